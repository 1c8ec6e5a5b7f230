"""Antidote (post-fine-tuning Wanda pruning): the formula on toy layers, identity at ratio 0, only the
intended tensors change, and the CLI end to end."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ftsafety import data as D
from ftsafety import models
from ftsafety.defenses import antidote as A
from ftsafety.errors import FtsafetyError

ALIASES = ["tiny-opt", "tiny-llama"]


def _perturbed_adapter(model, path, settings, seed):
    peft_model = models.attach_lora(model, settings)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    models.save_adapter(peft_model, path, settings)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per alias: an `align` run (one adapter) and a fine-tune run on top (two adapters), randomly perturbed."""
    root = tmp_path_factory.mktemp("antidote_runs")
    out = {}
    for i, alias in enumerate(ALIASES):
        align, ft = root / alias / "align", root / alias / "ft"
        base, _, spec = models.load(alias, device="cpu")
        _perturbed_adapter(base, align / "adapter", models.LoraSettings(r=4, alpha=8, targets="qkv"), 10 + i)
        (align / models.RUN_MANIFEST).write_text(json.dumps(models.run_manifest(spec, align / "adapter", align, {})))
        merged, _, spec = models.load(str(align), device="cpu")
        _perturbed_adapter(merged, ft / "adapter", models.LoraSettings(r=8, alpha=16, targets="attn"), 20 + i)
        (ft / models.RUN_MANIFEST).write_text(json.dumps(models.run_manifest(spec, ft / "adapter", ft, {})))
        out[alias] = ft
    return out


def _run(ft, out, tiny_data_dir, **kw):
    cfg = A.AntidoteConfig(calibration_n=kw.pop("n", 16), batch_size=4, **kw)
    dcfg = D.DataConfig(data=str(tiny_data_dir), max_length=64)
    return A.run_antidote(cfg, str(ft), dcfg, out, device="cpu", quiet=True)


def _state(spec):
    model, _, _ = models.load(str(spec), device="cpu")
    return model.state_dict()


# ---------------------------------------------------------------------------------------------
# The formula on toy layers


def test_row_mask_is_per_row_top_alpha_of_wanda_score_by_hand():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 5, bias=False)
    x = torch.randn(2, 3, 64)
    att = torch.tensor([[1, 1, 1], [1, 1, 0]])
    x[1, 2] = 1e6  # a padding position: must not count
    with A.InputNorms({"lin": lin}) as rec:
        rec.batch(att)
        lin(x)
    real = [x[0, 0], x[0, 1], x[0, 2], x[1, 0], x[1, 1]]
    # Wanda's scaler_row: sum over real tokens of x_j^2, divided by the number of sequences (2)
    col_norm = [math.sqrt(sum(float(t[j]) ** 2 for t in real) / 2) for j in range(64)]
    assert rec.n_samples == 2 and rec.n_tokens == 5
    assert torch.allclose(torch.sqrt(rec.scaler("lin")), torch.tensor(col_norm), rtol=1e-5)
    score = A.wanda_score(lin.weight, rec.scaler("lin"))
    mask = A.wanda_masks({"lin": score}, 0.1, "row")["lin"]
    # the original keeps int(64 * 0.9) = 57 lowest per row, so 7 are zeroed (ceil(6.4), not floor)
    assert A.n_zeroed(64, 0.1) == 7 and A.n_zeroed(8, 0.1) == 1 and A.n_zeroed(10, 0.1) == 1
    for i in range(5):
        by_hand = sorted(range(64), key=lambda j: abs(float(lin.weight.detach()[i, j])) * col_norm[j])[-7:]
        assert sorted(torch.nonzero(mask[i]).flatten().tolist()) == sorted(by_hand)
    assert mask.sum(1).tolist() == [7] * 5
    assert not A.wanda_masks({"lin": score}, 0.0, "row")["lin"].any()
    assert A.wanda_masks({"lin": score}, 1.0, "row")["lin"].all()


def test_row_mask_ties_follow_stable_sort():
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 2.0, 0.0]])
    mask = A.row_mask(score, 0.5)  # keep int(4 * 0.5) = 2 lowest; among ties the later columns go
    assert mask.tolist() == [[False, False, True, True], [True, False, True, False]]


def test_global_scope_is_one_argtopk_by_hand():
    torch.manual_seed(1)
    scores = {"a": torch.rand(4, 10), "b": torch.rand(3, 6) * 2}
    masks = A.wanda_masks(scores, 0.2, "global")
    flat = [(float(v), name, i) for name, s in scores.items() for i, v in enumerate(s.flatten())]
    k = 58 - int(58 * 0.8)
    top = sorted(flat)[-k:]
    assert sum(int(m.sum()) for m in masks.values()) == k == 12
    for _, name, i in top:
        assert masks[name].flatten()[i]
    # ties: later positions of the concatenation are zeroed first
    tied = A.wanda_masks({"a": torch.ones(2, 2), "b": torch.ones(1, 2)}, 0.5, "global")
    assert tied["a"].flatten().tolist() == [False, False, False, True] and tied["b"].flatten().tolist() == [True, True]


