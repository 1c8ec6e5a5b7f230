"""Vaccine and Booster: neutral knobs reduce to `align`, the update formulas match a computation by
hand, gradient accumulation survives, and the CLI commands write runs that `finetune` accepts."""

from __future__ import annotations

import dataclasses

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from ftsafety import data as D
from ftsafety import models
from ftsafety.defenses import _perturb
from ftsafety.defenses import vaccine as vaccine_mod
from ftsafety.defenses.booster import BoosterTrainer, harmful_dataset
from ftsafety.defenses.vaccine import VaccineTrainer
from ftsafety.train import TrainConfig, train_lora, training_args

DCFG = D.DataConfig(max_length=64)


def _run(
    tmp_path,
    alias,
    name,
    trainer_cls=Trainer,
    kwargs=None,
    kwargs_fn=None,
    dropout=0.1,
    batch=4,
    ga=1,
    steps=2,
):
    """A short LoRA alignment run through train_lora; returns the saved adapter tensors."""
    examples = D.alignment_examples(DCFG, 8, 0.25, seed=0)
    tcfg = TrainConfig(max_steps=steps, batch_size=batch, grad_accum=ga, lr=1e-2, warmup_ratio=0.0, seed=0)
    train_lora(
        stage=name,
        parent=alias,
        examples=examples,
        out_dir=tmp_path / name,
        data_cfg=DCFG,
        train_cfg=tcfg,
        lora=models.LoraSettings(r=4, dropout=dropout),
        device="cpu",
        trainer_cls=trainer_cls,
        trainer_kwargs=kwargs,
        trainer_kwargs_fn=kwargs_fn,
        quiet=True,
    )
    return load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))


def _booster_fn(tokenizer, model):
    return {"harmful_dataset": harmful_dataset(DCFG, tokenizer)}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Per model: the neutral runs that must equal `align`, then runs with the knob on that must not.
NEUTRAL = {
    "tiny-opt": [("vac0", VaccineTrainer, {"rho": 0.0}), ("boo0", BoosterTrainer, {"lam": 0.0})],
    "tiny-llama": [
        ("vac0", VaccineTrainer, {"rho": 0.0}),
        ("boo0pa", BoosterTrainer, {"lam": 0.0, "perturb_aware": True, "rho": 0.0}),
    ],
}
ACTIVE = {
    "tiny-opt": [("vac2", VaccineTrainer, {"rho": 2.0}), ("boo5", BoosterTrainer, {"lam": 5.0})],
    "tiny-llama": [
        ("vac2layer", VaccineTrainer, {"rho": 2.0, "perturb_at": "layer"}),
        ("boo5pa", BoosterTrainer, {"lam": 5.0, "perturb_aware": True}),
    ],
}


@pytest.mark.parametrize("alias", ["tiny-opt", "tiny-llama"])
def test_neutral_knobs_reproduce_align_bitwise(tmp_path, alias):
    """rho=0 / lam=0 give the *bitwise* (torch.equal) adapter of `align`, with LoRA dropout 0.1 on:
    the extra passes leave the RNG as a plain step would. rho>0 / lam>0 change the weights."""
    align = _run(tmp_path, alias, "align")
    for name, cls, kw in NEUTRAL[alias]:
        fn = _booster_fn if cls is BoosterTrainer else None
        assert _same(_run(tmp_path, alias, name, cls, kw, fn), align), name
    for name, cls, kw in ACTIVE[alias]:
        w = _run(tmp_path, alias, name, cls, kw, _booster_fn if cls is BoosterTrainer else None)
        assert w.keys() == align.keys()
        diff = max((w[k] - align[k]).abs().max().item() for k in w)
        assert diff > 1e-4, f"{name} did not change the weights (max diff {diff})"


