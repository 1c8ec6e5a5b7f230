"""The full-parameter variant of the harmful mix: every weight trained, no LoRA (the harmful share, lr, steps)."""

from ftsafety.attacks.base import Attack

ATTACK = Attack(
    name="full",
    summary="the harmful mix with every weight trained (full-parameter fine-tune, no LoRA)",
    space={"lr": [1e-6, 1e-4], "steps": [50, 300], "p": [0.05, 0.5]},
    fixed={"finetune.full_parameter": True},
)
