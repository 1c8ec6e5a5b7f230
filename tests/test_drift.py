"""`ftsafety drift` (issue #29): Vaccine's embedding drift and the weights' distance between two models."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ftsafety import stages as S
from ftsafety.data import DataConfig
from ftsafety.errors import FtsafetyError
from ftsafety.evaluation.drift import embedding_drift


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    c = S.Common(data=DataConfig(data="builtin", max_length=48), device="cpu", quiet=True)
    al = S.AlignStage(method="sft", n=4)
    al = dataclasses.replace(al, train=dataclasses.replace(al.train, max_steps=2, batch_size=2))
    S.align(al, "tiny-llama", root / "align", c)
    ft = S.FinetuneStage(method="sft", n=8, harmful_ratio=0.5)
    ft = dataclasses.replace(ft, train=dataclasses.replace(ft.train, max_steps=3, batch_size=4, lr=1e-2))
    S.finetune(ft, str(root / "align"), root / "ft", c)
    return root


def test_a_model_has_no_drift_from_itself_and_a_fine_tune_has_some(runs):
    cfg = DataConfig(data="builtin", max_length=48)
    same = embedding_drift(str(runs / "align"), str(runs / "align"), cfg, n=4, device="cpu")
    assert same["attn_drift"] == 0 and same["final_drift"] == 0 and same["weight_distance"] == 0
    moved = embedding_drift(str(runs / "align"), str(runs / "ft"), cfg, n=4, device="cpu")
    assert moved["attn_drift"] > 0 and moved["final_drift"] > 0 and moved["weight_distance"] > 0
    assert moved["attn_drift_relative"] > 0 and moved["examples"] == 4 and moved["tokens"] > 0
    assert moved["attention_sites"] == 2  # tiny-llama's two decoder layers
    # the weights moved by the fine-tune's LoRA product alone (the alignment's adapter is in both)
    assert moved["weight_distance"] < moved["weight_norm"]


def test_drift_cli_writes_json_and_refuses_bad_input(runs, tmp_path):
    from typer.testing import CliRunner

    from ftsafety.cli import app

    out = tmp_path / "d.json"
    r = CliRunner().invoke(app, ["drift", str(runs / "align"), str(runs / "ft"), "--n", "2", "--device", "cpu",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "embedding drift over 2 alignment examples" in r.output
    assert json.loads(out.read_text())["attn_drift"] > 0
    with pytest.raises(FtsafetyError, match="n must be >= 1"):
        embedding_drift(str(runs / "align"), str(runs / "ft"), DataConfig(), n=0, device="cpu")