def test_vaccine_grad_accumulation_matches_big_batch(tmp_path):
    """2 micro-batches of 2 with grad_accum 2 == 1 batch of 4 (atol 1e-5). At rho=0 (eps is normalised per
    micro-batch, so for rho>0 the two differ by design); the rho>0 case is test_vaccine_step_accumulates."""
    big = _run(tmp_path, "tiny-llama", "big", VaccineTrainer, {"rho": 0.0}, dropout=0.0, batch=4, ga=1)
    acc = _run(tmp_path, "tiny-llama", "acc", VaccineTrainer, {"rho": 0.0}, dropout=0.0, batch=2, ga=2)
    for k in big:
        torch.testing.assert_close(acc[k], big[k], atol=1e-5, rtol=0)


# --- the formulas, by hand, on a tiny model --------------------------------------------------------


def _toy(alias, tmp_path, cls, **kw):
    model, tok = models.tiny.build(alias)
    model = models.attach_lora(model, models.LoraSettings(r=4, dropout=0.0))
    model.train()
    ds = D.SFTDataset(D.alignment_examples(DCFG, 4, 0.0, seed=1), tok, DCFG)
    collate = D.Collator(tok.pad_token_id)
    args = training_args(TrainConfig(batch_size=2, seed=0), torch.device("cpu"), str(tmp_path / "scratch"))
    trainer = cls(model=model, args=args, train_dataset=ds, data_collator=collate, **kw)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we bypass
    return trainer, model, tok, [collate([ds[0], ds[1]]), collate([ds[2], ds[3]])]


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _grad_of(model, batch, hooks=()):
    """Weight gradient of the mean loss on `batch`, with optional forward hooks (module, fn)."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        return torch.autograd.grad(model(**batch).loss, _params(model))
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    "alias,perturb_at", [("tiny-opt", "attn"), ("tiny-llama", "attn"), ("tiny-llama", "layer")]
)
def test_vaccine_step_matches_hand_formula(tmp_path, monkeypatch, alias, perturb_at):
    rho = 2.0
    trainer, model, _, (batch, _) = _toy(alias, tmp_path, VaccineTrainer, rho=rho, perturb_at=perturb_at)
    layers = (
        model.base_model.model.model.decoder.layers
        if alias == "tiny-opt"
        else model.base_model.model.model.layers
    )
    sites = [l.self_attn for l in layers] if perturb_at == "attn" else list(layers)
    assert _perturb.perturb_targets(model, perturb_at) == sites
    # by hand: one forward with retain_grad on the hooked outputs
    outs = {}

    def keep(m, a, o):
        h = o[0] if isinstance(o, tuple) else o
        h.retain_grad()
        outs[m] = h

    handles = [m.register_forward_hook(keep) for m in sites]
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    g = [outs[m].grad for m in sites]
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    eps_hand = {m: rho * x / (norm + 1e-7) for m, x in zip(sites, g)}
    model.zero_grad(set_to_none=True)

    def add_hand(m, a, o):
        return (o[0] + eps_hand[m], *o[1:]) if isinstance(o, tuple) else o + eps_hand[m]

    grad_hand = _grad_of(model, batch, [(m, add_hand) for m in sites])
    # the trainer: record the eps it adds, compare with the hand values and the resulting weight gradient
    used = {}
    real = vaccine_mod.add_to_outputs

    def spy(eps):
        used.update(eps)
        return real(eps)

    monkeypatch.setattr(vaccine_mod, "add_to_outputs", spy)
    trainer.training_step(model, batch)
    assert set(used) == set(sites)
    for m in sites:
        torch.testing.assert_close(used[m], eps_hand[m], atol=1e-6, rtol=1e-5)
    total = torch.sqrt(sum((e**2).sum() for e in used.values()))
    assert abs(total.item() - rho) < 1e-4  # ||eps|| = rho, globally
    for p, gh in zip(_params(model), grad_hand):
        torch.testing.assert_close(p.grad, gh, atol=1e-6, rtol=1e-5)
    assert not any(h for m in sites for h in (m._forward_hooks, m._backward_hooks))  # hooks removed


def test_eps_on_toy_modules_shared_gradient_and_frozen_input():
    """Two sites whose outputs are summed get one gradient tensor from autograd (each eps must still be
    rho*g/||g||), and a site with frozen weights and input (output needs no grad) still gets its eps."""
    torch.manual_seed(0)
    frozen, a, b = torch.nn.Linear(3, 3).requires_grad_(False), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)

    def loss():
        h = frozen(x)
        return ((a(h) + b(h)) ** 2).sum()

    eps, norm, _ = _perturb.activation_perturbation(a, [frozen, a, b], loss, rho=2.0)
    h = frozen(x).requires_grad_(True)
    ya, yb = a(h), b(h)
    ga, gb, gh = torch.autograd.grad(((ya + yb) ** 2).sum(), [ya, yb, h])
    hand_norm = torch.sqrt((ga**2).sum() + (gb**2).sum() + (gh**2).sum())
    for site, g in ((frozen, gh), (a, ga), (b, gb)):
        torch.testing.assert_close(eps[site], 2.0 * g / (hand_norm + 1e-7))
    assert norm.item() == pytest.approx(hand_norm.item(), rel=1e-6)


def test_vaccine_step_accumulates(tmp_path):
    """With rho>0, two training steps without zeroing leave the sum of the two steps' gradients in .grad."""
    trainer, model, _, (b1, b2) = _toy("tiny-opt", tmp_path, VaccineTrainer, rho=2.0)
    trainer.training_step(model, b1)
    g1 = [p.grad.clone() for p in _params(model)]
    model.zero_grad(set_to_none=True)
    trainer.training_step(model, b2)
    g2 = [p.grad.clone() for p in _params(model)]
    model.zero_grad(set_to_none=True)
    trainer.training_step(model, b1)
    trainer.training_step(model, b2)
    for p, a, b in zip(_params(model), g1, g2):
        torch.testing.assert_close(p.grad, a + b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("alias", ["tiny-opt", "tiny-llama"])
def test_booster_step_matches_hand_formula(tmp_path, alias):
    lam, alpha = 5.0, 0.1
    trainer, model, tok, (batch, harm) = _toy(
        alias,
        tmp_path,
        BoosterTrainer,
        lam=lam,
        alpha=alpha,
        harmful_dataset=[{"input_ids": [1, 2], "labels": [1, 2]}],
    )
    harm = D.Collator(tok.pad_token_id)(
        [x for x in D.SFTDataset(D.harmful_examples(DCFG, "calibration")[:2], tok, DCFG)]
    )
    trainer.harmful.next = lambda: harm
    params = _params(model)
    before = [p.detach().clone() for p in params]
    # by hand: three explicit autograd computations
    g_f = _grad_of(model, batch)
    g_h = _grad_of(model, harm)
    norm = torch.sqrt(sum((g**2).sum() for g in g_h))
    with torch.no_grad():
        for p, g in zip(params, g_h):
            p.sub_(alpha * g / (norm + 1e-7))
    g_hp = _grad_of(model, harm)
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    earlier = [torch.full_like(p, 0.5) for p in params]  # an earlier micro-batch's gradient must survive
    for p, e in zip(params, earlier):
        p.grad = e.clone()
    trainer.training_step(model, batch)
    for p, e, f, h, hp, b in zip(params, earlier, g_f, g_h, g_hp, before):
        torch.testing.assert_close(p.grad, e + f + lam * (h - hp), atol=1e-6, rtol=1e-5)
        assert torch.equal(p.detach(), b)  # weights restored exactly after the simulated harmful step
    logged = trainer._extra.pop_means()
    assert (
        logged["booster_harmful_loss"] > logged["booster_harmful_loss_perturbed"]
    )  # the harmful step lowers h


def test_booster_harmful_batches_cycle_with_own_seed():
    from ftsafety.defenses.booster import CyclingBatches

    state = torch.random.get_rng_state()
    it = CyclingBatches([{"i": i} for i in range(5)], 2, lambda b: [x["i"] for x in b], seed=3)
    first = [it.next() for _ in range(3)]
    assert sorted(i for b in first for i in b) == [0, 1, 2, 3, 4] and [len(b) for b in first] == [2, 2, 1]
    assert len(it.next()) == 2  # a new pass
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    again = CyclingBatches([{"i": i} for i in range(5)], 2, lambda b: [x["i"] for x in b], seed=3)
    assert [again.next() for _ in range(3)] == first


def test_decoder_layers_found_through_peft_and_with_decoys():
    model, _ = models.tiny.build("tiny-llama")
    model = models.attach_lora(model, models.LoraSettings())
    layers = _perturb.decoder_layers(model)
    assert layers is model.base_model.model.model.layers
    # a longer list of blocks without attention (MoE-like experts) is not taken for the layers
    model.base_model.model.experts = torch.nn.ModuleList(
        [torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(7)]
    )
    assert _perturb.decoder_layers(model) is layers
    with pytest.raises(Exception, match="perturbation site"):
        _perturb.perturb_targets(model, "mlp")


# --- CLI ---------------------------------------------------------------------------------------------


def _metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_align_vaccine_then_finetune(tmp_path, cli):
    steps = ["--max-steps", "5", "--batch-size", "1", "--max-length", "48", "-q"]
    r = cli(
        "align-vaccine",
        "--model",
        "tiny-opt",
        "--n",
        "8",
        "--rho",
        "1.5",
        "--lora-dropout",
        "0.1",
        *steps,
        "--out",
        str(tmp_path / "vac"),
    )
    assert r.returncode == 0, r.stderr
    row = next(m for m in _metrics(tmp_path / "vac") if "loss" in m)
    assert row["vaccine_eps_norm"] == pytest.approx(1.5, rel=1e-4) and row["vaccine_grad_norm"] > 0
    assert "rho: 1.5" in (tmp_path / "vac" / "config.yaml").read_text()
    r = cli(
        "finetune",
        "--model",
        str(tmp_path / "vac"),
        "--n",
        "8",
        "-p",
        "0.25",
        "--max-steps",
        "1",
        "-q",
        "--out",
        str(tmp_path / "ft"),
    )
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "ft" / "ftsafety_run.json").read_text())["adapters"]) == 2


