"""Security properties: no secrets in what a run writes, remote code off unless asked for (and then
announced), safetensors only (never unpickling), judge output parsed as text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from ftsafety import models
from ftsafety.errors import FtsafetyError
from ftsafety.utils import is_secret_key, scrub, write_json, write_jsonl, write_yaml

FAKE_HF = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"  # 30 characters after hf_: shaped like a real token
FAKE_SK = "sk-" + "proj-" + "a1B2c3D4e5F6g7H8i9J0k1L2m3"
SRC = Path(__file__).resolve().parents[1] / "src" / "ftsafety"


# -- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["token", "hf_token", "HF_TOKEN", "hub-token", "access_token", "api_key", "apikey",
                                 "secret", "client_secret", "password", "auth", "authorization", "use_auth_token"])
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["max_new_tokens", "fa_max_new_tokens", "n_tokens", "tokens_per_second",
                                 "generated_tokens_hs", "pad_token", "eos_token", "max_length", "tokenizer", "author",
                                 "password_cracking", "session_token_theft", "credential_phishing", "db_password_leak"])
def test_not_secret_keys(key):
    assert not is_secret_key(key)


def test_data_named_like_secrets_keeps_its_figures(tmp_path):
    """Audit C23: per-category HS for categories such as password_cracking survived the scrubber as '<redacted>'."""
    figures = {"hs_by_category": {"password_cracking": 50.0, "credential_phishing": 25.0, "session_token_theft": 100.0,
                                  "token": 12.5, "password": 0.0},
               "labels": {"api_key_theft": 3}}
    write_json(tmp_path / "r.json", figures)
    assert json.loads((tmp_path / "r.json").read_text()) == figures
    for shaped in ("AKIA" + "ABCDEFGHIJKLMNOP", "xoxb-" + "1234567890-abcdef"):
        assert scrub({"note": f"key {shaped}"}) == {"note": "key <redacted>"}


def _secrets() -> dict:
    return {
        "max_new_tokens": 64, "fa_max_new_tokens": 32, "n_tokens": 10, "tokens_per_second": 3.5,
        "model": "tiny-opt",
        "hub": {"hf_token": "whatever-is-here", "nested": [{"HF_TOKEN": FAKE_HF}, {"api_key": "k"}]},
        "env_like": {"HF_TOKEN": FAKE_HF, "PATH": "/usr/bin"},
        "note": f"pushed with {FAKE_HF} yesterday",
        "list": [FAKE_HF, FAKE_SK, "plain"],
        "password": "hunter2",
    }


def _assert_scrubbed(text: str):
    assert FAKE_HF not in text and FAKE_SK not in text
    assert "whatever-is-here" not in text and "hunter2" not in text
    assert "<redacted>" in text


def test_scrub_keeps_counts_and_drops_secrets():
    out = scrub(_secrets())
    assert out["max_new_tokens"] == 64 and out["fa_max_new_tokens"] == 32 and out["n_tokens"] == 10
    assert out["tokens_per_second"] == 3.5 and out["model"] == "tiny-opt" and out["env_like"]["PATH"] == "/usr/bin"
    assert out["hub"]["hf_token"] == "<redacted>" and out["hub"]["nested"][0]["HF_TOKEN"] == "<redacted>"
    assert out["note"] == "pushed with <redacted> yesterday"
    assert out["list"] == ["<redacted>", "<redacted>", "plain"]
    _assert_scrubbed(json.dumps(out))


def test_written_json_yaml_jsonl_are_scrubbed(tmp_path):
    write_json(tmp_path / "a.json", _secrets())
    write_yaml(tmp_path / "a.yaml", _secrets())
    write_jsonl(tmp_path / "a.jsonl", [_secrets(), {"response": f"my key is {FAKE_SK}"}])
    for name in ("a.json", "a.yaml", "a.jsonl"):
        _assert_scrubbed((tmp_path / name).read_text())
    assert json.loads((tmp_path / "a.json").read_text())["max_new_tokens"] == 64
    assert yaml.safe_load((tmp_path / "a.yaml").read_text())["max_new_tokens"] == 64
    assert "max_new_tokens: 64" in (tmp_path / "a.yaml").read_text()


def test_eval_config_keeps_max_new_tokens(tmp_path, tiny_data_dir):
    """The bug this fixes: evaluate's config.yaml said `max_new_tokens: <redacted>`."""
    from ftsafety import data as D
    from ftsafety.evaluation.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(model="tiny-opt", data=D.DataConfig(data=str(tiny_data_dir)), hs_limit=1, fa_limit=1, or_limit=0,
                     max_new_tokens=3, fa_max_new_tokens=2, device="cpu")
    evaluate(cfg, tmp_path / "ev", quiet=True)
    saved = yaml.safe_load((tmp_path / "ev" / "config.yaml").read_text())
    assert saved["max_new_tokens"] == 3 and saved["fa_max_new_tokens"] == 2


