"""Option aliases for the commands that are not generated from config dataclasses (run, report)."""

from __future__ import annotations

from typing import Annotated

import typer

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.", metavar="")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.", metavar="")]


def _setup(verbose: bool, quiet: bool) -> None:
    from ftsafety.console import setup_logging

    setup_logging(verbose, quiet)
