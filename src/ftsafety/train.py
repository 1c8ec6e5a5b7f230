"""LoRA training on transformers' Trainer: the `align` and `finetune` baselines, and the hook every
training-stage defense plugs into (a Trainer subclass passed as `trainer_cls`)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from ftsafety import distributed, models
from ftsafety.console import RichTrainCallback
from ftsafety.data import Collator, DataConfig, SFTDataset
from ftsafety.errors import FtsafetyError, check_number
from ftsafety.options import knob
from ftsafety.rundir import write_run
from ftsafety.trainer import FtTrainer
from ftsafety.utils import (
    Precision,
    _json_default,
    atomic_write_text,
    check_not_input,
    check_writable_dir,
    locks_output,
    resolve_device,
    resolve_precision,
    scrub,
    seed_everything,
)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: float = knob(2.0, "Passes over the training examples.")
    max_steps: int = knob(-1, "> 0 overrides --epochs.")
    batch_size: int = knob(8, "Examples per step (per process).")
    grad_accum: int = knob(1, "Gradient accumulation steps.")
    lr: float = knob(1e-3, "Learning rate.")
    scheduler: str = knob("cosine", "Any transformers scheduler name: cosine, constant, linear, ...")
    warmup_ratio: float = knob(0.1, "Share of steps with linear warm-up.")
    weight_decay: float = knob(0.1, "AdamW weight decay.")
    seed: int = knob(42, cli=False)  # the command's --seed
    logging_steps: int = knob(5, cli=False)
    group_by_length: bool = knob(False, "Batches of examples of similar length (less padding; another example "
                                        "order, so other numbers than without).", flags=("--group-by-length",),
                                 key_when_set=True)
    report_to: str = knob("none", "Trainer integrations to log to: none | tensorboard | wandb | ... (comma-separated; "
                                  "metrics.jsonl is always written). Logs go to the run directory's logs/.",
                          key_when_set=True)

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accum < 1:
            raise FtsafetyError("batch size and gradient accumulation must be >= 1")
        check_number("learning rate", self.lr, high=1e3, low_open=True)
        if not math.isfinite(self.epochs) or not -1e6 <= self.epochs <= 1e6:
            raise FtsafetyError(f"epochs must be a finite number of at most 1e6, got {self.epochs}")
        if self.max_steps > 10**9:
            raise FtsafetyError(f"max steps must be at most 1e9, got {self.max_steps}")
        if self.logging_steps < 1:
            raise FtsafetyError(f"logging steps must be >= 1, got {self.logging_steps}")
        check_report_to(self.report_to)
        if self.epochs <= 0 and self.max_steps <= 0:
            raise FtsafetyError("give epochs > 0 or max steps > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise FtsafetyError(f"warmup ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise FtsafetyError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.seed < 2**32:
            raise FtsafetyError(f"seed must be in [0, 2**32), got {self.seed}")
        from transformers.trainer_utils import SchedulerType

        names = [t.value for t in SchedulerType]
        if self.scheduler not in names:
            raise FtsafetyError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(names)}")


_REPORT_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "tensorboard": "tensorboard", "flyte": "flytekit"}


def check_report_to(value: str) -> None:
    """--report-to: `none`, `all`, or known integrations whose packages are installed (checked before
    anything is created; transformers would fail mid-setup with its own message)."""
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    if not names:
        raise FtsafetyError("--report-to is empty: give none, all, or integrations such as tensorboard,wandb")
    if len(names) > 1 and ({"none", "all"} & set(names)):
        raise FtsafetyError(f"--report-to {value}: 'none' and 'all' stand alone, not in a list")
    if names in (["none"], ["all"]):
        return
    from transformers.integrations import integration_utils as iu

    known = list(iu.INTEGRATION_TO_CALLBACK)
    for name in names:
        if name not in known:
            raise FtsafetyError(f"--report-to {name}: not a known integration; choose none, all or from "
                                f"{', '.join(known)}")
    installed = set(iu.get_available_reporting_integrations())
    for name in names:
        if name not in installed:
            raise FtsafetyError(f"--report-to {name}: its package is not installed "
                                f"(pip install {_REPORT_PACKAGES.get(name, name.replace('_', '-'))})")


class NaNLossError(FtsafetyError):
    pass


DIVERGED_HINT = "check --lr and the method's strength (--lora-alpha, --rho, --lam)"


class _NaNGuard(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs and not math.isfinite(logs["loss"]):
            raise NaNLossError(f"training loss became {logs['loss']} at step {state.global_step}; {DIVERGED_HINT}")


def check_finite_weights(model, step: int | None = None) -> None:
    """Refuse to keep a run whose trained weights ended non-finite (the loss logged before the last update
    can still be finite)."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            at = f" by step {step}" if step is not None else ""
            raise NaNLossError(f"the trained weights became nan/inf{at} ({name}); {DIVERGED_HINT}")


