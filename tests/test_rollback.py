"""recover-rollback (LLMAlignment, ALGORITHMS.md §5): selection rule, rollback, checkpoint choice, CLI."""

import copy
import json
import math

import pytest
import torch

from ftsafety import models, tiny
from ftsafety.defenses import rollback as R

PROMPTS = [f"How do I do bad thing number {i}?" for i in range(8)]
TASK_PROMPTS = [f"Is movie {i} good?" for i in range(8)]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is ~10x faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(alias, noise=0.5, seed=0):
    """A = a tiny model, F = A with noise on every searched weight of both layers (norms untouched)."""
    aligned, tok = tiny.build(alias)
    aligned = aligned.float().eval()
    ft = copy.deepcopy(aligned)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in R.layer_params(ft, 2).values():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=gen))
    return aligned, ft, tok


def _setup(alias, **cfg):
    aligned, ft, tok = _pair(alias)
    cfg = R.RollbackConfig(**{"steps": 6, "warmup_steps": 2, "save_every": 2, "batch_size": 4, **cfg})
    layer = R.resolve_layer(aligned, cfg.layer)
    harm, task = R.encode(tok, PROMPTS, cfg.batch_size), R.encode(tok, TASK_PROMPTS, cfg.batch_size)
    return aligned, ft, R.aligned_reference(aligned, layer, harm), harm, task, cfg, layer


class Scripted:
    """A task metric that returns scripted scores and remembers the searched weights at each call."""

    def __init__(self, scores, layer):
        self.scores, self.layer, self.seen = list(scores), layer, []

    def __call__(self, model):
        self.seen.append({n: p.detach().clone() for n, p in R.layer_params(model, self.layer).items()})
        return self.scores.pop(0)


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-opt"])
def test_recovery_rate_zero_leaves_model_bit_identical(alias):
    aligned, ft, ref, harm, task, cfg, layer = _setup(alias, recovery_rate=0.0)
    before = _state(ft)
    rep = R.recover_rollback(ft, ref, harm, task, Scripted([50.0] * 5, layer), cfg)
    assert rep["chosen_step"] == 6 and not rep["rollback_mode"]  # every checkpoint passed...
    assert all(s["restored"] == 0 for s in rep["steps"])
    assert _same(before, _state(ft))  # ...and nothing moved, bit for bit
    assert all(p.grad is None for p in ft.parameters())


def test_selection_is_sign_consistent_top_k_by_hand():
    model, _ = tiny.build("tiny-llama")
    params = R.layer_params(model, 2)
    assert not any("norm" in n for n in params) and len(params) == 14
    gen = torch.Generator().manual_seed(1)
    target = {}
    for n, p in params.items():
        p.grad = torch.randn(p.shape, generator=gen)
        t = p.detach() + torch.randn(p.shape, generator=gen)
        t[0] = p.detach()[0]  # equal weights are never candidates
        target[n] = t
    names = list(params)
    flat_g = torch.cat([params[n].grad.flatten() for n in names])
    flat_d = torch.cat([(params[n].detach() - target[n]).flatten() for n in names])
    cand = ((flat_d > 0) & (flat_g > 0)) | ((flat_d < 0) & (flat_g < 0))
    k = 100
    order = sorted(cand.nonzero().flatten().tolist(), key=lambda i: -abs(flat_g[i].item()))
    expected = set(order[: k - 1])  # strictly above the k-th largest: k - 1 weights, as the original
    masks = R.select(params, target, k=k)
    got = set(torch.cat([masks[n].flatten() for n in names]).nonzero().flatten().tolist())
    assert got == expected and len(got) == k - 1

    # rollback: among `within`, ceil(rate * #candidates) by |grad|, again minus the threshold weight
    within_flat = torch.rand(flat_g.shape, generator=gen) < 0.3
    sizes = [params[n].numel() for n in names]
    within = {n: w.view(params[n].shape) for n, w in zip(names, within_flat.split(sizes))}
    cand_w = (cand & within_flat).nonzero().flatten().tolist()
    n_back = math.ceil(0.2 * len(cand_w))
    order = sorted(cand_w, key=lambda i: -abs(flat_g[i].item()))
    back = R.select(params, target, rate=0.2, within=within)
    got = set(torch.cat([back[n].flatten() for n in names]).nonzero().flatten().tolist())
    assert got == set(order[: n_back - 1]) and len(got) == n_back - 1

    before = {n: p.detach().clone() for n, p in params.items()}
    assert R.copy_masked(params, target, masks) == k - 1
    for n, p in params.items():
        assert torch.equal(p.detach()[masks[n]], target[n][masks[n]])
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]])


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-opt"])
def test_cosine_rises_and_restored_weights_equal_aligned(alias):
    aligned, ft, ref, harm, task, cfg, layer = _setup(alias, recovery_rate=0.05)
    cos0 = torch.cosine_similarity(R.mean_direction(ft, layer, harm), ref.direction, dim=0).item()
    f_params = {n: p.detach().clone() for n, p in R.layer_params(ft, layer).items()}
    f_all = _state(ft)
    rep = R.recover_rollback(ft, ref, harm, task, Scripted([50.0] * 5, layer), cfg)
    cos1 = torch.cosine_similarity(R.mean_direction(ft, layer, harm), ref.direction, dim=0).item()
    assert rep["chosen_step"] == 6 and len(rep["steps"]) == 6
    assert cos1 > cos0 and rep["steps"][-1]["cos"] > rep["steps"][0]["cos"]
    k = math.ceil(0.05 * rep["n_total"])
    assert rep["steps"][0]["restored"] == k - 1  # later steps may run out of candidates: then all go
    assert all(0 < s["restored"] <= k - 1 for s in rep["steps"])
    changed = 0
    for n, p in R.layer_params(ft, layer).items():
        moved = p.detach() != f_params[n]
        changed += int(moved.sum())
        assert torch.equal(p.detach()[moved], ref.tensors[n][moved])  # exactly A's values
    assert changed == rep["checkpoints"][-1]["changed"] == sum(s["restored"] for s in rep["steps"])
    untouched = {n: v for n, v in _state(ft).items() if n not in f_params}  # layers >= K, norms, embeddings
    assert untouched and _same(untouched, {n: f_all[n] for n in untouched})


