"""CLI commands grouped by stage; each module exposes `register(app)`."""

from __future__ import annotations

import importlib
import importlib.util

# One entry per command module (explicit and greppable; add a line when a module is added).
COMMAND_MODULES: tuple[str, ...] = ("alignment", "lisa", "antidote", "rollback", "pipeline")


def register_all(app) -> None:
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(f"ftsafety.commands.{name}") is None:  # module still being written
            continue
        importlib.import_module(f"ftsafety.commands.{name}").register(app)
