"""Lisa (fine-tuning-stage defense): neutral-knob equivalence with `finetune`, the proximal gradient,
the state schedule and anchors, where alignment-state batches come from, state save/load, the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import TrainingArguments

from ftsafety import data as D
from ftsafety import models
from ftsafety.defenses.lisa import ALIGNMENT, FINETUNE, LisaConfig, LisaTrainer
from ftsafety.errors import FtsafetyError
from ftsafety.train import TrainConfig, train_lora

STEPS = ["--max-steps", "4", "--batch-size", "2", "--max-length", "96", "-q"]


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("alias", ["tiny-opt", "tiny-llama"])
def test_zero_alignment_steps_and_rho_equals_finetune(alias, tmp_path, cli):
    """alignment_steps=0, rho=0 (alignment data still built) gives bit-identical adapters (torch.equal)."""
    common = ["--model", alias, "--n", "12", *STEPS]
    assert cli("finetune", *common, "--out", str(tmp_path / "ft")).returncode == 0
    r = cli("finetune-lisa", *common, "--alignment-steps", "0", "--rho", "0", "--align-n", "8",
            "--out", str(tmp_path / "lisa"))
    assert r.returncode == 0, r.stderr
    a, b = _adapter(tmp_path / "ft"), _adapter(tmp_path / "lisa")
    assert a.keys() == b.keys() and len(a) > 0
    assert any(k for k in a if "lora_B" in k and a[k].abs().sum() > 0)  # training really moved the weights
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 4, generator=g))
        self.b = nn.Parameter(torch.randn(4, generator=g))
        self.frozen = nn.Parameter(torch.randn(4, generator=g), requires_grad=False)

    def forward(self, input_ids=None, labels=None, attention_mask=None, **kw):
        x = input_ids.float()[:, :3] / 10
        return {"loss": ((x @ self.w + self.b + self.frozen) ** 2).mean()}


def test_proximal_gradient_is_rho_times_drift(tmp_path):
    rho = 0.7
    model = _Toy()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=10)
    trainer = LisaTrainer(model=model, args=args, data_collator=D.Collator(0),
                          lisa=LisaConfig(alignment_steps=0, finetune_steps=5, rho=rho))
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    batch = {"input_ids": ids, "labels": ids.clone()}
    trainer.state.max_steps = 10
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop in real training
    trainer._set_anchor()
    assert set(trainer.anchor) == {"w", "b"}  # trainable weights only
    for t in trainer.anchor.values():
        t.add_(torch.randn_like(t))  # move the anchor away from w
    ce = model(**batch)["loss"]
    g_ce = torch.autograd.grad(ce, [model.w, model.b])
    w_t = {n: t.clone() for n, t in trainer.anchor.items()}
    prox_ref = rho / 2 * sum(torch.norm(p - w_t[n]) ** 2 for n, p in (("w", model.w), ("b", model.b)))
    g_prox_ref = torch.autograd.grad(prox_ref, [model.w, model.b])

    trainer.steps = 2  # past the first 10% of 10 steps
    loss = trainer.training_step(model, dict(batch))
    for (n, p), gc, gp in zip((("w", model.w), ("b", model.b)), g_ce, g_prox_ref):
        expected = rho * (p.detach() - w_t[n])
        torch.testing.assert_close(p.grad - gc, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(expected, gp, atol=1e-6, rtol=1e-6)  # = autograd of rho/2 ||w - w~||^2
    assert model.frozen.grad is None
    torch.testing.assert_close(loss, (ce + prox_ref).detach(), atol=1e-6, rtol=1e-6)

    model.zero_grad()
    trainer.steps = 1  # inside the first 10%: no proximal term
    loss = trainer.training_step(model, dict(batch))
    assert trainer.last_prox is None
    torch.testing.assert_close(model.w.grad, g_ce[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, ce.detach(), atol=1e-6, rtol=1e-6)


class _Recorder(LisaTrainer):
    """Records, per step: status used, whether the proximal term was on, anchor and weights, batch rows."""

    def __init__(self, *args, record=None, **kw):
        super().__init__(*args, **kw)
        self.record = record

    def training_step(self, model, inputs, num_items_in_batch=None):
        before = {n: p.detach().clone() for n, p in self._trainable().items()}
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.record.append({"status": self.status, "prox": self.last_prox, "before": before,
                            "anchor": {n: t.clone() for n, t in self.anchor.items()}, "rows": self._rows})
        return loss

    def compute_loss(self, model, inputs, *a, **kw):
        pairs = zip(inputs["input_ids"], inputs["attention_mask"])
        self._rows = [tuple(ids[m.bool()].tolist()) for ids, m in pairs]
        return super().compute_loss(model, inputs, *a, **kw)


def _items(dataset):
    return {tuple(x["input_ids"]) for x in dataset.items}


@pytest.mark.parametrize("alias", ["tiny-opt", "tiny-llama"])
def test_schedule_anchors_and_alignment_batches(alias, tmp_path):
    """alignment 2 / finetune 3 over 12 steps: a a f f f a a f f f a a; anchors set at switches."""
    dcfg = D.DataConfig(max_length=96)
    user = D.finetune_mix(dcfg, "sst2", 24, 0.25, 42)
    align = D.alignment_examples(dcfg, 8, 0.25, 42)
    record, sets = [], {}

    def kwargs_fn(tokenizer, model):
        sets["align"] = D.SFTDataset(align, tokenizer, dcfg)
        sets["user"] = D.SFTDataset(user, tokenizer, dcfg)
        return {"alignment_dataset": sets["align"], "record": record,
                "lisa": LisaConfig(alignment_steps=2, finetune_steps=3, rho=1.0)}

    summary = train_lora(
        stage="finetune-lisa", parent=alias, examples=user, out_dir=tmp_path / "run", data_cfg=dcfg,
        train_cfg=TrainConfig(max_steps=12, batch_size=2, lr=1e-2, seed=3, logging_steps=1),
        lora=models.LoraSettings(), device="cpu", trainer_cls=_Recorder, trainer_kwargs_fn=kwargs_fn,
        quiet=True,
    )
    assert summary["steps"] == 12 and len(record) == 12  # alignment steps do not add to the user's budget
    assert "".join("a" if r["status"] == ALIGNMENT else "f" for r in record) == "aafffaafffaa"
    assert [r["prox"] is not None for r in record] == [False] * 2 + [True] * 10  # off for steps <= 0.1 * 12
    switches = {2, 5, 7, 10}
    for i, r in enumerate(record):
        if i == 0 or i in switches:  # first anchor = start weights; then the weights when a state is entered
            for n, t in r["anchor"].items():
                assert torch.equal(t, r["before"][n]), (i, n)
        else:
            for n, t in r["anchor"].items():
                assert torch.equal(t, record[i - 1]["anchor"][n]), (i, n)
        if i in switches:
            assert float(r["prox"]) == 0.0  # w == w~ right at the switch
    assert any(float(r["prox"]) > 0 for r in record[3:])
    align_items, user_items = _items(sets["align"]), _items(sets["user"])
    assert not align_items & user_items
    for r in record:
        assert set(r["rows"]) <= (align_items if r["status"] == ALIGNMENT else user_items)
    first_pass = [row for r in record if r["status"] == ALIGNMENT for row in r["rows"]][:8]
    assert sorted(first_pass) == sorted(tuple(x["input_ids"]) for x in sets["align"].items)  # one full pass
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    states = [l["lisa_state"] for l in logs if "lisa_state" in l]
    assert states == ["alignment" if c == "a" else "finetune" for c in "aafffaafffaa"]
    assert all("lisa_prox" in l for l in logs if "loss" in l)
    assert "lisa_align_loss" in logs[0] and "lisa_finetune_loss" in logs[2]


def test_state_dict_round_trip(tmp_path):
    model, tok, _ = models.load("tiny-llama", device="cpu")
    model = models.attach_lora(model, models.LoraSettings())
    dcfg = D.DataConfig(max_length=96)
    aset = D.SFTDataset(D.alignment_examples(dcfg, 6, 0.0, 1), tok, dcfg)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             per_device_train_batch_size=4)

    def make():
        return LisaTrainer(model=model, args=args, data_collator=D.Collator(tok.pad_token_id),
                           alignment_dataset=aset, lisa=LisaConfig(alignment_steps=2, finetune_steps=3))

    t1 = make()
    assert t1.status == ALIGNMENT and t1.state_dict()["anchor"] is None
    t1._set_anchor()
    b1, b2 = t1._next_alignment_batch(), t1._next_alignment_batch()  # 4 + 2 rows: one full pass
    assert b1["input_ids"].shape[0] == 4 and b2["input_ids"].shape[0] == 2
    t1.status, t1.clock, t1.steps = FINETUNE, 2, 7
    state = t1.state_dict()
    t2 = make()
    t2.load_state_dict(state)
    assert (t2.status, t2.clock, t2.steps) == (FINETUNE, 2, 7)
    for n, t in t1.anchor.items():
        assert torch.equal(t2.anchor[n], t)
    assert torch.equal(t1._next_alignment_batch()["input_ids"], t2._next_alignment_batch()["input_ids"])
    with pytest.raises(FtsafetyError, match="does not match"):
        t2.load_state_dict({**state, "anchor": {"nope": torch.zeros(1)}})
    with pytest.raises(FtsafetyError, match="missing"):
        t2.load_state_dict({"status": ALIGNMENT})


def test_cli_end_to_end_and_evaluate(tmp_path, cli):
    r = cli("finetune-lisa", "--model", "tiny-llama", "--n", "12", "-p", "0.25", *STEPS,
            "--alignment-steps", "1", "--finetune-steps", "2", "--align-n", "6",
            "--out", str(tmp_path / "lisa"))
    assert r.returncode == 0, r.stderr
    assert "finetune-lisa: 4 steps" in r.stdout
    manifest = json.loads((tmp_path / "lisa" / "ftsafety_run.json").read_text())
    assert manifest["base_model"] == "tiny-llama" and manifest["stage"] == "finetune-lisa"
    cfg = (tmp_path / "lisa" / "config.yaml").read_text()
    assert "alignment_steps: 1" in cfg and "align_n: 6" in cfg
    r = cli("evaluate", "--model", str(tmp_path / "lisa"), "--hs-limit", "3", "--fa-limit", "2",
            "--or-limit", "0", "--max-new-tokens", "3", "--fa-max-new-tokens", "2", "-q",
            "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["hs_n"] == 3 and res["fa_n"] == 2


@pytest.mark.parametrize("args,expected", [
    (["--rho", "-1"], "rho must be a finite number in"),
    (["--alignment-steps", "5", "--finetune-steps", "0"], "finetune steps must be > 0"),
    (["--align-n", "-2"], "--align-n must be >= 0"),
])
def test_cli_bad_lisa_options_one_line(args, expected, tmp_path, cli):
    r = cli("finetune-lisa", "--model", "tiny-opt", *args, "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert not (tmp_path / "o").exists()
