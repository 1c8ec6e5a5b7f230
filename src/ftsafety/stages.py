"""The pipeline's stages as config dataclasses and one function per stage.

`ftsafety run` (recipes) calls these functions; each writes one run directory (atomically) that the
next stage takes as its model. Defaults equal the subcommands' defaults, so a recipe that leaves a
key out gets what the matching subcommand would do.

    align     none | sft | the align defenses         -> align(...)
    finetune  none | sft | the finetune defenses      -> finetune(...)
    post      none | the post defenses                -> post(...)
    evaluate  HS / FA / OR with one judge            -> ftsafety.evaluation.evaluate

The defenses are not named here: each stage class gets one field per registered defense of its stage
(`ftsafety.defenses.DEFENSES`), holding that defense's config, and dispatch goes through the
defense's declaration (its `setup` or `run`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ftsafety.data import TASKS, DataConfig, check_alignment_data, check_benign_task
from ftsafety.defenses import DEFENSES, TrainerSetup, for_stage
from ftsafety.errors import FtsafetyError
from ftsafety.evaluation.settings import EvalSettings
from ftsafety.models import LoraSettings
from ftsafety.options import config_key, knob
from ftsafety.train import TrainConfig

NO_STAGE = "none"  # a stage left out of the pipeline
PLAIN = "sft"  # the plain training stage the defenses are compared with


def methods(stage: str) -> tuple[str, ...]:
    """The methods a stage accepts: none, the plain stage (align, finetune) and the registered defenses."""
    plain = (PLAIN,) if stage != "post" else ()
    return (NO_STAGE, *plain, *(d.name for d in for_stage(stage)))


def _check(method: str, stage: str) -> None:
    allowed = methods(stage)
    if method not in allowed:
        raise FtsafetyError(f"unknown {stage} method {method!r}; choose one of {', '.join(allowed)}")


def _resolved(st) -> dict:
    """The keys that decide a stage's output: its own settings and only the chosen defense's knobs
    (knobs added later enter only when set: `options.config_key`)."""
    names = {d.name for d in DEFENSES.values()}
    return {k: v for k, v in config_key(st).items() if k not in names or k == st.method}


@dataclass
class AlignBase:
    """The alignment stage: SFT on (harmful prompt, refusal) pairs plus a benign share, or a defense."""

    method: str = knob(PLAIN, "none | sft | an alignment-stage defense.", cli=False)
    n: int = knob(300, "Alignment examples (harmful prompt -> refusal, plus benign). The built-in data holds "
                       "494 benign pairs, so n x benign-ratio <= 494 there.", flags=("--n",))
    benign_ratio: float = knob(0.5, "Share of benign instruction/answer pairs mixed in.")
    benign_task: str = knob("none", "none, or a task (sst2, ag_news, gsm8k) whose training rows (with an Input "
                                    "section) make half of the benign share.")
    alignment_data: str = knob("refusals", "refusals: harmful prompts -> refusals written by ftsafety (Booster's "
                                           "setting) | beavertails-safe: BeaverTails' is_safe pairs (Vaccine's "
                                           "and Lisa's code)", key_when_set=True)
    train: TrainConfig = knob(factory=lambda: TrainConfig(epochs=2.0, lr=1e-3, scheduler="cosine", weight_decay=0.1))
    lora: LoraSettings = knob(factory=LoraSettings)

    def __post_init__(self):
        _check(self.method, "align")
        if self.n < 1:
            raise FtsafetyError(f"alignment size must be >= 1 (--n / align.n), got {self.n}")
        if not 0.0 <= self.benign_ratio < 1.0:
            raise FtsafetyError(f"benign ratio must be in [0, 1), got {self.benign_ratio}")
        check_benign_task(self.benign_task)
        check_alignment_data(self.alignment_data)

    resolved = _resolved


@dataclass
class FinetuneBase:
    """The user's fine-tune: round(p*n) harmful pairs plus the rest from a benign task, plain or a defense."""

    method: str = knob(PLAIN, "none | sft | a fine-tuning-stage defense.", cli=False)
    task: str = knob("sst2", "Benign task: sst2 | ag_news | gsm8k.")
    n: int = knob(1000, "Fine-tuning samples.", flags=("--n",))
    harmful_ratio: float = knob(0.1, "Share p of harmful samples.", flags=("--harmful-ratio", "-p"))
    continue_adapter: bool = knob(False, "Train the parent's LoRA adapter further instead of a new LoRA on the merged "
                                         "model (Booster's --alternating single_lora); --lora-* are then the "
                                         "adapter's own.", flags=("--continue-adapter",), key_when_set=True)
    full_parameter: bool = knob(False, "Train every weight of the merged model instead of a LoRA (the full-parameter "
                                       "attack; plain fine-tune only; the run holds the whole model).",
                                flags=("--full-parameter",), key_when_set=True)
    train: TrainConfig = knob(factory=lambda: TrainConfig(epochs=1.0, lr=1e-4, scheduler="constant",
                                                          weight_decay=0.0))
    lora: LoraSettings = knob(factory=LoraSettings)

    def __post_init__(self):
        _check(self.method, "finetune")
        if self.task not in TASKS:
            raise FtsafetyError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if not 0.0 <= self.harmful_ratio <= 1.0:
            raise FtsafetyError(f"harmful ratio p must be in [0, 1], got {self.harmful_ratio}")
        self.harmful_ratio += 0.0  # -0.0 is 0.0 (one cache key, one record)
        if self.n < 1:
            raise FtsafetyError(f"number of fine-tuning samples n must be >= 1 (--n / finetune.n), got {self.n}")
        if self.full_parameter and self.method != PLAIN:
            raise FtsafetyError(f"full-parameter fine-tuning is the plain fine-tune's (method {PLAIN}), not "
                                f"{self.method}'s")
        if self.full_parameter and self.continue_adapter:
            raise FtsafetyError("--full-parameter trains every weight; --continue-adapter trains a LoRA: pick one")

    resolved = _resolved


