"""Pure harmful fine-tuning: a small set of harmful pairs only (p = 1, small n)."""

from ftsafety.attacks.base import Attack

ATTACK = Attack(
    name="pure",
    summary="harmful pairs only (p = 1), a small n",
    space={"lr": [1e-5, 1e-3], "steps": [10, 100], "n": [10, 200], "lora_r": [4, 8, 16]},
    fixed={"finetune.harmful_ratio": 1.0},
)