def test_config_rejects_bad_values():
    for kw, msg in [({"ratio": 1.5}, "ratio"), ({"target": "full"}, "target"), ({"scope": "layer"}, "scope"),
                    ({"calibration_n": -1}, "calibration"), ({"batch_size": 0}, "batch size")]:
        with pytest.raises(FtsafetyError, match=msg):
            A.AntidoteConfig(**kw)


# ---------------------------------------------------------------------------------------------
# Runs on tiny models


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("target", ["lora", "dense"])
def test_ratio_zero_is_identity_bit_for_bit(runs, alias, target, tmp_path, tiny_data_dir):
    s = _run(runs[alias], tmp_path / "out", tiny_data_dir, ratio=0.0, target=target)
    assert s["zeroed"] == 0 and s["numel"] > 0
    before, after = _state(runs[alias]), _state(tmp_path / "out")
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not any(m.any() for m in load_file(str(tmp_path / "out" / A.MASK_FILE)).values())


@pytest.mark.parametrize("alias", ALIASES)
def test_lora_target_changes_only_the_last_adapter_factors(runs, alias, tmp_path, tiny_data_dir):
    ft, out = runs[alias], tmp_path / "out"
    s = _run(ft, out, tiny_data_dir, ratio=0.1)
    parent = json.loads((ft / models.RUN_MANIFEST).read_text())
    child = json.loads((out / models.RUN_MANIFEST).read_text())
    assert child["adapters"][:-1] == [dict(e, relpath=child["adapters"][0]["relpath"]) for e in parent["adapters"][:-1]]
    assert child["adapters"][-1]["relpath"] == "adapter" and child["base_model"] == alias
    old = load_file(str(ft / "adapter" / A.ADAPTER_FILE))
    new = load_file(str(out / "adapter" / A.ADAPTER_FILE))
    mask = load_file(str(out / A.MASK_FILE))
    assert old.keys() == new.keys() == mask.keys()
    for key, m in mask.items():
        assert m.dtype == torch.bool and torch.equal(new[key][~m], old[key][~m]) and not new[key][m].any()
        assert m.sum(1).tolist() == [A.n_zeroed(m.shape[1], 0.1)] * m.shape[0]  # lora_B (in = r = 8): 1 per row
    assert s["zeroed"] == sum(int(m.sum()) for m in mask.values())
    assert set(s["by_type"]) == {".".join(k.split(".")[-3:-1]) for k in mask} and len(s["by_type"]) == 8
    # merged through models.load: only the linears that carry the user's LoRA moved
    before, after = _state(ft), _state(out)
    targeted = {k.removeprefix("base_model.model.").rsplit(".", 2)[0] + ".weight" for k in mask}
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= targeted


@pytest.mark.parametrize("alias", ALIASES)
def test_dense_target_zeroes_only_the_targeted_linears(runs, alias, tmp_path, tiny_data_dir):
    ft, out = runs[alias], tmp_path / "out"
    s = _run(ft, out, tiny_data_dir, ratio=0.2, target="dense", dense_targets="q_proj,v_proj")
    manifest = json.loads((out / models.RUN_MANIFEST).read_text())
    assert manifest["adapters"] == [] and models.resolve(str(out)).base == str((out / "model").resolve())
    before, after = _state(ft), _state(out)
    mask = load_file(str(out / A.MASK_FILE))
    assert mask and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in mask)
    for k in before:
        if k in mask:
            m = mask[k]
            assert torch.equal(after[k][~m], before[k][~m]) and not after[k][m].any()
            assert m.sum(1).tolist() == [A.n_zeroed(m.shape[1], 0.2)] * m.shape[0]
        else:
            assert torch.equal(before[k], after[k]), k
    assert s["by_type"]["q_proj"]["zeroed"] > 0 and set(s["by_type"]) == {"q_proj", "v_proj"}


def test_global_scope_and_magnitude_fallback(runs, tmp_path, tiny_data_dir):
    ft = runs["tiny-llama"]
    g = _run(ft, tmp_path / "g", tiny_data_dir, ratio=0.1, scope="global")
    assert g["zeroed"] == A.n_zeroed(g["numel"], 0.1)
    mag = _run(ft, tmp_path / "m", tiny_data_dir, ratio=0.1, n=0)
    assert mag["n_calibration"] == 0 and mag["calibration_seconds"] < 1.0
    w = _run(ft, tmp_path / "w", tiny_data_dir, ratio=0.1)
    # calibration counts only real tokens: the positions of the tokenised calibration set
    tok = models.load("tiny-llama", device="cpu")[1]
    dcfg = D.DataConfig(data=str(tiny_data_dir), max_length=64)
    assert w["n_positions"] == sum(D.SFTDataset(D.harmful_examples(dcfg, "calibration")[:16], tok, dcfg).lengths())
    m_w, m_mag = load_file(str(tmp_path / "w" / A.MASK_FILE)), load_file(str(tmp_path / "m" / A.MASK_FILE))
    assert any(not torch.equal(m_w[k], m_mag[k]) for k in m_w)  # activations change the choice


