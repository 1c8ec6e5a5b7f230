"""Model layer: alias resolution, one-line errors, LoRA attach/save/load/merge/stack."""

import json

import pytest
import torch

from ftsafety import models
from ftsafety.errors import FtsafetyError


def test_aliases_resolve():
    for alias in models.ALIASES:
        assert models.resolve(alias).base == alias
    assert models.resolve("facebook/opt-125m").source == "hub"


@pytest.mark.parametrize("bad", ["no-such-model", "./missing/dir", "/abs/missing", "a/b/c"])
def test_unknown_model_one_line_error_names_aliases(bad):
    with pytest.raises(FtsafetyError) as info:
        models.resolve(bad)
    msg = str(info.value)
    assert "\n" not in msg and "tiny-opt" in msg and "smollm2-135m" in msg


@pytest.mark.parametrize("alias", ["tiny-opt", "tiny-llama"])
def test_tiny_models_deterministic_and_generate(alias):
    m1, tok, _ = models.load(alias, device="cpu")
    m2, _, _ = models.load(alias, device="cpu")
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    text = "Below is an instruction.\n\n### Response:\n"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    out = m1.generate(torch.tensor([tok(text)["input_ids"]]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == len(tok(text)["input_ids"]) + 4


def test_lora_targets_resolve_per_architecture():
    m, _, _ = models.load("tiny-opt", device="cpu")
    assert "out_proj" in models.resolve_targets(m, "attn")
    m, _, _ = models.load("tiny-llama", device="cpu")
    assert models.resolve_targets(m, "all") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(FtsafetyError, match="match no linear layer"):
        models.resolve_targets(m, "nonexistent_proj")


def _perturbed_adapter(tmp_path, alias, name, scale):
    base, _, _ = models.load(alias, device="cpu")
    settings = models.LoraSettings(r=4, alpha=8, targets="attn")
    peft_model = models.attach_lora(base, settings)
    torch.manual_seed(scale)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.1)
    models.save_adapter(peft_model, tmp_path / name, settings)
    return peft_model


@pytest.mark.parametrize("alias", ["tiny-opt", "tiny-llama"])
def test_adapter_save_load_merge_and_stack(tmp_path, alias):
    first = _perturbed_adapter(tmp_path, alias, "a1", 1)
    assert (tmp_path / "a1" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "a1" / "adapter_config.json").is_file()
    x = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        want1 = first(input_ids=x).logits
    spec = models.ModelSpec(base=alias, adapters=[str(tmp_path / "a1")], source="run")
    merged, _, _ = models.load(spec, device="cpu")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, want1, atol=1e-5)

    # Stacking: a second adapter trained on the merged model; a run manifest chains both.
    settings = models.LoraSettings(r=4, alpha=8, targets="attn")
    second = models.attach_lora(merged, settings)
    with torch.no_grad():
        for n, p in second.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
        want2 = second(input_ids=x).logits
    run = tmp_path / "run"
    run.mkdir()
    models.save_adapter(second, run / "adapter", settings)
    manifest = models.run_manifest(spec, run / "adapter", run, {"stage": "finetune"})
    (run / models.RUN_MANIFEST).write_text(json.dumps(manifest))
    stacked, _, ms = models.load(str(run), device="cpu")
    assert ms.source == "run" and len(ms.adapters) == 2
    with torch.no_grad():
        assert torch.allclose(stacked(input_ids=x).logits, want2, atol=1e-5)


def test_adapter_for_another_base_is_refused(tmp_path):
    _perturbed_adapter(tmp_path, "tiny-opt", "opt_adapter", 1)
    spec = models.ModelSpec(base="tiny-llama", adapters=[str(tmp_path / "opt_adapter")], source="run")
    with pytest.raises(FtsafetyError, match="adapter was trained for a opt model"):
        models.load(spec, device="cpu")


def test_run_dir_with_missing_adapter(tmp_path):
    (tmp_path / models.RUN_MANIFEST).write_text(json.dumps({"base_model": "tiny-opt", "adapters": [{"path": "/nope", "relpath": "nope"}]}))
    with pytest.raises(FtsafetyError, match="missing"):
        models.resolve(str(tmp_path))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FtsafetyError, match="neither a model"):
        models.resolve(str(tmp_path))


def test_not_a_causal_lm(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)).save_pretrained(tmp_path)
    with pytest.raises(FtsafetyError, match="causal language model|could not load"):
        models.load(str(tmp_path), device="cpu")
