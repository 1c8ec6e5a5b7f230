"""`finetune-lisa`: the user's fine-tune with Lisa (Bi-State Optimisation + proximal term) as the
provider's fine-tuning-stage defense (Huang et al., NeurIPS 2024, arXiv 2405.18641; ALGORITHMS.md §3).

Same options and defaults as `finetune`, plus Lisa's knobs; writes the same run directory. The
alignment data is built like `align`'s (harmful prompt -> refusal plus a benign share).
"""

from __future__ import annotations

from typing import Annotated

import typer

from ftsafety.commands.common import (
    Data, Device, LoraTargets, MaxLen, Model, Out, Quiet, Resume, Seed, Template, Trust, Verbose,
    _common, _default_out, _done, _setup, _train_configs,
)


def finetune_lisa(
    model: Model = "smollm2-135m",
    data: Data = "builtin",
    task: Annotated[str, typer.Option(help="Benign task: sst2 | ag_news | gsm8k.")] = "sst2",
    n: Annotated[int, typer.Option("--n", help="Fine-tuning samples.")] = 1000,
    harmful_ratio: Annotated[
        float, typer.Option("--harmful-ratio", "-p", help="Share p of harmful samples.")
    ] = 0.1,
    template: Template = "alpaca",
    max_length: MaxLen = 256,
    epochs: float = 1.0,
    max_steps: Annotated[int, typer.Option(help="> 0 overrides --epochs.")] = -1,
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
    alignment_steps: Annotated[int, typer.Option(
        help="Steps per alignment state; they replace user steps (the user data fixes the total).")] = 100,
    finetune_steps: Annotated[int, typer.Option(help="Steps per fine-tuning state.")] = 900,
    rho: Annotated[float, typer.Option(help="Proximal intensity rho (0 = plain BSO).")] = 1.0,
    align_n: Annotated[int, typer.Option(
        help="Alignment examples, built as `align` builds them (0 = none: plain fine-tune).")] = 300,
    align_benign_ratio: Annotated[float, typer.Option(
        help="Share of benign pairs in the alignment examples (as `align --benign-ratio`).")] = 0.5,
    align_benign_task: Annotated[str, typer.Option(
        help="none, or the task whose rows make half of the benign pairs (as `align --benign-task`).")] = "none",
):
    """The user's fine-tune under Lisa: alternate alignment and fine-tuning states, pulled together by a
    proximal term. The step budget is set by the user data (--epochs / --max-steps): alignment steps
    take the place of user steps (the user batches of those steps are skipped), they are not extra."""
    opts = dict(locals())
    from ftsafety import stages

    _setup(verbose, quiet)
    tcfg, lora = _train_configs(opts)
    lisa = stages.LisaStage(alignment_steps=alignment_steps, finetune_steps=finetune_steps, rho=rho, align_n=align_n,
                            align_benign_ratio=align_benign_ratio, align_benign_task=align_benign_task)
    st = stages.FinetuneStage(method="lisa", task=task, n=n, harmful_ratio=harmful_ratio, train=tcfg, lora=lora,
                              lisa=lisa)
    out = out or _default_out("finetune-lisa", resume)
    _done(out, stages.finetune(st, model, out, _common(opts), resume=resume))


def register(app) -> None:
    app.command("finetune-lisa")(finetune_lisa)
