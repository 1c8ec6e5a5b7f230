"""Alignment-stage defenses on the command line: `align-vaccine` (Vaccine, arXiv 2402.01109) and
`align-booster` (Booster, arXiv 2409.01586).

Both take every option of `align` (same defaults) plus their own knobs, train through the same
`train_lora` and write the same run directory, which `finetune` and `evaluate` accept as --model.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ftsafety.commands.common import (
    BenignRatio,
    BenignTask,
    Data,
    Device,
    LoraTargets,
    MaxLen,
    MaxSteps,
    Model,
    Out,
    Quiet,
    Resume,
    Seed,
    Template,
    Trust,
    Verbose,
    _default_out,
    _done,
    _setup,
    _common,
    _train_configs,
)

Rho = Annotated[float, typer.Option("--rho", help="Vaccine's rho: norm of the hidden-state perturbation.")]
N = Annotated[int, typer.Option("--n", help="Alignment examples (harmful prompt -> refusal, plus benign).")]


def _train(method: str, o: dict, **defense) -> None:
    """What `align` does (same data, config and run directory) with an alignment-stage defense."""
    from ftsafety import stages

    tcfg, lora = _train_configs(o)
    st = stages.AlignStage(method=method, n=o["n"], benign_ratio=o["benign_ratio"], benign_task=o["benign_task"],
                           train=tcfg, lora=lora, **defense)
    out = o["out"] or _default_out(f"align-{method}", o["resume"])
    _done(out, stages.align(st, o["model"], out, _common(o), resume=o["resume"]))


def align_vaccine(
    model: Model = "smollm2-135m",
    data: Data = "builtin",
    n: N = 300,
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
    rho: Rho = 2.0,
    perturb_at: Annotated[
        str,
        typer.Option(
            help="attn: each attention module's output (authors' code) | layer: each decoder layer's output (paper)."
        ),
    ] = "attn",
    device: Device = "auto",
    out: Out = None,
    resume: Resume = False,
    seed: Seed = 42,
    trust_remote_code: Trust = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Vaccine alignment: SFT under a worst-case hidden-state perturbation of norm rho (2 passes/step)."""
    opts = dict(locals())  # the options shared with `align`, by name
    from ftsafety.defenses.vaccine import VaccineConfig

    _setup(verbose, quiet)
    _train("vaccine", opts, vaccine=VaccineConfig(rho=rho, perturb_at=perturb_at))


def align_booster(
    model: Model = "smollm2-135m",
    data: Data = "builtin",
    n: N = 300,
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
    resume: Resume = False,
    seed: Seed = 42,
    trust_remote_code: Trust = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Booster alignment: SFT plus a term damping the loss drop of a simulated harmful step (3 passes/step)."""
    opts = dict(locals())  # the options shared with `align`, by name
    from ftsafety.defenses.booster import BoosterConfig

    _setup(verbose, quiet)
    _train("booster", opts, booster=BoosterConfig(lam=lam, alpha=alpha, perturb_aware=perturb_aware, rho=rho))


def register(app: typer.Typer) -> None:
    app.command("align-vaccine")(align_vaccine)
    app.command("align-booster")(align_booster)
