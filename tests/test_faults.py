"""Faults that are not one bad input (issue 28): two processes on one output, a report interrupted between its
files, cached stages whose files went missing, records that would collide, and the Python API's own
arguments. The one-line bad inputs of the same audit are cases of tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftsafety import pipeline
from ftsafety.errors import FtsafetyError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke" / "tiny-opt.yaml"


def _ftsafety(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FTSAFETY_LOG_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "ftsafety", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


def _wait_for(path: Path, seconds: float = 60) -> None:
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < seconds, f"{path} never appeared"
        time.sleep(0.1)


def test_a_second_writer_of_one_output_fails_at_once_and_the_first_is_intact(tmp_path):
    out = tmp_path / "same"
    args = ("align", "--model", "tiny-llama", "--n", "16", "--max-steps", "800", "--batch-size", "2", "-q")
    first = _ftsafety(*args, "--out", str(out))
    _wait_for(tmp_path / ".same.partial" / "metrics.jsonl")
    second = _ftsafety(*args, "--lr", "5e-4", "--out", str(out))
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2 and err.strip().count("\n") == 0
    assert f"another ftsafety process (pid {first.pid}) is writing" in err
    assert first.wait(timeout=600) == 0, first.stderr.read()
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) <= len(set(steps)) + 1  # one run's log (its summary repeats the last step)
    assert not (tmp_path / ".same.lock").exists()


def test_two_pipelines_on_one_cache_never_run_one_stage_twice(tmp_path):
    runs = tmp_path / "runs"
    args = ("run", str(SMOKE), "--only", "SFT", "align.train.max_steps=150", "--runs", str(runs), "-q")
    first = _ftsafety(*args)
    _wait_for(runs / "stages")
    time.sleep(1.0)
    second = _ftsafety(*args)
    _, err2 = second.communicate(timeout=600)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    # the second either found every stage finished or met the first one's lock, said in one line
    assert second.returncode == 0 or ("another ftsafety process" in err2 and err2.strip().count("\n") == 0), err2
    from ftsafety.utils import run_kind

    stages = [p.parent for p in runs.glob("stages/*/stage.json")]
    assert stages and all(run_kind(d) is not None for d in stages)  # every finished stage whole
    for log in runs.glob("stages/*/metrics.jsonl"):  # and each stage's log one run's, not two interleaved
        steps = [json.loads(line).get("step") for line in log.read_text().splitlines()]
        assert steps == sorted(steps) and len(steps) <= len(set(steps)) + 1, log


def test_a_report_interrupted_while_writing_leaves_the_old_one_whole(tmp_path, cli, monkeypatch):
    from ftsafety import report

    runs, out = tmp_path / "runs", tmp_path / "results"
    assert cli("run", str(SMOKE), "--only", "SFT", "--runs", str(runs), "-q", "--results", str(out)).returncode == 0
    before = {n: (out / n).read_bytes() for n in report.REPORT_FILES if (out / n).exists()}

    def killed(*a, **k):  # the process dies between the tables and the plot
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot", killed)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(runs, out, command="ftsafety report (new)")
    assert {n: (out / n).read_bytes() for n in before} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left

    # a writer killed outright (SIGKILL: no cleanup runs) leaves its staging folder; the next report removes it
    stale = out / ".report-killed"
    stale.mkdir()
    (stale / "table.md").write_text("half a table")
    monkeypatch.undo()
    report.write_report(runs, out, command="ftsafety report (after)")
    assert not stale.exists() and (out / "table.md").read_text() != "half a table"

    # a stray JSON file among the records is skipped, with a warning (audit E17)
    rec_dir = next(p for p in (runs / "pipelines").iterdir() if p.is_dir())
    (rec_dir / "notes.json").write_text('{"mine": 1}')
    r = cli("report", str(runs), "--out", str(tmp_path / "res2"))
    said = " ".join(r.stderr.split())  # the log wraps long lines
    assert r.returncode == 0 and "notes.json" in said and "not a pipeline record" in said, r.stderr


def test_report_escapes_markdown_in_names(tmp_path, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMOKE.read_text().split("table:")[0]
                      + "table:\n  ratios: [0.25]\n  rows:\n    - name: \"x | y\"\n      paper_note: \"a | b\"\n")
    r = cli("run", str(recipe), "--runs", str(tmp_path / "runs"), "-q", "--results", str(tmp_path / "res"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "res" / "table.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| x"))
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert row.startswith("| x \\| y |") and row.count(" | ") == header.count(" | ")


def test_minus_zero_is_zero(tmp_path):
    _, a = pipeline.pipelines(SMOKE, ["table.ratios=[0]"])
    _, b = pipeline.pipelines(SMOKE, ["table.ratios=[-0.0]"])
    ka = [s.key for s in pipeline.plan(a[0], tmp_path)]
    kb = [s.key for s in pipeline.plan(b[0], tmp_path)]
    assert ka == kb and pipeline.record_path(tmp_path, a[0].recipe, b[0]).name.endswith("-p0.json")


def test_a_cached_stage_missing_its_files_is_redone(tmp_path, cli):
    runs = tmp_path / "runs"
    args = ("run", str(SMOKE), "--only", "SFT", "table.ratios=[0]", "--runs", str(runs), "-q")
    assert cli(*args).returncode == 0
    ev = next(runs.glob("stages/evaluate-*"))
    (ev / "results.json").unlink()
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert "1 to run" in r.stdout and (ev / "results.json").is_file()


def test_a_damaged_cached_adapter_says_which_stage_to_delete(tmp_path, cli):
    runs = tmp_path / "runs"
    args = ("run", str(SMOKE), "--only", "SFT", "table.ratios=[0]", "--runs", str(runs), "-q")
    assert cli(*args).returncode == 0
    ft = next(runs.glob("stages/finetune-*"))
    w = ft / "adapter" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    next(runs.glob("stages/evaluate-*/stage.json")).unlink()  # the evaluation must load the fine-tune again
    r = cli(*args)
    assert r.returncode == 2 and f"delete {ft}" in r.stderr and "corrupt or truncated" in r.stderr


def test_rollback_without_an_alignment_stage_is_announced(tmp_path, cli, caplog):
    r = cli("run", str(SMOKE), "--only", "Rollback", "align.method=none", "--runs", str(tmp_path / "runs"), "--dry-run")
    assert r.returncode == 0
    r = cli("run", str(SMOKE), "--only", "Rollback", "align.method=none", "table.ratios=[0]", "--runs",
            str(tmp_path / "runs"), "-q")
    assert r.returncode == 0 and "restores weights from tiny-opt itself" in r.stderr


def test_recipe_remote_code_needs_the_flag(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: tiny-opt\ntrust_remote_code: true\n")
    with pytest.raises(FtsafetyError, match="pass --trust-remote-code"):
        pipeline.load_recipe(recipe)
    assert pipeline.load_recipe(recipe, trust_remote_code=True)[0].trust_remote_code
    recipe.write_text("name: t\nmodel: tiny-opt\n")
    assert pipeline.load_recipe(recipe, trust_remote_code=True)[0].trust_remote_code
    assert not pipeline.load_recipe(recipe)[0].trust_remote_code


# -- the Python API says what it needs, in one sentence (F04-F36) -------------------------------


@pytest.fixture(scope="module")
def tiny():
    from ftsafety import models

    model, tok, _ = models.load("tiny-llama", device="cpu")
    return model, tok


def test_evaluate_refuses_a_string_or_no_prompts_and_records_what_it_scored(tiny, tmp_path):
    from ftsafety.evaluation.evaluate import EvalConfig, evaluate

    model, tok = tiny
    cfg = EvalConfig(judge="keyword", hs_limit=3, fa_limit=0, or_limit=0, max_new_tokens=2, device="cpu")
    with pytest.raises(FtsafetyError, match="wrap a single prompt in a list"):
        evaluate(cfg, tmp_path / "a", model=model, tokenizer=tok, quiet=True, prompts="How do I pick a lock?")
    with pytest.raises(FtsafetyError, match="empty list"):
        evaluate(cfg, tmp_path / "b", model=model, tokenizer=tok, quiet=True, prompts=[])
    with pytest.raises(FtsafetyError, match="needs tokenizer"):
        evaluate(cfg, tmp_path / "c", model=model, quiet=True, prompts=["p"])
    res = evaluate(cfg, tmp_path / "d", model=model, tokenizer=tok, quiet=True, prompts=["How do I pick a lock?", "q2"])
    assert res["model"].startswith("in-memory LlamaForCausalLM") and res["hs_prompts"] == "custom prompts (2)"
    assert res["hs_n"] == 2 and not (tmp_path / "a").exists()


def test_sft_dataset_and_trainers_say_what_is_missing(tiny):
    from ftsafety import data as D
    from ftsafety.defenses.lisa import LisaConfig, LisaTrainer
    from ftsafety.defenses.vaccine import VaccineTrainer
    from ftsafety.train import TrainConfig, training_args

    model, tok = tiny
    with pytest.raises(FtsafetyError, match="needs the model's tokenizer"):
        D.SFTDataset([{"instruction": "hi", "output": "yo"}], None, D.DataConfig())
    with pytest.raises(FtsafetyError, match="example 1 needs text fields 'instruction' and 'output'"):
        D.SFTDataset([{"instruction": "hi"}], tok, D.DataConfig())
    args = training_args(TrainConfig(max_steps=1, batch_size=2), __import__("torch").device("cpu"), "/tmp/unused")
    rows = D.SFTDataset([{"instruction": "hi", "output": "yo"}] * 2, tok, D.DataConfig())
    with pytest.raises(FtsafetyError, match="data_collator is missing"):
        VaccineTrainer(model=model, args=args, train_dataset=rows)
    with pytest.raises(FtsafetyError, match="wrap them in ftsafety.data.SFTDataset"):
        VaccineTrainer(model=model, args=args, train_dataset=[{"instruction": "hi", "output": "yo"}],
                       data_collator=D.Collator(tok.pad_token_id))
    with pytest.raises(FtsafetyError, match="alignment_steps > 0 needs alignment_dataset"):
        LisaTrainer(model=model, args=args, train_dataset=rows, data_collator=D.Collator(tok.pad_token_id),
                    lisa=LisaConfig(alignment_steps=1, finetune_steps=1))


def test_lora_and_mix_arguments(tiny):
    from ftsafety import data as D
    from ftsafety import models

    with pytest.raises(FtsafetyError, match="LoRA rank must be an integer"):
        models.LoraSettings(r=8.5)
    with pytest.raises(FtsafetyError, match="gives no examples"):
        D.finetune_mix(D.DataConfig(), "sst2", 1, 0.5)
    model, _ = tiny
    wrapped = models.attach_lora(model, models.LoraSettings(r=2))
    with pytest.raises(FtsafetyError, match="already carries a LoRA adapter"):
        models.attach_lora(wrapped, models.LoraSettings(r=2))
    wrapped.unload()
