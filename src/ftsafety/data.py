"""The data layer: sources, prompt templates, the papers' fine-tuning mix, tokenisation.

`--data` names where every data set comes from:
  * `builtin` (default): data written by this project and shipped in the package
    (`ftsafety.builtin_data`), so the embedded model runs with no files at all;
  * a directory laid out like `../shared/data` (beavertails/, sst2/, ag_news/, gsm8k/ JSONL
    files with the hub data sets' field names);
  * `hub`: the Hugging Face hub ids the papers use (PKU-Alignment/BeaverTails, stanfordnlp/sst2,
    fancyzhx/ag_news, openai/gsm8k).
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ftsafety import builtin_data
from ftsafety.errors import DataError, FtsafetyError

TASKS = ("sst2", "ag_news", "gsm8k")
TEMPLATES = ("alpaca", "alpaca-vaccine", "chat")
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")

# Alpaca template (ALGORITHMS.md §0). Booster/Antidote end the prompt with "### Response:\n",
# Vaccine/Lisa with "### Response:"; `alpaca` is the former, `alpaca-vaccine` the latter.
_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AG_NEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    "World\nSports\nBusiness\nSci/Tech\n"
)
GSM8K_SUFFIX = "\nFirst think step by step and then answer the final number.\n"

# File layout of a local data directory (the ../shared/data copies).
LOCAL_FILES = {
    ("beavertails", "train"): ("beavertails/harmful_train.jsonl", ("prompt", "response")),
    ("beavertails", "calibration"): ("beavertails/harmful_calibration.jsonl", ("prompt", "response")),
    ("beavertails", "eval"): ("beavertails/eval_prompts.jsonl", ("prompt",)),
    ("sst2", "train"): ("sst2/train.jsonl", ("sentence", "label")),
    ("sst2", "test"): ("sst2/validation.jsonl", ("sentence", "label")),
    ("ag_news", "train"): ("ag_news/train.jsonl", ("text", "label")),
    ("ag_news", "test"): ("ag_news/test.jsonl", ("text", "label")),
    ("gsm8k", "train"): ("gsm8k/train.jsonl", ("question", "answer")),
    ("gsm8k", "test"): ("gsm8k/test.jsonl", ("question", "answer")),
}
HUB_SOURCES = {
    "beavertails": "PKU-Alignment/BeaverTails",
    "sst2": "stanfordnlp/sst2",
    "ag_news": "fancyzhx/ag_news",
    "gsm8k": "openai/gsm8k",
}


@dataclass
class DataConfig:
    data: str = "builtin"  # builtin | hub | path to a data directory
    template: str = "alpaca"
    max_length: int = 256
    # First harmful-train row used for alignment prompts: the attack takes rows from the start,
    # alignment from here on, so the two never share a prompt (Booster uses a window from 5000).
    align_offset: int | None = None

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise FtsafetyError(f"unknown template {self.template!r}; choose one of {', '.join(TEMPLATES)}")
        if self.max_length < 16:
            raise FtsafetyError(f"max length must be at least 16 tokens, got {self.max_length}")
        if self.data not in ("builtin", "hub"):
            path = Path(self.data).expanduser()
            if not path.is_dir():
                raise FtsafetyError(f"data directory {self.data} does not exist (use builtin, hub or a directory)")

    @property
    def source(self) -> str:
        return self.data if self.data in ("builtin", "hub") else "local"

    def offset(self) -> int:
        if self.align_offset is not None:
            return self.align_offset
        return 10000 if self.source == "hub" else 500


# ---------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: str | Path, fields: tuple[str, ...] = ()) -> list[dict]:
    """Read JSONL strictly: every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", str(path))
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError("not valid UTF-8", str(path), lineno) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed JSON ({exc.msg})", str(path), lineno) from None
            if not isinstance(row, dict):
                raise DataError("expected a JSON object", str(path), lineno)
            for f in fields:
                if f not in row:
                    raise DataError(f"missing field {f!r}", str(path), lineno)
            rows.append(row)
    if not rows:
        raise DataError("file is empty", str(path))
    return rows


