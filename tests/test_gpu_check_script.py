"""`make test-gpu`'s script on a machine without CUDA: every gpu test skips, the script exits 0 and says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the real checks")
def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    env = {**os.environ, "PY": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "pytest -m gpu: exit 0" in summary and "skipped" in summary and "failed" not in summary
    log = (tmp_path / "out" / "pytest.log").read_text()
    assert "needs CUDA" in log and " passed" not in log  # nothing ran on the CPU in the GPU's place
    assert not (tmp_path / "out" / "measurements.jsonl").exists()


def test_gpu_check_says_what_to_install(tmp_path):
    env = {**os.environ, "PY": "/bin/false"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2 and "run make install" in r.stderr and len(r.stderr.strip().splitlines()) == 1
