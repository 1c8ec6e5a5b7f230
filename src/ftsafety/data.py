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
from ftsafety.options import knob
from ftsafety.tasks import AG_NEWS_LABELS, SST2_INSTRUCTION, nonempty_field, text_field  # noqa: F401
from ftsafety.tasks import TASKS as TASK_DEFS

TASKS = tuple(TASK_DEFS)

TEMPLATES = ("alpaca", "alpaca-vaccine", "chat")

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

# BeaverTails (the safety data) in a local data directory; the tasks declare their own files (ftsafety.tasks).
SAFETY_FILES = {
    "train": ("beavertails/harmful_train.jsonl", ("prompt", "response")),
    "calibration": ("beavertails/harmful_calibration.jsonl", ("prompt", "response")),
    "eval": ("beavertails/eval_prompts.jsonl", ("prompt",)),
    # BeaverTails' is_safe pairs (a harmful prompt with a safe answer): the originals' Vaccine/Lisa
    # alignment data; on the hub the 30k_train rows with is_safe true, locally a file with its fields
    "safe": ("beavertails/safe_train.jsonl", ("prompt", "response")),
}
ALIGNMENT_DATA = ("refusals", "beavertails-safe")
BEAVERTAILS_HUB = "PKU-Alignment/BeaverTails"


def _local_file(name: str, split: str) -> tuple[str, tuple[str, ...]] | None:
    if name == "beavertails":
        return SAFETY_FILES.get(split)
    task = TASK_DEFS.get(name)
    return (task.files[split], task.fields) if task and split in task.files else None


@dataclass
class DataConfig:
    data: str = knob("builtin", "builtin | hub | a directory laid out like ../shared/data.", flags=("--data",))
    template: str = knob("alpaca", "alpaca (Booster/Antidote) | alpaca-vaccine (Vaccine/Lisa) | chat.")
    max_length: int = knob(256, "Maximum training sequence length in tokens.", flags=("--max-length",))
    # First harmful-train row used for alignment prompts: the attack takes rows from the start,
    # alignment from here on, so the two never share a prompt (Booster uses a window from 5000).
    align_offset: int | None = knob(None, cli=False)

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


# Limits on what a data or prompt file may hold, checked while reading (never after loading it whole): a
# row of any data set here is a few kB, a whole set well under the file limit.
MAX_LINE_BYTES = 1 << 20
MAX_FILE_BYTES = 1 << 30


def check_file_size(path: Path, limit: int = MAX_FILE_BYTES) -> None:
    """One line for a file larger than `limit` bytes, before any of it is read."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size > limit:
        raise DataError(f"file is {size / 2**20:,.0f} MB, more than the {limit / 2**20:,.0f} MB a data or prompt file "
                        "may hold here", str(path))


def read_jsonl(path: str | Path, fields: tuple[str, ...] = (), limit: int = MAX_FILE_BYTES) -> list[dict]:
    """Read JSONL strictly: every problem names the file and line; a file above `limit` bytes or a line
    above MAX_LINE_BYTES is refused before it is read whole."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", str(path))
    check_file_size(path, limit)
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"line longer than {MAX_LINE_BYTES >> 20} MB (one row of a data set is a few kB)",
                                str(path), lineno)
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
    hub_id = BEAVERTAILS_HUB if name == "beavertails" else TASK_DEFS[name].hub_id
    try:
        import datasets

        if name == "beavertails":
            hub_split = "30k_test" if split == "eval" else "30k_train"
            ds = datasets.load_dataset(hub_id, split=hub_split)
            if split == "safe":
                return [r for r in ds if r["is_safe"]]
            rows = [r for r in ds if not r["is_safe"]]
            if split == "calibration":  # Antidote's disjoint window of unsafe rows: its code's strict window
                rows = rows[5001:7000]  # start < i < start + n, i.e. rows 5001-6999 (1,999 rows)
            return rows
        task = TASK_DEFS[name]
        args = (hub_id, task.hub_config) if task.hub_config else (hub_id,)
        return list(datasets.load_dataset(*args, split=task.hub_splits[split]))
    except Exception as exc:  # network, auth, missing split: one line for the user
        raise FtsafetyError(f"could not load {hub_id} ({split}) from the hub: {str(exc).splitlines()[0][:200]}") from exc