def test_lora_target_needs_an_adapter(tmp_path, tiny_data_dir):
    with pytest.raises(FtsafetyError, match="no LoRA adapter"):
        _run("tiny-opt", tmp_path / "o", tiny_data_dir)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_end_to_end_then_evaluate(cli, tmp_path, tiny_data_dir):
    steps = ["--max-steps", "2", "--batch-size", "4", "-q", "--data", str(tiny_data_dir), "--max-length", "64"]
    assert cli("align", "--model", "tiny-opt", "--n", "8", *steps, "--out", str(tmp_path / "al")).returncode == 0
    r = cli("finetune", "--model", str(tmp_path / "al"), "--n", "8", "-p", "0.25", *steps, "--out", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr
    r = cli("prune-antidote", "--model", str(tmp_path / "ft"), "--data", str(tiny_data_dir), "--calibration-n", "8",
            "--batch-size", "4", "--max-length", "64", "--ratio", "0.1", "-q", "--out", str(tmp_path / "pr"))
    assert r.returncode == 0, r.stderr
    assert "prune-antidote: zeroed" in r.stdout
    s = json.loads((tmp_path / "pr" / A.SUMMARY_FILE).read_text())
    assert s["zeroed"] > 0 and s["calibration_seconds"] >= 0 and s["finetune_seconds"] is not None
    r = cli("evaluate", "--model", str(tmp_path / "pr"), "--data", str(tiny_data_dir), "--hs-limit", "2", "--fa-limit", "2",
            "--or-limit", "1", "--max-new-tokens", "2", "--fa-max-new-tokens", "2", "-q", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["hs_n"] == 2
    r = cli("prune-antidote", "--model", str(tmp_path / "ft"), "--ratio", "2", "--out", str(tmp_path / "bad"))
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "prune ratio must be in [0, 1]" in r.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("alias", ALIASES)
def test_fast_calibration_gives_the_same_masks(runs, alias, tiny_data_dir):
    """Length-sorted batches and forwards stopped after the last scored layer: the same masks as whole
    forwards in data order (the sums differ at most by float rounding; stopping alone changes no bit)."""
    from peft import PeftModel

    dcfg = D.DataConfig(data=str(tiny_data_dir), max_length=1024)
    examples = [dict(e, output=e["output"] * (1 + i % 5)) for i, e in enumerate(D.harmful_examples(dcfg, "calibration")[:24])]
    spec = models.resolve(str(runs[alias]))
    parent = models.ModelSpec(base=spec.base, adapters=spec.adapters[:-1], source=spec.source)
    net, tok, _ = models.load(parent, device="cpu")
    net = PeftModel.from_pretrained(net, spec.adapters[-1])
    dense, _, _ = models.load(alias, device="cpu")
    for model, modules in ((net, A._lora_modules(net)),
                           (dense, {n: m for n, m in dense.named_modules()
                                    if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")})):
        ref = A.calibrate(model, modules, examples, tok, dcfg, 4, sort_by_length=False, stop_early=False)
        stop = A.calibrate(model, modules, examples, tok, dcfg, 4, sort_by_length=False, stop_early=True)
        fast = A.calibrate(model, modules, examples, tok, dcfg, 4)
        assert fast.stop_after is not None and fast.n_tokens == ref.n_tokens and fast.n_samples == ref.n_samples
        assert all(torch.equal(stop.sumsq[n], ref.sumsq[n]) for n in modules)
        assert all(torch.allclose(fast.sumsq[n], ref.sumsq[n], rtol=1e-5) for n in modules)
        for scope in ("row", "global"):
            masks = [A.wanda_masks({n: A.wanda_score(m.weight, rec.scaler(n)) for n, m in modules.items()}, 0.1, scope)
                     for rec in (ref, fast)]
            assert all(torch.equal(masks[0][n], masks[1][n]) for n in modules)


def test_random_prune_baseline(runs, tmp_path, tiny_data_dir):
    """--score random (the paper's random-pruning ablation): as many weights per row as Wanda zeroes,
    chosen at random, the same with the same seed, and no harmful calibration data read."""
    ft = runs["tiny-llama"]
    wanda = _run(ft, tmp_path / "wanda", tiny_data_dir, ratio=0.25)
    rand = _run(ft, tmp_path / "rand", tiny_data_dir, ratio=0.25, score="random")
    _run(ft, tmp_path / "again", tiny_data_dir, ratio=0.25, score="random")
    assert rand["zeroed"] == wanda["zeroed"] > 0 and rand["n_calibration"] == 0
    mw, mr, ma = (load_file(str(tmp_path / d / A.MASK_FILE)) for d in ("wanda", "rand", "again"))
    assert all(torch.equal(mr[k].sum(1), mw[k].sum(1)) for k in mw)  # same count per row
    assert any(not torch.equal(mr[k], mw[k]) for k in mw)  # other positions
    assert all(torch.equal(mr[k], ma[k]) for k in mr)  # reproducible
    with pytest.raises(FtsafetyError, match="unknown score"):
        A.AntidoteConfig(score="magnitude")
