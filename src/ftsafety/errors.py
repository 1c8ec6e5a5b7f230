"""The one exception type the CLI turns into a one-line message (never a traceback)."""


class FtsafetyError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class DataError(FtsafetyError):
    """Bad data: names the file and line where it can."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}")
        self.path, self.line = path, line
