"""Lisa: lazy safety alignment during the user's fine-tune (fine-tuning-stage defense).

Paper: Huang et al., "Lisa: Lazy Safety Alignment for Large Language Models against Harmful
Fine-tuning Attack", NeurIPS 2024, arXiv 2405.18641; code git-disl/Lisa (`trainer.py`).

Bi-State Optimisation (BSO) alternates an *alignment state* (steps on safe alignment data, loss f)
and a *fine-tuning state* (steps on the user's data, loss h) with asymmetric budgets, and Lisa adds
a proximal term to both states (the paper's two proximal sub-problems, as ALGORITHMS.md §3 states
them; we did not check the camera-ready's equation numbers):

    alignment state:   min_w f(w) + rho/2 * ||w - w~||^2
    fine-tuning state: min_w h(w) + rho/2 * ||w - w~||^2

where w~ (the anchor) is the point where the current state was entered. `LisaTrainer` follows the
original `check_mode` / `training_step`:
  * the status starts as "alignment" when alignment_steps > 0 and alignment data is given; a clock
    counts the steps spent in the current state; when it reaches that state's budget the status
    flips, the anchor becomes a detached copy of the current trainable (LoRA) weights, the clock
    restarts;
  * in the alignment state the user batch drawn by the Trainer is discarded and replaced by the next
    batch of the alignment set. The total step budget is therefore fixed by the user data: alignment
    steps consume user steps (with 100/900, 10% of the user's batches are never trained on);
  * the proximal term is on only once more than 10% of all steps are done (code quirk; the
    original notes it hurts GSM8K convergence early), and only for rho > 0 (rho = 0 is plain BSO);
  * one optimizer and one LR schedule serve both states.

Where we differ from the original code, and why:
  * First anchor: the original initialises both of its anchor copies to the weights at the start of
    training; we do the same (one anchor: the original keeps two copies but each state only ever
    reads the one written when it was entered).
  * The proximal gradient rho * (w - w~) is added to `.grad` with fused foreach kernels instead of
    back-propagating the term through autograd: the same gradient (checked in tests) at a fraction
    of the kernel launches. The term's value is still added to the returned (logged) loss.
  * The 10% threshold uses the Trainer's real total step count (`state.max_steps`); the original
    used len(train dataloader) * epochs, which ignores `max_steps`. `prox_start` = 0 turns the term on
    from the first step, as the paper's objective reads (no delay is described there; we did not
    check the paper's pseudocode itself).
  * Steps (clock and threshold) count `training_step` calls, i.e. micro-batches, as the original;
    they equal optimizer steps at grad_accum 1, the papers' setting. Under gradient accumulation the
    proximal gradient is divided by the number of accumulated micro-batches like the loss is (the
    original divided neither).
  * The alignment iterator has its own seeded generator (args.seed + epoch) rather than the global
    RNG, so it neither perturbs nor depends on the user dataloader's shuffling.
  * Alignment batches are passed with `num_items_in_batch=None` (mean over their own tokens): the
    Trainer's count was taken on the discarded user batch.

Several processes (DDP, docs/distributed.md): the state switches depend only on the step counters,
which every process advances identically, so every process switches at the same step; the anchor and
the proximal term are elementwise on replicated weights (identical everywhere, added after DDP's
all-reduce). The alignment batches are sharded like the Trainer shards the user batches: every process
draws the same global batch of batch_size x processes from the same seeded order and trains on its own
slice, and the loss is normalised by the loss tokens of the whole global batch (`num_items_in_batch`,
one all-reduce; what the Trainer does for the user batches), so a step equals the one-process step on
the same global batch. When the short last batch of a pass leaves a process nothing, it runs a forward
on one example with every label masked (it adds nothing to the gradient).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch

from ftsafety import distributed
from ftsafety.defenses._perturb import loss_tokens
from ftsafety.defenses.base import Defense, Paper, TrainerSetup, defense_settings, training_arguments_class
from ftsafety.errors import FtsafetyError, check_number
from ftsafety.trainer import FtTrainer

log = logging.getLogger(__name__)

ALIGNMENT, FINETUNE = "alignment", "finetune"


@dataclass
class LisaConfig:
    """Lisa's knobs with the defaults of `script/finetune/lisa_poison_ratio.sh`."""

    alignment_steps: int = field(
        default=100, metadata={"help": "Steps per alignment state (code `alignment_step`, default 100)."}
    )
    finetune_steps: int = field(
        default=900, metadata={"help": "Steps per fine-tuning state (code `finetune_step`, default 900)."}
    )
    rho: float = field(default=1.0, metadata={"help": "rho, proximal intensity (default 1; 0 = plain BSO)."})
    prox_start: float = field(
        default=0.1, metadata={"help": "Share of steps before the proximal term starts (code 0.1)."}
    )
    align_n: int = field(
        default=300, metadata={"help": "Alignment examples, built as `align` builds them (0 = none: plain fine-tune)."}
    )
    align_benign_ratio: float = field(
        default=0.5, metadata={"help": "Share of benign pairs in the alignment examples (as `align --benign-ratio`)."}
    )
    align_benign_task: str = field(
        default="none",
        metadata={"help": "none, or the task whose rows make half of the benign pairs (as `align --benign-task`)."},
    )
    align_data: str = field(
        default="refusals", metadata={"key_when_set": True,
                                      "help": "refusals | beavertails-safe (Lisa's guide data), as `align --alignment-data`."},
    )

    def __post_init__(self):
        if self.alignment_steps < 0 or self.finetune_steps < 0:
            raise FtsafetyError(
                f"alignment and fine-tuning steps must be >= 0, got --alignment-steps {self.alignment_steps} "
                f"and --finetune-steps {self.finetune_steps}"
            )
        if self.alignment_steps == 0 and self.finetune_steps == 0:
            raise FtsafetyError(
                "--alignment-steps and --finetune-steps are both 0: Lisa has no state to train in "
                "(for a plain fine-tune use --alignment-steps 0 with --finetune-steps > 0, or --align-n 0)"
            )
        if self.alignment_steps > 0 and self.finetune_steps == 0:
            raise FtsafetyError(
                "finetune steps must be > 0 when alignment steps > 0 (no user batch would be trained on)"
            )
        check_number("rho", self.rho)
        if not 0.0 <= self.prox_start <= 1.0:
            raise FtsafetyError(f"prox_start must be in [0, 1], got {self.prox_start}")
        if self.align_n < 0:
            raise FtsafetyError(f"--align-n must be >= 0, got {self.align_n}")
        if not 0.0 <= self.align_benign_ratio < 1.0:
            raise FtsafetyError(f"benign ratio must be in [0, 1), got {self.align_benign_ratio}")
        from ftsafety.data import check_alignment_data, check_benign_task

        check_benign_task(self.align_benign_task)
        check_alignment_data(self.align_data)


