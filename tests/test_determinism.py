"""Determinism: the same seed twice gives bit-identical adapters (CPU) for align and finetune, and the
same evaluation (HS and every sample) of the result; another seed gives other weights."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from ftsafety import data as D
from ftsafety import models
from ftsafety.evaluation.evaluate import EvalConfig, evaluate
from ftsafety.train import TrainConfig, train_lora

DCFG = D.DataConfig(max_length=64)
LORA = models.LoraSettings(r=4, dropout=0.1)


def _align(out, seed):
    train_lora(stage="align", parent="tiny-llama", examples=D.alignment_examples(DCFG, 8, 0.5, seed), out_dir=out,
               data_cfg=DCFG, train_cfg=TrainConfig(max_steps=4, batch_size=2, lr=1e-2, seed=seed), lora=LORA,
               device="cpu", quiet=True)


def _finetune(parent, out, seed):
    train_lora(stage="finetune", parent=str(parent), examples=D.finetune_mix(DCFG, "sst2", 8, 0.25, seed),
               out_dir=out, data_cfg=DCFG, lora=LORA, device="cpu", quiet=True,
               train_cfg=TrainConfig(max_steps=4, batch_size=2, lr=1e-2, scheduler="constant", weight_decay=0.0,
                                     seed=seed))


def _weights(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and bool(a) and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_and_evaluation(tmp_path):
    results = []
    for i in (1, 2):
        _align(tmp_path / f"align{i}", seed=7)
        _finetune(tmp_path / f"align{i}", tmp_path / f"ft{i}", seed=7)
        cfg = EvalConfig(model=str(tmp_path / f"ft{i}"), data=DCFG, task="sst2", judge="keyword", hs_limit=6,
                         fa_limit=4, or_limit=3, batch_size=4, max_new_tokens=8, fa_max_new_tokens=3, device="cpu",
                         seed=7)
        res = evaluate(cfg, tmp_path / f"eval{i}", quiet=True)
        results.append({k: v for k, v in res.items() if k not in ("timings", "environment", "model")})
    assert _equal(_weights(tmp_path / "align1"), _weights(tmp_path / "align2"))
    assert _equal(_weights(tmp_path / "ft1"), _weights(tmp_path / "ft2"))
    assert results[0] == results[1] and "hs" in results[0] and "fa" in results[0]
    samples = [[json.loads(line) for line in (tmp_path / f"eval{i}" / "samples.jsonl").read_text().splitlines()]
               for i in (1, 2)]
    assert samples[0] == samples[1] and len(samples[0]) == 6 + 4 + 3

    _align(tmp_path / "other", seed=8)  # the seed matters (LoRA init, data order, dropout)
    assert not _equal(_weights(tmp_path / "align1"), _weights(tmp_path / "other"))
