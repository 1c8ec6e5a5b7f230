"""Booster: attenuating harmful perturbation during safety alignment (`align-booster`).

Huang et al., "Booster: Tackling Harmful Fine-tuning for Large Language Models via Attenuating
Harmful Perturbation", ICLR 2025, arXiv 2409.01586, code git-disl/Booster (`trainer.py`,
BoosterAlignmentTrainer).

Objective: min_w f(w) + lam * (h(w) - h(w - alpha * grad h(w) / ||grad h(w)||)), f the alignment loss,
h the loss on harmful (prompt, harmful answer) pairs. With the second-order term dropped (as in
first-order MAML) each step's update direction is (Algorithm 1)
    grad f(w) + lam * (grad h(w) - grad h(w - alpha * grad h(w) / ||grad h(w)||)),
three forward/backward passes: h at w, h at the perturbed weights, f at w. `perturb_aware=True`
computes grad f with Vaccine's hidden-state perturbation (4 passes), as the Booster code offers.
Defaults: lam = 5, alpha = 0.1 (`smooth_align.sh`), rho = 5 for the perturb-aware mode
(`smooth_align_perturb.sh`).

Harmful data: `data.harmful_examples(cfg, "calibration")`, disjoint from the attack rows, in the
same template, drawn with its own seeded generator in batches of the alignment batch size, cycling
(the original draws batches of 10 = its alignment batch size from a RandomSampler DataLoader).

Differences from the original code: the harmful gradients are taken with `torch.autograd.grad`
(the original backpropagates into `.grad` and calls `model.zero_grad()`, which wipes earlier
micro-batches under gradient accumulation); the perturbed weights are restored by copying back a
stored copy rather than re-adding the step (no rounding drift); the harmful passes run under a
forked RNG, so lam = 0 reproduces `align` exactly (dropout included); the harmful term is divided
by the gradient-accumulation steps like the alignment loss, so accumulation averages it too.

Several processes (DDP, docs/distributed.md): the reference is the one-process run with the same
global batch B = batch_size x processes, whose harmful batches hold B examples. Every process draws
the same global harmful batch of B (same seeded generator) and takes its own slice of batch_size, as
the Trainer shards the alignment batches. The harmful passes run on the module inside the DDP wrapper
(autograd.grad gives gradients that DDP does not all-reduce); each process weights its gradient by its
`token_share` N_r/N of the harmful loss tokens and one all-reduce sums them, so every process holds
the gradient of the whole global harmful batch (the one-process gradient), takes the same norm and
makes the same weight perturbation: the replicas never diverge. grad f goes through DDP as in `align`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ftsafety import distributed
from ftsafety.defenses._perturb import (
    PERTURB_AT,
    MetricSums,
    activation_perturbation,
    add_to_outputs,
    forked_rng,
    global_norm,
    perturb_targets,
    refuse_sharded_training,
    token_share,
)
from ftsafety.defenses.base import Defense, Paper, TrainerSetup, defense_settings, training_arguments_class
from ftsafety.errors import FtsafetyError, check_number
from ftsafety.trainer import FtTrainer

HARMFUL_DATA = ("calibration", "paired")

PAPER = Paper("Booster: Tackling Harmful Fine-tuning for Large Language Models via Attenuating Harmful Perturbation",
              "ICLR 2025", "2409.01586", "git-disl/Booster")


@dataclass
class BoosterConfig:
    lam: float = field(
        default=5.0, metadata={"help": "lambda, regulariser intensity (smooth_align.sh default 5)."}
    )
    alpha: float = field(
        default=0.1, metadata={"help": "alpha, step size of the simulated harmful perturbation (0.1)."}
    )
    perturb_aware: bool = field(
        default=False, metadata={"help": "Also apply Vaccine's perturbation to the alignment pass."}
    )
    rho: float = field(
        default=5.0, metadata={"help": "rho of the perturb-aware mode (smooth_align_perturb.sh default 5)."}
    )
    perturb_at: str = field(
        default="attn", metadata={"help": "attn | layer: where the perturb-aware eps is added."}
    )
    harmful_batch_size: int = field(
        default=0, metadata={"key_when_set": True,
                             "help": "Harmful examples per step (0: the alignment batch size; the original: always 10)."})
    harmful_data: str = field(
        default="calibration", metadata={
            "key_when_set": True,
            "help": "calibration: BeaverTails' calibration split (prompts disjoint from the alignment's) | "
                    "paired: the alignment prompts themselves with their harmful answers (the original's "
                    "RepNoise file pairs them so)"})

    def __post_init__(self):
        for name in ("lam", "alpha", "rho"):
            check_number(name, getattr(self, name))
        if self.perturb_at not in PERTURB_AT:
            raise FtsafetyError(
                f"unknown perturbation site {self.perturb_at!r}; choose one of {', '.join(PERTURB_AT)}"
            )
        if self.harmful_batch_size < 0:
            raise FtsafetyError(f"harmful batch size must be >= 0 (0: the alignment batch size), got "
                                f"{self.harmful_batch_size}")
        if self.harmful_data not in HARMFUL_DATA:
            raise FtsafetyError(f"unknown harmful data {self.harmful_data!r}; choose one of {', '.join(HARMFUL_DATA)}")


class CyclingBatches:
    """Batches from a map-style dataset in a seeded random order, reshuffled each time it runs out
    (the last batch of a pass may be smaller, like a DataLoader without drop_last). Never touches
    the global RNG.

    With `world` > 1 processes every process draws the same global batch of batch_size x world and
    `next` returns this process's (`rank`'s) slice of batch_size, or None when the short last batch of
    a pass leaves it nothing."""

    def __init__(self, dataset, batch_size: int, collate, seed: int, world: int = 1, rank: int = 0):
        if len(dataset) == 0:
            raise FtsafetyError("the harmful data set for Booster is empty")
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.world, self.rank = world, rank
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> dict | None:
        if not self.order:
            self.order = torch.randperm(len(self.dataset), generator=self.generator).tolist()
        n = self.batch_size * self.world
        idx, self.order = self.order[:n], self.order[n:]
        if self.world > 1:
            idx = idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if not idx:
                return None
        return self.collate([self.dataset[i] for i in idx])

    def state_dict(self) -> dict:
        """Position for a resume: the generator's state and what is left of the current pass."""
        return {"generator": self.generator.get_state(), "order": list(self.order), "n": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != len(self.dataset):
            raise FtsafetyError(
                f"saved harmful-batch state is for {state['n']} examples, this data set has {len(self.dataset)}"
            )
        self.generator.set_state(state["generator"].to(torch.uint8))
        self.order = [int(i) for i in state["order"]]


BoosterTrainingArguments = training_arguments_class(
    "BoosterTrainingArguments", BoosterConfig, ("lam", "alpha", "perturb_aware", "rho", "perturb_at"),
    "`transformers.TrainingArguments` plus Booster's lam, alpha, perturb_aware, rho and perturb_at: "
    "`BoosterTrainer(args=..., harmful_dataset=...)`.")


class BoosterTrainer(FtTrainer):
    """transformers.Trainer whose training step adds Booster's harmful-perturbation attenuation term."""

    paper = PAPER

    def __init__(
        self,
        *args,
        harmful_dataset,
        lam: float | None = None,
        alpha: float | None = None,
        perturb_aware: bool | None = None,
        rho: float | None = None,
        perturb_at: str | None = None,
        harmful_batch_size: int = 0,
        **kwargs,
    ):
        # explicit values win over those of `args` (a BoosterTrainingArguments), which win over the defaults
        self.booster = defense_settings(BoosterConfig, args, kwargs, {
            "lam": lam, "alpha": alpha, "perturb_aware": perturb_aware, "rho": rho, "perturb_at": perturb_at})
        super().__init__(*args, **kwargs)
        refuse_sharded_training(self, "align-booster")
        self.harmful = CyclingBatches(
            harmful_dataset, harmful_batch_size or self.args.per_device_train_batch_size, self.data_collator,
            seed=self.args.seed,
            world=distributed.world_size(), rank=distributed.rank(),
        )
        self._extra = MetricSums()
        self._sites: tuple[int, list[nn.Module]] | None = None

    # the hooks train_lora's checkpoints call: the harmful-batch iterator is Booster's only state
    def defense_state_dict(self) -> dict:
        return {"harmful_batches": self.harmful.state_dict()}

    def load_defense_state_dict(self, state: dict) -> None:
        self.harmful.load_state_dict(state["harmful_batches"])

    def _loss(self, model, inputs) -> torch.Tensor:
        with self.compute_loss_context_manager():
            return self.compute_loss(model, dict(inputs))  # per-batch mean (no num_items_in_batch)

    def harmful_gradients(self, model: nn.Module, harmful: dict | None, params: list[torch.Tensor],
                          share: torch.Tensor | None = None):
        """grad h(w) and grad h(w - alpha * grad h(w) / ||grad h(w)||); weights restored exactly.

        `share` (several processes): this process's token share of the global harmful batch; both
        gradients are then those of the global batch, summed over the processes (see the module doc)."""
        if share is None:
            h0 = self._loss(model, harmful)
            g_h = _grads(h0, params)
        else:
            h0, g_h = self._global_harmful_grads(model, harmful, params, share)
        norm = global_norm(g_h)
        scale = self.booster.alpha / (norm + 1e-7)
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, g in zip(params, g_h):
                    p.sub_(g * scale)
            if share is None:
                h1 = self._loss(model, harmful)
                g_hp = _grads(h1, params)
            else:
                h1, g_hp = self._global_harmful_grads(model, harmful, params, share)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        return g_h, g_hp, h0.detach(), h1.detach(), norm

    def _global_harmful_grads(self, model, harmful: dict | None, params: list[torch.Tensor],
                              share: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(local mean loss, sum over processes of share_r * grad_r): the global batch's gradient."""
        if harmful is None or not bool(share > 0):  # no harmful loss token here: contributes zero
            loss = torch.zeros((), device=share.device)
            grads = [torch.zeros_like(p) for p in params]
        else:
            loss = self._loss(model, harmful)
            grads = [g * share.to(device=g.device, dtype=g.dtype) for g in _grads(loss, params)]
        return loss, distributed.all_reduce_sum_tensors(grads)

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        batch = self.harmful.next()  # this process's slice of the global harmful batch (None: empty)
        harmful = None if batch is None else self._prepare_inputs(batch)
        share = token_share(harmful, device=self.args.device)  # None in a single process
        net = model if share is None else distributed.unwrap_ddp(model)  # extra passes: no DDP all-reduce
        params = [p for p in model.parameters() if p.requires_grad]
        with forked_rng(model):  # passes 1-2: the alignment pass below sees a plain SFT step's RNG
            g_h, g_hp, h0, h1, h_norm = self.harmful_gradients(net, harmful, params, share)
        self._extra.add(
            booster_harmful_loss=h0, booster_harmful_loss_perturbed=h1, booster_harmful_grad_norm=h_norm
        )
        ctx = contextlib.nullcontext()
        if self.booster.perturb_aware:  # Vaccine's pass 1 on the alignment batch
            eps, a_norm, _ = activation_perturbation(
                net, self._perturbation_sites(net), lambda: self._loss(net, inputs), self.booster.rho,
                share=token_share(inputs),
            )
            self._extra.add(vaccine_grad_norm=a_norm)
            ctx = add_to_outputs(eps)
        with ctx:  # pass 3 (4): grad f into .grad, exactly as `align` does it
            loss = super().training_step(model, inputs, num_items_in_batch)
        ga = (
            getattr(self, "current_gradient_accumulation_steps", None)
            or self.args.gradient_accumulation_steps
        )
        coef = self.booster.lam / ga
        with torch.no_grad():
            for p, a, b in zip(params, g_h, g_hp):
                term = (a - b).mul_(coef).to(p.dtype)
                if p.grad is None:
                    if coef:
                        p.grad = term
                else:
                    p.grad.add_(term)
        return loss

    def _perturbation_sites(self, model: nn.Module) -> list[nn.Module]:
        if self._sites is None or self._sites[0] != id(model):
            self._sites = (id(model), perturb_targets(model, self.booster.perturb_at))
        return self._sites[1]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs get the defense terms, averaged since the last log
            logs.update(self._extra.pop_means())
        super().log(logs, start_time)


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def harmful_dataset(data_cfg, tokenizer, examples: list[dict] | None = None):
    """The harmful pairs Booster simulates its harmful step on, tokenised like the alignment set: by
    default the calibration pairs (disjoint from the attack data)."""
    from ftsafety import data as D

    examples = D.harmful_examples(data_cfg, "calibration") if examples is None else examples
    return D.SFTDataset(examples, tokenizer, data_cfg)


def _setup(cfg: BoosterConfig, common, stage) -> TrainerSetup:
    """`paired` takes the harmful answers of exactly the prompts being aligned: the harmful perturbation
    is then simulated on the prompts whose refusals are being learned, as in Booster's own data."""
    from ftsafety import data as D

    if cfg.harmful_data == "paired":
        examples = D.alignment_prompt_rows(common.data, stage.n, stage.benign_ratio)
    else:
        examples = D.harmful_examples(common.data, "calibration")
    record = {"booster": dataclasses.asdict(cfg), "harmful_split": "train" if cfg.harmful_data == "paired"
              else "calibration", "n_harmful": len(examples)}
    kwargs = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("harmful_data", "harmful_batch_size")}
    if cfg.harmful_batch_size:  # the trainer's argument only when set: unset, the trainer and its key are unchanged
        kwargs["harmful_batch_size"] = cfg.harmful_batch_size
    return TrainerSetup(BoosterTrainer, kwargs=kwargs, record=record,
                        kwargs_fn=lambda tokenizer, model: {"harmful_dataset": harmful_dataset(common.data, tokenizer,
                                                                                              examples)})


DEFENSE = Defense(
    name="booster", stage="align", command="align-booster", config_cls=BoosterConfig, paper=PAPER,
    summary="SFT alignment plus a term damping the loss drop of a simulated harmful step (3 passes/step).",
    neutral={"lam": 0.0}, setup=_setup,
)
