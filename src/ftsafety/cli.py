"""The `ftsafety` command line: thin Typer commands over library functions.

Every user error becomes one line on stderr and a non-zero exit, never a traceback
(set FTSAFETY_DEBUG=1 to see one)."""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from ftsafety import __version__
from ftsafety.errors import FtsafetyError

app = typer.Typer(
    name="ftsafety", help="Defenses against harmful fine-tuning of LLMs, one pipeline and one evaluator.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register_commands() -> None:
    """The stage commands (generated from the defense registry) and `run`/`report`, in their modules."""
    from ftsafety.commands import register_all

    register_all(app)


_register_commands()


@app.command()
def summary(runs: Annotated[list[Path], typer.Argument(help="Evaluation run directories (each holds results.json).",
                                                      metavar="RUN_DIR")]):
    """One table (and its Markdown) from several evaluation runs: HS before and after each stage."""
    from rich.markup import escape
    from rich.table import Table

    from ftsafety.console import console
    from ftsafety.report import _md, check_results, read_json_object

    rows = []
    for run in runs:
        path = run / "results.json"
        if not path.is_file():
            raise FtsafetyError(f"{run}: no results.json (not an evaluate run, or it did not finish)")
        res = read_json_object(path, "evaluation result")
        check_results(path, res)
        rows.append((run, res))
    table = Table(title="ftsafety summary")
    cols = ("run", "model", "judge", "HS %", "CR %", "HS+ %", "FA %", "OR %")
    for c in cols:
        table.add_column(c, justify="left" if c in ("run", "model", "judge") else "right")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for run, r in rows:
        cells = [run.name, str(r.get("model", "")), r.get("judge", {}).get("name", "")] + [
            f"{r[k]:.1f}" if r.get(k) is not None else "-" for k in ("hs", "cr", "hs_plus", "fa", "or")
        ]
        table.add_row(*map(escape, cells))
        md.append("| " + " | ".join(map(_md, cells)) + " |")
    console.print(table)
    typer.echo("\n".join(md))


@app.command("models")
def list_models():
    """List the model aliases `--model` accepts."""
    from ftsafety.models import ALIASES

    for alias, what in ALIASES.items():
        typer.echo(f"{alias:16s} {what}")


@app.command()
def env():
    """Versions, device and git hash, the supported dependency ranges and the locked set, for bug reports."""
    import json

    from ftsafety.utils import dependency_report, environment

    typer.echo(json.dumps({**environment(), "dependencies": dependency_report()}, indent=2))


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.", metavar="")] = False):
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def _one_line(message: str) -> str:
    """An error message as the single stderr line the CLI promises (inner newlines become spaces)."""
    return " ".join(part.strip() for part in message.strip().splitlines() if part.strip()) or "unknown error"


_DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EMFILE: "too many open files"}


_RERUN = ("rerun the same command (a training stage continues from its last checkpoint with --resume; "
          "ftsafety run resumes by itself); nothing half-written was left as a run")


def _command() -> str:
    return next((a for a in sys.argv[1:] if not a.startswith("-")), "")


def _os_problem(exc: BaseException) -> str | None:
    """A file-system failure anywhere in the exception's chain (torch and safetensors wrap them), as a line
    that says what to do; None for anything else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
            where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
            return f"{_DISK_ERRORS[exc.errno]}{where}: free space or fix the permissions, then {_RERUN}"
        if "No space left on device" in str(exc) or "file write failed" in str(exc):
            return f"no space left on the device: free space, then {_RERUN}"
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
            name = os.fspath(exc.filename)[:60] if getattr(exc, "filename", None) else "a path"
            return f"file name too long: {name}... (a name holds at most 255 bytes); choose a shorter one"
        exc = exc.__cause__ or exc.__context__
    return None


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _flag_value_hint(exc: BaseException) -> str:
    """`--resume true` is a flag followed by a stray word: say that flags take no value."""
    m = re.search(r"unexpected extra argument(?:s|\(s\))? \((\S+)", str(exc.format_message()))
    word = m.group(1).rstrip(")") if m else ""
    if word.lower() not in _BOOL_WORDS:
        return ""
    args = sys.argv[1:]
    flags = [a for a, b in zip(args, args[1:]) if b == word and a.startswith("-")]
    flag = flags[0] if flags else "--resume"
    return f"; flags take no value: write the flag alone ({flag}, not {flag} {word})"


def main() -> None:
    """Console entry point: one-line errors, non-zero exits."""
    try:
        rc = app(standalone_mode=False, prog_name="ftsafety")
        if rc == 130:  # typer turns a Ctrl-C into this return value (its Exit(130)) instead of raising it
            raise KeyboardInterrupt
    except FtsafetyError as exc:
        typer.secho(f"error: {_one_line(str(exc))}", err=True, fg="red")
        sys.exit(2)
    except KeyboardInterrupt:  # a training stage left a hint on how to resume (ftsafety.train.TrainingInterrupted)
        train = sys.modules.get("ftsafety.train")
        last = getattr(getattr(train, "TrainingInterrupted", None), "last", None)
        typer.secho(last.hint_for(pipeline=_command() == "run") if last is not None
                    else "interrupted: nothing half-written was left behind", err=True, fg="yellow")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except Exception as exc:  # usage errors (typer's own click) and unexpected failures
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `ftsafety` (or a bare group): the help was printed
            sys.exit(0)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # bad option value, unknown option
            ctx = getattr(exc, "ctx", None)
            where = f" ({ctx.command_path})" if ctx is not None else ""
            typer.secho(f"error: {_one_line(exc.format_message())}{where}{_flag_value_hint(exc)}", err=True, fg="red")
            sys.exit(exc.exit_code or 2)
        if type(exc).__name__ == "Abort":
            sys.exit(130)
        if os.environ.get("FTSAFETY_DEBUG"):
            raise
        problem = _os_problem(exc)
        if problem is not None:
            typer.secho(f"error: {problem}", err=True, fg="red")
            sys.exit(2)
        msg = (str(exc).strip().splitlines() or [""])[0][:300]
        typer.secho(f"error: {type(exc).__name__}: {msg} (set FTSAFETY_DEBUG=1 for the traceback)", err=True, fg="red")
        sys.exit(1)


if __name__ == "__main__":
    main()
