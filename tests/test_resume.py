"""Checkpoints and resume: a run killed at step k and resumed gives bit-identical adapter weights
(torch.equal) to an uninterrupted run, for every training command's trainer, the defense state
(Lisa's phase/anchor/alignment iterator, Booster's harmful-batch iterator) included."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from ftsafety import data as D
from ftsafety import models
from ftsafety import train as T
from ftsafety.defenses.booster import BoosterTrainer
from ftsafety.defenses.lisa import LisaConfig, LisaTrainer
from ftsafety.defenses.vaccine import VaccineTrainer
from ftsafety.errors import FtsafetyError

DCFG = D.DataConfig(max_length=64)
LORA = models.LoraSettings(r=4, dropout=0.1)  # dropout: the resumed run must restore the RNG too


def _align_case(trainer_cls=Trainer, kwargs=None, kwargs_fn=None, extra=None, steps=6):
    """As `align` / `align-vaccine` / `align-booster` build it (cosine schedule with warmup)."""
    return {
        "stage": "align", "examples": D.alignment_examples(DCFG, 12, 0.5, 42),
        "train_cfg": T.TrainConfig(max_steps=steps, batch_size=2, lr=1e-2, seed=42, logging_steps=1),
        "trainer_cls": trainer_cls, "trainer_kwargs": kwargs, "trainer_kwargs_fn": kwargs_fn, "extra_config": extra,
    }


def _booster_fn(tokenizer, model):
    # 5 harmful rows in batches of 2, 2, 1: new orders are drawn at steps 1, 4 and 7, so the run resumed
    # from step 4 needs the rest of the current order (steps 5-6) and the generator's state (steps 7-8)
    return {"harmful_dataset": D.SFTDataset(D.harmful_examples(DCFG, "calibration")[:5], tokenizer, DCFG)}


def _lisa_fn(tokenizer, model):
    aset = D.SFTDataset(D.alignment_examples(DCFG, 5, 0.5, 42), tokenizer, DCFG)
    return {"alignment_dataset": aset, "lisa": LisaConfig(alignment_steps=2, finetune_steps=3, rho=1.0)}


def _finetune_case(**kw):
    """As `finetune` builds it (constant schedule); 8 rows, batch 2, grad_accum 2: 2 steps per epoch."""
    return dict(
        stage="finetune", examples=D.finetune_mix(DCFG, "sst2", 8, 0.25, 42),
        train_cfg=T.TrainConfig(max_steps=6, batch_size=2, grad_accum=2, lr=1e-2, scheduler="constant",
                                weight_decay=0.0, seed=42, logging_steps=1),
        **kw,
    )


# name -> (case, checkpoint_every, step k at which the run is killed, "step_end" (before step k's
# checkpoint: resumes from an earlier one) or "after_save" (step k's checkpoint is complete))
CASES = {
    "align": (lambda: _align_case(), 2, 3, "step_end"),
    "align-vaccine": (lambda: _align_case(VaccineTrainer, {"rho": 2.0}), 2, 4, "after_save"),
    "align-booster": (lambda: _align_case(BoosterTrainer, {"lam": 5.0, "alpha": 0.1}, _booster_fn, steps=8),
                      2, 5, "step_end"),
    # resumes from step 3 (mid epoch 2), killed at step 5 (epoch 3): epoch boundaries on both sides
    "finetune": (lambda: _finetune_case(), 3, 5, "step_end"),
    # a a f f f a a f over 8 steps: checkpoint at 3 (finetune state, clock 1), killed at 4 (mid-state),
    # the switch back to alignment (step 5) comes after the interruption
    "finetune-lisa": (
        lambda: {**_finetune_case(trainer_kwargs_fn=_lisa_fn, trainer_cls=LisaTrainer), "stage": "finetune-lisa",
                 "train_cfg": T.TrainConfig(max_steps=8, batch_size=2, lr=1e-2, scheduler="constant",
                                            weight_decay=0.0, seed=42, logging_steps=1)},
        3, 4, "step_end",
    ),
}


class _Kill(T._NaNGuard):
    """Stands in for the NaN guard callback and raises KeyboardInterrupt (a Ctrl-C) at step `at`:
    step_end: right after the optimizer step, before its checkpoint is saved; save: while the
    checkpoint is being saved (the Trainer's files are written, ftsafety's marker is not);
    after_save: once the checkpoint is complete (at the start of the next step)."""

    at: int = 0
    when: str = "step_end"

    def on_step_end(self, args, state, control, **kw):
        if self.when == "step_end" and state.global_step == self.at:
            raise KeyboardInterrupt

    def on_save(self, args, state, control, **kw):
        if self.when == "save" and state.global_step == self.at:
            raise KeyboardInterrupt

    def on_step_begin(self, args, state, control, **kw):
        if self.when == "after_save" and state.global_step == self.at:
            raise KeyboardInterrupt


def _train(case: dict, out, **kw) -> dict:
    return T.train_lora(parent="tiny-llama", out_dir=out, data_cfg=DCFG, lora=LORA, device="cpu", quiet=True,
                        **case, **kw)


def _weights(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_equal(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _kill(monkeypatch, case, out, at, when, every):
    monkeypatch.setattr(T, "_NaNGuard", type("K", (_Kill,), {"at": at, "when": when}))
    with pytest.raises(T.TrainingInterrupted) as info:
        _train(case, out, checkpoint_every=every)
    monkeypatch.undo()
    return info.value


@pytest.mark.parametrize("name", list(CASES))
def test_kill_and_resume_is_bitwise_identical(name, tmp_path, monkeypatch):
    make, every, at, when = CASES[name]
    ref = _train(make(), tmp_path / "ref", checkpoint_every=0)  # no checkpoints at all
    assert not T.partial_dir(tmp_path / "ref").exists()

    out = tmp_path / "run"
    exc = _kill(monkeypatch, make(), out, at, when, every)
    last = at if when == "after_save" else (at - 1) // every * every
    assert (exc.step, exc.checkpoint_step) == (at, last) and "--resume" in exc.hint
    assert not out.exists() and not list(tmp_path.glob(".run.tmp-*"))  # no final (or half-written) run
    partial = T.partial_dir(out)
    assert (partial / f"checkpoint-{last}" / T.CHECKPOINT_MARKER).is_file()
    ckpt = partial / f"checkpoint-{last}"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    if when == "after_save":
        assert exc.step == at  # killed before step at + 1 did anything
    if name in ("align-booster", "finetune-lisa"):
        assert (ckpt / "defense_state.json").is_file() and (ckpt / "defense_state.safetensors").is_file()
    if name == "finetune-lisa":
        state = json.loads((ckpt / "defense_state.json").read_text())
        assert (state["status"], state["clock"], state["steps"]) == ("finetune", 1, 3)

    summary = _train(make(), out, checkpoint_every=every, resume=True)
    assert summary["resumed_from_step"] == last and summary["steps"] == ref["steps"]
    _assert_equal(_weights(tmp_path / "ref"), _weights(out))
    assert not partial.exists()  # deleted once the run directory is in place
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # one row per step (logging_steps 1) plus the end-of-training row: none kept twice after the resume
    assert steps[:-1] == list(range(1, ref["steps"] + 1))
    assert summary["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)  # over the whole run


def test_resume_without_checkpoint_starts_over_and_mismatch_refused(tmp_path, monkeypatch, caplog):
    case = _align_case()
    ref = tmp_path / "ref"
    _train(case, ref, checkpoint_every=0)
    out = tmp_path / "run"
    exc = _kill(monkeypatch, _align_case(), out, 1, "step_end", 2)  # before the first checkpoint
    assert exc.checkpoint_step is None and "run the command again" in exc.hint
    with caplog.at_level(logging.WARNING, logger="ftsafety.train"):
        _train(_align_case(), out, checkpoint_every=2, resume=True)
    assert "no complete checkpoint" in caplog.text
    _assert_equal(_weights(ref), _weights(out))

    # resume of a finished run with the same settings: nothing to do, the summary comes back
    again = _train(_align_case(), out, resume=True)
    assert again == json.loads((out / "train_results.json").read_text())

    # other settings: refused in one line, checkpoints kept; without resume they are discarded
    out2 = tmp_path / "run2"
    _kill(monkeypatch, _align_case(), out2, 3, "step_end", 2)
    other = _align_case()
    other["train_cfg"] = T.TrainConfig(max_steps=6, batch_size=2, lr=2e-2, seed=42, logging_steps=1)
    with pytest.raises(FtsafetyError, match=r"other settings \(train\.lr\)"):
        _train(other, out2, checkpoint_every=2, resume=True)
    assert (T.partial_dir(out2) / "checkpoint-2").is_dir()
    with caplog.at_level(logging.INFO, logger="ftsafety.train"):
        _train(_align_case(), out2, checkpoint_every=2)
    assert "deleting the checkpoints of an earlier interrupted run" in caplog.text
    assert not T.partial_dir(out2).exists()
    _assert_equal(_weights(ref), _weights(out2))


def test_half_written_checkpoint_is_skipped(tmp_path, monkeypatch):
    """A checkpoint without its completion marker (killed while saving) is not resumed from."""
    _train(_align_case(), tmp_path / "ref", checkpoint_every=0)
    out = tmp_path / "run"
    exc = _kill(monkeypatch, _align_case(), out, 4, "save", 2)  # Trainer's files written, marker not
    assert exc.checkpoint_step == 2
    assert (T.partial_dir(out) / "checkpoint-4" / "optimizer.pt").is_file()
    summary = _train(_align_case(), out, checkpoint_every=2, resume=True)
    assert summary["resumed_from_step"] == 2
    _assert_equal(_weights(tmp_path / "ref"), _weights(out))


def test_tensor_state_round_trip_without_pickle(tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = {"a": torch.arange(4.0), "nested": {"g": gen.get_state(), "xs": [1, 2], "t": [torch.ones(2, 2)]},
             "s": "finetune", "n": None}
    T.save_tensor_state(tmp_path, "st", state)
    back = T.load_tensor_state(tmp_path, "st")
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["nested"]["g"], state["nested"]["g"])
    assert torch.equal(back["nested"]["t"][0], torch.ones(2, 2))
    assert (back["s"], back["n"], back["nested"]["xs"]) == ("finetune", None, [1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st.json", "st.safetensors"]


def test_cli_resume(tmp_path, cli, monkeypatch):
    args = ["align", "--model", "tiny-llama", "--n", "8", "--max-steps", "4", "--batch-size", "2",
            "--max-length", "64", "-q"]
    r = cli(*args, "--resume")
    assert r.returncode == 2 and "--resume needs --out" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert cli(*args, "--out", str(tmp_path / "ref")).returncode == 0
    monkeypatch.setattr(T, "default_checkpoint_every", lambda total, logging_steps=1: 1)
    monkeypatch.setattr(T, "_NaNGuard", type("K", (_Kill,), {"at": 3, "when": "step_end"}))
    r = cli(*args, "--out", str(tmp_path / "run"))
    assert r.returncode == 130, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines()[-1].startswith("align interrupted at step 3 (checkpoint of step 2")
    assert "resume with the same command plus --resume" in r.stderr
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(T, "_NaNGuard", _Kill)  # at 0: never fires
    r = cli(*args, "--out", str(tmp_path / "run"), "--resume")
    assert r.returncode == 0, r.stderr
    _assert_equal(_weights(tmp_path / "ref"), _weights(tmp_path / "run"))


def test_metrics_log_is_the_same_after_a_resume(tmp_path, monkeypatch):
    """Issue 19: with the default checkpoints and a loss logged every 2 steps, a run killed at step 6 and
    resumed writes the metrics.jsonl rows of the uninterrupted run (the checkpoints fall on logged
    steps, so the first loss logged after the resume averages the same steps)."""
    def case():
        c = _align_case(steps=8)
        c["train_cfg"] = dataclasses.replace(c["train_cfg"], logging_steps=2)
        return c

    assert T.default_checkpoint_every(8, 2) == 2 and T.default_checkpoint_every(30, 4) == 4
    _train(case(), tmp_path / "ref")
    out = tmp_path / "run"
    monkeypatch.setattr(T, "_NaNGuard", type("K", (_Kill,), {"at": 6, "when": "step_end"}))
    with pytest.raises(T.TrainingInterrupted) as info:
        _train(case(), out)
    monkeypatch.undo()
    assert info.value.checkpoint_step == 4
    assert _train(case(), out, resume=True)["resumed_from_step"] == 4

    def rows(run):
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r.get("grad_norm"), r.get("learning_rate")) for r in logged if "loss" in r]

    assert rows(out) == rows(tmp_path / "ref") and len(rows(out)) == 4
    _assert_equal(_weights(tmp_path / "ref"), _weights(out))


@pytest.mark.parametrize("tamper", ["changed", "planted", "removed"])
def test_resume_loads_only_the_pickles_the_run_wrote(tamper, tmp_path, monkeypatch):
    """Issue 19: the Trainer's optimizer/scheduler/RNG files are torch pickles; each checkpoint's marker holds
    their sha256, and a resume refuses (one line, naming the file) a checkpoint whose pickles differ."""
    out = tmp_path / "run"
    exc = _kill(monkeypatch, _align_case(), out, 4, "after_save", 2)
    ckpt = T.partial_dir(out) / f"checkpoint-{exc.checkpoint_step}"
    assert set(json.loads((ckpt / T.CHECKPOINT_MARKER).read_text())["sha256"]) >= {"optimizer.pt", "scheduler.pt"}
    name = {"changed": "optimizer.pt", "planted": "extra.pt", "removed": "scheduler.pt"}[tamper]
    if tamper == "removed":
        (ckpt / name).unlink()
        name = "scheduler.pt"
    else:
        with open(ckpt / name, "ab") as fh:
            fh.write(b"\x80\x04planted")
    if tamper == "removed":  # an incomplete checkpoint: never loaded, the run resumes from the one before
        summary = _train(_align_case(), out, checkpoint_every=2, resume=True)
        assert summary["resumed_from_step"] == exc.checkpoint_step - 2
        return
    with pytest.raises(FtsafetyError, match=rf"{name} changed since the run wrote it"):
        _train(_align_case(), out, checkpoint_every=2, resume=True)
