"""The pipeline's stages as config dataclasses and one function per stage.

`ftsafety run` (recipes) calls these functions; each writes one run directory (atomically) that the
next stage takes as its model. Defaults equal the subcommands' defaults, so a recipe that leaves a
key out gets what the matching subcommand would do.

    align     none | sft | vaccine | booster         -> align(...)
    finetune  none | sft | lisa                      -> finetune(...)
    post      none | antidote | rollback             -> post(...)
    evaluate  HS / FA / OR with one judge            -> ftsafety.evaluation.evaluate
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ftsafety.data import DataConfig
from ftsafety.defenses.antidote import AntidoteConfig
from ftsafety.defenses.booster import BoosterConfig
from ftsafety.defenses.rollback import RollbackConfig
from ftsafety.defenses.vaccine import VaccineConfig
from ftsafety.errors import FtsafetyError
from ftsafety.models import LoraSettings
from ftsafety.train import TrainConfig

ALIGN_METHODS = ("none", "sft", "vaccine", "booster")
FINETUNE_METHODS = ("none", "sft", "lisa")
POST_METHODS = ("none", "antidote", "rollback")


def _check(method: str, allowed: tuple[str, ...], what: str) -> None:
    if method not in allowed:
        raise FtsafetyError(f"unknown {what} method {method!r}; choose one of {', '.join(allowed)}")


def _check_benign_task(task: str) -> None:
    from ftsafety.data import TASKS

    if task != "none" and task not in TASKS:
        raise FtsafetyError(f"unknown benign task {task!r}; choose none or one of {', '.join(TASKS)}")


@dataclass
class AlignStage:
    method: str = "sft"
    n: int = 300
    benign_ratio: float = 0.5
    benign_task: str = "none"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2.0, lr=1e-3, scheduler="cosine",
                                                                   weight_decay=0.1))
    lora: LoraSettings = field(default_factory=LoraSettings)
    vaccine: VaccineConfig = field(default_factory=VaccineConfig)
    booster: BoosterConfig = field(default_factory=BoosterConfig)

    def __post_init__(self):
        _check(self.method, ALIGN_METHODS, "align")
        if self.n < 1:
            raise FtsafetyError(f"alignment size must be >= 1 (--n / align.n), got {self.n}")
        if not 0.0 <= self.benign_ratio < 1.0:
            raise FtsafetyError(f"benign ratio must be in [0, 1), got {self.benign_ratio}")
        _check_benign_task(self.benign_task)

    def resolved(self) -> dict:
        """The keys that decide this stage's output (the other methods' knobs left out)."""
        d = dataclasses.asdict(self)
        for m in ("vaccine", "booster"):
            if m != self.method:
                d.pop(m)
        return d


@dataclass
class LisaStage:
    alignment_steps: int = 100
    finetune_steps: int = 900
    rho: float = 1.0
    prox_start: float = 0.1
    align_n: int = 300
    align_benign_ratio: float = 0.5
    align_benign_task: str = "none"

    def __post_init__(self):
        _check_benign_task(self.align_benign_task)
        self.config()  # LisaConfig checks the step budgets and rho
        if self.align_n < 0:
            raise FtsafetyError(f"--align-n must be >= 0, got {self.align_n}")

    def config(self):
        from ftsafety.defenses.lisa import LisaConfig

        return LisaConfig(alignment_steps=self.alignment_steps, finetune_steps=self.finetune_steps, rho=self.rho,
                          prox_start=self.prox_start)


@dataclass
class FinetuneStage:
    method: str = "sft"
    task: str = "sst2"
    n: int = 1000
    harmful_ratio: float = 0.1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0, lr=1e-4, scheduler="constant",
                                                                   weight_decay=0.0))
    lora: LoraSettings = field(default_factory=LoraSettings)
    lisa: LisaStage = field(default_factory=LisaStage)

    def __post_init__(self):
        from ftsafety.data import TASKS

        _check(self.method, FINETUNE_METHODS, "finetune")
        if self.task not in TASKS:
            raise FtsafetyError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if not 0.0 <= self.harmful_ratio <= 1.0:
            raise FtsafetyError(f"harmful ratio p must be in [0, 1], got {self.harmful_ratio}")
        if self.n < 1:
            raise FtsafetyError(f"number of fine-tuning samples n must be >= 1 (--n / finetune.n), got {self.n}")

    def resolved(self) -> dict:
        d = dataclasses.asdict(self)
        if self.method != "lisa":
            d.pop("lisa")
        return d


@dataclass
class RollbackStage(RollbackConfig):
    val_n: int = 100
    fa_max_new_tokens: int = 16


@dataclass
class PostStage:
    method: str = "none"
    antidote: AntidoteConfig = field(default_factory=AntidoteConfig)
    rollback: RollbackStage = field(default_factory=RollbackStage)

    def __post_init__(self):
        _check(self.method, POST_METHODS, "post")

    def resolved(self) -> dict:
        return {"method": self.method, **({self.method: dataclasses.asdict(getattr(self, self.method))}
                                          if self.method != "none" else {})}


@dataclass
class EvalStage:
    judge: str = "keyword"
    hs_limit: int = 700
    fa_limit: int = 872
    or_limit: int = 100
    batch_size: int = 64
    max_new_tokens: int = 128
    fa_max_new_tokens: int = 32


@dataclass
class Common:
    """What every stage shares: data, device, seed and the trust flag."""

    data: DataConfig = field(default_factory=DataConfig)
    device: str = "auto"
    seed: int = 42
    trust_remote_code: bool = False
    quiet: bool = False


def _train_lora(**kw) -> dict:
    from ftsafety.train import train_lora

    from ftsafety.train import partial_dir

    # an interrupted stage continues from its last checkpoint; with none there is nothing to say
    kw["resume"] = kw.get("resume", True) and partial_dir(Path(kw["out_dir"])).is_dir()
    return train_lora(**kw)


def align(st: AlignStage, parent: str, out: str | Path, c: Common, resume: bool = True) -> dict:
    """SFT alignment or one of the alignment-stage defenses (Vaccine, Booster) on `parent`."""
    from ftsafety import data as D

    if st.method == "none":
        raise FtsafetyError("align method 'none' writes no stage")
    tcfg = dataclasses.replace(st.train, seed=c.seed)
    examples = D.alignment_examples(c.data, st.n, st.benign_ratio, c.seed, st.benign_task)
    extra: dict = {"benign_ratio": st.benign_ratio, "benign_task": st.benign_task}
    trainer_cls, kwargs, kwargs_fn = None, {}, None
    if st.method == "vaccine":
        from ftsafety.defenses.vaccine import VaccineTrainer

        trainer_cls, kwargs = VaccineTrainer, dataclasses.asdict(st.vaccine)
        extra["vaccine"] = dataclasses.asdict(st.vaccine)
    elif st.method == "booster":
        from ftsafety.defenses.booster import BoosterTrainer, harmful_dataset

        trainer_cls, kwargs = BoosterTrainer, dataclasses.asdict(st.booster)
        kwargs_fn = lambda tokenizer, model: {"harmful_dataset": harmful_dataset(c.data, tokenizer)}  # noqa: E731
        extra.update(booster=dataclasses.asdict(st.booster), harmful_split="calibration",
                     n_harmful=len(D.harmful_examples(c.data, "calibration")))
    stage = "align" if st.method == "sft" else f"align-{st.method}"
    kw = dict(stage=stage, parent=parent, examples=examples, out_dir=out, data_cfg=c.data, train_cfg=tcfg,
              lora=st.lora, device=c.device, trust_remote_code=c.trust_remote_code, quiet=c.quiet,
              trainer_kwargs=kwargs, trainer_kwargs_fn=kwargs_fn, extra_config=extra, resume=resume)
    if trainer_cls is not None:
        kw["trainer_cls"] = trainer_cls
    return _train_lora(**kw)


def finetune(st: FinetuneStage, parent: str, out: str | Path, c: Common, resume: bool = True) -> dict:
    """The user's fine-tune on a mix with harmful share p: plain, or under Lisa."""
    from ftsafety import data as D

    if st.method == "none":
        raise FtsafetyError("finetune method 'none' writes no stage")
    tcfg = dataclasses.replace(st.train, seed=c.seed)
    examples = D.finetune_mix(c.data, st.task, st.n, st.harmful_ratio, c.seed)
    extra: dict = {"task": st.task, "n": st.n, "harmful_ratio": st.harmful_ratio}
    kw = dict(stage="finetune", parent=parent, examples=examples, out_dir=out, data_cfg=c.data, train_cfg=tcfg,
              lora=st.lora, device=c.device, trust_remote_code=c.trust_remote_code, quiet=c.quiet,
              extra_config=extra, resume=resume)
    if st.method == "lisa":
        from ftsafety.defenses.lisa import LisaTrainer

        ls = st.lisa
        lcfg = ls.config()
        align_examples = D.alignment_examples(c.data, ls.align_n, ls.align_benign_ratio, c.seed,
                                               ls.align_benign_task) if ls.align_n else []

        def lisa_kwargs(tokenizer, model):
            aset = D.SFTDataset(align_examples, tokenizer, c.data) if align_examples else None
            return {"alignment_dataset": aset, "lisa": lcfg}

        kw.update(stage="finetune-lisa", trainer_cls=LisaTrainer, trainer_kwargs_fn=lisa_kwargs)
        extra["lisa"] = dataclasses.asdict(ls)
    return _train_lora(**kw)


