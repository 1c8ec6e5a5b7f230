"""The defenses, one module each, and the registry built from their declarations.

Each module ends with `DEFENSE = Defense(...)` (`ftsafety.defenses.base`); adding a defense is one
module and one line in `MODULES`. Stage dispatch, the recipe schema, the CLI commands and the
shared test matrix all read `DEFENSES`.
"""

from __future__ import annotations

import importlib

from ftsafety.defenses.base import Defense, Paper, TrainerSetup

MODULES: tuple[str, ...] = ("vaccine", "booster", "lisa", "antidote", "rollback")


def _load() -> dict[str, Defense]:
    out: dict[str, Defense] = {}
    for mod in MODULES:
        d = importlib.import_module(f"ftsafety.defenses.{mod}").DEFENSE
        if d.name in out:
            raise ValueError(f"two defenses are named {d.name!r}")
        out[d.name] = d
    return out


DEFENSES: dict[str, Defense] = _load()


def for_stage(stage: str) -> list[Defense]:
    """The defenses of one stage (align | finetune | post), in registry order."""
    return [d for d in DEFENSES.values() if d.stage == stage]


def register(defense: Defense) -> None:
    """Add a defense declared outside this package (a plugin, or a test's example defense)."""
    if defense.name in DEFENSES or defense.name in ("none", "sft"):
        raise ValueError(f"a defense named {defense.name!r} exists already")
    DEFENSES[defense.name] = defense


__all__ = ["DEFENSES", "Defense", "Paper", "TrainerSetup", "for_stage", "register"]