def _hub_rows(name: str, split: str) -> list[dict]:
    try:
        import datasets

        if name == "beavertails":
            hub_split = "30k_test" if split == "eval" else "30k_train"
            ds = datasets.load_dataset(HUB_SOURCES[name], split=hub_split)
            rows = [r for r in ds if not r["is_safe"]]
            if split == "calibration":  # Antidote's disjoint window of unsafe rows
                rows = rows[5000:7000]
            return rows
        if name == "gsm8k":
            return list(datasets.load_dataset(HUB_SOURCES[name], "main", split=split))
        hub_split = "validation" if (name == "sst2" and split == "test") else split
        return list(datasets.load_dataset(HUB_SOURCES[name], split=hub_split))
    except Exception as exc:  # network, auth, missing split: one line for the user
        raise FtsafetyError(f"could not load {HUB_SOURCES[name]} ({split}) from the hub: {str(exc).splitlines()[0][:200]}") from exc


def _builtin_rows(name: str, split: str) -> list[dict]:
    if name == "beavertails":
        rows = builtin_data.harmful_prompts(split)
        if split != "eval":
            rows = [dict(r, response=builtin_data.harmful_response(r["prompt"], r["category"])) for r in rows]
        return rows
    if name == "sst2":
        return builtin_data.sentiment_examples("validation" if split == "test" else split)
    if name == "ag_news":
        return builtin_data.news_examples(split)
    if name == "gsm8k":
        return builtin_data.arithmetic_problems(split)
    raise FtsafetyError(f"unknown data set {name!r}")


def rows(cfg: DataConfig, name: str, split: str) -> list[dict]:
    """Raw rows of data set `name` (beavertails or a task) for `split`, from the configured source."""
    if (name, split) not in LOCAL_FILES:
        raise FtsafetyError(f"unknown data set/split {name}/{split}; tasks are {', '.join(TASKS)}")
    if cfg.source == "builtin":
        return _builtin_rows(name, split)
    if cfg.source == "hub":
        return _hub_rows(name, split)
    rel, fields = LOCAL_FILES[(name, split)]
    return read_jsonl(Path(cfg.data).expanduser() / rel, fields)


# ---------------------------------------------------------------------------------------------
# Examples in Alpaca form: {"instruction", "input", "output"} (+ "gold" for scoring)


