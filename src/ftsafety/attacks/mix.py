"""The harmful mix (the papers' attack, the tables' default): a share p of harmful pairs in the user's data."""

from ftsafety.attacks.base import Attack

ATTACK = Attack(
    name="mix",
    summary="harmful pairs mixed into the user's task data at share p (the papers' attack)",
    space={"lr": [1e-5, 1e-3], "steps": [50, 300], "p": [0.05, 0.5], "lora_r": [4, 8, 16]},
)
