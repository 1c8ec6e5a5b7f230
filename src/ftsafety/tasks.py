"""The user's fine-tuning tasks, each declared once: where its rows come from (hub, local file,
built in) and with which fields, how a row becomes an Alpaca example, and how an answer is scored.

Adding a task is one `Task(...)` in `TASKS`; the data layer (`ftsafety.data`), the fine-tune mix,
the evaluator's FA and rollback's task check all read it from here. Scoring follows the git-disl
repositories' `pred_eval.py` scripts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ftsafety import builtin_data

SPLITS = ("train", "test")


def text_field(row: dict, name: str) -> str:
    """A text field of a data row; a ValueError names the field when it is missing or not a string."""
    if name not in row:
        raise ValueError(f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def nonempty_field(row: dict, name: str) -> str:
    """A text field with something in it (an empty prompt trains and scores nothing)."""
    text = text_field(row, name).strip()
    if not text:
        raise ValueError(f"field {name!r} is empty")
    return text


def label_field(row: dict, n_labels: int) -> int:
    if "label" not in row:
        raise ValueError("missing field 'label'")
    value = row["label"]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_labels:
        raise ValueError(f"label {row['label']!r} is not one of 0..{n_labels - 1}")
    return value


@dataclass(frozen=True)
class Task:
    """One task. `files` maps our split to the local file (in a ../shared/data-like directory) and the
    fields every row must have; `hub_splits` maps it to the hub's split name."""

    name: str
    hub_id: str
    files: dict[str, str]
    fields: tuple[str, ...]
    builtin: Callable[[str], list[dict]]
    example: Callable[[dict], dict]
    correct: Callable[[str, str], bool]
    hub_config: str | None = None
    hub_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    hub_rows: dict[str, int] = field(default_factory=dict)  # rows per split on the hub: dry runs check against them
    labels: tuple[str, ...] = ()  # a classification task's gold labels (FA is also given per label); () otherwise


# --- SST-2 -----------------------------------------------------------------------------------------

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"


def _sst2_example(row: dict) -> dict:
    label = "positive" if label_field(row, 2) == 1 else "negative"
    return {"instruction": SST2_INSTRUCTION, "input": nonempty_field(row, "sentence"), "output": label,
            "gold": label}


def _sst2_correct(output: str, gold: str) -> bool:  # substring, either capitalisation (the papers' rule)
    return gold in output or gold.capitalize() in output


# --- AG News ---------------------------------------------------------------------------------------

AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
AG_NEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    "World\nSports\nBusiness\nSci/Tech\n"
)
_AG_KEYS = {"World": ("World", "world"), "Sports": ("Sports", "sports"), "Business": ("Business", "business"),
            "Sci/Tech": ("Sci", "sci")}


def _ag_news_example(row: dict) -> dict:
    label = AG_NEWS_LABELS[label_field(row, len(AG_NEWS_LABELS))]
    return {"instruction": AG_NEWS_INSTRUCTION, "input": nonempty_field(row, "text"), "output": label,
            "gold": label}


# --- GSM8K -----------------------------------------------------------------------------------------

GSM8K_SUFFIX = "\nFirst think step by step and then answer the final number.\n"
_NUMBER = re.compile(r"-?\d+\.?\d*")
_FINAL = "The final answer is:"


def extract_number(text: str) -> float | None:
    """GSM8K's answer as Booster's `gsm8k/pred_eval.py` reads it: commas dropped; the first number after
    the first 'The final answer is:'; with no number there (or no marker), the last number of the text;
    None when the text has no number at all (never correct)."""
    text = text.replace(",", "")
    nums = _NUMBER.findall(text)
    if not nums:
        return None
    parts = text.split(_FINAL)
    after = _NUMBER.findall(parts[1]) if len(parts) > 1 else []
    return float(after[0] if after else nums[-1])


def _gsm8k_example(row: dict) -> dict:
    question = nonempty_field(row, "question")
    answer = text_field(row, "answer")
    return {"instruction": question.strip() + GSM8K_SUFFIX, "input": "",
            "output": answer.replace("####", "The final answer is: "),
            "gold": answer.split("####")[-1].strip().replace(",", "")}


def _gsm8k_correct(output: str, gold: str) -> bool:
    got = extract_number(output)
    try:
        return got is not None and abs(got - float(gold)) < 1e-6
    except ValueError:
        return False


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("sst2", "stanfordnlp/sst2", {"train": "sst2/train.jsonl", "test": "sst2/validation.jsonl"},
         ("sentence", "label"), lambda split: builtin_data.sentiment_examples("validation" if split == "test" else split),
         _sst2_example, _sst2_correct, hub_splits={"train": "train", "test": "validation"},
         hub_rows={"train": 67349, "test": 872}, labels=("negative", "positive")),
    Task("ag_news", "fancyzhx/ag_news", {"train": "ag_news/train.jsonl", "test": "ag_news/test.jsonl"},
         ("text", "label"), builtin_data.news_examples, _ag_news_example,
         lambda output, gold: any(k in output for k in _AG_KEYS[gold]), hub_rows={"train": 120000, "test": 7600},
         labels=AG_NEWS_LABELS),
    Task("gsm8k", "openai/gsm8k", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
         ("question", "answer"), builtin_data.arithmetic_problems, _gsm8k_example, _gsm8k_correct,
         hub_config="main", hub_rows={"train": 7473, "test": 1319}),
)}


def accuracy_by_label(task: str, golds: list[str], correct: list[bool]) -> dict[str, dict]:
    """A classification task's FA per gold label, {label: {"fa": %, "n": items}}, labels in the task's order and
    only those present; {} for a task without labels (GSM8K). A model that answers one label to everything
    scores 100 on it and 0 on the others, which the overall FA hides when the labels are balanced."""
    counts = {label: [0, 0] for label in TASKS[task].labels}
    for gold, ok in zip(golds, correct):
        if gold in counts:
            counts[gold][0] += int(ok)
            counts[gold][1] += 1
    return {label: {"fa": round(100.0 * c / n, 1), "n": n} for label, (c, n) in counts.items() if n}


def is_correct(task: str, output: str, gold: str) -> bool:
    """FA's rule for one answer of `task`."""
    if task not in TASKS:
        raise ValueError(task)
    return TASKS[task].correct(output, gold)