def post(st: PostStage, model: str, aligned: str, task: str, out: str | Path, c: Common) -> dict:
    """A post-fine-tuning defense on the fine-tuned `model` (rollback also reads the `aligned` one)."""
    if st.method == "antidote":
        from ftsafety.defenses.antidote import run_antidote

        return run_antidote(st.antidote, model, c.data, out, device=c.device, seed=c.seed,
                            trust_remote_code=c.trust_remote_code, quiet=c.quiet)
    if st.method == "rollback":
        from ftsafety.defenses.rollback import run

        r = st.rollback
        cfg = RollbackConfig(**{f.name: getattr(r, f.name) for f in dataclasses.fields(RollbackConfig)})
        dcfg = dataclasses.replace(c.data, max_length=r.max_length)
        return run(model=model, aligned=aligned, out_dir=out, dcfg=dcfg, task=task, cfg=cfg, val_n=r.val_n,
                   fa_max_new_tokens=r.fa_max_new_tokens, device=c.device, seed=c.seed,
                   trust_remote_code=c.trust_remote_code)
    raise FtsafetyError("post method 'none' writes no stage")


def evaluate(st: EvalStage, model: str, task: str, out: str | Path, c: Common) -> dict:
    from ftsafety.evaluation.evaluate import EvalConfig, evaluate as run_eval

    cfg = EvalConfig(model=model, data=c.data, task=task, judge=st.judge, hs_limit=st.hs_limit,
                     fa_limit=st.fa_limit, or_limit=st.or_limit, batch_size=st.batch_size,
                     max_new_tokens=st.max_new_tokens, fa_max_new_tokens=st.fa_max_new_tokens, device=c.device,
                     seed=c.seed)
    return run_eval(cfg, out, quiet=c.quiet)
