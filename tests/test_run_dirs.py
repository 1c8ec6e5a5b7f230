"""Run directories are never lost or mixed up (issue 19's silent data losses): an --out that is the
--model run is refused; a copied run loads its own adapters; a local --model path is stored resolved;
a symlinked --out is written through."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from safetensors.torch import load_file, save_file

from ftsafety import models

ALIGN = ("align", "--model", "tiny-llama", "--n", "8", "--max-steps", "2", "--batch-size", "2", "-q")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_out_equal_to_model_is_refused_and_nothing_is_lost(tmp_path, cli):
    al = tmp_path / "al"
    assert cli(*ALIGN, "--out", str(al)).returncode == 0
    before = _sha(al / "adapter" / "adapter_model.safetensors")
    r = cli("finetune", "--model", str(al), "--n", "8", "-p", "0.25", "--max-steps", "1", "--batch-size", "2",
            "--out", str(al), "-q")
    assert r.returncode == 2 and "is where this run's input" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _sha(al / "adapter" / "adapter_model.safetensors") == before
    assert len(json.loads((al / models.RUN_MANIFEST).read_text())["adapters"]) == 1
    # an evaluation written over the run it evaluates would replace it (it holds a run marker)
    r = cli("evaluate", "--model", str(al), "--hs-limit", "1", "--fa-limit", "0", "--or-limit", "0", "--out", str(al))
    assert r.returncode == 2 and "holds an ftsafety train run; refusing to replace it with an evaluate run" in r.stderr
    assert (al / models.RUN_MANIFEST).is_file()


def test_a_copied_run_loads_its_own_adapter(tmp_path, cli):
    a = tmp_path / "a"
    assert cli(*ALIGN, "--out", str(a)).returncode == 0
    copy = tmp_path / "acopy"
    shutil.copytree(a, copy)
    f = copy / "adapter" / "adapter_model.safetensors"
    save_file({k: v.zero_() for k, v in load_file(str(f)).items()}, str(f))
    spec = models.resolve(str(copy))
    assert spec.adapters == [str((copy / "adapter").resolve())]
    shutil.rmtree(a)  # and it does not need the original at all
    assert models.resolve(str(copy)).adapters == [str((copy / "adapter").resolve())]


def test_relative_model_path_is_stored_resolved(tmp_path, cli, monkeypatch):
    model, tok = models.tiny.build("tiny-llama")
    mixed = tmp_path / "mixed"
    model.save_pretrained(mixed, safe_serialization=True)
    tok.save_pretrained(mixed)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    r = cli("align", "--model", "../mixed", "--n", "8", "--max-steps", "1", "--batch-size", "2", "--out", "run", "-q")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((work / "run" / models.RUN_MANIFEST).read_text())
    assert manifest["base_model"] == str(mixed.resolve()) and manifest["base_relpath"] == "../../mixed"
    monkeypatch.chdir(tmp_path)
    assert models.resolve(str(work / "run")).base == str(mixed.resolve())


def test_symlinked_out_is_written_through(tmp_path, cli):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    os.symlink(target, link)
    r = cli(*ALIGN, "--out", str(link))
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and (target / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".link")]
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere" / "deeper", dangling)
    r = cli(*ALIGN, "--out", str(dangling))
    assert r.returncode == 2 and "whose folder does not exist" in r.stderr
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name or "nowhere" in p.name]