def training_args(cfg: TrainConfig, device: torch.device, output_dir: str, precision: Precision | None = None,
                  **overrides) -> TrainingArguments:
    """The Trainer's arguments for `cfg`; `precision` (default: the device's legacy one) sets bf16 autocast."""
    bf16 = precision.ran == "bf16" if precision is not None else device.type == "cuda"
    kw = dict(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        weight_decay=cfg.weight_decay,
        optim="adamw_torch",
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to=[r.strip() for r in cfg.report_to.split(",")] if cfg.report_to != "none" else "none",
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        bf16=bf16,
        logging_nan_inf_filter=False,
    )
    params = inspect.signature(TrainingArguments.__init__).parameters
    if cfg.group_by_length:  # transformers >= 5 names the sampler; 4.x has a flag
        if "train_sampling_strategy" in params:
            kw["train_sampling_strategy"] = "group_by_length"
        else:
            kw["group_by_length"] = True
    if distributed.launched():  # every LoRA weight takes part in every forward: skip DDP's graph search
        kw["ddp_find_unused_parameters"] = False
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio)
    if "warmup_ratio" in params:
        kw["warmup_ratio"] = cfg.warmup_ratio
    else:
        kw["warmup_steps"] = cfg.warmup_ratio
    kw.update(overrides)
    return TrainingArguments(**kw)


def _train(trainer, stage: str, resume_from, checkpointer, prior: dict, partial) -> object:
    """`trainer.train()`, with a Ctrl-C turned into TrainingInterrupted (which says how to resume) and
    the checkpoints of a diverged run dropped (no use to a resume)."""
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    except KeyboardInterrupt as exc:
        step = int(getattr(getattr(trainer, "state", None), "global_step", 0) or 0)
        last = checkpointer.last_step or (prior.get("step") if resume_from is not None else None)
        raise TrainingInterrupted(stage, step, last, partial) from exc
    except NaNLossError:
        if partial is not None and distributed.is_main():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        if not math.isfinite(result.training_loss):
            raise NaNLossError(f"training loss became {result.training_loss}; {DIVERGED_HINT}")
        check_finite_weights(trainer.model, result.global_step)
    except NaNLossError:
        if partial is not None and distributed.is_main():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return result


def _run_loss(result, start_step: int, prior: dict, world: int) -> float:
    """The mean training loss over the whole run, across processes and across a resume."""
    train_loss = result.training_loss
    if world > 1:  # the Trainer's last, unlogged stretch of the loss is each process's own: average it
        losses = distributed.gather_objects(float(train_loss))
        train_loss = sum(losses) / len(losses)
    if start_step:  # the loss over the whole run, not only the steps after the resume
        steps_now = result.global_step - start_step
        train_loss = (float(prior.get("loss_sum", 0.0)) + train_loss * steps_now) / max(result.global_step, 1)
    return train_loss