def _builtin_rows(name: str, split: str) -> list[dict]:
    if name == "beavertails" and split == "safe":
        raise FtsafetyError("BeaverTails' safe pairs are not built in: use --data hub, or a data directory with "
                            "beavertails/safe_train.jsonl (fields prompt, response), or --alignment-data refusals")
    if name == "beavertails":
        rows = builtin_data.harmful_prompts(split)
        if split != "eval":
            rows = [dict(r, response=builtin_data.harmful_response(r["prompt"], r["category"])) for r in rows]
        return rows
    if name in TASK_DEFS:
        return TASK_DEFS[name].builtin(split)
    raise FtsafetyError(f"unknown data set {name!r}")


def rows(cfg: DataConfig, name: str, split: str) -> list[dict]:
    """Raw rows of data set `name` (beavertails or a task) for `split`, from the configured source."""
    local = _local_file(name, split)
    if local is None:
        raise FtsafetyError(f"unknown data set/split {name}/{split}; tasks are {', '.join(TASKS)}")
    if cfg.source == "builtin":
        return _builtin_rows(name, split)
    if cfg.source == "hub":
        return _hub_rows(name, split)
    rel, fields = local
    return _read_local(Path(cfg.data).expanduser() / rel, fields)


_LOCAL_CACHE: dict[tuple, list[dict]] = {}


def _read_local(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """A local file's rows, read once per (file, size, mtime) in a process (a recipe's pipelines read the
    same files many times); each call gets fresh copies of the rows."""
    try:
        st = path.stat()
    except OSError:
        return read_jsonl(path, fields)  # the one-line "file not found"
    key = (str(path), st.st_size, st.st_mtime_ns, fields)
    if key not in _LOCAL_CACHE:
        if len(_LOCAL_CACHE) >= 16:  # bounded: a data directory has 9 files
            _LOCAL_CACHE.pop(next(iter(_LOCAL_CACHE)))
        _LOCAL_CACHE[key] = read_jsonl(path, fields)
    return [dict(r) for r in _LOCAL_CACHE[key]]


# ---------------------------------------------------------------------------------------------
# Examples in Alpaca form: {"instruction", "input", "output"} (+ "gold" for scoring)


def where(cfg: DataConfig, name: str, split: str) -> str:
    """The file (local data) or source that rows of `name`/`split` come from, for error messages."""
    if cfg.source == "local":
        return str(Path(cfg.data).expanduser() / _local_file(name, split)[0])
    return f"{cfg.source} {name}/{split}"


def _checked(cfg: DataConfig, name: str, split: str, raw: list[dict], convert) -> list[dict]:
    """`convert` applied to each row; a bad row is a one-line DataError naming its source and row."""
    out = []
    for i, row in enumerate(raw, 1):
        try:
            out.append(convert(row))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            msg = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise DataError(f"row {i}: {msg}", where(cfg, name, split)) from None
    return out


def task_example(task: str, row: dict) -> dict:
    if task not in TASK_DEFS:
        raise FtsafetyError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return TASK_DEFS[task].example(row)


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
        "instruction": nonempty_field(r, "prompt"), "input": "", "output": text_field(r, "response").strip(),
        "category": _category(r)})


def alignment_prompt_rows(cfg: DataConfig, n: int, benign_ratio: float) -> list[dict]:
    """The harmful-train rows whose prompts `alignment_examples` turns into refusals, with their harmful
    responses: Booster's paired harmful set (the same prompts, harmful answers)."""
    n_refusal = n - int(round(n * benign_ratio))
    return harmful_examples(cfg, "train")[cfg.offset():][:n_refusal]


