"""The defenses, one module each, and the one registry that lists them.

Adding a defense = one module here + one line in DEFENSES + its command module + tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftsafety.defenses.antidote import AntidoteConfig
from ftsafety.defenses.booster import BoosterConfig
from ftsafety.defenses.lisa import LisaConfig
from ftsafety.defenses.rollback import RollbackConfig
from ftsafety.defenses.vaccine import VaccineConfig


@dataclass(frozen=True)
class Paper:
    title: str
    venue: str
    arxiv: str
    code: str


@dataclass(frozen=True)
class Defense:
    name: str
    stage: str  # alignment | finetune | post
    command: str
    config_cls: type
    paper: Paper
    neutral: str  # the setting at which it reduces to the baseline (equivalence tests)


DEFENSES: dict[str, Defense] = {
    "vaccine": Defense("vaccine", "alignment", "align-vaccine", VaccineConfig,
                       Paper("Vaccine: Perturbation-aware Alignment for LLMs against Harmful Fine-tuning",
                             "NeurIPS 2024", "2402.01109", "git-disl/Vaccine"), "rho=0 == align"),
    "booster": Defense("booster", "alignment", "align-booster", BoosterConfig,
                       Paper("Booster: Tackling Harmful Fine-tuning for LLMs via Attenuating Harmful Perturbation",
                             "ICLR 2025", "2409.01586", "git-disl/Booster"), "lambda=0 == align"),
    "lisa": Defense("lisa", "finetune", "finetune-lisa", LisaConfig,
                    Paper("Lisa: Lazy Safety Alignment for LLMs against Harmful Fine-tuning Attack",
                          "NeurIPS 2024", "2405.18641", "git-disl/Lisa"), "alignment_steps=0, rho=0 == finetune"),
    "antidote": Defense("antidote", "post", "prune-antidote", AntidoteConfig,
                        Paper("Antidote: Post-fine-tuning Safety Alignment for LLMs against Harmful Fine-tuning",
                              "ICML 2025", "2408.09600", "git-disl/Antidote"), "ratio=0 == identity"),
    "rollback": Defense("rollback", "post", "recover-rollback", RollbackConfig,
                        Paper("Alleviating the Fear of Losing Alignment in LLM Fine-tuning", "IEEE S&P 2025",
                              "2504.09757", "kangyangWHU/LLMAlignment"), "recovery_rate=0 == identity"),
}
