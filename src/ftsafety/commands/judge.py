"""`ftsafety train-judge`: fit the learned judge (`ftsafety-judge`) on a labelled set's training split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ftsafety.commands.common import Verbose, _setup
from ftsafety.errors import FtsafetyError


def _numbers(text: str, kind, flag: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FtsafetyError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise FtsafetyError(f"{flag} takes comma-separated numbers, got {text!r}")
    return values


def train_judge(
    labels: Annotated[Path, typer.Option("--labels", help="Labelled pairs (JSONL; see tests/data/judge/).")]
    = Path("tests/data/judge/labels.jsonl"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Judge directory to write (make judge: the package's).")]
    = Path("runs/ftsafety-judge"),
    data: Annotated[Optional[str], typer.Option(
        "--data", help="A data directory whose prompts/ holds the gated sets the labels refer to.")] = None,
    base: Annotated[str, typer.Option("--base", help="The model whose first layers read each pair.")] = "smollm2-135m",
    layers: Annotated[str, typer.Option("--layers", help="Candidate numbers of decoder layers (cross-validated).")]
    = "4,6,8",
    l2: Annotated[str, typer.Option("--l2", help="Candidate L2 strengths of the head (cross-validated).")]
    = "0.001,0.003,0.01,0.03,0.1",
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds, grouped by prompt.")] = 5,
    verbose: Verbose = False,
):
    """Fit ftsafety-judge on the labels' train split: features of the base model's first layers,
    a logistic-regression head, layers and L2 chosen by cross-validation; deterministic."""
    from ftsafety.evaluation.judge_train import train_judge as fit

    _setup(verbose, False)
    fit(labels, out, data=data, base=base, layers=_numbers(layers, int, "--layers"), l2_grid=_numbers(l2, float, "--l2"),
        folds=folds, echo=typer.echo)


def register(app: typer.Typer) -> None:
    app.command("train-judge")(train_judge)
