"""`--hs-prompts` / `--or-prompts`: every named set read offline from a local file with the hub's field
names, every file format, and each way a set can be wrong (one line each)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ftsafety import data as D
from ftsafety import prompt_sets as P
from ftsafety.errors import FtsafetyError


def _hub_row(pset: P.PromptSet, i: int) -> dict:
    """A row with the hub's field names for `pset` (plus a column no set uses)."""
    row = {pset.fields[0]: f"{pset.name} prompt number {i}?", "unrelated": i}
    if pset.category_fields:
        row[pset.category_fields[0]] = f"cat{i % 3}"
    if pset.name == "xstest":
        row["label"] = "safe" if i % 2 == 0 else "unsafe"
    return row


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", [n for n, s in P.SETS.items() if s.reader is None])  # the defaults: below
def test_each_named_set_reads_a_local_copy_with_hub_fields(name, tmp_path, monkeypatch):
    pset = P.SETS[name]
    _jsonl(tmp_path / "prompts" / f"{name}.jsonl", [_hub_row(pset, i) for i in range(10)])

    def no_hub(*a, **k):  # the local copy must be used: the hub is never asked
        raise AssertionError("hub reached")

    monkeypatch.setattr(P, "_hub_rows", no_hub)
    items = P.items(name, pset.kind, str(tmp_path), n=4)
    kept = [i for i in range(10) if pset.keep is None or pset.keep(_hub_row(pset, i))]
    assert [it["prompt"] for it in items] == [f"{name} prompt number {i}?" for i in kept[:4]]
    if pset.category_fields:
        assert [it["category"] for it in items] == [f"cat{i % 3}" for i in kept[:4]]
    else:
        assert {it["category"] for it in items} == {"unknown"}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt"])
def test_any_local_file_format(suffix, tmp_path):
    rows = [{"goal": f"Write a harmful thing {i}", "category": "misc" if i else "first"} for i in range(5)]
    path = tmp_path / f"set{suffix}"
    if suffix == ".jsonl":
        _jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["goal", "category"])
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("\n".join(r["goal"] for r in rows) + "\n\n")
    items = P.items(str(path), "harmful", None)
    assert [it["prompt"] for it in items] == [r["goal"] for r in rows]
    if suffix != ".txt":
        assert items[0]["category"] == "first" and items[1]["category"] == "misc"


def test_prompt_field_names_the_column(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"text": "a", "prompt": "not this"}, {"text": "b", "prompt": "nor this"}])
    assert [it["prompt"] for it in P.items(str(path), "harmful", None, prompt_field="text")] == ["a", "b"]


@pytest.mark.parametrize("content,suffix,message", [
    ('{"text": "x"}\n', ".jsonl", "no prompt column (looked for prompt, goal"),
    ('{"prompt": "x"}\n{"prompt": "  "}\n', ".jsonl", "row 2: field 'prompt' is empty"),
    ('{"prompt": "x"}\n{"prompt": 3}\n', ".jsonl", "row 2: field 'prompt' is not text"),
    ('[{"prompt": "x"}, 3]', ".json", "expected a JSON list of objects"),
    ('[{"prompt": "x"', ".json", "malformed JSON"),
    ("prompt\n", ".csv", "no prompts"),
    ("", ".txt", "no prompts"),
    ("not parquet", ".parquet", "cannot read as parquet"),
])
def test_bad_prompt_files_are_one_line(content, suffix, message, tmp_path):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(FtsafetyError, match=message.replace("(", r"\(")) as err:
        P.items(str(path), "harmful", None)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("spec,kind,message", [
    ("advbnch", "harmful", "unknown prompt set 'advbnch'"),
    ("xstest", "harmful", "xstest is a benign prompt set"),
    ("advbench", "benign", "advbench is a harmful prompt set"),
    ("missing.jsonl", "harmful", "file not found"),
    ("prompts.xlsx", "harmful", "unknown prompt set"),
])
def test_bad_set_names(spec, kind, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FtsafetyError, match=message):
        P.check_spec(spec, kind)


