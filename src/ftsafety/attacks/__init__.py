"""Harmful fine-tuning attacks, one module each, behind one registry (like the defenses).

An attack is a set of fine-tune settings an attacker controls: which knobs it searches (learning rate,
steps, harmful share, harmful count, LoRA rank) and which it fixes. `ftsafety attack-search` looks for
the most harmful setting of one attack that keeps the model useful. Adding an attack is one module with
an `ATTACK = Attack(...)` and one line in `MODULES`.
"""

from __future__ import annotations

import importlib

from ftsafety.attacks.base import KNOBS, Attack, Knob
from ftsafety.errors import FtsafetyError

MODULES: tuple[str, ...] = ("mix", "pure", "benign", "full")
ATTACKS: dict[str, Attack] = {}


def register(attack: Attack) -> Attack:
    if attack.name in ATTACKS:
        raise FtsafetyError(f"attack {attack.name!r} is registered twice")
    unknown = [k for k in attack.knobs if k not in KNOBS]
    if unknown:
        raise FtsafetyError(f"attack {attack.name!r}: unknown knobs {unknown}; known: {', '.join(KNOBS)}")
    ATTACKS[attack.name] = attack
    return attack


def get(name: str) -> Attack:
    if name not in ATTACKS:
        raise FtsafetyError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


for _m in MODULES:
    register(importlib.import_module(f"ftsafety.attacks.{_m}").ATTACK)

__all__ = ["ATTACKS", "KNOBS", "Attack", "Knob", "get", "register"]
