"""Alignment-stage defenses on the command line: `align-vaccine` (Vaccine, arXiv 2402.01109) and
`align-booster` (Booster, arXiv 2409.01586).

Both take every option of `align` (same defaults) plus their own knobs, train through the same
`train_lora` and write the same run directory, which `finetune` and `evaluate` accept as --model.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from ftsafety.commands.common import (
    BenignRatio,
    Data,
    Device,
    LoraTargets,
    MaxLen,
    MaxSteps,
    Model,
    Out,
    Quiet,
    Seed,
    Template,
    Trust,
    Verbose,
    _default_out,
    _done,
    _setup,
    _train_configs,
)

Rho = Annotated[float, typer.Option("--rho", help="Vaccine's rho: norm of the hidden-state perturbation.")]
N = Annotated[int, typer.Option("--n", help="Alignment examples (harmful prompt -> refusal, plus benign).")]


def _train(stage: str, o: dict, defense_cfg, trainer_cls, kwargs: dict, kwargs_fn=None, extra=None):
    """What `align` does (same data, config and run directory), with a defense's Trainer subclass
    plugged into `train_lora`. `o` holds the options shared with `align`."""
    from ftsafety import data as D
    from ftsafety.train import train_lora

    dcfg, tcfg, lora = _train_configs(o)
    examples = D.alignment_examples(dcfg, o["n"], o["benign_ratio"], o["seed"])
    extra = extra(dcfg) if callable(extra) else (extra or {})  # may read data: before the model loads
    out = o["out"] or _default_out(stage)
    summary = train_lora(
        stage=stage, parent=o["model"], examples=examples, out_dir=out, data_cfg=dcfg, train_cfg=tcfg, lora=lora,
        device=o["device"], trust_remote_code=o["trust_remote_code"], quiet=o["quiet"], trainer_cls=trainer_cls,
        trainer_kwargs=kwargs, trainer_kwargs_fn=kwargs_fn and (lambda **kw: kwargs_fn(dcfg, **kw)),
        extra_config={"benign_ratio": o["benign_ratio"], stage.split("-")[-1]: dataclasses.asdict(defense_cfg),
                      **extra},
    )
    _done(out, summary)


def align_vaccine(
    model: Model = "smollm2-135m",
    data: Data = "builtin",
    n: N = 300,
    benign_ratio: BenignRatio = 0.5,
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
    rho: Rho = 2.0,
    perturb_at: Annotated[
        str,
        typer.Option(
            help="attn: each attention module's output (authors' code) | layer: each decoder layer's output (paper)."
        ),
    ] = "attn",
    device: Device = "auto",
    out: Out = None,
    seed: Seed = 42,
    trust_remote_code: Trust = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Vaccine alignment: SFT under a worst-case hidden-state perturbation of norm rho (2 passes/step)."""
    opts = dict(locals())  # the options shared with `align`, by name
    from ftsafety.defenses.vaccine import VaccineConfig, VaccineTrainer

    _setup(verbose, quiet)
    cfg = VaccineConfig(rho=rho, perturb_at=perturb_at)
    _train("align-vaccine", opts, cfg, VaccineTrainer, dataclasses.asdict(cfg))


def align_booster(
    model: Model = "smollm2-135m",
    data: Data = "builtin",
    n: N = 300,
    benign_ratio: BenignRatio = 0.5,
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
    lam: Annotated[
        float, typer.Option("--lam", help="lambda: weight of the harmful-perturbation attenuation term.")
    ] = 5.0,
    alpha: Annotated[
        float, typer.Option("--alpha", help="alpha: step size of the simulated harmful perturbation.")
    ] = 0.1,
    perturb_aware: Annotated[
        bool,
        typer.Option(
            "--perturb-aware/--no-perturb-aware",
            help="Add Vaccine's perturbation to the alignment pass (4 passes/step).",
        ),
    ] = False,
    rho: Annotated[float, typer.Option("--rho", help="Vaccine's rho, used with --perturb-aware.")] = 5.0,
    device: Device = "auto",
    out: Out = None,
    seed: Seed = 42,
    trust_remote_code: Trust = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Booster alignment: SFT plus a term damping the loss drop of a simulated harmful step (3 passes/step)."""
    opts = dict(locals())  # the options shared with `align`, by name
    from ftsafety import data as D
    from ftsafety.defenses.booster import BoosterConfig, BoosterTrainer, harmful_dataset

    _setup(verbose, quiet)
    cfg = BoosterConfig(lam=lam, alpha=alpha, perturb_aware=perturb_aware, rho=rho)
    _train(
        "align-booster", opts, cfg, BoosterTrainer, dataclasses.asdict(cfg),
        kwargs_fn=lambda dcfg, tokenizer, model: {"harmful_dataset": harmful_dataset(dcfg, tokenizer)},
        extra=lambda dcfg: {"n_harmful": len(D.harmful_examples(dcfg, "calibration")), "harmful_split": "calibration"},
    )


def register(app: typer.Typer) -> None:
    app.command("align-vaccine")(align_vaccine)
    app.command("align-booster")(align_booster)