@locks_output("out_dir")
def train_lora(
    *,
    stage: str,
    parent: str,
    examples: list[dict],
    out_dir: str | Path,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    lora: models.LoraSettings,
    device: str | None = "auto",
    dtype: str | None = "auto",
    trainer_cls: type[Trainer] = FtTrainer,
    trainer_kwargs: dict | None = None,
    trainer_kwargs_fn=None,
    extra_config: dict | None = None,
    trust_remote_code: bool = False,
    quiet: bool = False,
    resume: bool = False,
    checkpoint_every: int | None = None,
    continue_adapter: bool = False,
    full_parameter: bool = False,
) -> dict:
    """Merge `parent`'s adapters, attach a fresh LoRA, train it on `examples`, write a run directory.

    `trainer_cls` is the hook for training-stage defenses (a `transformers.Trainer` subclass);
    `trainer_kwargs` / `trainer_kwargs_fn(tokenizer=, model=)` give it its extra arguments.
    The run directory (written atomically) holds `adapter/` (peft format), `ftsafety_run.json`
    (base model + adapter chain: pass the directory as `--model` to the next stage),
    `config.yaml`, `metrics.jsonl` and `train_results.json`.

    Checkpoints: every `checkpoint_every` optimizer steps (None: every 10% of the run, at most every
    50 steps; 0: none) the Trainer checkpoint (adapter weights, optimizer, LR scheduler, RNG states,
    trainer state) plus the defense's own state (`defense_state_dict()` of the trainer, if it has
    one) go to `partial_dir(out_dir)`, a hidden sibling `.<name>.partial/` that keeps the last two.
    `resume=True` continues from its last complete checkpoint (bit-identical to an uninterrupted
    run on CPU) after checking that the settings are the same, or starts from scratch if there is
    none; without it, a leftover partial directory is deleted first. It is deleted on success,
    after the run directory is in place; an interrupted run raises `TrainingInterrupted`.

    Launched with several processes (`accelerate launch`, `torchrun`; see docs/distributed.md) the
    Trainer runs DDP: `train_cfg.batch_size` is per process, the global batch is batch_size x processes
    x grad_accum. Only the main process writes (checkpoint extras, metrics, the run directory); the
    others wait for it and return the same summary. The number of processes is part of the settings
    a resume must share.
    """
    if not examples:
        raise FtsafetyError(f"{stage}: no training examples (an empty list); nothing to train on")
    out_dir = check_writable_dir(out_dir, "train")
    final = Path(out_dir)
    TrainingInterrupted.last = None
    if checkpoint_every is not None and checkpoint_every < 0:
        raise FtsafetyError(f"checkpoint_every must be >= 0 (0 = no checkpoints), got {checkpoint_every}")
    if resume and checkpoint_every == 0:
        raise FtsafetyError("resume needs checkpoints, and checkpoint_every=0 turns them off")
    spec = models.resolve(parent)
    check_not_input(final, [parent, spec.base, *spec.adapters])
    # continue_adapter (Booster's `--alternating single_lora`): the parent's last adapter is trained further,
    # on the merge of the adapters before it, and replaces it in the new run's chain
    owner = spec
    if continue_adapter:
        if not spec.adapters:
            raise FtsafetyError(f"--continue-adapter trains the parent's LoRA adapter further, and {parent} has none")
        owner = dataclasses.replace(spec, adapters=spec.adapters[:-1])
        lora = models.adapter_lora_settings(spec.adapters[-1])
    dev = resolve_device(device)  # a bad device or dtype fails here, before a checkpoint directory is made
    world = distributed.init(dev) if distributed.launched() else 1
    precision = resolve_precision(dtype, dev)
    train_record = dataclasses.asdict(train_cfg)
    if not train_cfg.group_by_length:  # the runs made before the knob keep their fingerprints
        train_record.pop("group_by_length")
    config = {
        "stage": stage, "parent": parent, "parent_resolved": dataclasses.asdict(spec), "data": dataclasses.asdict(data_cfg),
        "train": train_record, "lora": dataclasses.asdict(lora), "n_examples": len(examples),
        "kinds": _count_kinds(examples), **(extra_config or {}),
    }
    if continue_adapter:
        config["continue_adapter"] = True
    if full_parameter:
        config["full_parameter"] = True
        config.pop("lora")
    if not precision.legacy:  # fp32 on CPU / bf16 on CUDA: the fingerprints of the runs made before --dtype
        config["precision"] = precision.record()
    if world > 1:
        config["world_size"] = world
    fp_config = _fingerprint_config(config, examples, trainer_cls, trainer_kwargs)
    fingerprint = _sha256(json.dumps(fp_config, sort_keys=True))
    if resume:
        done = _finished_run(final, fingerprint)
        if done is not None:
            log.info("%s: %s is already complete with these settings; nothing to resume", stage, final)
            distributed.run_on_main(shutil.rmtree, partial_dir(final), ignore_errors=True)
            return done
    checkpoints = checkpoint_every != 0
    partial = partial_dir(final) if checkpoints else None
    resume_from = (distributed.run_on_main(_prepare_partial, partial, stage, fp_config, fingerprint, resume)
                   if checkpoints else None)
    prior = _read_marker(resume_from) if resume_from is not None else {}

    try:  # a bad model or data set fails here: a fresh checkpoint directory is not left behind
        seed_everything(train_cfg.seed)
        model, tok, _ = models.load(owner, device=dev, dtype=precision.weights, trust_remote_code=trust_remote_code)
        if full_parameter:
            for param in model.parameters():
                param.requires_grad_(True)
        elif continue_adapter:
            model = models.continue_lora(model, spec.adapters[-1])
        else:
            model = models.attach_lora(model, lora)
        spec = owner  # the new run's chain: the parent's, its last adapter replaced when continued
        model.train()
        dataset = SFTDataset(examples, tok, data_cfg)
        kwargs = dict(trainer_kwargs or {})
        if trainer_kwargs_fn is not None:  # defenses that need the tokenizer/model (e.g. a second dataset)
            kwargs.update(trainer_kwargs_fn(tokenizer=tok, model=model))
    except BaseException:
        if partial is not None and resume_from is None and distributed.is_main():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    every = checkpoint_every if checkpoint_every is not None else default_checkpoint_every(
        _total_steps(train_cfg, len(dataset), world), train_cfg.logging_steps)
    with tempfile.TemporaryDirectory() as scratch:
        metrics = (partial if checkpoints else Path(scratch)) / "metrics.jsonl"
        main = distributed.is_main()  # only the main process keeps the log
        if main and resume_from is not None:
            _truncate_metrics(metrics, prior["step"])
        elif main and metrics.exists():
            metrics.unlink()
        callback = RichTrainCallback(f"{stage}", metrics_path=metrics if main else None,
                                     disable=quiet or not main)
        checkpointer = _Checkpointer(fingerprint, resume_from, prior)
        save = {"save_strategy": "steps", "save_steps": every, "save_total_limit": 2, "save_only_model": False}
        save = save if every else {}
        if every and "save_safetensors" in inspect.signature(TrainingArguments.__init__).parameters:
            save["save_safetensors"] = True  # transformers 4.x; 5.x always writes safetensors
        trainer = trainer_cls(
            model=model, args=training_args(train_cfg, dev, str(partial or scratch), precision, **save), train_dataset=dataset,
            data_collator=Collator(tok.pad_token_id), callbacks=[callback, _NaNGuard(), checkpointer], **kwargs,
        )
        checkpointer.trainer = trainer
        trainer.remove_callback(PrinterCallback)  # the rich callback reports instead
        t0 = time.perf_counter()
        result = _train(trainer, stage, resume_from, checkpointer, prior, partial)
        seconds = time.perf_counter() - t0
        start_step = int(prior.get("step", 0))
        steps_now = result.global_step - start_step
        train_loss = _run_loss(result, start_step, prior, world)
        fsdp_adapter = None
        if getattr(trainer, "is_fsdp_enabled", False):  # sharded weights: every process helps gather the adapter
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
            fsdp_adapter = Path(scratch) / "fsdp-adapter"  # written by the main process only
            trainer.save_model(str(fsdp_adapter))

        def write_on_main() -> dict:  # the main process writes; the others wait and return its summary
            def files(tmp: Path) -> None:
                if full_parameter:
                    models.save_full_model(model, tok, tmp / "model")
                elif fsdp_adapter is None:
                    models.save_adapter(model, tmp / "adapter", lora)
                else:
                    _adapter_from_trainer(fsdp_adapter, tmp / "adapter", model, lora)
                if metrics.is_file():
                    shutil.copyfile(metrics, tmp / "metrics.jsonl")
                tracked = Path(partial or scratch) / "runs"  # --report-to tensorboard writes here
                if tracked.is_dir():
                    shutil.copytree(tracked, tmp / "logs")

            summary = write_run(
                final, config=config, results_file="train_results.json", files=files,
                manifest=lambda tmp: (models.full_model_manifest(final, {"stage": stage}) if full_parameter else
                                      models.run_manifest(spec, tmp / "adapter", final, {"stage": stage})),
                results={
                    "stage": stage, "train_loss": train_loss, "steps": result.global_step,
                    "seconds": round(seconds, 2), "seconds_per_step": round(seconds / max(steps_now, 1), 4),
                    "n_examples": len(examples), "resumed_from_step": start_step or None,
                    "precision": precision.record(), "fingerprint": fingerprint,
                })
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)
            return summary

        summary = distributed.run_on_main(write_on_main)
    # debug: the commands print their own one-line result (info here printed every result twice)
    log.debug("%s: %d steps in %.1fs, loss %.4f -> %s", stage, result.global_step, seconds, train_loss, out_dir)
    return summary