def test_cli_align_booster_then_finetune(tmp_path, cli, tiny_data_dir):
    steps = ["--max-steps", "5", "--batch-size", "1", "--max-length", "48", "-q"]
    r = cli(
        "align-booster",
        "--model",
        "tiny-llama",
        "--data",
        str(tiny_data_dir),
        "--n",
        "8",
        "--perturb-aware",
        "--lam",
        "3",
        *steps,
        "--out",
        str(tmp_path / "boo"),
    )
    assert r.returncode == 0, r.stderr
    row = next(m for m in _metrics(tmp_path / "boo") if "loss" in m)
    assert {"booster_harmful_loss", "booster_harmful_loss_perturbed", "vaccine_grad_norm"} <= row.keys()
    cfg = (tmp_path / "boo" / "config.yaml").read_text()
    assert "lam: 3.0" in cfg and "perturb_aware: true" in cfg and "n_harmful: 50" in cfg
    r = cli(
        "finetune",
        "--model",
        str(tmp_path / "boo"),
        "--data",
        str(tiny_data_dir),
        "--n",
        "8",
        "-p",
        "0.25",
        "--max-steps",
        "1",
        "-q",
        "--out",
        str(tmp_path / "ft"),
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (["align-vaccine", "--rho", "-1"], "rho must be a finite number in"),
        (["align-vaccine", "--perturb-at", "mlp"], "unknown --perturb-at 'mlp'"),
        (["align-booster", "--lam", "nan"], "lam must be a finite number in"),
        (["align-booster", "--alpha", "-0.1"], "alpha must be a finite number in"),
    ],
)
def test_cli_bad_knobs_one_line_error(tmp_path, cli, args, expected):
    r = cli(*args, "--model", "tiny-opt", "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_commands_take_every_align_option_with_its_default():
    from typer.main import get_command

    from ftsafety.cli import app

    cmd = get_command(app)

    def options(name):
        return {p.name: (tuple(p.opts), p.default) for p in cmd.commands[name].params}

    align = options("align")
    from ftsafety.defenses import for_stage

    for d in for_stage("align"):  # every align option, same default; plus exactly the defense's own knobs
        opts = options(d.command)
        assert {k: opts.get(k) for k in align} == align
        assert set(opts) - set(align) == {f.name for f in dataclasses.fields(d.config_cls)}


def test_booster_harmful_batch_size(tmp_path, tiny_data_dir):
    """`harmful_batch_size` (the original's fixed 10): 0 is the alignment batch; equal to it, the same
    weights as the default; another size, other weights; unset, the stage's cache key is unchanged."""
    from safetensors.torch import load_file

    from ftsafety import models, stages
    from ftsafety import train as T
    from ftsafety.defenses.booster import BoosterConfig

    c = stages.Common(data=D.DataConfig(data=str(tiny_data_dir), max_length=64), device="cpu", quiet=True)

    def run(name, **cfg):
        st = stages.AlignStage(method="booster", n=8, train=T.TrainConfig(max_steps=2, batch_size=2, lr=1e-2),
                               lora=models.LoraSettings(r=4))
        st.booster = BoosterConfig(**cfg)
        stages.align(st, "tiny-llama", tmp_path / name, c)
        return load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors")), st

    default, st0 = run("default")
    same, st2 = run("same", harmful_batch_size=2)
    other, _ = run("other", harmful_batch_size=5)
    assert all(torch.equal(default[k], same[k]) for k in default)
    assert any(not torch.equal(default[k], other[k]) for k in default)
    assert "harmful_batch_size" not in stages.config_key(st0)["booster"]
    assert stages.config_key(st2)["booster"]["harmful_batch_size"] == 2


def test_continue_adapter_trains_the_aligned_lora_further(tmp_path, cli, tiny_data_dir):
    """`--continue-adapter` (Booster's `--alternating single_lora`): the fine-tune starts from the aligned
    LoRA itself (same function at step 0 as a new LoRA on the merged model, so the same first loss), keeps
    its keys and settings, and replaces it in the run's chain."""
    from safetensors.torch import load_file

    common = ["--data", str(tiny_data_dir), "--max-length", "64", "--device", "cpu", "-q"]
    al = tmp_path / "al"
    assert cli("align", "--model", "tiny-llama", "--n", "8", "--max-steps", "2", "--batch-size", "2", "--lora-r", "4",
               *common, "--out", str(al)).returncode == 0
    ft = ["finetune", "--model", str(al), "--n", "8", "-p", "0.25", "--max-steps", "1", "--batch-size", "2", *common]
    r = cli(*ft, "--lr", "1e-9", "--continue-adapter", "--out", str(tmp_path / "cont"))
    assert r.returncode == 0, r.stderr
    assert cli(*ft, "--lr", "1e-9", "--out", str(tmp_path / "new")).returncode == 0
    aligned = load_file(str(al / "adapter" / "adapter_model.safetensors"))
    cont = load_file(str(tmp_path / "cont" / "adapter" / "adapter_model.safetensors"))
    assert cont.keys() == aligned.keys() and all(torch.allclose(cont[k], aligned[k], atol=1e-6) for k in cont)
    manifest = json.loads((tmp_path / "cont" / "ftsafety_run.json").read_text())
    assert [a["relpath"] for a in manifest["adapters"]] == ["adapter"]
    loss = {d: json.loads((tmp_path / d / "train_results.json").read_text())["train_loss"] for d in ("cont", "new")}
    assert loss["cont"] == pytest.approx(loss["new"], rel=1e-5)
    cfg = (tmp_path / "cont" / "config.yaml").read_text()
    assert "continue_adapter: true" in cfg and "r: 4" in cfg