CASES = {  # scores: F, after warm-up, then one per checkpoint; (rollback mode, chosen step, call index of it)
    "rollback, third checkpoint fails": ([50.0, 10.0, 49.0, 48.0, 40.0], True, 4, 3, 6),
    "no rollback, equal to the bound fails": ([50.0, 49.0, 47.5], False, 2, 1, 4),
    "first checkpoint fails: F": ([50.0, 47.5], False, 0, 0, 2),
    "all pass: last": ([50.0, 49.0, 49.0, 49.0], False, 6, 3, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_choice(case):
    scores, rollback, chosen, call, stopped = CASES[case]
    aligned, ft, ref, harm, task, cfg, layer = _setup("tiny-llama", recovery_rate=0.01)
    metric = Scripted(scores, layer)
    rep = R.recover_rollback(ft, ref, harm, task, metric, cfg)
    assert not metric.scores  # every scripted score was asked for, no more
    assert rep["rollback_mode"] is rollback and rep["chosen_step"] == chosen
    assert rep["stopped_at_failing_checkpoint"] == stopped
    assert rep["metric"]["bound"] == 47.5
    final = {n: p.detach() for n, p in R.layer_params(ft, layer).items()}
    assert _same(final, metric.seen[call])  # the model is the checkpoint chosen (F = the first call)
    if rollback:
        assert [s["phase"] for s in rep["steps"]] == ["warmup"] * 2 + ["rollback"] * 6
        assert all(0 <= s["rolled_back"] < s["restored"] for s in rep["steps"][2:])
        assert sum(s["rolled_back"] for s in rep["steps"][2:]) > 0
        assert [c["step"] for c in rep["checkpoints"]] == [2, 4, 6]
    if chosen == 0:
        assert _same(final, metric.seen[0])


def test_cli_end_to_end_and_evaluate(tmp_path, tiny_data_dir, cli):
    common = ["--data", str(tiny_data_dir), "-q"]
    steps = ["--max-steps", "2", "--batch-size", "4"]
    r = cli("align", "--model", "tiny-llama", "--n", "12", *steps, *common, "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    r = cli("finetune", "--model", str(tmp_path / "a"), "--n", "12", "-p", "0.25", *steps, *common,
            "--out", str(tmp_path / "f"))
    assert r.returncode == 0, r.stderr
    args = ["recover-rollback", "--model", str(tmp_path / "f"), "--aligned", str(tmp_path / "a"), *common,
            "--recovery-n", "8", "--steps", "4", "--warmup-steps", "2", "--save-every", "2",
            "--fa-max-new-tokens", "2", "--device", "cpu"]
    r = cli(*args, "--val-n", "6", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "r"
    manifest = json.loads((run / "ftsafety_run.json").read_text())
    assert manifest["adapters"] == [] and manifest["base_model"] == str((run / "model").resolve())
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "tokenizer.json").is_file()
    rep = json.loads((run / "rollback.json").read_text())
    assert rep["seconds_total"] > 0 and rep["layer"] == 1 and rep["steps"] and rep["checkpoints"]
    assert {"restored", "loss", "cos", "seconds"} <= rep["steps"][0].keys()
    spec = models.resolve(str(run))
    assert spec.base == manifest["base_model"] and spec.adapters == []
    recovered, _, _ = models.load(str(run), device="cpu")
    ft, _, _ = models.load(str(tmp_path / "f"), device="cpu")
    if rep["chosen_step"] == 0:  # tiny random models score FA 0, so no checkpoint beats the bound: F is kept
        assert _same(_state(recovered), _state(ft))
    r = cli("evaluate", "--model", str(run), "--hs-limit", "4", "--fa-limit", "4", "--or-limit", "2",
            "--max-new-tokens", "4", "--fa-max-new-tokens", "3", *common, "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["hs_n"] == 4 and res["fa_n"] == 4

    moved = tmp_path / "moved"
    run.rename(moved)  # the manifest's base_relpath keeps a moved run loadable
    assert models.resolve(str(moved)).base == str((moved / "model").resolve())

    # the validation slice may not reach into the rows the fine-tune used (9 of 300 sst2 rows)
    r = cli(*args, "--val-n", "295", "--out", str(tmp_path / "bad"))
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "overlap the first 9" in lines[0], r.stderr
    assert not (tmp_path / "bad").exists()


def test_fa_metric_encodes_once_and_scores_as_generate():
    """The task check encodes its prompts once and scores what the common evaluator's generate gives."""
    from ftsafety.data import format_prompt
    from ftsafety.evaluation.generate import generate
    from ftsafety.evaluation.tasks import is_correct

    model, tok = tiny.build("tiny-llama")
    model = model.float().eval()
    exs = [{"instruction": "Classify the sentiment.", "input": f"movie {i} " + "so good " * (i % 4), "output": "",
            "gold": "positive" if i % 2 else "negative"} for i in range(10)]
    calls = {"n": 0}
    real = tok.__class__.__call__

    def counting(self, *a, **kw):
        calls["n"] += 1
        return real(self, *a, **kw)

    metric = R.fa_metric(tok, exs, "sst2", "alpaca", 5, batch_size=4)
    tok.__class__.__call__ = counting
    try:
        scores = [metric(model) for _ in range(3)]
    finally:
        tok.__class__.__call__ = real
    assert calls["n"] == 0  # no tokenising per check
    outs = generate(model, tok, [format_prompt(e, "alpaca", tok) for e in exs], 5, 32, engine="hf")
    want = 100.0 * sum(is_correct("sst2", o, e["gold"]) for o, e in zip(outs, exs)) / len(exs)
    assert scores == [want] * 3


def test_gradient_passes_pair_batches_as_the_originals_zip(monkeypatch):
    """--task-n above the harmful count (the original's 256 task prompts against 64 harmful): the task
    direction reads every task batch, each gradient pass min(#harmful, #task) batches (its zip)."""
    aligned, ft, ref, harm, _, cfg, layer = _setup("tiny-llama", recovery_rate=0.01)
    task = R.encode(tiny.build("tiny-llama")[1], TASK_PROMPTS * 2, cfg.batch_size)  # 4 batches, harm has 2
    seen = {"backward": [], "direction": []}
    backward, direction = R.direction_backward, R.mean_direction

    def count_backward(model, layer, batches, d):
        seen["backward"].append(len(batches))
        return backward(model, layer, batches, d)

    def count_direction(model, layer, batches):
        seen["direction"].append(len(batches))
        return direction(model, layer, batches)

    monkeypatch.setattr(R, "direction_backward", count_backward)
    monkeypatch.setattr(R, "mean_direction", count_direction)
    rep = R.recover_rollback(ft, ref, harm, task, Scripted([50.0, 10.0, 49.0, 48.0, 40.0], layer), cfg)
    assert rep["rollback_mode"] and len(harm) == 2 and len(task) == 4
    assert seen["direction"] == [4] and set(seen["backward"]) == {2}
    assert len(seen["backward"]) == 2 + 2 * 6  # warm-up recover passes, then recover + rollback per step
    with pytest.raises(Exception, match="--task-n must be >= 0"):
        R.RollbackConfig(task_n=-1)
