"""The `ftsafety` command line: thin Typer commands over library functions.

Every user error becomes one line on stderr and a non-zero exit, never a traceback
(set FTSAFETY_DEBUG=1 to see one)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ftsafety import __version__
from ftsafety.errors import FtsafetyError

app = typer.Typer(
    name="ftsafety", help="Defenses against harmful fine-tuning of LLMs, one pipeline and one evaluator.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

from ftsafety.commands.common import (  # noqa: E402  shared option aliases and helpers
    BenignRatio, BenignTask, Data, Device, LoraTargets, MaxLen, MaxSteps, Model, Out, Quiet, Resume, Seed, Template, Trust, Verbose,
    _common, _default_out, _done, _setup, _train_configs,
)


@app.command()
def align(
    model: Model = "smollm2-135m",
    data: Data = "builtin",
    n: Annotated[int, typer.Option("--n", help="Alignment examples (harmful prompt -> refusal, plus benign).")] = 300,
    benign_ratio: BenignRatio = 0.5,
    benign_task: BenignTask = "none",
    template: Template = "alpaca",
    max_length: MaxLen = 256,
    epochs: float = 2.0,
    max_steps: MaxSteps = -1,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 1e-3,
    scheduler: str = "cosine",
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.1,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: LoraTargets = "attn",
    device: Device = "auto",
    out: Out = None,
    resume: Resume = False,
    seed: Seed = 42,
    trust_remote_code: Trust = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """SFT safety alignment: train a LoRA on (harmful prompt, refusal) pairs."""
    opts = dict(locals())
    from ftsafety import stages

    _setup(verbose, quiet)
    tcfg, lora = _train_configs(opts)
    st = stages.AlignStage(method="sft", n=n, benign_ratio=benign_ratio, benign_task=benign_task, train=tcfg, lora=lora)
    out = out or _default_out("align", resume)
    _done(out, stages.align(st, model, out, _common(opts), resume=resume))


@app.command()
def finetune(
    model: Model = "smollm2-135m",
    data: Data = "builtin",
    task: Annotated[str, typer.Option(help="Benign task: sst2 | ag_news | gsm8k.")] = "sst2",
    n: Annotated[int, typer.Option("--n", help="Fine-tuning samples.")] = 1000,
    harmful_ratio: Annotated[float, typer.Option("--harmful-ratio", "-p", help="Share p of harmful samples.")] = 0.1,
    template: Template = "alpaca",
    max_length: MaxLen = 256,
    epochs: float = 1.0,
    max_steps: MaxSteps = -1,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 1e-4,
    scheduler: str = "constant",
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: LoraTargets = "attn",
    device: Device = "auto",
    out: Out = None,
    resume: Resume = False,
    seed: Seed = 42,
    trust_remote_code: Trust = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """The user's fine-tune (the attack at p > 0): merge the model's adapters, train a new LoRA on the mix."""
    opts = dict(locals())
    from ftsafety import stages

    _setup(verbose, quiet)
    tcfg, lora = _train_configs(opts)
    st = stages.FinetuneStage(method="sft", task=task, n=n, harmful_ratio=harmful_ratio, train=tcfg, lora=lora)
    out = out or _default_out("finetune", resume)
    _done(out, stages.finetune(st, model, out, _common(opts), resume=resume))


@app.command()
def evaluate(
    model: Model = "smollm2-135m",
    data: Data = "builtin",
    task: Annotated[str, typer.Option(help="sst2 | ag_news | gsm8k | none.")] = "sst2",
    judge: Annotated[str, typer.Option(help="keyword | compliance | beaver-dam[:path] | llama-guard[:path] | classifier:<id-or-path>.")] = "keyword",
    hs_limit: Annotated[int, typer.Option(help="Harmful prompts to score (0 skips HS).")] = 700,
    fa_limit: Annotated[int, typer.Option(help="Task test items (0 skips FA).")] = 872,
    or_limit: Annotated[int, typer.Option(help="Benign instructions for over-refusal (0 skips OR).")] = 100,
    template: Template = "alpaca",
    batch_size: int = 64,
    max_new_tokens: int = 128,
    fa_max_new_tokens: int = 32,
    device: Device = "auto",
    out: Out = None,
    seed: Seed = 42,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Harmful score (HS, HS+), fine-tune accuracy (FA) and over-refusal (OR) of a model or run."""
    from ftsafety import data as D
    from ftsafety.evaluation.evaluate import EvalConfig, evaluate as run_eval

    _setup(verbose, quiet)
    cfg = EvalConfig(model=model, data=D.DataConfig(data=data, template=template), task=task, judge=judge,
                     hs_limit=hs_limit, fa_limit=fa_limit, or_limit=or_limit, batch_size=batch_size,
                     max_new_tokens=max_new_tokens, fa_max_new_tokens=fa_max_new_tokens, device=device, seed=seed)
    out = out or _default_out("evaluate")
    run_eval(cfg, out, quiet=quiet)
    typer.echo(f"results written to {out}/results.json")


@app.command()
def summary(runs: Annotated[list[Path], typer.Argument(help="Evaluation run directories (each holds results.json).")]):
    """One table (and its Markdown) from several evaluation runs: HS before and after each stage."""
    import json

    from rich.table import Table

    from ftsafety.console import console

    rows = []
    for run in runs:
        path = run / "results.json"
        if not path.is_file():
            raise FtsafetyError(f"{run}: no results.json (not an evaluate run, or it did not finish)")
        try:
            res = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FtsafetyError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)})") from exc
        if not isinstance(res, dict):
            raise FtsafetyError(f"{path}: not an evaluation result (expected a JSON object)")
        rows.append((run, res))
    table = Table(title="ftsafety summary")
    cols = ("run", "model", "judge", "HS %", "HS+ %", "FA %", "OR %")
    for c in cols:
        table.add_column(c, justify="left" if c in ("run", "model", "judge") else "right")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for run, r in rows:
        cells = [run.name, str(r.get("model", "")), r.get("judge", {}).get("name", "")] + [
            f"{r[k]:.1f}" if k in r else "-" for k in ("hs", "hs_plus", "fa", "or")
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
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
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False):
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def _register_commands() -> None:
    """Stage commands that live in their own modules (one module per defense family)."""
    from ftsafety.commands import register_all

    register_all(app)


_register_commands()


def _one_line(message: str) -> str:
    """An error message as the single stderr line the CLI promises (inner newlines become spaces)."""
    return " ".join(part.strip() for part in message.strip().splitlines() if part.strip()) or "unknown error"


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
        typer.secho(last.hint if last is not None else "interrupted: nothing half-written was left behind",
                    err=True, fg="yellow")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except Exception as exc:  # usage errors (typer's own click) and unexpected failures
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # bad option value, unknown option
            ctx = getattr(exc, "ctx", None)
            where = f" ({ctx.command_path})" if ctx is not None else ""
            typer.secho(f"error: {_one_line(exc.format_message())}{where}", err=True, fg="red")
            sys.exit(exc.exit_code or 2)
        if type(exc).__name__ == "Abort":
            sys.exit(130)
        if os.environ.get("FTSAFETY_DEBUG"):
            raise
        msg = (str(exc).strip().splitlines() or [""])[0][:300]
        typer.secho(f"error: {type(exc).__name__}: {msg} (set FTSAFETY_DEBUG=1 for the traceback)", err=True, fg="red")
        sys.exit(1)


if __name__ == "__main__":
    main()
