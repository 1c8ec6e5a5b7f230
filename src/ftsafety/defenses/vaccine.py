"""Vaccine: perturbation-aware safety alignment (`align-vaccine`).

Huang, Hu, Liu, "Vaccine: Perturbation-aware Alignment for Large Language Models against Harmful
Fine-tuning", NeurIPS 2024, arXiv 2402.01109, code git-disl/Vaccine (`trainer.py`, VaccineTrainer).

Eq. 2 of the paper: min_w max_{||eps|| <= rho} L(f~_{w_L,eps_L} o ... o f~_{w_1,eps_1}(x), y), with
f~_{w_l,eps_l}(e) = f_{w_l}(e) + eps_l. The inner max is one normalised gradient step on the hidden
states, so each training step makes two forward/backward passes on the same alignment batch:
  1. g_l = dL/de_l for every perturbed hidden state; eps_l = rho * g_l / (||g|| + 1e-7), ||g|| the
     global L2 norm over all of them;
  2. the loss with eps_l added (as a constant) to those states; only this gradient updates the LoRA.

Defaults follow the authors' code: rho = 2 (`Vaccine.sh`), eps added to the output of each
attention module (their hooks on LlamaAttention/OPTAttention); `perturb_at="layer"` adds it to each
decoder layer's output instead, as the paper's text describes.

Differences from the original code (see also `_perturb.py`): pass 1 takes the activation gradients
with `torch.autograd.grad` (no weight gradient is computed and nothing is zeroed, so gradient
accumulation > 1 works; the original's `model.zero_grad()` inside the step breaks it), and runs
under a forked RNG, so rho = 0 gives exactly the `align` run, dropout included. With gradient
accumulation, eps is normalised per micro-batch (a step cannot see the later micro-batches).

Several processes (DDP): ||g|| is the norm over the global batch, each process's activation gradients
weighted by its share of the loss tokens (one all-reduce; the scaling is derived in `_perturb.py` and
docs/distributed.md), so every example gets the eps of a one-process run on the whole global batch.
"""

from __future__ import annotations

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
    perturb_targets,
    refuse_sharded_training,
    token_share,
)
from ftsafety.defenses.base import Defense, Paper, TrainerSetup, defense_settings, training_arguments_class
from ftsafety.errors import FtsafetyError, check_number
from ftsafety.trainer import FtTrainer

PAPER = Paper("Vaccine: Perturbation-aware Alignment for Large Language Models against Harmful Fine-tuning",
              "NeurIPS 2024", "2402.01109", "git-disl/Vaccine")


@dataclass
class VaccineConfig:
    rho: float = field(
        default=2.0, metadata={"help": "rho, perturbation intensity ||eps|| (Vaccine.sh default 2)."}
    )
    perturb_at: str = field(
        default="attn",
        metadata={
            "help": "attn: each attention module's output (authors' code) | layer: each decoder layer's output (paper)."
        },
    )

    def __post_init__(self):
        check_number("rho", self.rho)
        if self.perturb_at not in PERTURB_AT:
            raise FtsafetyError(
                f"unknown --perturb-at {self.perturb_at!r}; choose one of {', '.join(PERTURB_AT)}"
            )


VaccineTrainingArguments = training_arguments_class(
    "VaccineTrainingArguments", VaccineConfig, ("rho", "perturb_at"),
    "`transformers.TrainingArguments` plus Vaccine's rho and perturb_at: `VaccineTrainer(args=...)`.")


class VaccineTrainer(FtTrainer):
    """transformers.Trainer whose training step is Vaccine's two-pass perturbation-aware step.

    Stateless between steps (eps is recomputed from each batch; `_extra` only feeds the logs), so a
    checkpoint needs nothing beyond the Trainer's own (no `defense_state_dict`)."""

    paper = PAPER

    def __init__(self, *args, rho: float | None = None, perturb_at: str | None = None, **kwargs):
        # explicit values win over those of `args` (a VaccineTrainingArguments), which win over the defaults
        self.vaccine = defense_settings(VaccineConfig, args, kwargs, {"rho": rho, "perturb_at": perturb_at})
        super().__init__(*args, **kwargs)
        refuse_sharded_training(self, "align-vaccine")
        self._sites: tuple[int, list[nn.Module]] | None = None
        self._extra = MetricSums()

    def perturbation_sites(self, model: nn.Module) -> list[nn.Module]:
        if self._sites is None or self._sites[0] != id(model):
            self._sites = (id(model), perturb_targets(model, self.vaccine.perturb_at))
        return self._sites[1]

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        # several processes: this process's share of the global batch's loss tokens, so that ||g|| is the
        # norm over the global batch (see _perturb.py); pass 1 then runs on the module inside DDP, which
        # never arms DDP's gradient all-reduce (autograd.grad writes no parameter gradient anyway)
        share = token_share(inputs)
        net = model if share is None else distributed.unwrap_ddp(model)

        def clean_loss():  # pass 1: the unperturbed per-batch mean loss (its scale does not matter)
            with self.compute_loss_context_manager():
                return self.compute_loss(net, dict(inputs))

        eps, g_norm, loss1 = activation_perturbation(
            net, self.perturbation_sites(net), clean_loss, self.vaccine.rho, share=share
        )
        self._extra.add(
            vaccine_clean_loss=loss1,
            vaccine_grad_norm=g_norm,
            vaccine_eps_norm=self.vaccine.rho * g_norm / (g_norm + 1e-7),
        )
        with add_to_outputs(eps):  # pass 2: the plain SFT step, with eps added to the hidden states
            loss = super().training_step(model, inputs, num_items_in_batch)
        del eps
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs get the defense terms, averaged since the last log
            logs.update(self._extra.pop_means())
        super().log(logs, start_time)


def _setup(cfg: VaccineConfig, common, stage) -> TrainerSetup:
    return TrainerSetup(VaccineTrainer, kwargs=dataclasses.asdict(cfg), record={"vaccine": dataclasses.asdict(cfg)})


DEFENSE = Defense(
    name="vaccine", stage="align", command="align-vaccine", config_cls=VaccineConfig, paper=PAPER,
    summary="SFT alignment under a worst-case hidden-state perturbation of norm rho (2 passes/step).",
    neutral={"rho": 0.0}, setup=_setup,
)