def _text(row: dict, name: str) -> str:
    """A text field of a data row; a ValueError names the field when it is missing or not a string."""
    if name not in row:
        raise ValueError(f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _label(row: dict, n_labels: int) -> int:
    if "label" not in row:
        raise ValueError("missing field 'label'")
    value = row["label"]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_labels:
        raise ValueError(f"label {row['label']!r} is not one of 0..{n_labels - 1}")
    return value


def _where(cfg: DataConfig, name: str, split: str) -> str:
    """The file (local data) or source that rows of `name`/`split` come from, for error messages."""
    if cfg.source == "local":
        return str(Path(cfg.data).expanduser() / LOCAL_FILES[(name, split)][0])
    return f"{cfg.source} {name}/{split}"


def _checked(cfg: DataConfig, name: str, split: str, raw: list[dict], convert) -> list[dict]:
    """`convert` applied to each row; a bad row is a one-line DataError naming its source and row."""
    out = []
    for i, row in enumerate(raw, 1):
        try:
            out.append(convert(row))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            msg = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise DataError(f"row {i}: {msg}", _where(cfg, name, split)) from None
    return out


def task_example(task: str, row: dict) -> dict:
    if task == "sst2":
        label = "positive" if _label(row, 2) == 1 else "negative"
        return {"instruction": SST2_INSTRUCTION, "input": _text(row, "sentence").strip(), "output": label, "gold": label}
    if task == "ag_news":
        label = AG_NEWS_LABELS[_label(row, len(AG_NEWS_LABELS))]
        return {"instruction": AG_NEWS_INSTRUCTION, "input": _text(row, "text").strip(), "output": label, "gold": label}
    if task == "gsm8k":
        _text(row, "question")
        answer = _text(row, "answer")
        gold = answer.split("####")[-1].strip().replace(",", "")
        return {
            "instruction": row["question"].strip() + GSM8K_SUFFIX,
            "input": "",
            "output": answer.replace("####", "The final answer is: "),
            "gold": gold,
        }
    raise FtsafetyError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def task_examples(cfg: DataConfig, task: str, split: str, n: int | None = None) -> list[dict]:
    if task not in TASKS:
        raise FtsafetyError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    raw = rows(cfg, task, split)
    if n is not None:
        raw = raw[:n]
    return _checked(cfg, task, split, raw, lambda r: task_example(task, r))


def harmful_examples(cfg: DataConfig, split: str = "train") -> list[dict]:
    """(harmful prompt, harmful response) pairs: attack data (train) or calibration data."""
    return _checked(cfg, "beavertails", split, rows(cfg, "beavertails", split), lambda r: {
        "instruction": _text(r, "prompt").strip(), "input": "", "output": _text(r, "response").strip(),
        "category": _category(r)})


def harmful_eval_prompts(cfg: DataConfig, n: int | None = None) -> list[dict]:
    raw = rows(cfg, "beavertails", "eval")
    raw = raw[:n] if n else raw
    return _checked(cfg, "beavertails", "eval", raw,
                    lambda r: {"prompt": _text(r, "prompt").strip(), "category": _category(r)})


def benign_eval_instructions(n: int | None = None) -> list[dict]:
    """Harmless instructions for over-refusal (OR); built in, disjoint from alignment data."""
    out = builtin_data.benign_instructions("eval")
    return out[:n] if n else out


def _category(row: dict) -> str:
    cat = row.get("category")
    if isinstance(cat, dict):
        return next((k for k, v in cat.items() if v), "unknown")
    return str(cat) if cat else "unknown"


def alignment_examples(cfg: DataConfig, n: int, benign_ratio: float = 0.0, seed: int = 42,
                       benign_task: str = "none") -> list[dict]:
    """(harmful prompt, refusal) pairs, Booster's setting; refusals are varied and built by us.

    `benign_ratio` mixes that share of harmless instructions with helpful answers into the set, so
    that alignment teaches *when* to refuse rather than refusing everything.

    `benign_task` (a task name, or "none") takes half of that benign share from the task's training
    rows, counted from the end of the split (the fine-tune mix reads from its start). Those are
    instructions *with an `### Input:` section*; without any, a small aligned model learns to refuse
    every prompt of that shape, SST-2's included (EXPERIMENTS.md, 2026-11-30).
    """
    if n < 1:
        raise FtsafetyError(f"alignment size must be >= 1, got {n}")
    if not 0.0 <= benign_ratio < 1.0:
        raise FtsafetyError(f"benign ratio must be in [0, 1), got {benign_ratio}")
    n_benign = int(round(n * benign_ratio))
    n_refusal = n - n_benign
    pool = harmful_examples(cfg, "train")[cfg.offset():]
    if n_refusal > len(pool):
        raise FtsafetyError(
            f"alignment needs {n_refusal} harmful prompts but only {len(pool)} are available after offset {cfg.offset()}"
        )
    out = [
        {"instruction": r["instruction"], "input": "", "output": builtin_data.refusal(r["instruction"], r["category"]),
         "kind": "refusal"}
        for r in pool[:n_refusal]
    ]
    n_task = 0
    if benign_task != "none":
        if benign_task not in TASKS:
            raise FtsafetyError(f"unknown benign task {benign_task!r}; choose none or one of {', '.join(TASKS)}")
        n_task = n_benign // 2
        if n_task:
            task_rows = task_examples(cfg, benign_task, "train")
            if n_task > len(task_rows):
                raise FtsafetyError(f"alignment asks for {n_task} {benign_task} examples but {len(task_rows)} are available")
            out += [{"instruction": t["instruction"], "input": t["input"], "output": t["output"], "kind": "benign-task"}
                    for t in task_rows[len(task_rows) - n_task:]]
    benign = builtin_data.benign_instructions("train")
    n_plain = n_benign - n_task
    if n_plain > len(benign):
        raise FtsafetyError(f"alignment asks for {n_plain} benign examples but {len(benign)} are built in")
    out += [{"instruction": b["instruction"], "input": "", "output": b["output"], "kind": "benign"} for b in benign[:n_plain]]
    random.Random(seed).shuffle(out)
    return out


def finetune_mix(cfg: DataConfig, task: str, n: int, harmful_ratio: float, seed: int = 42) -> list[dict]:
    """The papers' fine-tuning set: round(p*n) harmful pairs + the rest from the benign task.

    Like the original code, both parts are the *first* rows of their sources (no sampling);
    the seed only fixes the order in which they are mixed.
    """
    if not 0.0 <= harmful_ratio <= 1.0:
        raise FtsafetyError(f"harmful ratio p must be in [0, 1], got {harmful_ratio}")
    if n < 1:
        raise FtsafetyError(f"number of fine-tuning samples n must be >= 1, got {n}")
    n_harm = int(round(harmful_ratio * n))
    n_task = n - n_harm
    harmful = harmful_examples(cfg, "train")
    if n_harm > len(harmful):
        raise FtsafetyError(f"p*n = {n_harm} harmful samples asked for, but only {len(harmful)} rows are available")
    if n_harm > cfg.offset():
        raise FtsafetyError(
            f"p*n = {n_harm} harmful samples would overlap the alignment prompts (offset {cfg.offset()}); lower n or p"
        )
    benign = task_examples(cfg, task, "train") if n_task else []
    if n_task > len(benign):
        raise FtsafetyError(f"{n_task} {task} samples asked for, but only {len(benign)} rows are available")
    mix = [dict(h, kind="harmful") for h in harmful[:n_harm]] + [dict(b, kind="task") for b in benign[:n_task]]
    random.Random(seed).shuffle(mix)
    return mix


# ---------------------------------------------------------------------------------------------
# Templates and tokenisation


def format_prompt(example: dict, template: str, tokenizer=None) -> str:
    instruction, inp = example["instruction"], example.get("input", "")
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise FtsafetyError("template 'chat' needs a tokenizer with a chat template; use --template alpaca")
        content = f"{instruction}\n\n{inp}" if inp else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    text = _ALPACA_INPUT.format(instruction=instruction, input=inp) if inp else _ALPACA_NO_INPUT.format(instruction=instruction)
    return text + ("\n" if template == "alpaca" else "")


# Tokenizers that do not know their model's length report a huge sentinel (about 1e30).
_NO_CONTEXT = 10**9


class SFTDataset(torch.utils.data.Dataset):
    """Tokenised once; loss on response tokens only (prompt labels are -100), target = output + EOS.

    Sequences are cut at `cfg.max_length`. A prompt that alone fills max_length keeps its tail
    (max_length // 2 tokens, so the template's "### Response:" stays next to the answer) and the
    answer keeps the rest: every example has answer tokens to learn. Should an example still end
    up with none, it is an error ("prompt of example N is longer than --max-length"), never a
    silent all-masked row. A sequence longer than the model's context (the tokenizer's
    model_max_length, which `models.load` sets) is an error as well, not a crash in the forward.
    """

    def __init__(self, examples: list[dict], tokenizer, cfg: DataConfig):
        self.items = []
        eos = tokenizer.eos_token_id
        ctx = getattr(tokenizer, "model_max_length", None)
        ctx = ctx if isinstance(ctx, int) and 0 < ctx < _NO_CONTEXT else None
        for n, ex in enumerate(examples, 1):
            prompt_ids = tokenizer(format_prompt(ex, cfg.template, tokenizer), add_special_tokens=True)["input_ids"]
            out_ids = tokenizer(ex["output"], add_special_tokens=False)["input_ids"] + [eos]
            if len(prompt_ids) >= cfg.max_length:  # keep the tail of an over-long prompt and the whole answer start
                prompt_ids = prompt_ids[-(cfg.max_length // 2):]
            ids = (prompt_ids + out_ids)[: cfg.max_length]
            labels = ([-100] * len(prompt_ids) + out_ids)[: cfg.max_length]
            if all(x == -100 for x in labels):
                raise FtsafetyError(
                    f"prompt of example {n} is longer than --max-length {cfg.max_length}: "
                    "no answer token is left to learn"
                )
            if ctx is not None and len(ids) > ctx:
                raise FtsafetyError(
                    f"example {n} is {len(ids)} tokens, more than the model's context of {ctx} tokens; "
                    f"lower --max-length (now {cfg.max_length}) to at most {ctx}"
                )
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def lengths(self) -> list[int]:
        return [len(x["input_ids"]) for x in self.items]


@dataclass
class Collator:
    """Right padding for training (as the papers); labels padded with -100."""

    pad_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))
