"""Fine-tune accuracy, scored as the git-disl repos' pred_eval.py scripts do."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
_AG_KEYS = {"World": ("World", "world"), "Sports": ("Sports", "sports"), "Business": ("Business", "business"),
            "Sci/Tech": ("Sci", "sci")}


def extract_number(text: str) -> float | None:
    """GSM8K: the number after 'The final answer is:', else the last number in the output."""
    tail = text.split("The final answer is:")[-1] if "The final answer is:" in text else text
    nums = _NUMBER.findall(tail if "The final answer is:" in text else text)
    if not nums:
        return None
    pick = nums[0] if "The final answer is:" in text else nums[-1]
    try:
        return float(pick.replace(",", "").rstrip("."))
    except ValueError:
        return None


def is_correct(task: str, output: str, gold: str) -> bool:
    if task == "sst2":  # substring, either capitalisation (the papers' rule)
        return gold in output or gold.capitalize() in output
    if task == "ag_news":
        return any(k in output for k in _AG_KEYS[gold])
    if task == "gsm8k":
        got = extract_number(output)
        try:
            return got is not None and abs(got - float(gold)) < 1e-6
        except ValueError:
            return False
    raise ValueError(task)
