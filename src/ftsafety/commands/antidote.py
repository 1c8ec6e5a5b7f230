"""`ftsafety prune-antidote`: Antidote's post-fine-tuning one-shot pruning (ALGORITHMS.md §4).

Huang et al., ICML 2025, arXiv 2408.09600; the algorithm and its differences from the original code
are described in `ftsafety.defenses.antidote`. This module only parses options.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ftsafety.commands.common import (
    Data, Device, LoraTargets, MaxLen, Model, Out, Quiet, Seed, Template, Trust, Verbose, _default_out,
    _setup,
)


def prune_antidote(
    model: Model,
    data: Data = "builtin",
    template: Template = "alpaca",
    max_length: MaxLen = 256,
    ratio: Annotated[float, typer.Option(help="alpha: share of scored weights to zero (dense_ratio).")] = 0.1,
    target: Annotated[str, typer.Option(help="lora: the fine-tune LoRA's A/B (code) | dense.")] = "lora",
    scope: Annotated[str, typer.Option(help="row: top-alpha per row (code) | global (paper).")] = "row",
    calibration_n: Annotated[int, typer.Option(help="Harmful calibration pairs; 0 = |W| only.")] = 500,
    batch_size: Annotated[int, typer.Option(help="Calibration forward batch size.")] = 8,
    dense_targets: LoraTargets = "qkv",
    device: Device = "auto",
    out: Out = None,
    seed: Seed = 42,
    trust_remote_code: Trust = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Antidote: zero the weights with the highest Wanda score on harmful data, after fine-tuning."""
    from ftsafety import data as D
    from ftsafety.defenses.antidote import AntidoteConfig, run_antidote

    _setup(verbose, quiet)
    cfg = AntidoteConfig(
        ratio=ratio, target=target, scope=scope, calibration_n=calibration_n, batch_size=batch_size,
        dense_targets=dense_targets,
    )
    dcfg = D.DataConfig(data=data, template=template, max_length=max_length)
    out = out or _default_out("prune-antidote")
    s = run_antidote(
        cfg, model, dcfg, out, device=device, seed=seed, trust_remote_code=trust_remote_code, quiet=quiet
    )
    typer.echo(
        f"prune-antidote: zeroed {s['zeroed']} of {s['numel']} weights ({100 * s['zeroed_fraction']:.2f}%) "
        f"in {s['n_tensors']} tensors; calibration {s['calibration_seconds']:.1f}s on {s['n_calibration']} "
        f"samples; wrote {out} (pass it as --model to evaluate)"
    )


def register(app) -> None:
    app.command("prune-antidote")(prune_antidote)
