"""What an attack is: the fine-tune knobs it searches (with their ranges) and the settings it fixes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ftsafety.errors import FtsafetyError


@dataclass(frozen=True)
class Knob:
    """One searchable fine-tune setting: the recipe key it sets and how it is sampled."""

    key: str  # dotted recipe key
    kind: str  # "log" (float, log scale) | "float" | "int" | "choice"
    help: str


KNOBS: dict[str, Knob] = {
    "lr": Knob("finetune.train.lr", "log", "learning rate (log scale)"),
    "steps": Knob("finetune.train.max_steps", "int", "optimizer steps"),
    "p": Knob("finetune.harmful_ratio", "float", "harmful share of the fine-tuning set"),
    "n": Knob("finetune.n", "int", "fine-tuning examples (with p = 1: harmful ones)"),
    "lora_r": Knob("finetune.lora.r", "choice", "LoRA rank (choices)"),
}


def _number(v):
    """A bound as written in YAML (which reads 1e-5 as text) or on the command line: a number, else v."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return v
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v) if v == int(v) else v
    return v


def check_range(name: str, values, knob: Knob) -> list:
    """A knob's range from a recipe or the command line: [low, high] (low <= high), or the choices."""
    if not isinstance(values, (list, tuple)) or not values:
        raise FtsafetyError(f"attack_search.space.{name}: give a list, [low, high] or the choices; got {values!r}")
    values = [_number(v) for v in values]
    if knob.kind == "choice":
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise FtsafetyError(f"attack_search.space.{name}: choices must be integers >= 1, got {values!r}")
        return sorted(set(values))
    if len(values) != 2:
        raise FtsafetyError(f"attack_search.space.{name}: give [low, high], got {values!r}")
    lo, hi = values
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)):
        raise FtsafetyError(f"attack_search.space.{name}: bounds must be finite numbers, got {values!r}")
    if lo > hi:
        raise FtsafetyError(f"attack_search.space.{name}: the range [{lo:g}, {hi:g}] is inverted (low > high)")
    if knob.kind == "log" and lo <= 0:
        raise FtsafetyError(f"attack_search.space.{name}: a log-scale range must be above 0, got [{lo:g}, {hi:g}]")
    if knob.kind == "int":
        if lo != int(lo) or hi != int(hi) or lo < 1:
            raise FtsafetyError(f"attack_search.space.{name}: bounds must be integers >= 1, got {values!r}")
        return [int(lo), int(hi)]
    if name == "p" and not (0.0 <= lo and hi <= 1.0):
        raise FtsafetyError(f"attack_search.space.p: a harmful share lies in [0, 1], got [{lo:g}, {hi:g}]")
    return [float(lo), float(hi)]


@dataclass(frozen=True)
class Attack:
    """A harmful fine-tuning attack: its searched knobs with default ranges, and its fixed settings."""

    name: str
    summary: str
    space: dict[str, list]  # knob -> default range ([low, high], or the choices for lora_r)
    fixed: dict[str, Any] = field(default_factory=dict)  # dotted recipe key -> value

    @property
    def knobs(self) -> tuple[str, ...]:
        return tuple(self.space)

    def resolve_space(self, given: dict[str, list] | None) -> dict[str, list]:
        """The default ranges with `given` ones replacing them; a knob this attack does not search is an error."""
        given = dict(given or {})
        unknown = [k for k in given if k not in self.space]
        if unknown:
            known = ", ".join(self.space)
            raise FtsafetyError(f"attack {self.name!r} does not search {', '.join(map(repr, unknown))}; its knobs: "
                                f"{known}" + (" (p is fixed by this attack)" if "p" in unknown and "p" in KNOBS else ""))
        return {k: check_range(k, given.get(k, v), KNOBS[k]) for k, v in self.space.items()}

    def overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """The recipe keys a trial with `params` sets (its knobs, then the attack's fixed settings)."""
        return {**{KNOBS[k].key: v for k, v in params.items()}, **self.fixed}
