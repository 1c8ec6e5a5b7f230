"""`ftsafety recover-rollback`: the LLMAlignment post-fine-tuning defense (IEEE S&P 2025, ALGORITHMS.md §5).

Copies a sparse set of aligned weights back into the fine-tuned model (gradient of -cos to the aligned
model's harmful direction), with rollback when the task score drops; the algorithm, its defaults and
where it differs from `kangyangWHU/LLMAlignment` are in `ftsafety.defenses.rollback`. Thin wrapper.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ftsafety.commands.common import (
    Data, Device, Out, Quiet, Seed, Template, Trust, Verbose, _default_out, _setup,
)

_F = "Fine-tuned model F: a finetune run, model dir, alias or hub id."
_A = "Aligned model A: an align run, model dir, alias or hub id."
_TASK = "Task of the fine-tune; its FA guards the rollback: sst2 | ag_news | gsm8k."
_LAYER = "K: hidden state after decoder layer K-1; layers < K are searched (default floor(2L/3))."
_DROP = "Relative FA drop allowed: a checkpoint needs FA > (1 - drop) * FA(F)."
_VAL = "Validation rows for FA: the LAST rows of the task's train split (the fine-tune uses the first)."


def recover_rollback(
    model: Annotated[str, typer.Option("--model", "-m", help=_F)],
    aligned: Annotated[str, typer.Option("--aligned", help=_A)],
    data: Data = "builtin",
    task: Annotated[str, typer.Option(help=_TASK)] = "sst2",
    template: Template = "alpaca",
    max_length: Annotated[int, typer.Option("--max-length", help="Prompt tokens kept (the tail).")] = 512,
    layer: Annotated[Optional[int], typer.Option(help=_LAYER)] = None,
    recovery_rate: Annotated[float, typer.Option(help="Share of weights restored per step.")] = 0.002,
    rollback_rate: Annotated[float, typer.Option(help="Share of restored candidates reset to F.")] = 0.2,
    steps: Annotated[int, typer.Option(help="Recover steps.")] = 20,
    warmup_steps: Annotated[int, typer.Option(help="Steps before the check that may start rollback.")] = 5,
    save_every: Annotated[int, typer.Option(help="Checkpoint (and task check) every N steps.")] = 5,
    metric_drop: Annotated[float, typer.Option(help=_DROP)] = 0.05,
    recovery_n: Annotated[int, typer.Option(help="Harmful (and task) prompts for the directions.")] = 64,
    val_n: Annotated[int, typer.Option(help=_VAL)] = 100,
    batch_size: Annotated[int, typer.Option(help="Prompts per gradient batch.")] = 8,
    fa_max_new_tokens: Annotated[int, typer.Option(help="Generated tokens per validation answer.")] = 16,
    device: Device = "auto",
    out: Out = None,
    seed: Seed = 42,
    trust_remote_code: Trust = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Post-fine-tuning: restore a sparse set of aligned weights; roll back if task accuracy drops."""
    from ftsafety import data as D
    from ftsafety.defenses.rollback import RollbackConfig, run
    from ftsafety.errors import FtsafetyError

    _setup(verbose, quiet)
    if fa_max_new_tokens < 1:
        raise FtsafetyError("--fa-max-new-tokens must be >= 1")
    if task not in D.TASKS:
        raise FtsafetyError(f"unknown task {task!r}; choose one of {', '.join(D.TASKS)}")
    dcfg = D.DataConfig(data=data, template=template, max_length=max_length)
    cfg = RollbackConfig(layer=layer, recovery_rate=recovery_rate, rollback_rate=rollback_rate, steps=steps,
                         warmup_steps=warmup_steps, save_every=save_every, metric_drop=metric_drop,
                         recovery_n=recovery_n, batch_size=batch_size, max_length=max_length)
    out = out or _default_out("recover-rollback")
    rep = run(model=model, aligned=aligned, out_dir=out, dcfg=dcfg, task=task, cfg=cfg, val_n=val_n,
              fa_max_new_tokens=fa_max_new_tokens, device=device, seed=seed,
              trust_remote_code=trust_remote_code)
    changed = next((c["changed"] for c in rep["checkpoints"] if c["step"] == rep["chosen_step"]), 0)
    typer.echo(
        f"recover-rollback: {len(rep['steps'])} steps, {rep['seconds_total']:.0f}s, rollback mode "
        f"{'on' if rep['rollback_mode'] else 'off'}, FA(F) {rep['metric']['finetuned']:.1f}, chose step "
        f"{rep['chosen_step']} ({changed} weights differ from F); wrote {out} (pass it as --model to evaluate)"
    )


def register(app) -> None:
    app.command("recover-rollback")(recover_rollback)