def _adapter_from_trainer(saved: Path, target: Path, model, lora: models.LoraSettings) -> None:
    """The adapter directory `models.save_adapter` writes, from the full adapter the Trainer saved under
    FSDP (adapter_config.json + adapter_model.safetensors; its pickled training_args.bin is left out)."""
    target.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (saved / name).is_file():
            raise FtsafetyError(f"the Trainer saved no {name} under FSDP (set fsdp_state_dict_type: FULL_STATE_DICT)")
        shutil.copyfile(saved / name, target / name)
    base = model.get_base_model()
    meta = {"model_type": base.config.model_type, "hidden_size": models._hidden_size(base),
            "num_layers": models._num_layers(base), "lora": dataclasses.asdict(lora)}
    (target / "ftsafety_adapter.json").write_text(json.dumps(meta, indent=2))


# -- checkpoints and resume ------------------------------------------------------------------------

CHECKPOINT_MARKER = "ftsafety_checkpoint.json"  # written last: a checkpoint without it is incomplete
PARTIAL_MANIFEST = "ftsafety_partial.json"  # settings of the run the checkpoints belong to
DEFENSE_STATE = "defense_state"  # defense_state.safetensors + defense_state.json in a checkpoint
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TRAINER_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a KeyboardInterrupt) during training: no run directory was written; the checkpoints stay.

    `TrainingInterrupted.last` keeps the latest one: typer turns a KeyboardInterrupt into an exit
    code, so the CLI reads the resume hint from there.
    """

    last: TrainingInterrupted | None = None

    def __init__(self, stage: str, step: int, checkpoint_step: int | None, partial: Path | None):
        self.stage, self.step, self.checkpoint_step, self.partial = stage, step, checkpoint_step, partial
        super().__init__(self.hint)
        TrainingInterrupted.last = self

    @property
    def hint(self) -> str:
        return self.hint_for(pipeline=False)

    def hint_for(self, pipeline: bool) -> str:
        """What to do next: a stage command resumes with --resume; `ftsafety run` resumes by itself."""
        if self.checkpoint_step:
            how = ("rerun the same ftsafety run command (it reuses finished stages and resumes this one)" if pipeline
                   else "resume with the same command plus --resume")
            return (f"{self.stage} interrupted at step {self.step} (checkpoint of step {self.checkpoint_step} kept in "
                    f"{self.partial}); {how}")
        return f"{self.stage} interrupted at step {self.step}, before its first checkpoint; run the command again"


def partial_dir(out_dir: str | Path) -> Path:
    """Where the checkpoints of a run that will write `out_dir` live until it finishes."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.partial"


