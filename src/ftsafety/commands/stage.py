"""The stage commands, generated from the registry and the config dataclasses.

    align, align-<defense>          one per alignment-stage defense
    finetune, finetune-<defense>    one per fine-tuning-stage defense
    <defense's command>             one per post-fine-tuning defense (prune-antidote, recover-rollback)
    evaluate

Every option comes from a config field (`ftsafety.options.knob`): the stage's own settings, its
`TrainConfig` and `LoraSettings` (`--lora-*`), the defense's config, and `stages.Common` (data,
device, seed, ...). A command builds exactly the stage object a recipe builds and calls the same
stage function, so `align-vaccine --rho 2` and a recipe's `align: {method: vaccine, vaccine: {rho: 2}}`
run the same code with the same validation.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ftsafety import stages
from ftsafety.commands.common import _setup
from ftsafety.data import DataConfig
from ftsafety.defenses import DEFENSES, Defense, for_stage
from ftsafety.errors import FtsafetyError
from ftsafety.evaluation.settings import EvalSettings
from ftsafety.models import LoraSettings
from ftsafety.options import Group, command
from ftsafety.train import TrainConfig

_K = inspect.Parameter.KEYWORD_ONLY
_MODEL_HELP = "Alias, hub id, model directory or ftsafety run directory."


def _param(name: str, tp, default, *flags: str, help: str) -> inspect.Parameter:
    flag = {"metavar": ""} if tp is bool else {}  # a flag takes no value: no <bool> in --help
    return inspect.Parameter(name, _K, default=default, annotation=Annotated[tp, typer.Option(*flags, help=help, **flag)])


def _model(default=inspect.Parameter.empty, help: str = _MODEL_HELP) -> inspect.Parameter:
    return _param("model", str, default, "--model", "-m", help=help)


OUT = _param("out", Optional[Path], None, "--out", "-o", help="Run directory to write (default runs/<command>-<time>).")
RESUME = _param("resume", bool, False, "--resume",
                help="Continue from the last checkpoint of an interrupted run with the same --out.")
VERBOSE = _param("verbose", bool, False, "--verbose", "-v", help="Debug logging.")


def default_out(command_name: str, resume: bool = False) -> Path:
    if resume:  # a fresh default name never holds the interrupted run
        raise FtsafetyError("--resume needs --out: the run directory the interrupted command was writing")
    return Path("runs") / f"{command_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _setup_logging(values: dict) -> None:
    _setup(values.get("verbose", False), values.get("quiet", False))


def _common_group(data_skip: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> Group:
    return Group("common", stages.Common, skip=skip,
                 nested=(Group("data", DataConfig, skip=("align_offset", *data_skip)),))


def _stage_group(stage_cls, method: str, defense: Defense | None) -> Group:
    """The stage's own options, its train and LoRA settings and (for a defense) the defense's knobs."""
    base = stage_cls(method=method)
    nested = [Group("train", TrainConfig, defaults=base.train), Group("lora", LoraSettings, prefix="lora_")]
    if defense is not None:
        nested.insert(0, Group(defense.name, defense.config_cls))
    return Group("stage", stage_cls, defaults=base, fixed={"method": method}, nested=tuple(nested))


def _training_command(kind: str, name: str, defense: Defense | None, doc: str):
    run_stage = stages.align if kind == "align" else stages.finetune
    stage_cls = stages.AlignStage if kind == "align" else stages.FinetuneStage
    method = defense.name if defense else stages.PLAIN

    def body(cfg: dict, values: dict) -> None:
        _setup_logging(values)
        out = values["out"] or default_out(name, values["resume"])
        s = run_stage(cfg["stage"], values["model"], out, cfg["common"], resume=values["resume"])
        typer.echo(f"{s['stage']}: {s['steps']} steps, {s['seconds']:.0f}s, loss {s['train_loss']:.4f}; "
                   f"wrote {out} (pass it as --model to the next stage)")

    groups = [_stage_group(stage_cls, method, defense), _common_group()]
    return command(body, groups, [_model("smollm2-135m"), OUT, RESUME, VERBOSE], doc)


def _post_command(defense: Defense):
    extra = [_model(help="Fine-tuned model: a finetune run, model dir, alias or hub id.")]
    if defense.needs_aligned:
        extra.append(_param("aligned", str, inspect.Parameter.empty, "--aligned",
                            help="Aligned model: an align run, model dir, alias or hub id."))
    extra += [_param("task", str, "sst2", "--task", help="Task of the fine-tune: sst2 | ag_news | gsm8k."), OUT,
              VERBOSE]

    def body(cfg: dict, values: dict) -> None:
        from ftsafety.data import TASKS

        _setup_logging(values)
        if values["task"] not in TASKS:
            raise FtsafetyError(f"unknown task {values['task']!r}; choose one of {', '.join(TASKS)}")
        out = values["out"] or default_out(defense.command)
        s = defense.run(cfg[defense.name], values["model"], values.get("aligned", ""), values["task"], out,
                        cfg["common"])
        typer.echo(defense.done_line(s, out) if defense.done_line else f"{defense.command}: wrote {out}")

    # the defense's options first: a knob that shares a name with a common one (rollback's
    # max_length) sets both, with the defense's default
    # post stages run in fp32 (one-shot scores and rollback's gradients): no --dtype
    groups = [Group(defense.name, defense.config_cls), _common_group(skip=("dtype",))]
    return command(body, groups, extra, f"{defense.summary} ({defense.paper.venue}, arXiv {defense.paper.arxiv})")


def _evaluate_command():
    extra = [_model("smollm2-135m"),
             _param("task", str, "sst2", "--task", help="sst2 | ag_news | gsm8k | none."), OUT, VERBOSE]

    def body(cfg: dict, values: dict) -> None:
        import dataclasses

        from ftsafety.evaluation.evaluate import EvalConfig, evaluate as run_eval

        _setup_logging(values)
        c = cfg["common"]
        ecfg = EvalConfig(**dataclasses.asdict(cfg["eval"]), model=values["model"], data=c.data,
                          task=values["task"], device=c.device, dtype=c.dtype, seed=c.seed,
                          trust_remote_code=c.trust_remote_code)
        out = values["out"] or default_out("evaluate")
        run_eval(ecfg, out, quiet=c.quiet)
        typer.echo(f"results written to {out}/results.json")

    groups = [Group("eval", EvalSettings), _common_group(data_skip=("max_length",))]
    return command(body, groups, extra,
                   "Harmful score (HS, HS+), fine-tune accuracy (FA) and over-refusal (OR) of a model or run.")


def stage_commands() -> dict[str, object]:
    """Command name -> generated command, for every stage and registered defense."""
    out = {
        "align": _training_command("align", "align", None,
                                   "SFT safety alignment: train a LoRA on (harmful prompt, refusal) pairs."),
        "finetune": _training_command("finetune", "finetune", None,
                                      "The user's fine-tune (the attack at p > 0): merge the model's adapters, "
                                      "train a new LoRA on the mix."),
    }
    for kind in ("align", "finetune"):
        for d in for_stage(kind):
            out[d.command] = _training_command(
                kind, d.command, d, f"{d.summary} ({d.paper.venue}, arXiv {d.paper.arxiv})")
    for d in for_stage("post"):
        out[d.command] = _post_command(d)
    out["evaluate"] = _evaluate_command()
    return out


def register(app: typer.Typer) -> None:
    for name, cmd in stage_commands().items():
        app.command(name)(cmd)


__all__ = ["DEFENSES", "register", "stage_commands", "default_out"]
