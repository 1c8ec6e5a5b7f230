"""CLI commands grouped by stage; each module exposes `register(app)`."""

from __future__ import annotations

import importlib

# One entry per command module (explicit and greppable; add a line when a module is added).
COMMAND_MODULES: tuple[str, ...] = ("stage", "pipeline", "judge", "analysis", "attack")


def register_all(app) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"ftsafety.commands.{name}").register(app)