def default_checkpoint_every(total_steps: int, logging_steps: int = 1) -> int:
    """Every 10% of the run, but at least every 50 steps: an interruption loses at most that much; rounded
    up to a multiple of `logging_steps`, so that a resumed run's first logged loss averages the same steps
    as the uninterrupted run's (the Trainer averages the loss since its last log, which a checkpoint
    between two logs would cut) and its metrics.jsonl is the same."""
    every = max(1, min(50, total_steps // 10))
    step = max(1, logging_steps)
    return -(-every // step) * step


def _total_steps(cfg: TrainConfig, n: int, world: int = 1) -> int:
    """The optimizer steps the Trainer will run, as Trainer computes them (`world` processes, each
    taking every world-th batch of batch_size, the last round padded as accelerate's even_batches does)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(math.ceil(n / cfg.batch_size) / world)
    per_epoch = max(batches // cfg.grad_accum + int(batches % cfg.grad_accum > 0), 1)
    return math.ceil(cfg.epochs * per_epoch)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _fingerprint_config(config: dict, examples: list[dict], trainer_cls, trainer_kwargs: dict | None) -> dict:
    """Everything a resumed run must share with the interrupted one, as plain JSON."""

    def default(o):
        try:
            return _json_default(o)
        except TypeError:
            return f"<{type(o).__name__}>"  # datasets and the like: not comparable, not fingerprinted

    fp = {
        **config, "trainer": f"{trainer_cls.__module__}.{trainer_cls.__qualname__}",
        "trainer_kwargs": trainer_kwargs or {},
        "examples_sha256": _sha256(json.dumps(examples, sort_keys=True, default=str)),
    }
    return json.loads(json.dumps(scrub(fp), sort_keys=True, default=default))


def _finished_run(final: Path, fingerprint: str) -> dict | None:
    """The summary of a complete run directory made with the same settings, else None."""
    path = final / "train_results.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = summary.get("fingerprint") == fingerprint and (final / models.RUN_MANIFEST).is_file()
    return summary if ok else None


def _checkpoint_dirs(partial: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in partial.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return sorted(found)


_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def _pickle_hashes(ckpt: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ckpt.iterdir())
            if p.is_file() and p.suffix in _PICKLE_SUFFIXES}


def check_pickle_hashes(ckpt: Path) -> None:
    """Refuse a checkpoint whose pickle-format files are not exactly those its marker lists (added, removed or
    changed since the run wrote them): torch.load never sees a file this run did not write."""
    want = _read_marker(ckpt).get("sha256")
    if want is None:
        raise FtsafetyError(f"{ckpt}: the checkpoint lists no file hashes (written by an older ftsafety); "
                            "drop --resume to start over")
    have = _pickle_hashes(ckpt)
    bad = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
    if bad:
        raise FtsafetyError(f"{ckpt}: {', '.join(bad)} changed since the run wrote it (sha256); refusing to load it "
                            "(drop --resume to start over)")
    for name in sorted(have):  # the marker sits beside the files and can be rewritten: read each one safely too
        if name != "training_args.bin":  # the Trainer writes it for people and never reads it back
            check_plain_pickle(ckpt / name)


def check_plain_pickle(path: Path) -> None:
    """Load `path` the safe way (tensors, numbers and numpy arrays only, `weights_only=True`) before the
    Trainer does: a file with anything else in it is refused in one line (and never unpickled fully, on
    any torch release)."""
    import warnings

    try:
        from transformers.trainer_pt_utils import safe_globals

        with safe_globals(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on a foreign pickle protocol: the line below says it all
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise FtsafetyError(f"{path} is not a checkpoint file this run wrote (it holds more than tensors and numbers); "
                            "refusing to load it: drop --resume to start over") from None


def _is_complete(ckpt: Path) -> bool:
    return (ckpt / CHECKPOINT_MARKER).is_file() and all((ckpt / f).is_file() for f in _TRAINER_FILES)


def _read_marker(ckpt: Path) -> dict:
    return json.loads((ckpt / CHECKPOINT_MARKER).read_text())


def _config_diff(old: dict, new: dict) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
        else:
            out.append(k)
    return out


def _prepare_partial(partial: Path, stage: str, fp_config: dict, fingerprint: str, resume: bool) -> Path | None:
    """Set up the checkpoint directory; return the checkpoint to resume from (None: start fresh). A path
    there that is not a checkpoint folder this tool made (a file, a link, a folder of other files) is
    refused, never deleted."""
    if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
        raise FtsafetyError(f"{partial} is not an ftsafety checkpoint folder (a {'link' if partial.is_symlink() else 'file'}); "
                            "remove it, then rerun")
    if partial.is_dir() and any(partial.iterdir()) and not (partial / PARTIAL_MANIFEST).is_file():
        raise FtsafetyError(f"{partial} holds files that are not an ftsafety run's checkpoints; move them away, then rerun")
    manifest = None
    if resume:
        try:
            manifest = json.loads((partial / PARTIAL_MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            log.info("%s: no checkpoint of an interrupted run in %s; starting from the beginning", stage, partial)
    if manifest is not None:
        if manifest.get("fingerprint") != fingerprint:
            diff = _config_diff(manifest.get("config", {}), fp_config) or ["the training data or trainer"]
            raise FtsafetyError(
                f"cannot resume: the interrupted run in {partial} used other settings ({', '.join(diff[:6])}); "
                "use the same settings, or drop --resume to start over"
            )
        ckpts = _checkpoint_dirs(partial)
        complete = [(s, p) for s, p in ckpts if _is_complete(p)]
        if complete:
            step, ckpt = complete[-1]
            check_pickle_hashes(ckpt)
            for s, p in ckpts:  # half-written checkpoints and any newer than the one we resume from
                if s > step or not _is_complete(p):
                    shutil.rmtree(p, ignore_errors=True)
            log.info("%s: resuming from step %d (%s)", stage, step, ckpt)
            return ckpt
        log.warning("%s: the interrupted run in %s saved no complete checkpoint; starting from the beginning",
                    stage, partial)
    elif partial.exists() and not resume:
        log.info("%s: deleting the checkpoints of an earlier interrupted run in %s (resume continues it instead)",
                 stage, partial)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    atomic_write_text(partial / PARTIAL_MANIFEST,
                      json.dumps({"stage": stage, "fingerprint": fingerprint, "config": fp_config}, indent=1) + "\n")
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the log rows of the steps after the checkpoint (they are trained again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line + "\n")
        except json.JSONDecodeError:  # a row cut off by the interruption
            continue
    atomic_write_text(path, "".join(keep))


class _Checkpointer(TrainerCallback):
    """Completes each Trainer checkpoint with the defense's state and a marker; restores the state on resume.

    A defense trainer with state of its own (Lisa's phase and anchor, Booster's harmful-batch
    iterator) provides `defense_state_dict()` -> nested dict of tensors and JSON values, and
    `load_defense_state_dict(state)`; trainers without them are stateless between steps.
    """

    def __init__(self, fingerprint: str, resume_from: Path | None, prior: dict):
        self.trainer: Trainer | None = None
        self.fingerprint, self.resume_from, self.prior = fingerprint, resume_from, prior
        self.last_step: int | None = None
        self.t0 = time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
        if self.resume_from is None:
            return
        loader = getattr(self.trainer, "load_defense_state_dict", None)
        saved = (self.resume_from / f"{DEFENSE_STATE}.json").is_file()
        if loader is not None and not saved:
            raise FtsafetyError(f"{self.resume_from}: no {DEFENSE_STATE}.json for {type(self.trainer).__name__}")
        if loader is not None:
            loader(load_tensor_state(self.resume_from, DEFENSE_STATE))

    def on_save(self, args, state, control, **kw):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        distributed.barrier()  # every process has written its share (its RNG state) before the marker
        if not distributed.is_main():
            self.last_step = state.global_step
            return
        if not ckpt.is_dir():
            return
        getter = getattr(self.trainer, "defense_state_dict", None)
        if getter is not None:
            save_tensor_state(ckpt, DEFENSE_STATE, getter())
        tr_loss = getattr(self.trainer, "_tr_loss", 0.0)
        loss_now = float(getattr(self.trainer, "_total_loss_scalar", 0.0)) + float(tr_loss)
        marker = {
            "step": state.global_step, "fingerprint": self.fingerprint,
            "loss_sum": float(self.prior.get("loss_sum", 0.0)) + loss_now,
            "seconds": float(self.prior.get("seconds", 0.0)) + time.perf_counter() - self.t0,
            "defense_state": getter is not None,
            # the Trainer's own state files are torch pickles (optimizer, scheduler, RNG): their hashes, so a
            # resume loads only the files this run wrote (a planted or altered file is refused by name)
            "sha256": _pickle_hashes(ckpt),
        }
        atomic_write_text(ckpt / CHECKPOINT_MARKER, json.dumps(marker, indent=1) + "\n")
        self.last_step = state.global_step


# -- tensor state on disk (safetensors + JSON, never pickle) ---------------------------------------

_TENSOR_REF = "__tensor__"


def save_tensor_state(directory: str | Path, name: str, state: dict) -> None:
    """Write a nested dict of tensors and JSON values as `<name>.safetensors` + `<name>.json`.

    Tensors (at any depth, in dicts or lists) go to the safetensors file; the JSON file holds the
    rest of the structure with `{"__tensor__": key}` in their place. No pickle is involved, so a
    state file can be loaded without trusting it. Both files are written atomically, JSON last.
    """
    import contextlib
    import os

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}

    def split(obj, key: str):
        if isinstance(obj, torch.Tensor):
            if key in tensors:
                raise ValueError(f"state key {key!r} appears twice")
            tensors[key] = obj.detach().to("cpu").contiguous().clone()
            return {_TENSOR_REF: key}
        if isinstance(obj, dict):
            if _TENSOR_REF in obj or not all(isinstance(k, str) for k in obj):
                raise ValueError(f"state at {key or '<root>'}: keys must be strings other than {_TENSOR_REF!r}")
            return {k: split(v, f"{key}/{k}" if key else k) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [split(v, f"{key}/{i}" if key else str(i)) for i, v in enumerate(obj)]
        return obj

    text = json.dumps(split(state, ""), indent=1, allow_nan=False)  # fails before anything is written
    st_path = directory / f"{name}.safetensors"
    if tensors:
        fd, tmp = tempfile.mkstemp(prefix=f".{st_path.name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, st_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    atomic_write_text(directory / f"{name}.json", text + "\n")


def load_tensor_state(directory: str | Path, name: str) -> dict:
    """Read back what `save_tensor_state` wrote (tensors on CPU)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    json_path, st_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    try:
        skeleton = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FtsafetyError(f"{json_path}: cannot read saved state ({exc})") from exc
    tensors = load_file(str(st_path)) if st_path.is_file() else {}

    def join(obj):
        if isinstance(obj, dict):
            if set(obj) == {_TENSOR_REF}:
                if obj[_TENSOR_REF] not in tensors:
                    raise FtsafetyError(f"{st_path}: tensor {obj[_TENSOR_REF]!r} is missing")
                return tensors[obj[_TENSOR_REF]]
            return {k: join(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [join(v) for v in obj]
        return obj

    return join(skeleton)


def _count_kinds(examples: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        out[e.get("kind", "example")] = out.get(e.get("kind", "example"), 0) + 1
    return out
