"""Every prompt set the evaluator scores, in one place: harmful prompts for HS (`--hs-prompts`) and benign
instructions for over-refusal (`--or-prompts`).

A set is named (declared once below) or is a local file (`.jsonl`, `.json`, `.csv`, `.parquet`, or `.txt`
with one prompt per line) with a prompt column. The two defaults, the ones the table has always used,
are named sets like the others whose rows come from the data layer: `beavertails` (BeaverTails'
evaluation prompts from wherever `--data` points: a directory, the hub or the built-in data) and
`builtin` (the built-in benign instructions). The benchmarks the field reports on are read, in this
order, from `<data dir>/prompts/<name>.<ext>` when `--data` is a directory holding such a file (the
hub's field names; `scripts/build_prompt_sets.py` writes them from the original releases' files), else
from the hub through `datasets` (its cache makes that offline once downloaded). A gated or unreachable
set fails with one line that says how to get it.

`items(spec, kind, data, n)` is the one entry point: `{"prompt", "category"}` rows of either kind.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ftsafety.errors import DataError, FtsafetyError

FORMATS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
DEFAULT_HS = "beavertails"
DEFAULT_OR = "builtin"
KINDS = ("harmful", "benign")


@dataclass(frozen=True)
class PromptSet:
    """A named prompt set. `fields` are the prompt column's names, the hub's first, then the original
    release's; `category_fields` likewise. `keep` selects rows (XSTest's safe prompts for OR)."""

    name: str
    kind: str  # harmful | benign
    title: str
    hub_id: str
    split: str
    fields: tuple[str, ...]
    category_fields: tuple[str, ...] = ()
    config: str | None = None
    licence: str = ""
    gated: bool = False
    source: str = ""
    keep: Callable[[dict], bool] | None = None
    hub_reader: Callable[["PromptSet"], list[dict]] | None = None  # a set that is not a `datasets` table
    dir_reader: Callable[[Path], list[dict]] | None = None  # a local folder of the hub's own files
    # a set whose rows (and where they came from) are read by the data layer for any --data: the defaults
    reader: Callable[[object], tuple[list[dict], str]] | None = None

    def how_to_get(self) -> str:
        gate = (f"accept its terms at huggingface.co/datasets/{self.hub_id} and log in (huggingface-cli login), "
                if self.gated else "")
        folder = f" (or its files under prompts/{self.name}/)" if self.dir_reader else ""
        return (f"{gate}or save it as prompts/{self.name}.jsonl (field {self.fields[0]!r}){folder} in a --data "
                f"directory, or pass the file's path")

    @property
    def where(self) -> str:
        return self.hub_id + (f" ({self.config})" if self.config else "") + (f" [{self.split}]" if self.split else "")


def _xstest_safe(row: dict) -> bool:
    return str(row.get("label", "")).strip().lower() == "safe"


# HEx-PHI ships 11 header-less CSVs, category_<i>.csv, one instruction per line; category_2 (child abuse
# content) was withdrawn by its authors, so the hub holds 300 prompts.
HEXPHI_CATEGORIES = ("illegal_activity", "child_abuse_content", "hate_harass_violence", "malware",
                     "physical_harm", "economic_harm", "fraud_deception", "adult_content",
                     "political_campaigning", "privacy_violation", "tailored_financial_advice")


def _hexphi_rows(read_file: Callable[[str], Path | None]) -> list[dict]:
    rows = []
    for i, cat in enumerate(HEXPHI_CATEGORIES, 1):
        path = read_file(f"category_{i}.csv")
        if path is None:
            continue
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows += [{"prompt": r[0], "category": cat} for r in csv.reader(fh) if r and r[0].strip()]
    return rows


def _hexphi_local(folder: Path) -> list[dict]:
    return _hexphi_rows(lambda name: folder / name if (folder / name).is_file() else None)


def _hexphi_hub(pset: "PromptSet") -> list[dict]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(pset.hub_id, name, repo_type="dataset"))
        except EntryNotFoundError:  # a withdrawn category
            return None

    return _hexphi_rows(fetch)


def _beavertails_eval(data_cfg) -> tuple[list[dict], str]:
    from ftsafety import data as D

    return D.rows(data_cfg, "beavertails", "eval"), D.where(data_cfg, "beavertails", "eval")


def _builtin_benign(data_cfg) -> tuple[list[dict], str]:
    from ftsafety import builtin_data

    return builtin_data.benign_instructions("eval"), "builtin benign instructions"


SETS: dict[str, PromptSet] = {s.name: s for s in (
    PromptSet(DEFAULT_HS, "harmful", "BeaverTails evaluation prompts (700 locally, 50 per category; the table's)",
              "PKU-Alignment/BeaverTails", "30k_test", ("prompt",), ("category",), licence="CC-BY-NC-4.0",
              source="Ji et al. 2023; read from --data (a directory, hub or builtin)", reader=_beavertails_eval),
    PromptSet(DEFAULT_OR, "benign", "ftsafety's built-in benign instructions (243; over-refusal)", "", "",
              ("instruction",), licence="Apache-2.0 (this project)", source="written for ftsafety",
              reader=_builtin_benign),
    PromptSet("advbench", "harmful", "AdvBench harmful behaviors (520)", "walledai/AdvBench", "train",
              ("prompt", "goal"), licence="MIT", gated=True, source="Zou et al. 2023; llm-attacks harmful_behaviors.csv"),
    PromptSet("hexphi", "harmful", "HEx-PHI (300 of 330; 10 categories on the hub)", "LLM-Tuning-Safety/HEx-PHI", "",
              ("prompt",), ("category",), licence="HEx-PHI licence (research)", gated=True,
              source="Qi et al. 2023 (ICLR 2024)", hub_reader=_hexphi_hub, dir_reader=_hexphi_local),
    PromptSet("catqa", "harmful", "CatQA (550, 11 categories)", "declare-lab/CategoricalHarmfulQA", "en",
              ("Question", "prompt"), ("Category",), licence="Apache-2.0",
              source="Bhardwaj et al. 2024 (the rollback paper's set)"),
    PromptSet("harmbench", "harmful", "HarmBench standard behaviors (200)", "walledai/HarmBench", "train",
              ("prompt", "Behavior"), ("category", "SemanticCategory"), config="standard", licence="MIT", gated=True,
              source="Mazeika et al. 2024; harmbench_behaviors_text_all.csv"),
    PromptSet("strongreject", "harmful", "StrongREJECT (313)", "walledai/StrongREJECT", "train",
              ("prompt", "forbidden_prompt"), ("category",), licence="MIT", gated=True,
              source="Souly et al. 2024; strongreject_dataset.csv"),
    PromptSet("jbb", "harmful", "JailbreakBench JBB-Behaviors, harmful (100)", "JailbreakBench/JBB-Behaviors",
              "harmful", ("Goal",), ("Category",), config="behaviors", licence="MIT",
              source="Chao et al. 2024"),
    PromptSet("xstest", "benign", "XSTest, its 250 safe prompts", "Paul/XSTest", "train",
              ("prompt",), ("type",), licence="CC-BY-4.0", source="Röttger et al. 2024; xstest_prompts.csv",
              keep=_xstest_safe),
)}

PROMPT_FIELDS = ("prompt", "goal", "Goal", "Behavior", "forbidden_prompt", "Question", "question", "instruction")
CATEGORY_FIELDS = ("category", "Category", "SemanticCategory", "type")


def names(kind: str) -> list[str]:
    """The named sets of one kind, the default first."""
    return [n for n, s in SETS.items() if s.kind == kind]


def check_spec(spec: str, kind: str) -> None:
    """A set name of the right kind, or a path to a file in a readable format (checked before a model loads)."""
    if spec in names(kind):
        return
    other = SETS.get(spec)
    if other is not None:
        raise FtsafetyError(f"{spec} is a {other.kind} prompt set; --{'hs' if kind == 'harmful' else 'or'}-prompts "
                            f"takes one of {', '.join(names(kind))} or a file")
    path = Path(spec).expanduser()
    if path.suffix.lower() not in FORMATS:
        raise FtsafetyError(f"unknown prompt set {spec!r}: name one of {', '.join(names(kind))}, or a file "
                            f"({', '.join(FORMATS)})")
    if not path.is_file():
        raise DataError("file not found", str(path))


def _data_config(data):
    """A `DataConfig` from what callers pass as `data`: a DataConfig, a --data value, or None (builtin)."""
    from ftsafety.data import DataConfig

    return data if isinstance(data, DataConfig) else DataConfig(data=str(data) if data else "builtin")


def items(spec: str, kind: str, data=None, n: int | None = None, prompt_field: str | None = None,
          category_field: str | None = None) -> list[dict]:
    """`{"prompt", "category"}` rows of a named set or a local file, the first `n` of them (all if None).

    `data`: a `DataConfig` or a --data value (None: builtin); a named benchmark is read from its
    `prompts/` folder when that is a directory, else from the hub."""
    check_spec(spec, kind)
    cfg = _data_config(data)
    pset = SETS.get(spec)
    if pset is None:
        path = Path(spec).expanduser()
        rows = read_rows(path)
        where = str(path)
        fields, cat_fields = PROMPT_FIELDS, CATEGORY_FIELDS
    else:
        if pset.reader is not None:
            rows, where = pset.reader(cfg)
        else:
            local = _local_copy(pset, cfg.data if cfg.source == "local" else None)
            if local is None:
                rows = _hub_rows(pset)
            else:
                rows = pset.dir_reader(local) if local.is_dir() else read_rows(local)
            where = str(local) if local else pset.where
        fields, cat_fields = pset.fields, pset.category_fields or CATEGORY_FIELDS
        if pset.keep is not None:
            rows = [r for r in rows if pset.keep(r)]
    if not rows:
        raise DataError("no prompts", where)
    pfield = prompt_field or _pick(rows[0], fields, where, "--prompt-field")
    cfield = category_field or next((f for f in cat_fields if f in rows[0]), None)
    out = []
    for i, row in enumerate(rows[:n] if n else rows, 1):
        text = row.get(pfield)
        if not isinstance(text, str) or not text.strip():
            what = "missing" if pfield not in row else ("empty" if isinstance(text, str) else "not text")
            raise DataError(f"row {i}: field {pfield!r} is {what}", where)
        out.append({"prompt": text, "category": _category(row.get(cfield) if cfield else None, i, where)})
    return out


def _category(cat, i: int, where: str) -> str:
    """A row's category as one string: BeaverTails' mapping of booleans gives its first true key."""
    if isinstance(cat, dict):
        return next((str(k) for k, v in cat.items() if v), "unknown")
    if cat is not None and not isinstance(cat, (str, int, float)):
        raise DataError(f"row {i}: field 'category' must be a string or a mapping of booleans, got "
                        f"{type(cat).__name__}", where)
    return str(cat).strip() if cat not in (None, "") else "unknown"


def _pick(row: dict, fields: tuple[str, ...], where: str, flag: str) -> str:
    found = next((f for f in fields if f in row), None)
    if found is None:
        cols = ", ".join(map(str, list(row)[:12])) or "none"
        raise DataError(f"no prompt column (looked for {', '.join(fields)}; it has {cols}): name it with {flag}", where)
    return found


def _local_copy(pset: PromptSet, data_dir: str | None) -> Path | None:
    if not data_dir:
        return None
    base = Path(data_dir).expanduser() / "prompts"
    if pset.dir_reader is not None and (base / pset.name).is_dir():
        return base / pset.name
    return next((base / f"{pset.name}{ext}" for ext in FORMATS if (base / f"{pset.name}{ext}").is_file()), None)


MAX_PROMPT_FILE_BYTES = 64 << 20  # a prompt set is kilobytes to a few MB


def read_rows(path: Path) -> list[dict]:
    """The rows of a local prompt file, each a dict; every problem is one line naming the file. A file
    above MAX_PROMPT_FILE_BYTES, or a line above the data layer's line limit, is refused unread."""
    from ftsafety import data as D

    suffix = path.suffix.lower()
    D.check_file_size(path, MAX_PROMPT_FILE_BYTES)
    if suffix == ".jsonl":
        return D.read_jsonl(path, limit=MAX_PROMPT_FILE_BYTES)
    try:
        if suffix == ".txt":
            return _text_rows(path)
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as fh:
                return [dict(r) for r in csv.DictReader(fh)]
        if suffix == ".json":
            obj = json.loads(path.read_text(encoding="utf-8"))
            rows = obj.get("data") if isinstance(obj, dict) else obj
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise DataError("expected a JSON list of objects (or {\"data\": [...]})", str(path))
            return rows
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except UnicodeDecodeError:
        raise DataError("not valid UTF-8", str(path)) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON ({exc.msg}, line {exc.lineno})", str(path)) from None
    except csv.Error as exc:
        raise DataError(f"malformed CSV ({exc})", str(path)) from None
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror or exc})", str(path)) from None
    except DataError:
        raise
    except Exception as exc:  # pyarrow's errors: one line
        raise DataError(f"cannot read as {suffix[1:]} ({str(exc).splitlines()[0][:160]})", str(path)) from None
    raise DataError(f"unsupported format {suffix or '(none)'}; use one of {', '.join(FORMATS)}", str(path))


