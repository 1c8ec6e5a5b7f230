"""Option aliases and helpers shared by every command (defined once, as the hf CLI does)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

Model = Annotated[str, typer.Option("--model", "-m", help="Alias, hub id, model directory or ftsafety run directory.")]
Data = Annotated[str, typer.Option("--data", help="builtin | hub | a directory laid out like ../shared/data.")]
Template = Annotated[str, typer.Option(help="alpaca (Booster/Antidote) | alpaca-vaccine (Vaccine/Lisa) | chat.")]
MaxLen = Annotated[int, typer.Option("--max-length", help="Maximum training sequence length in tokens.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (fp32 on CPU, bf16 on CUDA).")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory to write (default runs/<command>-<time>).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of an interrupted run with the same --out.")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
Trust = Annotated[bool, typer.Option("--trust-remote-code", help="Run code shipped with a hub model (off by default).")]
LoraTargets = Annotated[str, typer.Option(help="attn | qv | qkv | all | comma-separated module names.")]
MaxSteps = Annotated[int, typer.Option(help="> 0 overrides --epochs.")]
BenignRatio = Annotated[float, typer.Option(help="Share of benign instruction/answer pairs mixed in.")]
BenignTask = Annotated[str, typer.Option(
    help="none, or a task (sst2, ag_news, gsm8k) whose training rows (with an Input section) make half "
         "of the benign share.")]

_TRAIN_KEYS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "scheduler", "warmup_ratio", "weight_decay", "seed")


def _setup(verbose: bool, quiet: bool) -> None:
    from ftsafety.console import setup_logging

    setup_logging(verbose, quiet)


def _default_out(command: str, resume: bool = False) -> Path:
    if resume:  # a fresh default name never holds the interrupted run
        from ftsafety.errors import FtsafetyError

        raise FtsafetyError("--resume needs --out: the run directory the interrupted command was writing")
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def _train_configs(opts: dict):
    """(TrainConfig, LoraSettings) from the options every training command shares, by name."""
    from ftsafety.train import TrainConfig

    tcfg = TrainConfig(**{k: opts[k] for k in _TRAIN_KEYS})
    return tcfg, _lora(opts["lora_r"], opts["lora_alpha"], opts["lora_dropout"], opts["lora_targets"])


def _common(opts: dict):
    """stages.Common (data, device, seed, trust flag) from the options every stage command shares."""
    from ftsafety.data import DataConfig
    from ftsafety.stages import Common

    return Common(data=DataConfig(data=opts["data"], template=opts["template"], max_length=opts["max_length"]),
                  device=opts["device"], seed=opts["seed"], trust_remote_code=opts["trust_remote_code"],
                  quiet=opts["quiet"])


def _lora(r, alpha, dropout, targets):
    from ftsafety.models import LoraSettings

    return LoraSettings(r=r, alpha=alpha, dropout=dropout, targets=targets)


def _done(out: Path, summary: dict) -> None:
    typer.echo(
        f"{summary['stage']}: {summary['steps']} steps, {summary['seconds']:.0f}s, loss {summary['train_loss']:.4f}; "
        f"wrote {out} (pass it as --model to the next stage)"
    )
