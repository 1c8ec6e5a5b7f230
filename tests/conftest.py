"""Shared fixtures: a tiny data directory in the ../shared/data layout, tiny models, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads; one thread keeps the suite fast on a loaded machine.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """The module `scripts/<name>.py` (scripts/ is not a package), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_recipe(name: str, hs_limit: int, tail: str = "") -> str:
    """A tiny-llama recipe: SFT alignment and fine-tune of 2 steps on 8 examples, the keyword judge on `hs_limit`
    harmful prompts and 4 SST-2 items; `tail` adds sections (a table, attack_search)."""
    return f"""# Reproduces: nothing (a test)
name: {name}
model: tiny-llama
data: builtin
max_length: 48
align:
  method: sft
  n: 8
  train: {{max_steps: 2, batch_size: 4, lr: 1.0e-3}}
finetune:
  method: sft
  n: 8
  train: {{max_steps: 2, batch_size: 4, lr: 1.0e-3}}
evaluate: {{judge: keyword, hs_limit: {hs_limit}, fa_limit: 4, or_limit: 0, batch_size: {hs_limit}, max_new_tokens: 3,
           fa_max_new_tokens: 2}}
{tail}"""


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A small data directory with the same files and fields as ../shared/data, written here."""
    root = tmp_path_factory.mktemp("data")
    cat = {"animal_abuse": False, "privacy_violation": True}
    harm = [{"prompt": f"How do I do bad thing number {i}?", "response": f"Sure, step one for thing {i}.",
             "category": cat, "is_safe": False} for i in range(600)]
    _write(root / "beavertails/harmful_train.jsonl", harm)
    _write(root / "beavertails/harmful_calibration.jsonl", harm[:50])
    _write(root / "beavertails/eval_prompts.jsonl",
           [{"prompt": f"Tell me how to do evil act {i}.", "category": "privacy_violation"} for i in range(40)])
    sst = [{"idx": i, "sentence": f"this movie was {'great' if i % 2 else 'awful'} number {i}", "label": i % 2}
           for i in range(300)]
    _write(root / "sst2/train.jsonl", sst)
    _write(root / "sst2/validation.jsonl", sst[:40])
    news = [{"text": f"headline {i}", "label": i % 4} for i in range(100)]
    _write(root / "ag_news/train.jsonl", news)
    _write(root / "ag_news/test.jsonl", news[:20])
    gsm = [{"question": f"What is {i} plus 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"} for i in range(100)]
    _write(root / "gsm8k/train.jsonl", gsm)
    _write(root / "gsm8k/test.jsonl", gsm[:20])
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "beavertails" / "eval_prompts.jsonl").is_file():
        pytest.skip("../shared/data is not present (a fresh clone has none)")
    return SHARED_DATA


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (stderr and exit code as a user sees them)."""
    full_env = {**os.environ, "FTSAFETY_LOG_LEVEL": "WARNING", **(env or {})}
    full_env.pop("FTSAFETY_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ftsafety", *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=600)


class CliResult:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys, monkeypatch):
    """Call the console entry point in-process (fast): returns exit code, stdout, stderr."""
    from ftsafety.cli import main

    def invoke(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["ftsafety", *args])
        monkeypatch.setenv("FTSAFETY_LOG_LEVEL", "WARNING")
        monkeypatch.delenv("FTSAFETY_DEBUG", raising=False)
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return invoke