@dataclass
class PostBase:
    """A post-fine-tuning defense on the fine-tuned model, or none."""

    method: str = knob(NO_STAGE, "none | a post-fine-tuning defense.", cli=False)

    def __post_init__(self):
        _check(self.method, "post")

    resolved = _resolved


def _with_defenses(base: type, stage: str) -> type:
    """`base` plus one field per registered defense of `stage`: its config, under the defense's name."""
    fields = [(d.name, d.config_cls, field(default_factory=d.config_cls)) for d in for_stage(stage)]
    cls = dataclasses.make_dataclass(base.__name__.replace("Base", "Stage"), fields, bases=(base,))
    cls.__module__, cls.__doc__ = __name__, base.__doc__
    return cls


def rebuild() -> None:
    """Regenerate the stage classes from the registry (after `ftsafety.defenses.register`)."""
    global AlignStage, FinetuneStage, PostStage
    AlignStage = _with_defenses(AlignBase, "align")
    FinetuneStage = _with_defenses(FinetuneBase, "finetune")
    PostStage = _with_defenses(PostBase, "post")


AlignStage: type
FinetuneStage: type
PostStage: type
rebuild()


EvalStage = EvalSettings  # the evaluate stage of a recipe: everything but the model, data and task


@dataclass
class Common:
    """What every stage shares: data, device, seed and the trust flag."""

    data: DataConfig = knob(factory=DataConfig)
    device: str = knob("auto", "auto | cpu | cuda | cuda:N.")
    dtype: str = knob("auto", "auto | fp32 | bf16. auto: bf16 where the device multiplies it fast (CUDA with bf16, a "
                              "CPU with AVX512-BF16 or AMX), else fp32. bf16 on CPU is autocast (fp32 weights).")
    seed: int = knob(42, "Random seed.")
    trust_remote_code: bool = knob(False, "Run code shipped with a hub model (off by default).",
                                   flags=("--trust-remote-code",))
    quiet: bool = knob(False, "No progress bars.", flags=("--quiet", "-q"))

    def __post_init__(self):
        if not 0 <= self.seed < 2**32:
            raise FtsafetyError(f"seed must be in [0, 2**32), got {self.seed}")
        from ftsafety.utils import check_dtype

        check_dtype(self.dtype)


