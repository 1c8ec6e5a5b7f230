"""What a defense declares about itself, once: the record `ftsafety.defenses.DEFENSES` is built from.

A defense module ends with `DEFENSE = Defense(...)`. From that record the stage functions dispatch
(`ftsafety.stages`), the recipe schema gets its `align.<name>` / `finetune.<name>` / `post.<name>`
section (the config dataclass), the command line gets its command with one option per config field
(`ftsafety.commands`), and the shared test matrix (`tests/test_defense_matrix.py`) checks it at its
neutral setting, under resume and with bad input.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

STAGES = ("align", "finetune", "post")


@dataclass(frozen=True)
class Paper:
    title: str
    venue: str
    arxiv: str
    code: str

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainerSetup:
    """How a training-stage defense changes `train_lora`: its Trainer class, the keyword arguments
    it takes (fixed, or built once the tokenizer and model exist), and what the run records."""

    trainer_cls: type
    kwargs: dict = field(default_factory=dict)
    kwargs_fn: Callable[[Any, Any], dict] | None = None
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Defense:
    """One defense. `setup(config, common, stage)` -> TrainerSetup for the align and finetune stages;
    `run(config, model, aligned, task, out, common)` -> summary for the post stage. `neutral` is the
    setting at which it reduces to the plain stage (the equivalence tests); `needs_aligned` says a
    post stage also reads the aligned model (its cache key then includes it)."""

    name: str
    stage: str
    command: str
    config_cls: type
    paper: Paper
    summary: str
    neutral: dict
    setup: Callable[..., TrainerSetup] | None = None
    run: Callable[..., dict] | None = None
    needs_aligned: bool = False
    done_line: Callable[[dict, Any], str] | None = None  # what the command prints when a post stage ends
    # check_data(config, common, task): build or count the defense's own data, raise if it asks for more
    # rows than there are (`ftsafety run` and `--dry-run` call it before anything trains)
    check_data: Callable[..., None] | None = None

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"defense {self.name}: stage must be one of {STAGES}, got {self.stage!r}")
        if (self.setup is None) == (self.stage != "post"):
            raise ValueError(f"defense {self.name}: a {self.stage} defense declares "
                             f"{'setup' if self.stage != 'post' else 'run'}")
        if self.run is None and self.stage == "post":
            raise ValueError(f"defense {self.name}: a post defense declares run")
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        if not set(self.neutral) <= fields:
            raise ValueError(f"defense {self.name}: neutral keys {set(self.neutral) - fields} are not config fields")


# -- TRL's pattern: a defense's knobs on a `TrainingArguments` subclass -------------------------------

ARGS_FIELDS = "_defense_fields"


def training_arguments_class(name: str, config_cls: type, names: tuple[str, ...], doc: str) -> type:
    """A `transformers.TrainingArguments` subclass that also carries the defense knobs `names` of
    `config_cls` (same defaults and help), as TRL's `SFTConfig` carries SFT's: a user's own
    `Trainer` workflow then configures a defense's trainer with one `args=` object. The knobs are
    checked by `config_cls` when the arguments are built."""
    from transformers import TrainingArguments

    src = {f.name: f for f in dataclasses.fields(config_cls)}
    extra = [(n, src[n].type, field(default=src[n].default, metadata=dict(src[n].metadata))) for n in names]

    def __post_init__(self):
        TrainingArguments.__post_init__(self)
        config_cls(**{n: getattr(self, n) for n in names})  # the defense's own checks, one line each

    cls = dataclasses.make_dataclass(name, extra, bases=(TrainingArguments,),
                                     namespace={"__post_init__": __post_init__, ARGS_FIELDS: names, "__doc__": doc})
    cls.__module__ = config_cls.__module__
    return cls


def defense_settings(config_cls: type, trainer_args: tuple, trainer_kwargs: dict, explicit: dict):
    """The defense's config for a trainer: the knobs carried by its `args` (a `training_arguments_class`
    instance, positional or `args=`), overridden by those passed to the trainer itself (not None)."""
    args = trainer_kwargs.get("args", trainer_args[1] if len(trainer_args) > 1 else None)
    values = {n: getattr(args, n) for n in getattr(type(args), ARGS_FIELDS, ())}
    values.update({k: v for k, v in explicit.items() if v is not None})
    return config_cls(**values)
