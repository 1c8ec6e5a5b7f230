"""`scripts/bench.py --quick` end to end on tiny-llama: every ratio lands in bench.md and bench.json.

The tiny model says nothing about the targets (its steps are mostly Python overhead), so only the
plumbing is checked: every part ran, every ratio is a positive number, the report names the machine.
"""

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("bench", SCRIPTS / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.path.remove(str(SCRIPTS))


def test_quick_bench_writes_every_ratio(bench, tmp_path, capsys, monkeypatch):
    report = bench.main(["--quick", "--model", "tiny-llama", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "bench.json").read_text())
    md = (tmp_path / "bench.md").read_text()
    assert saved["ratios"] == json.loads(json.dumps(report["ratios"]))
    targets = saved["ratios"]["targets"]
    assert set(targets) == set(bench.TARGETS)  # all four parts ran
    for key, t in targets.items():
        assert isinstance(t["value"], (int, float)) and t["value"] > 0 and math.isfinite(t["value"]), key
        assert t["target"] == bench.TARGETS[key][2] and isinstance(t["pass"], bool)
        assert bool(t["why"]) == (not t["pass"]) and bool(t["shortfall"]) == (not t["pass"])
        verdict = "PASS" if t["pass"] else "MISS"
        assert re.search(rf"\| {re.escape(t['what'])} \| {t['value']:.3f} \| {re.escape(t['op'])} [0-9.]+ \| {verdict}", md)
        assert t["what"] in printed
        if not t["pass"]:
            assert t["why"] in md
    info = saved["ratios"]["info"]
    for key in ("vaccine_peak_memory_x_sft", "booster_peak_memory_x_sft", "lisa_peak_memory_x_sft",
                "antidote_command_x_finetune", "rollback_command_x_finetune"):
        assert info[key] > 0, key
        assert f"| {key} |" in md
    assert saved["machine"]["cpu"] and saved["machine"]["torch_threads"] >= 1 and saved["date"]
    assert saved["model"] == "tiny-llama" and saved["quick"] is True
    assert "## How each ratio is measured" in md and saved["machine"]["cpu"] in md
    # our loop's outputs are batched model.generate's, on the same batches, and our loop did run
    for row in saved["parts"]["eval"]["rows"]:
        done, total = row["identical"].split("/")
        assert done == total and row["ours_engine"] == "ftsafety"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left
    # bf16 against fp32 (issue #29): the processor's bf16 flags, what auto picks, and the GEMM rates, same run
    d = saved["parts"]["dtype"]
    assert d["cpu"]["auto_picks"] in ("fp32", "bf16") and f"`--dtype auto` picks {d['cpu']['auto_picks']}" in md
    assert d["gemm"]["gflops"]["fp32"] > 0 and d["gemm"]["gflops"]["bf16"] > 0 and "bf16 instructions:" in md
    assert set(d["step"]) == {"sft", "vaccine", "booster", "lisa"}

    # every miss gets its reason, from this run's own figures
    unreachable = {k: (w, op, 1e-6 if op == "<=" else 1e6, part) for k, (w, op, _t, part) in bench.TARGETS.items()}
    monkeypatch.setattr(bench, "TARGETS", unreachable)
    missed = bench.ratios(saved["parts"])["targets"]
    assert set(missed) == set(unreachable) and not any(t["pass"] for t in missed.values())
    for key, t in missed.items():
        assert len(t["why"]) > 80 and "MISS" not in t["why"], key
    assert "### Why the misses" in bench.markdown({**saved, "ratios": {"targets": missed, "info": {}}})


def test_parts_and_bad_parts(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--parts", "eval,nope", "--out", str(tmp_path)])
    report = bench.run("tiny-llama", parts=("eval",), quick=True, out=tmp_path)
    assert set(report["ratios"]["targets"]) == {"eval_x_generate"}
    assert "our loop / batched model.generate" in (tmp_path / "bench.md").read_text()
