"""LoRA training on transformers' Trainer: the `align` and `finetune` baselines, and the hook every
training-stage defense plugs into (a Trainer subclass passed as `trainer_cls`)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from ftsafety import models
from ftsafety.console import RichTrainCallback
from ftsafety.data import Collator, DataConfig, SFTDataset
from ftsafety.errors import FtsafetyError
from ftsafety.utils import atomic_dir, check_writable_dir, environment, resolve_device, seed_everything, write_json, write_yaml

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    scheduler: str = "cosine"  # any transformers scheduler name: cosine, constant, linear, ...
    warmup_ratio: float = 0.1
    weight_decay: float = 0.1
    seed: int = 42
    logging_steps: int = 5

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accum < 1:
            raise FtsafetyError("batch size and gradient accumulation must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FtsafetyError(f"learning rate must be a positive number, got {self.lr}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise FtsafetyError("give epochs > 0 or max steps > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise FtsafetyError(f"warmup ratio must be in [0, 1), got {self.warmup_ratio}")


class NaNLossError(FtsafetyError):
    pass


class _NaNGuard(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs and not math.isfinite(logs["loss"]):
            raise NaNLossError(f"training loss became {logs['loss']} at step {state.global_step}; lower the learning rate")


def training_args(cfg: TrainConfig, device: torch.device, output_dir: str, **overrides) -> TrainingArguments:
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
        report_to="none",
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda",
        logging_nan_inf_filter=False,
    )
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio)
    if "warmup_ratio" in inspect.signature(TrainingArguments.__init__).parameters:
        kw["warmup_ratio"] = cfg.warmup_ratio
    else:
        kw["warmup_steps"] = cfg.warmup_ratio
    kw.update(overrides)
    return TrainingArguments(**kw)


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
    trainer_cls: type[Trainer] = Trainer,
    trainer_kwargs: dict | None = None,
    trainer_kwargs_fn=None,
    extra_config: dict | None = None,
    trust_remote_code: bool = False,
    quiet: bool = False,
) -> dict:
    """Merge `parent`'s adapters, attach a fresh LoRA, train it on `examples`, write a run directory.

    `trainer_cls` is the hook for training-stage defenses (a `transformers.Trainer` subclass);
    `trainer_kwargs` / `trainer_kwargs_fn(tokenizer=, model=)` give it its extra arguments.
    The run directory (written atomically) holds `adapter/` (peft format), `ftsafety_run.json`
    (base model + adapter chain: pass the directory as `--model` to the next stage),
    `config.yaml`, `metrics.jsonl` and `train_results.json`.
    """
    out_dir = check_writable_dir(out_dir)
    seed_everything(train_cfg.seed)
    dev = resolve_device(device)
    model, tok, spec = models.load(parent, device=dev, trust_remote_code=trust_remote_code)
    model = models.attach_lora(model, lora)
    model.train()
    dataset = SFTDataset(examples, tok, data_cfg)
    config = {
        "stage": stage, "parent": parent, "parent_resolved": dataclasses.asdict(spec), "data": dataclasses.asdict(data_cfg),
        "train": dataclasses.asdict(train_cfg), "lora": dataclasses.asdict(lora), "n_examples": len(examples),
        "kinds": _count_kinds(examples), **(extra_config or {}),
    }
    kwargs = dict(trainer_kwargs or {})
    if trainer_kwargs_fn is not None:  # defenses that need the tokenizer/model (e.g. a second dataset)
        kwargs.update(trainer_kwargs_fn(tokenizer=tok, model=model))
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory() as scratch:
        callback = RichTrainCallback(f"{stage}", metrics_path=tmp / "metrics.jsonl", disable=quiet)
        trainer = trainer_cls(
            model=model, args=training_args(train_cfg, dev, scratch), train_dataset=dataset,
            data_collator=Collator(tok.pad_token_id), callbacks=[callback, _NaNGuard()], **kwargs,
        )
        trainer.remove_callback(PrinterCallback)  # the rich callback reports instead
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
        if not math.isfinite(result.training_loss):
            raise NaNLossError(f"training loss became {result.training_loss}; lower the learning rate")
        models.save_adapter(model, tmp / "adapter", lora)
        final = Path(out_dir)
        write_json(tmp / models.RUN_MANIFEST, models.run_manifest(spec, tmp / "adapter", final, {"stage": stage}))
        write_yaml(tmp / "config.yaml", config)
        summary = {
            "stage": stage, "train_loss": result.training_loss, "steps": result.global_step, "seconds": round(seconds, 2),
            "seconds_per_step": round(seconds / max(result.global_step, 1), 4), "n_examples": len(examples),
            "environment": environment(),
        }
        write_json(tmp / "train_results.json", summary)
    log.info("%s: %d steps in %.1fs, loss %.4f -> %s", stage, result.global_step, seconds, result.training_loss, out_dir)
    return summary


def _count_kinds(examples: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        out[e.get("kind", "example")] = out.get(e.get("kind", "example"), 0) + 1
    return out