@pytest.fixture(scope="module")
def run_with_token(tmp_path_factory):
    """A real `ftsafety align` (subprocess) with hub tokens in its environment."""
    out = tmp_path_factory.mktemp("secrets") / "align"
    env = {"HF_TOKEN": FAKE_HF, "HUGGING_FACE_HUB_TOKEN": FAKE_HF, "OPENAI_API_KEY": FAKE_SK}
    r = run_cli("align", "--model", "tiny-opt", "--n", "8", "--max-steps", "1", "--batch-size", "4", "-q",
                "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    return out, r


def test_hub_token_in_environment_is_written_nowhere(run_with_token):
    out, r = run_with_token
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"train_results.json", "config.yaml", "ftsafety_run.json"} <= {p.name for p in files}
    assert "environment" in json.loads((out / "train_results.json").read_text())
    for p in files:
        data = p.read_bytes()
        assert FAKE_HF.encode() not in data and FAKE_SK.encode() not in data, p
    assert FAKE_HF not in r.stdout + r.stderr and FAKE_SK not in r.stdout + r.stderr


# -- trust_remote_code ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_tiny_opt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("local") / "tiny-opt"
    model, tok, _ = models.load("tiny-opt", device="cpu")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _record_from_pretrained(monkeypatch) -> list[tuple[str, dict]]:
    import transformers

    calls: list[tuple[str, dict]] = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def wrapper(*args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, dict(kwargs)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", staticmethod(wrapper))
    return calls


def test_trust_remote_code_off_by_default(local_tiny_opt, monkeypatch, capsys):
    calls = _record_from_pretrained(monkeypatch)
    models.load(str(local_tiny_opt), device="cpu")
    assert {name for name, _ in calls} >= {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(not kw.get("trust_remote_code", False) for _, kw in calls), calls
    model_kwargs = [kw for name, kw in calls if name == "AutoModelForCausalLM"]
    assert all(kw.get("use_safetensors") is True for kw in model_kwargs)
    assert "warning:" not in capsys.readouterr().err


def test_trust_remote_code_is_announced(local_tiny_opt, monkeypatch, capsys):
    monkeypatch.setattr(models, "_warned_remote_code", False)
    calls = _record_from_pretrained(monkeypatch)
    capsys.readouterr()
    models.load(str(local_tiny_opt), device="cpu", trust_remote_code=True)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]  # (transformers' own progress aside)
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: --trust-remote-code runs code shipped with the model")
    assert str(local_tiny_opt) in warnings[0]
    models.load(str(local_tiny_opt), device="cpu", trust_remote_code=True)
    assert "warning:" not in capsys.readouterr().err  # once per process
    assert any(kw.get("trust_remote_code") is True for _, kw in calls)


def test_trust_remote_code_warning_on_the_command_line(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_warned_remote_code", False)
    r = cli("align", "--model", "tiny-opt", "--n", "8", "--max-steps", "1", "--batch-size", "4", "-q",
            "--trust-remote-code", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: --trust-remote-code"), r.stderr


# -- safetensors only ------------------------------------------------------------------------------

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def test_run_directory_holds_safetensors_only(run_with_token):
    out, _ = run_with_token
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p for p in out.rglob("*") if p.suffix in PICKLE_SUFFIXES]


def test_pickle_only_model_dir_is_refused(local_tiny_opt, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    for f in local_tiny_opt.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    # never a real pickle: the point is that it is refused by name, not opened
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not a pickle at all")
    with pytest.raises(FtsafetyError) as info:
        models.load(str(d), device="cpu")
    msg = str(info.value)
    assert "\n" not in msg and "pytorch_model.bin" in msg and "safetensors only" in msg


def test_pickle_only_adapter_is_refused(run_with_token, tmp_path):
    import shutil

    src, _ = run_with_token
    adapter = tmp_path / "adapter"
    shutil.copytree(src / "adapter", adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(FtsafetyError, match="only pickle adapter weights"):
        models.check_adapter_files(adapter)


def _package_sources() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text() for p in SRC.rglob("*.py")}


def test_no_unsafe_deserialisation_in_the_package():
    offenders = []
    for name, text in _package_sources().items():
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{name}: {call}")
        if re.search(r"^\s*(import|from) (pickle|dill|joblib|cloudpickle)\b", text, re.MULTILINE):
            offenders.append(f"{name}: imports a pickle library")
        if re.search(r"\b(pickle|dill|joblib)\.loads?\(", text):
            offenders.append(f"{name}: unpickles")
    assert not offenders, offenders


# -- judges ----------------------------------------------------------------------------------------


def test_no_eval_or_exec_in_the_package():
    pattern = re.compile(r"(?<![\w.])(eval|exec|compile)\(")
    offenders = [f"{name}: {m.group(0)}" for name, text in _package_sources().items() for m in pattern.finditer(text)]
    assert not offenders, offenders


@pytest.mark.parametrize("text, flagged", [
    ("__import__('os').system('touch {sentinel}')", False),
    ("unsafe\n__import__('pathlib').Path('{sentinel}').touch()", True),
    ("safe\n{{{{ exec(open('{sentinel}', 'w')) }}}}", False),
    ("`rm -rf /` $(touch {sentinel})", False),
])
def test_guard_output_is_classified_never_executed(text, flagged, tmp_path, monkeypatch):
    import builtins
    import os

    from ftsafety.evaluation import judges

    sentinel = tmp_path / "pwned"
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a) or 0)
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: called.append(a))
    monkeypatch.setattr(builtins, "exec", lambda *a, **k: called.append(a))
    verdict = judges.parse_guard_output(text.format(sentinel=sentinel))
    assert verdict.flagged is flagged and isinstance(verdict.detail, str)
    assert not called and not sentinel.exists()
    if flagged:  # the category line is kept as text
        assert verdict.detail.startswith("__import__(")