def _category(row: dict) -> str:
    cat = row.get("category")
    if isinstance(cat, dict):
        return next((k for k, v in cat.items() if v), "unknown")
    if cat is not None and not isinstance(cat, str):
        raise ValueError(f"field 'category' must be a string or a mapping of booleans, got {type(cat).__name__}")
    return cat or "unknown"


def check_rows(what: str, need: int, have: int) -> None:
    """One line when a stage asks for more rows than its data has (`ftsafety run` checks before training)."""
    if need > have:
        raise FtsafetyError(f"{what} asks for {need} rows but the data has {have}")


def check_alignment_data(source: str) -> None:
    if source not in ALIGNMENT_DATA:
        raise FtsafetyError(f"unknown alignment data {source!r}; choose one of {', '.join(ALIGNMENT_DATA)}")


def check_benign_task(task: str) -> None:
    if task != "none" and task not in TASKS:
        raise FtsafetyError(f"unknown benign task {task!r}; choose none or one of {', '.join(TASKS)}")


def alignment_examples(cfg: DataConfig, n: int, benign_ratio: float = 0.0, seed: int = 42,
                       benign_task: str = "none", source: str = "refusals") -> list[dict]:
    """(harmful prompt, refusal) pairs, Booster's setting; refusals are varied and built by us.

    `benign_ratio` mixes that share of harmless instructions with helpful answers into the set, so
    that alignment teaches *when* to refuse rather than refusing everything.

    `benign_task` (a task name, or "none") takes half of that benign share from the task's training
    rows, counted from the end of the split (the fine-tune mix reads from its start). Those are
    instructions *with an `### Input:` section*; without any, a small aligned model learns to refuse
    every prompt of that shape, SST-2's included (EXPERIMENTS.md, 2026-11-30).

    `source="beavertails-safe"` takes the pairs from BeaverTails' is_safe rows instead (a harmful prompt
    with BeaverTails' own safe answer, the first ones, as Vaccine's and Lisa's code read them).
    """
    if n < 1:
        raise FtsafetyError(f"alignment size must be >= 1, got {n}")
    if not 0.0 <= benign_ratio < 1.0:
        raise FtsafetyError(f"benign ratio must be in [0, 1), got {benign_ratio}")
    n_benign = int(round(n * benign_ratio))
    n_refusal = n - n_benign
    check_alignment_data(source)
    if source == "beavertails-safe":
        safe = harmful_examples(cfg, "safe")
        if n_refusal > len(safe):
            raise FtsafetyError(f"alignment needs {n_refusal} BeaverTails safe pairs but only {len(safe)} are available")
        out = [{"instruction": r["instruction"], "input": "", "output": r["output"], "kind": "safe"}
               for r in safe[:n_refusal]]
    else:
        pool = harmful_examples(cfg, "train")[cfg.offset():]
        if n_refusal > len(pool):
            raise FtsafetyError(f"alignment needs {n_refusal} harmful prompts but only {len(pool)} are available "
                                f"after offset {cfg.offset()}")
        out = [{"instruction": r["instruction"], "input": "",
                "output": builtin_data.refusal(r["instruction"], r["category"]), "kind": "refusal"}
               for r in pool[:n_refusal]]
    n_task = 0
    check_benign_task(benign_task)
    if benign_task != "none":
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
    """The papers' fine-tuning set: int(p*n) harmful pairs + int((1-p)*n) rows of the benign task, the
    original code's counts (Booster's `SupervisedDataset`: Python floats, floored, so 0.29*100 gives 28).

    Like the original code, both parts are the *first* rows of their sources (no sampling);
    the seed only fixes the order in which they are mixed.
    """
    if not 0.0 <= harmful_ratio <= 1.0:
        raise FtsafetyError(f"harmful ratio p must be in [0, 1], got {harmful_ratio}")
    if n < 1:
        raise FtsafetyError(f"number of fine-tuning samples n must be >= 1, got {n}")
    n_harm = int(harmful_ratio * n)
    n_task = int((1 - harmful_ratio) * n)
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
    if not mix:
        raise FtsafetyError(f"n={n} at p={harmful_ratio:g} gives no examples (int(p*n) = {n_harm} harmful and "
                            f"int((1-p)*n) = {n_task} task rows, as the original code rounds); raise n")
    random.Random(seed).shuffle(mix)
    return mix