def _train(setup: TrainerSetup | None, **kw) -> dict:
    from ftsafety.train import partial_dir, train_lora

    if setup is not None:
        kw.update(trainer_cls=setup.trainer_cls, trainer_kwargs=setup.kwargs, trainer_kwargs_fn=setup.kwargs_fn)
        kw["extra_config"] = {**kw["extra_config"], **setup.record}
    # an interrupted stage continues from its last checkpoint; with none there is nothing to say
    kw["resume"] = kw.get("resume", True) and partial_dir(Path(kw["out_dir"])).is_dir()
    return train_lora(**kw)


def _setup(st, c: Common) -> TrainerSetup | None:
    if st.method == NO_STAGE:
        raise FtsafetyError(f"{type(st).__name__.replace('Stage', '').lower()} method 'none' writes no stage")
    return None if st.method == PLAIN else DEFENSES[st.method].setup(getattr(st, st.method), c, st)


def _name(kind: str, method: str) -> str:
    return kind if method == PLAIN else f"{kind}-{method}"


def _training_stage(kind: str, st, parent: str, out, c: Common, resume: bool, examples, record: dict) -> dict:
    """Train `st`'s LoRA on `examples()` (built after the method is checked) and write the run."""
    setup = _setup(st, c)
    return _train(setup, stage=_name(kind, st.method), parent=parent, examples=examples(), out_dir=out,
                  data_cfg=c.data, train_cfg=dataclasses.replace(st.train, seed=c.seed), lora=st.lora,
                  device=c.device, dtype=c.dtype, trust_remote_code=c.trust_remote_code, quiet=c.quiet, resume=resume,
                  extra_config=record, continue_adapter=getattr(st, "continue_adapter", False),
                  full_parameter=getattr(st, "full_parameter", False))


def align(st, parent: str, out: str | Path, c: Common, resume: bool = True) -> dict:
    """SFT alignment, or an alignment-stage defense, on `parent`."""
    from ftsafety import data as D

    return _training_stage(
        "align", st, parent, out, c, resume,
        lambda: D.alignment_examples(c.data, st.n, st.benign_ratio, c.seed, st.benign_task, st.alignment_data),
        {"benign_ratio": st.benign_ratio, "benign_task": st.benign_task, "alignment_data": st.alignment_data})


def finetune(st, parent: str, out: str | Path, c: Common, resume: bool = True) -> dict:
    """The user's fine-tune on a mix with harmful share p: plain, or under a fine-tuning-stage defense."""
    from ftsafety import data as D

    return _training_stage(
        "finetune", st, parent, out, c, resume,
        lambda: D.finetune_mix(c.data, st.task, st.n, st.harmful_ratio, c.seed),
        {"task": st.task, "n": st.n, "harmful_ratio": st.harmful_ratio})


def post(st, model: str, aligned: str, task: str, out: str | Path, c: Common) -> dict:
    """A post-fine-tuning defense on the fine-tuned `model` (some also read the `aligned` one)."""
    if st.method == NO_STAGE:
        raise FtsafetyError("post method 'none' writes no stage")
    return DEFENSES[st.method].run(getattr(st, st.method), model, aligned, task, out, c)


def evaluate(st: EvalSettings, model: str, task: str, out: str | Path, c: Common) -> dict:
    from ftsafety.evaluation.evaluate import EvalConfig
    from ftsafety.evaluation.evaluate import evaluate as run_eval

    cfg = EvalConfig(**dataclasses.asdict(st), model=model, data=c.data, task=task, device=c.device, dtype=c.dtype,
                     seed=c.seed,
                     trust_remote_code=c.trust_remote_code)
    return run_eval(cfg, out, quiet=c.quiet)
