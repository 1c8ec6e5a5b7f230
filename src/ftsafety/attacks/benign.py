"""Benign-only fine-tuning at an aggressive learning rate: safety lost without any harmful data."""

from ftsafety.attacks.base import Attack

ATTACK = Attack(
    name="benign",
    summary="the user's task data only (p = 0) at an aggressive learning rate",
    space={"lr": [1e-4, 5e-3], "steps": [50, 300], "lora_r": [4, 8, 16]},
    fixed={"finetune.harmful_ratio": 0.0},
)
