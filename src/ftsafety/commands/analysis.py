"""`ftsafety drift`: how far a fine-tune moved a model (Vaccine's embedding drift and the weights' distance)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ftsafety.commands.common import Verbose, _setup


def drift(
    reference: Annotated[str, typer.Argument(help="The model before: an align run, model dir or alias.")],
    model: Annotated[str, typer.Argument(help="The model after: its fine-tune run (or any model of the same base).")],
    n: Annotated[int, typer.Option("--n", help="Alignment examples (harmful prompt -> refusal) to measure on.")] = 64,
    data: Annotated[str, typer.Option("--data", help="builtin | hub | a data directory.")] = "builtin",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward pass.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the figures to this JSON file.")] = None,
    verbose: Verbose = False,
):
    """Vaccine's embedding drift (attention outputs and last hidden state, per token, on alignment data) of
    MODEL against REFERENCE, and the distance between their weights."""
    from ftsafety.data import DataConfig
    from ftsafety.evaluation.drift import embedding_drift
    from ftsafety.utils import atomic_write_text

    _setup(verbose, False)
    res = embedding_drift(reference, model, DataConfig(data=data), n=n, batch_size=batch_size, device=device)
    typer.echo(f"embedding drift over {res['examples']} alignment examples ({res['tokens']} tokens): attention outputs "
               f"{res['attn_drift']:.4g} per token ({100 * res['attn_drift_relative']:.2f}% of their norm), last hidden "
               f"state {res['final_drift']:.4g} ({100 * res['final_drift_relative']:.2f}%); weights moved "
               f"{res['weight_distance']:.4g} ({100 * res['weight_distance_relative']:.3f}% of their norm)")
    if out is not None:
        atomic_write_text(out, json.dumps(res, indent=2) + "\n")
        typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("drift")(drift)
