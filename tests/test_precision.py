"""--dtype (issue #29): how `auto` resolves, that bf16 really runs (not a silent fp32 fallback) on the locked
set, that the stage keys of fp32 runs made before the option are unchanged, and length-grouped batches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ftsafety import pipeline as P
from ftsafety import stages as S
from ftsafety import utils
from ftsafety.data import DataConfig
from ftsafety.errors import FtsafetyError
from ftsafety.train import TrainConfig, training_args
from ftsafety.utils import resolve_precision

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags, ran", [({"avx512_bf16", "avx2"}, "bf16"), ({"amx_bf16"}, "bf16"),
                                        ({"avx2", "avx512f"}, "fp32"), (set(), "fp32")])
def test_auto_on_cpu_follows_the_bf16_instructions(flags, ran):
    prec = resolve_precision("auto", CPU, flags=flags)
    assert prec.ran == ran
    assert prec.weights is torch.float32  # CPU bf16 is autocast: the weights stay fp32
    assert ("avx512_bf16" in prec.why or "amx_bf16" in prec.why) if ran == "bf16" else "without" in prec.why
    assert prec.legacy == (ran == "fp32")


def test_explicit_dtypes_and_bad_names():
    assert resolve_precision("fp32", CPU, flags={"avx512_bf16"}).ran == "fp32"
    assert resolve_precision("BF16", CPU, flags=set()).ran == "bf16"
    with pytest.raises(FtsafetyError, match="unknown dtype 'fp16'"):
        resolve_precision("fp16", CPU)
    with pytest.raises(FtsafetyError, match="not on mps"):
        resolve_precision("bf16", torch.device("mps"))
    with pytest.raises(FtsafetyError, match="unknown dtype"):
        S.Common(dtype="half")


def test_training_args_bf16_and_length_grouping():
    cfg = TrainConfig(max_steps=1)
    assert training_args(cfg, CPU, "/tmp/x", resolve_precision("bf16", CPU)).bf16
    assert not training_args(cfg, CPU, "/tmp/x", resolve_precision("fp32", CPU)).bf16
    grouped = training_args(dataclasses.replace(cfg, group_by_length=True), CPU, "/tmp/x")
    assert getattr(grouped, "train_sampling_strategy", None) == "group_by_length" or grouped.group_by_length


def _linear_dtypes(monkeypatch) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    forward = torch.nn.Linear.forward

    def spy(self, x):
        out = forward(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    return seen


def test_auto_does_not_fall_back_silently_on_a_bf16_cpu(tmp_path, monkeypatch):
    """On a CPU that reports AVX512-BF16, `auto` trains and generates with bf16 matmuls on the locked
    transformers/accelerate, and the run says so: this fails if CPU autocast stops being applied."""
    monkeypatch.setattr(utils, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    seen = _linear_dtypes(monkeypatch)
    c = S.Common(data=DataConfig(data="builtin", max_length=48), device="cpu", dtype="auto", quiet=True)
    st = S.AlignStage(method="sft", n=4)
    st = dataclasses.replace(st, train=dataclasses.replace(st.train, max_steps=1, batch_size=2))
    summary = S.align(st, "tiny-llama", tmp_path / "align", c)
    assert summary["precision"]["ran"] == "bf16" and "avx512_bf16" in summary["precision"]["why"]
    assert seen and set(seen) == {torch.bfloat16}
    config = (tmp_path / "align" / "config.yaml").read_text()
    assert "precision" in config  # not the legacy arithmetic: part of the run's settings (and fingerprint)

    seen.clear()
    ev = S.EvalStage(judge="keyword", hs_limit=2, fa_limit=0, or_limit=0, max_new_tokens=2)
    res = S.evaluate(ev, str(tmp_path / "align"), "sst2", tmp_path / "eval", c)
    assert res["precision"]["ran"] == "bf16"
    assert seen and set(seen) == {torch.bfloat16}


def test_fp32_runs_record_it_and_keep_their_fingerprint_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "cpu_flags", lambda: {"avx2"})
    seen = _linear_dtypes(monkeypatch)
    c = S.Common(data=DataConfig(data="builtin", max_length=48), device="cpu", quiet=True)
    st = S.AlignStage(method="sft", n=4)
    st = dataclasses.replace(st, train=dataclasses.replace(st.train, max_steps=1, batch_size=2))
    summary = S.align(st, "tiny-llama", tmp_path / "align", c)
    assert summary["precision"] == {"asked": "auto", "ran": "fp32",
                                    "why": "CPU without AVX512-BF16 or AMX (bf16 would be emulated, slower)"}
    assert set(seen) == {torch.float32}
    config = (tmp_path / "align" / "config.yaml").read_text()
    assert "precision" not in config and "group_by_length" not in config


def _keys(overrides, monkeypatch=None):
    _, pipes = P.pipelines(ROOT / "recipes" / "smoke" / "tiny-llama.yaml", ["data=builtin", *overrides])
    return [sp.key for pipe in pipes for sp in P.plan(pipe, Path("runs"))]


def test_stage_keys_of_fp32_runs_are_those_made_before_dtype(monkeypatch):
    monkeypatch.setattr(utils, "cpu_flags", lambda: {"avx2"})
    auto = _keys([])
    assert auto == _keys(["dtype=fp32"])
    bf16 = _keys(["dtype=bf16"])
    assert all(a != b for a, b in zip(auto, bf16))  # a bf16 run on CPU gets stages of its own
    monkeypatch.setattr(utils, "cpu_flags", lambda: {"avx512_bf16"})
    assert _keys([]) == bf16  # auto on a bf16 CPU is bf16, cached apart from the fp32 stages
    monkeypatch.setattr(P, "_precision_key", lambda recipe: {})  # the key as computed before --dtype existed
    assert _keys([]) == auto


def test_bad_dtype_in_a_recipe_is_one_line():
    with pytest.raises(FtsafetyError, match="dtype: unknown value 'fp8'"):
        _keys(["dtype=fp8"])


def test_length_grouped_training_runs_and_is_recorded(tmp_path):
    c = S.Common(data=DataConfig(data="builtin", max_length=48), device="cpu", quiet=True)
    st = S.FinetuneStage(method="sft", n=8)
    st = dataclasses.replace(st, train=dataclasses.replace(st.train, max_steps=2, batch_size=4, group_by_length=True))
    summary = S.finetune(st, "tiny-llama", tmp_path / "ft", c)
    assert summary["steps"] == 2
    cfg = json.dumps((tmp_path / "ft" / "config.yaml").read_text())
    assert "group_by_length: true" in cfg
