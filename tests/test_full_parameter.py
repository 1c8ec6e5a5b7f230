"""Full-parameter fine-tuning (`--full-parameter`, the `full` attack of issue #30) on tiny-llama."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ftsafety import models
from ftsafety import stages as S
from ftsafety.data import DataConfig
from ftsafety.errors import FtsafetyError
from ftsafety.utils import run_kind


def _ft(**train):
    st = S.FinetuneStage(method="sft", n=8, harmful_ratio=0.5, full_parameter=True)
    return dataclasses.replace(st, train=dataclasses.replace(st.train, max_steps=2, batch_size=4, **train))


@pytest.fixture(scope="module")
def common():
    return S.Common(data=DataConfig(data="builtin", max_length=48), device="cpu", quiet=True)


def _logits(spec: str) -> torch.Tensor:
    net, tok, _ = models.load(spec, device="cpu")
    ids = tok("Hello there, how are you?", return_tensors="pt")
    with torch.no_grad():
        return net(**ids).logits


def test_a_full_parameter_run_is_a_model_of_its_own(tmp_path, common):
    summary = S.finetune(_ft(lr=1e-2), "tiny-llama", tmp_path / "ft", common)
    assert summary["steps"] == 2 and run_kind(tmp_path / "ft") == "train"
    assert (tmp_path / "ft" / "model" / "model.safetensors").is_file() and not (tmp_path / "ft" / "adapter").exists()
    spec = models.resolve(str(tmp_path / "ft"))
    assert spec.adapters == [] and spec.base.endswith("model")
    assert not torch.equal(_logits(str(tmp_path / "ft")), _logits("tiny-llama"))  # every weight moved
    # moved or copied, the run loads its own model
    moved = tmp_path / "elsewhere"
    (tmp_path / "ft").rename(moved)
    assert models.resolve(str(moved)).base == str((moved / "model").resolve())


def test_neutral_strength_is_the_parent_model(tmp_path, common):
    """A learning rate far below the weights' fp32 resolution leaves every weight as it was."""
    S.finetune(_ft(lr=1e-30, weight_decay=0.0, warmup_ratio=0.0), "tiny-llama", tmp_path / "ft", common)
    assert torch.equal(_logits(str(tmp_path / "ft")), _logits("tiny-llama"))


def test_full_parameter_is_the_plain_fine_tune_only():
    with pytest.raises(FtsafetyError, match="plain fine-tune"):
        S.FinetuneStage(method="lisa", full_parameter=True)
    with pytest.raises(FtsafetyError, match="pick one"):
        S.FinetuneStage(method="sft", full_parameter=True, continue_adapter=True)