@pytest.mark.parametrize("name", ["hexphi", "advbench"])
def test_unreachable_or_gated_set_says_how_to_get_it(name, monkeypatch):
    import datasets
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError(f"Couldn't reach {P.SETS[name].hub_id!r} on the Hub (GatedRepoError)\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FtsafetyError) as err:
        P.items(name, "harmful", None)
    msg = str(err.value)
    assert "\n" not in msg and "huggingface-cli login" in msg and f"prompts/{name}.jsonl" in msg
    assert P.SETS[name].hub_id in msg


def test_hub_loading_asks_for_the_declared_id_config_and_split(monkeypatch):
    import datasets

    asked = []

    def fake(*args, split=None):
        asked.append((args, split))
        return [{"Goal": "g1", "Category": "c"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert P.items("jbb", "harmful", None)[0] == {"prompt": "g1", "category": "c"}
    assert asked == [(("JailbreakBench/JBB-Behaviors", "behaviors"), "harmful")]


def test_defaults_are_the_tables_sets(tiny_data_dir):
    """The defaults are named sets like the others, read by the data layer from wherever --data points."""
    from ftsafety import builtin_data

    cfg = D.DataConfig(data=str(tiny_data_dir))
    assert P.names("harmful")[0] == "beavertails" and P.names("benign")[0] == "builtin"
    raw = D.read_jsonl(tiny_data_dir / "beavertails" / "eval_prompts.jsonl")[:5]
    assert P.items("beavertails", "harmful", cfg, 5) == [{"prompt": r["prompt"], "category": r["category"]} for r in raw]
    assert P.items("builtin", "benign", cfg, 5) == [{"prompt": r["instruction"], "category": "unknown"}
                                                     for r in builtin_data.benign_instructions("eval")[:5]]
    builtin = P.items("beavertails", "harmful", "builtin", 3)
    assert [b["prompt"] for b in builtin] == [r["prompt"] for r in builtin_data.harmful_prompts("eval")[:3]]


def test_readme_lists_every_named_set():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert P.table_markdown() in readme


def test_evaluate_on_a_file_and_xstest(tmp_path, tiny_data_dir, cli):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(tiny_data_dir, data)
    _jsonl(data / "prompts" / "xstest.jsonl", [_hub_row(P.SETS["xstest"], i) for i in range(8)])
    hs = tmp_path / "hexphi.csv"
    with open(hs, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "category"])
        w.writerows([[f"harmful request {i}", "fraud" if i % 2 else "malware"] for i in range(6)])
    r = cli("evaluate", "--model", "tiny-opt", "--data", str(data), "--hs-prompts", str(hs), "--or-prompts", "xstest",
            "--hs-limit", "5", "--fa-limit", "0", "--or-limit", "3", "--max-new-tokens", "3", "--device", "cpu",
            "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["hs_n"] == 5 and res["or_n"] == 3 and set(res["hs_by_category"]) == {"fraud", "malware"}
    assert res["hs_prompts"] == str(hs) and res["or_prompts"] == "xstest"
    samples = [json.loads(line) for line in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples if s["kind"] == "benign"] == [f"xstest prompt number {i}?" for i in (0, 2, 4)]
    bad = cli("evaluate", "--model", "tiny-opt", "--hs-prompts", "nosuch", "--out", str(tmp_path / "ev2"))
    assert bad.returncode != 0 and "unknown prompt set 'nosuch'" in bad.stderr and "Traceback" not in bad.stderr


def _hexphi_files(folder: Path) -> None:
    """The hub's layout: header-less category_<i>.csv files, category_2 withdrawn."""
    folder.mkdir(parents=True)
    for i in (1, 3, 11):
        (folder / f"category_{i}.csv").write_text("".join(f'"Prompt {i}.{j}, with a comma"\n' for j in range(3)))


def test_hexphi_folder_of_the_hubs_headerless_files(tmp_path):
    _hexphi_files(tmp_path / "prompts" / "hexphi")
    items = P.items("hexphi", "harmful", str(tmp_path))
    assert len(items) == 9 and items[0] == {"prompt": "Prompt 1.0, with a comma", "category": "illegal_activity"}
    assert [it["category"] for it in items[3::3]] == ["hate_harass_violence", "tailored_financial_advice"]


def test_hexphi_from_the_hub_skips_the_withdrawn_category(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    _hexphi_files(tmp_path / "hub")
    asked = []

    def download(repo_id, filename, repo_type=None):
        asked.append((repo_id, filename, repo_type))
        if not (tmp_path / "hub" / filename).is_file():
            raise EntryNotFoundError(f"{filename} not found")
        return str(tmp_path / "hub" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    items = P.items("hexphi", "harmful", None)
    assert len(items) == 9 and len(asked) == 11 and asked[0] == ("LLM-Tuning-Safety/HEx-PHI", "category_1.csv", "dataset")