def _text_rows(path: Path) -> list[dict]:
    """One prompt per non-empty line of a text file, read line by line with the line limit."""
    from ftsafety import data as D

    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(iter(lambda: fh.readline(D.MAX_LINE_BYTES + 1), b""), 1):
            if len(raw) > D.MAX_LINE_BYTES:
                raise DataError(f"line longer than {D.MAX_LINE_BYTES >> 20} MB (a prompt is a few hundred characters)",
                                str(path), lineno)
            line = raw.decode("utf-8").strip()
            if line:
                rows.append({"prompt": line})
    return rows


def _hub_rows(pset: PromptSet) -> list[dict]:
    try:
        if pset.hub_reader is not None:
            return pset.hub_reader(pset)
        import datasets

        args = (pset.hub_id, pset.config) if pset.config else (pset.hub_id,)
        return list(datasets.load_dataset(*args, split=pset.split))
    except Exception as exc:  # offline, gated, moved: one line that says how to get it
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise FtsafetyError(f"could not load {pset.name} ({pset.hub_id}) from the hub: {first}; "
                            f"{pset.how_to_get()}") from exc


def table_markdown() -> str:
    """The named sets as a markdown table (README's list is this function's output)."""
    lines = ["| name | kind | set | hub id | prompt field | licence | source |", "|---|---|---|---|---|---|---|"]
    for s in SETS.values():
        hub = (f"`{s.hub_id}`" if s.hub_id else "—") + (f" ({s.config})" if s.config else "") + (", gated" if s.gated else "")
        lines.append(f"| `{s.name}` | {s.kind} | {s.title} | {hub} | `{s.fields[0]}` | {s.licence} | {s.source} |")
    return "\n".join(lines)