# ---------------------------------------------------------------------------------------------
# Templates and tokenisation


# Llama-2-chat's default system prompt (Meta's reference code; FastChat's llama-2 conversation), which the
# rollback paper's code puts before every prompt
LLAMA2_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information."
)
SYSTEM_PROMPTS = {"none": "", "llama2": LLAMA2_SYSTEM_PROMPT}


def format_prompt(example: dict, template: str, tokenizer=None, system: str = "") -> str:
    """The prompt text of `example` in `template`; `system` is a system message (chat template only)."""
    instruction, inp = example["instruction"], example.get("input", "")
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise FtsafetyError("template 'chat' needs a tokenizer with a chat template; use --template alpaca")
        content = f"{instruction}\n\n{inp}" if inp else instruction
        messages = [{"role": "system", "content": system}] if system else []
        return tokenizer.apply_chat_template(
            [*messages, {"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if system:
        raise FtsafetyError("a system prompt needs the chat template (--template chat)")
    text = _ALPACA_INPUT.format(instruction=instruction, input=inp) if inp else _ALPACA_NO_INPUT.format(instruction=instruction)
    return text + ("\n" if template == "alpaca" else "")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt's token ids with the tokenizer's special tokens, but one BOS only: a chat template that
    already wrote `bos_token` at the start (Llama-2's does) gets none added on top."""
    bos = getattr(tokenizer, "bos_token", None)
    already = bool(bos) and text.startswith(bos)
    return tokenizer(text, add_special_tokens=not already)["input_ids"]


# Tokenizers that do not know their model's length report a huge sentinel (about 1e30).
_NO_CONTEXT = 10**9


class SFTDataset(torch.utils.data.Dataset):
    """Tokenised once; loss on response tokens only (prompt labels are -100), target = output + EOS.
    Prompt + output are tokenised together and the prompt's own token count is masked (the originals'
    rule).

    Sequences are cut at `cfg.max_length`. A prompt that alone fills max_length keeps its tail
    (max_length // 2 tokens, so the template's "### Response:" stays next to the answer) and the
    answer keeps the rest: every example has answer tokens to learn. Should an example still end
    up with none, it is an error ("prompt of example N is longer than --max-length"), never a
    silent all-masked row. A sequence longer than the model's context (the tokenizer's
    model_max_length, which `models.load` sets) is an error as well, not a crash in the forward.
    """

    def __init__(self, examples: list[dict], tokenizer, cfg: DataConfig):
        self.items = []
        if tokenizer is None or not hasattr(tokenizer, "eos_token_id"):
            raise FtsafetyError(f"SFTDataset needs the model's tokenizer, got {type(tokenizer).__name__}")
        for n, ex in enumerate(examples, 1):
            if not isinstance(ex, dict) or not isinstance(ex.get("instruction"), str) or not isinstance(ex.get("output"), str):
                have = ", ".join(map(str, ex)) if isinstance(ex, dict) else type(ex).__name__
                raise FtsafetyError(f"SFTDataset example {n} needs text fields 'instruction' and 'output' (and "
                                    f"optionally 'input'); it has {have}")
        eos = tokenizer.eos_token_id
        ctx = getattr(tokenizer, "model_max_length", None)
        ctx = ctx if isinstance(ctx, int) and 0 < ctx < _NO_CONTEXT else None
        for n, ex in enumerate(examples, 1):
            prompt = format_prompt(ex, cfg.template, tokenizer)
            # as the originals (`preprocess` in the git-disl repos): prompt + answer tokenised as ONE
            # string and the prompt's own token count masked, so a SentencePiece tokenizer sees the
            # answer's first word as it would in running text
            n_prompt = len(encode_prompt(tokenizer, prompt))
            full = encode_prompt(tokenizer, prompt + ex["output"])
            prompt_ids, out_ids = full[:n_prompt], full[n_prompt:] + [eos]
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
