"""The one exception type the CLI turns into a one-line message (never a traceback)."""


class FtsafetyError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class DataError(FtsafetyError):
    """Bad data: names the file and line where it can."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}")
        self.path, self.line = path, line


# Strengths and rates far beyond any useful setting overflow float32 inside the training step (rho 1e308,
# lr 1e308, LoRA alpha 1e308): they are refused where they are set, naming the knob.
MAX_KNOB = 1e6


def check_number(what: str, value, low: float = 0.0, high: float = MAX_KNOB, low_open: bool = False) -> None:
    """`value` must be a finite number in [low, high] ((low, high] with `low_open`); one line naming `what`."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise FtsafetyError(f"{what} must be a finite number in {bounds}, got {value}")