LisaTrainingArguments = training_arguments_class(
    "LisaTrainingArguments", LisaConfig, ("alignment_steps", "finetune_steps", "rho", "prox_start"),
    "`transformers.TrainingArguments` plus Lisa's alignment_steps, finetune_steps, rho and prox_start: "
    "`LisaTrainer(args=..., alignment_dataset=...)`.")


class LisaTrainer(FtTrainer):
    """Bi-State Optimisation with a proximal term (Lisa), as a `transformers.Trainer` subclass.

    Args:
        alignment_dataset: tokenised alignment examples (e.g. an `SFTDataset`), batched with the
            Trainer's collator and batch size; an empty one turns BSO off (as `guide_data_num=0`).
            Required when `alignment_steps > 0`.
        lisa: a `LisaConfig` (alignment_steps, finetune_steps, rho, prox_start).

    The total number of steps is set by the user data (epochs / max_steps); alignment steps replace
    user steps, they are not added to them.
    """

    def __init__(self, *args, alignment_dataset=None, lisa: LisaConfig | None = None, **kwargs):
        # `lisa` wins over the knobs of `args` (a LisaTrainingArguments), which win over the defaults
        self.lisa = lisa or defense_settings(LisaConfig, args, kwargs, {})
        if alignment_dataset is None and self.lisa.alignment_steps > 0:
            raise FtsafetyError("LisaTrainer: alignment_steps > 0 needs alignment_dataset (tokenised alignment examples, "
                                "e.g. an SFTDataset); for a plain fine-tune set alignment_steps=0")
        super().__init__(*args, **kwargs)
        self.alignment_dataset = alignment_dataset
        has_align = alignment_dataset is not None and len(alignment_dataset) > 0
        if self.lisa.alignment_steps > 0 and not has_align:
            log.warning("lisa: alignment steps > 0 but no alignment data: plain fine-tuning (BSO off)")
        self.bso = self.lisa.alignment_steps > 0 and has_align
        self.status = ALIGNMENT if self.bso else FINETUNE
        self.clock = 0  # steps done in the current state
        self.steps = 0  # training_step calls so far
        self.anchor: dict[str, torch.Tensor] | None = None  # w~, set lazily to the weights at the start
        self.last_prox: torch.Tensor | None = None  # value added at the last step (None: term off)
        self._align_epoch, self._align_pos, self._align_order = 0, 0, None
        self._params: dict[str, torch.nn.Parameter] | None = None
        self._window = self._empty_window()

    # -- state ----------------------------------------------------------------------------------

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        if self._params is None:
            self._params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return self._params

    def _set_anchor(self) -> None:
        params = self._trainable()
        if self.anchor is None:
            self.anchor = {n: p.detach().clone() for n, p in params.items()}
        else:
            torch._foreach_copy_(list(self.anchor.values()), [p.detach() for p in params.values()])

    def state_dict(self) -> dict:
        """Defense state for a resume: status, clock, step count, alignment-iterator position, anchor."""
        return {
            "status": self.status, "clock": self.clock, "steps": self.steps,
            "align_epoch": self._align_epoch, "align_pos": self._align_pos,
            "anchor": None if self.anchor is None else {n: t.clone() for n, t in self.anchor.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"status", "clock", "steps", "align_epoch", "align_pos", "anchor"} - set(state)
        if missing:
            raise FtsafetyError(f"lisa state is missing {', '.join(sorted(missing))}")
        if state["status"] not in (ALIGNMENT, FINETUNE):
            raise FtsafetyError(f"lisa state has unknown status {state['status']!r}")
        if state["status"] == ALIGNMENT and not self.bso:
            raise FtsafetyError("lisa state is in the alignment state but this trainer has no alignment data")
        params = self._trainable()
        if state["anchor"] is not None:
            if set(state["anchor"]) != set(params):
                raise FtsafetyError("lisa state anchor does not match this model's trainable parameters")
            anchor = state["anchor"]
            self.anchor = {n: anchor[n].detach().to(p.device, p.dtype).clone() for n, p in params.items()}
        else:
            self.anchor = None
        self.status, self.clock, self.steps = state["status"], int(state["clock"]), int(state["steps"])
        self._align_epoch, self._align_pos = int(state["align_epoch"]), int(state["align_pos"])
        self._align_order = None

    # the hooks train_lora's checkpoints call (tensors go to safetensors, the rest to JSON)
    def defense_state_dict(self) -> dict:
        return self.state_dict()

    def load_defense_state_dict(self, state: dict) -> None:
        self._params = None  # the Trainer may have loaded the checkpoint's adapter since the cache was made
        self.load_state_dict(state)

    # -- alignment data ---------------------------------------------------------------------------

    def _next_alignment_batch(self) -> dict:
        """Next batch of the alignment set: seeded reshuffle per pass, cycling like the original.
        Several processes: the global batch is batch_size x processes and this process gets its slice."""
        n, bs = len(self.alignment_dataset), self.args.per_device_train_batch_size
        world = distributed.world_size()
        if self._align_pos >= n:  # pass finished: next pass, new order
            self._align_epoch, self._align_pos, self._align_order = self._align_epoch + 1, 0, None
        if self._align_order is None:
            gen = torch.Generator().manual_seed(self.args.seed + self._align_epoch)
            self._align_order = torch.randperm(n, generator=gen).tolist()
        idx = self._align_order[self._align_pos : self._align_pos + bs * world]
        self._align_pos += len(idx)
        if world > 1:
            return self._local_alignment_batch(idx, bs)
        return self.data_collator([self.alignment_dataset[i] for i in idx])

    def _global_token_mean(self) -> bool:
        """True when the alignment loss can be normalised over the global batch's tokens (the model
        takes num_items_in_batch and the Trainer averages tokens across processes, its default)."""
        return bool(self.model_accepts_loss_kwargs and self.args.average_tokens_across_devices)

    def _local_alignment_batch(self, idx: list[int], bs: int) -> dict:
        mine = idx[distributed.rank() * bs : (distributed.rank() + 1) * bs]
        if mine:
            return self.data_collator([self.alignment_dataset[i] for i in mine])
        batch = self.data_collator([self.alignment_dataset[idx[0]]])  # the short last batch left nothing here
        if self._global_token_mean():  # a forward that adds nothing (DDP needs every process's backward)
            batch["labels"] = torch.full_like(batch["labels"], -100)
        return batch

    def _alignment_inputs(self) -> tuple[dict, torch.Tensor | None]:
        """The next alignment batch and its num_items_in_batch: None (its own mean) in a single process;
        with several processes the loss tokens of the global batch times the accumulation steps."""
        batch = self._next_alignment_batch()
        if distributed.world_size() == 1 or not self._global_token_mean():
            return batch, None
        count = loss_tokens(batch).to(self.args.device).reshape(1)
        ga = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        return batch, distributed.all_reduce_sum_(count).reshape(()) * ga

    def check_mode(self, inputs: dict, num_items_in_batch):
        """The original `check_mode`: maybe switch state, and swap in an alignment batch if aligning."""
        cfg = self.lisa
        if self.status == ALIGNMENT:
            if self.clock >= cfg.alignment_steps and self.steps > 0:
                self.status, self.clock = FINETUNE, 0
                self._set_anchor()
            else:
                return self._alignment_inputs()
        elif self.bso and self.clock >= cfg.finetune_steps and self.steps > 0:
            self.status, self.clock = ALIGNMENT, 0
            self._set_anchor()
            return self._alignment_inputs()
        return inputs, num_items_in_batch

    # -- the step ---------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.anchor is None:  # first anchor: the weights at the start of training (as the original)
            self._set_anchor()
        inputs, num_items_in_batch = self.check_mode(inputs, num_items_in_batch)
        loss = super().training_step(model, inputs, num_items_in_batch)  # forward + backward of f or h
        ga = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        key = "align" if self.status == ALIGNMENT else "ft"
        self._window[f"{key}_loss"] += loss.detach() * ga
        self._window[f"{key}_n"] += 1
        total = self.state.max_steps * self.args.gradient_accumulation_steps
        if self.lisa.rho > 0 and self.steps > self.lisa.prox_start * total:
            prox = self._add_proximal_grad(1.0 / ga)
            self._window["prox"] += prox
            self._window["prox_n"] += 1
            self.last_prox = prox
            loss = loss + prox.to(loss.device) / ga
        else:
            self.last_prox = None
        self.steps += 1
        self.clock += 1
        return loss

    @torch.no_grad()
    def _add_proximal_grad(self, scale: float) -> torch.Tensor:
        """grad += scale * rho * (w - w~); returns rho/2 * ||w - w~||^2 (summed over trainable tensors)."""
        params = list(self._trainable().values())
        diffs = torch._foreach_sub([p.detach() for p in params], list(self.anchor.values()))
        coef = self.lisa.rho * scale
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # fp16: .grad holds scaled gradients until unscale_
            coef *= scaler.get_scale()
        with_grad = [(p.grad, d) for p, d in zip(params, diffs) if p.grad is not None]
        for p, d in zip(params, diffs):
            if p.grad is None:
                p.grad = d * coef
        if with_grad:
            grads, ds = zip(*with_grad)
            torch._foreach_add_(list(grads), list(ds), alpha=coef)
        norms = torch._foreach_norm(diffs)
        return 0.5 * self.lisa.rho * torch.stack(norms).float().pow(2).sum()

    # -- logging ----------------------------------------------------------------------------------

    @staticmethod
    def _empty_window() -> dict:
        return {"align_loss": 0.0, "align_n": 0, "ft_loss": 0.0, "ft_n": 0, "prox": 0.0, "prox_n": 0}

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds the Lisa state, the proximal term and the per-state losses to each training log."""
        if "loss" in logs:
            w = self._window
            logs["lisa_state"] = self.status
            logs["lisa_clock"] = self.clock
            logs["lisa_prox"] = float(w["prox"] / w["prox_n"]) if w["prox_n"] else 0.0
            if w["align_n"]:
                logs["lisa_align_loss"] = float(w["align_loss"] / w["align_n"])
            if w["ft_n"]:
                logs["lisa_finetune_loss"] = float(w["ft_loss"] / w["ft_n"])
            logs["lisa_align_steps"] = w["align_n"]
            self._window = self._empty_window()
        super().log(logs, *args, **kwargs)


PAPER = Paper("Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning Attack",
              "NeurIPS 2024", "2405.18641", "git-disl/Lisa")


def _alignment_examples(cfg: LisaConfig, common) -> list[dict]:
    from ftsafety import data as D

    if not cfg.align_n:
        return []
    return D.alignment_examples(common.data, cfg.align_n, cfg.align_benign_ratio, common.seed, cfg.align_benign_task,
                                cfg.align_data)


def _setup(cfg: LisaConfig, common, stage) -> TrainerSetup:
    """The alignment examples (built as `align` builds them) become Lisa's alignment state's data."""
    from ftsafety import data as D

    dcfg = common.data
    examples = _alignment_examples(cfg, common)

    def kwargs_fn(tokenizer, model):
        return {"alignment_dataset": D.SFTDataset(examples, tokenizer, dcfg) if examples else [], "lisa": cfg}

    return TrainerSetup(LisaTrainer, kwargs_fn=kwargs_fn, record={"lisa": dataclasses.asdict(cfg)})


DEFENSE = Defense(
    name="lisa", stage="finetune", command="finetune-lisa", config_cls=LisaConfig, paper=PAPER,
    summary="The user's fine-tune alternating alignment and user states, pulled together by a proximal term.",
    neutral={"alignment_steps": 0, "rho": 0.0}, setup=_setup,
    check_data=lambda cfg, common, task: _alignment_examples(cfg, common),
)
