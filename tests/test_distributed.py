"""Several processes (issue #8): commands under `accelerate launch` / `torchrun` give the one-process result.

The distributed tests (marker `slow`, `make test-dist`) launch 2 CPU processes with the gloo backend
(recipes/accelerate/cpu-gloo.yaml) on `tiny-llama` and compare with one process given the same GLOBAL
batch: 2 processes x --batch-size 2 against 1 process x --batch-size 4.

Tolerance (training, fp32 on CPU): over all adapter tensors, max |w_2 - w_1| <= 1e-5 x max |w_1|. The
two runs add the same numbers in another order (per-process sums, then an all-reduce), so they agree
to float rounding, amplified a little by Adam over the steps; measured when this test was written:
align 9e-8, align-vaccine 5e-7, align-booster 6e-7, finetune-lisa 1e-7 (relative, as above). A wrong
global quantity is far outside it: Vaccine with each process's own ||g|| gives 3e-2, Booster without
the all-reduce of the harmful gradient 2e-2. The scaling test checks the quantities themselves
(Vaccine's eps of each example and ||g||, Booster's harmful gradient) to 1e-5 relative (measured
1e-6, 4e-7, 8e-7). `evaluate` must be identical (the generation batches are the one-process batches:
same HS/HS+/FA/OR, byte-identical samples), and so must the Antidote masks and the rollback result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftsafety import distributed

ROOT = Path(__file__).resolve().parents[1]
CPU_GLOO = ROOT / "recipes" / "accelerate" / "cpu-gloo.yaml"
TOL = 1e-5  # relative, see the module docstring
COMMON = ["--model", "tiny-llama", "--max-length", "128", "--device", "cpu", "-q"]


# -- helpers ----------------------------------------------------------------------------------------


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "FTSAFETY_LOG_LEVEL": "WARNING"}
    for key in ("FTSAFETY_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch(*args: str, launcher: str = "accelerate", cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m ftsafety ARGS` in 2 CPU processes (gloo), through accelerate launch or torchrun."""
    if launcher == "accelerate":
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_GLOO)]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run([*head, "-m", "ftsafety", *args], check=False, capture_output=True, text=True,
                       env=_env(), cwd=cwd, timeout=600)
    assert r.returncode == 0, f"{launcher} failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return r


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _relative_diff(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    assert ref.keys() == other.keys() and ref
    scale = max(float(t.abs().max()) for t in ref.values())
    return max(float((ref[k] - other[k]).abs().max()) for k in ref) / scale


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# -- one process: the helpers are the identity --------------------------------------------------------


def test_single_process_helpers_change_nothing():
    from ftsafety.defenses._perturb import token_share

    assert not distributed.active() and distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.is_main()
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum_(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert distributed.all_reduce_sum_tensors([t])[0] is t
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("x") == "x"
    assert distributed.run_on_main(lambda a, b=0: a + b, 1, b=2) == 3
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert token_share({"labels": torch.ones(2, 3, dtype=torch.long)}) is None


def test_cycling_batches_give_each_process_its_slice_of_the_global_batch():
    from ftsafety.defenses.booster import CyclingBatches

    data = list(range(10))  # 10 = 2 global batches of 4 and a short one of 2, then a new pass

    def draws(world, rank, bs, n=6):
        it = CyclingBatches(data, bs, collate=list, seed=3, world=world, rank=rank)
        return [it.next() for _ in range(n)]

    one = draws(1, 0, 4)
    r0, r1 = draws(2, 0, 2), draws(2, 1, 2)
    for whole, a, b in zip(one, r0, r1):
        assert whole == a + (b or [])
    assert r1[2] is None and len(r0[2]) == 2  # the short last batch of a pass: nothing left for rank 1
    bs3 = draws(3, 2, 2)  # 3 processes x 2: rank 2 gets positions 4-5 of each global batch of 6
    assert bs3[0] == draws(1, 0, 6)[0][4:6]


def test_total_steps_count_the_processes():
    from ftsafety.train import TrainConfig, _total_steps

    cfg = TrainConfig(epochs=1, batch_size=2)
    assert _total_steps(cfg, 16) == 8 and _total_steps(cfg, 16, world=2) == 4
    assert _total_steps(cfg, 10, world=2) == 3  # 5 batches: the last round is padded by accelerate
    assert _total_steps(TrainConfig(max_steps=7, batch_size=2), 100, world=4) == 7


# -- the scaling of the global norms, on the quantities themselves --------------------------------------

_SCALING_WORKER = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    import torch.distributed as tdist
    from accelerate import PartialState
    torch.set_num_threads(1)
    PartialState(cpu=True)  # joins the gloo group torchrun set up
    from test_distributed import scaling_quantities
    rank = tdist.get_rank()
    torch.save(scaling_quantities(rank), f"{sys.argv[1]}/rank{rank}.pt")
''')


def scaling_quantities(rank: int | None) -> dict:
    """Vaccine's eps (each example's rows, real tokens only) and ||g||, and Booster's harmful gradient, for
    examples 0-3 in one process (rank None) or examples 2r, 2r+1 on process r of 2."""
    from types import SimpleNamespace

    from ftsafety import data as D
    from ftsafety import models
    from ftsafety.defenses._perturb import activation_perturbation, perturb_targets, token_share
    from ftsafety.defenses.booster import BoosterTrainer, _grads

    torch.manual_seed(0)
    model, tok, _ = models.load("tiny-llama", device="cpu")
    model = models.attach_lora(model, models.LoraSettings(r=4))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # a LoRA that has trained a little: every factor gets a gradient
        for p in params:
            p.normal_(0.0, 0.05)
    dcfg = D.DataConfig(max_length=256)  # untruncated lengths: the processes hold different token counts
    ds = D.SFTDataset(D.alignment_examples(dcfg, 4, 0.5, 0), tok, dcfg)
    idx = range(4) if rank is None else range(2 * rank, 2 * rank + 2)
    batch = D.Collator(tok.pad_token_id)([ds[i] for i in idx])
    sites = perturb_targets(model, "attn")
    share = token_share(batch)
    eps, norm, _ = activation_perturbation(model, sites, lambda: model(**batch).loss, 2.0, share=share)
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = [[eps[m][j, : lengths[j]].clone() for m in sites] for j in range(len(idx))]
    if share is None:
        grads = _grads(model(**batch).loss, params)
    else:
        stub = SimpleNamespace(_loss=lambda m, b: m(**b).loss)
        grads = BoosterTrainer._global_harmful_grads(stub, model, batch, params, share)[1]
    return {"eps_rows": rows, "norm": norm.detach().clone(), "grads": [g.detach().clone() for g in grads],
            "share": None if share is None else float(share)}


@pytest.mark.slow
def test_global_norms_and_gradients_match_one_process(tmp_path):
    """Vaccine: eps of every example and ||g|| as with the whole batch in one process; Booster: the summed
    harmful gradient is the whole batch's (2 gloo processes under torchrun)."""
    script = tmp_path / "worker.py"
    script.write_text(_SCALING_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path), str(Path(__file__).parent)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-6000:]
    ref = scaling_quantities(None)
    parts = [torch.load(tmp_path / f"rank{k}.pt") for k in (0, 1)]
    assert 0.0 < parts[0]["share"] < 1.0 and abs(parts[0]["share"] + parts[1]["share"] - 1.0) < 1e-6
    assert parts[0]["share"] != 0.5  # unequal token counts: the weighting matters
    worst = {"norm": 0.0, "eps": 0.0, "grad": 0.0}
    for k, part in enumerate(parts):
        worst["norm"] = max(worst["norm"], abs(float(part["norm"]) - float(ref["norm"])) / float(ref["norm"]))
        for j, row in enumerate(part["eps_rows"]):
            for a, b in zip(ref["eps_rows"][2 * k + j], row):
                assert a.shape == b.shape
                worst["eps"] = max(worst["eps"], float((a - b).abs().max()) / float(a.abs().max()))
        for a, b in zip(ref["grads"], part["grads"]):
            worst["grad"] = max(worst["grad"], float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12))
    print("relative differences to one process:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= TOL, worst


# -- the commands, 2 processes against 1 ------------------------------------------------------------------

TRAINING = {
    "align": ["align", "--n", "16", "--max-steps", "4"],
    "align-vaccine": ["align-vaccine", "--n", "16", "--max-steps", "4", "--rho", "2"],
    "align-booster": ["align-booster", "--n", "16", "--max-steps", "4"],
    # 5 alignment examples = a global batch of 4, then one of 1 that leaves process 1 nothing (a masked
    # stand-in); 2 alignment steps, 1 fine-tuning step, repeated: the states switch 4 times in 6 steps
    "finetune-lisa": ["finetune-lisa", "--n", "24", "--max-steps", "6", "-p", "0.25", "--align-n", "5",
                      "--alignment-steps", "2", "--finetune-steps", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(TRAINING))
def test_training_matches_one_process_with_the_same_global_batch(method, tmp_path, tiny_data_dir, cli):
    args = [*TRAINING[method], *COMMON, "--data", str(tiny_data_dir)]
    one, two = tmp_path / "one", tmp_path / "two"
    r = cli(*args, "--batch-size", "4", "--out", str(one))
    assert r.returncode == 0, r.stderr
    launch(*args, "--batch-size", "2", "--out", str(two))
    diff = _relative_diff(_adapter(one), _adapter(two))
    print(f"{method}: max |w_2 - w_1| / max |w_1| = {diff:.2e} (tolerance {TOL:.0e})")
    assert diff <= TOL, f"{method}: adapters differ by {diff:.2e} (relative), more than {TOL:.0e}"
    assert bool(_adapter(two)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].any())
    cfg = (two / "config.yaml").read_text()
    assert "world_size: 2" in cfg and "world_size" not in (one / "config.yaml").read_text()
    res_one = json.loads((one / "train_results.json").read_text())
    res_two = json.loads((two / "train_results.json").read_text())
    assert res_one["steps"] == res_two["steps"]
    assert abs(res_one["train_loss"] - res_two["train_loss"]) <= 1e-4 * abs(res_one["train_loss"])
    assert (two / "metrics.jsonl").is_file()
    assert _leftovers(tmp_path) == []  # no checkpoint or temporary directory left by either process


def _evaluate_args(out: Path, data: Path) -> list[str]:
    return ["evaluate", "--model", "tiny-llama", "--data", str(data), "--hs-limit", "10", "--fa-limit", "7",
            "--or-limit", "5", "--batch-size", "3", "--max-new-tokens", "12", "--fa-max-new-tokens", "4",
            "--device", "cpu", "-q", "--out", str(out)]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_evaluate_is_the_same_with_two_processes(launcher, tmp_path, tiny_data_dir, cli):
    """Same HS/HS+/FA/OR and byte-identical samples: 10 harmful prompts in 4 batches of 3, so the two
    processes decode 2 batches each and the gather puts the answers back in order."""
    r = cli(*_evaluate_args(tmp_path / "one", tiny_data_dir))
    assert r.returncode == 0, r.stderr
    launch(*_evaluate_args(tmp_path / "two", tiny_data_dir), launcher=launcher)
    samples = [(tmp_path / d / "samples.jsonl").read_bytes() for d in ("one", "two")]
    assert samples[0] == samples[1]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    for key in ("hs", "hs_plus", "fa", "or", "hs_n", "fa_n", "or_n", "hs_by_category", "generated_tokens_hs"):
        assert a[key] == b[key], key
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_post_fine_tuning_defenses_with_two_processes(tmp_path, tiny_data_dir, cli):
    """prune-antidote: calibration split over the processes, sums all-reduced: the same masks.
    recover-rollback: runs on the main process while the other waits: the same report and weights."""
    data = ["--data", str(tiny_data_dir)]
    r = cli("align", *COMMON, *data, "--n", "8", "--max-steps", "2", "--batch-size", "4", "--out",
            str(tmp_path / "aligned"))
    assert r.returncode == 0, r.stderr
    r = cli("finetune", *COMMON, *data, "--model", str(tmp_path / "aligned"), "--n", "8", "--max-steps", "2",
            "--batch-size", "4", "--lr", "1e-2", "--out", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr
    antidote = ["prune-antidote", "--model", str(tmp_path / "ft"), *data, "--max-length", "64",
                "--calibration-n", "20", "--batch-size", "3", "--device", "cpu", "-q"]
    assert cli(*antidote, "--out", str(tmp_path / "ad1")).returncode == 0
    launch(*antidote, "--out", str(tmp_path / "ad2"))
    m1, m2 = (load_file(str(tmp_path / d / "mask.safetensors")) for d in ("ad1", "ad2"))
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    s1, s2 = (json.loads((tmp_path / d / "antidote.json").read_text()) for d in ("ad1", "ad2"))
    assert (s1["n_positions"], s1["zeroed"]) == (s2["n_positions"], s2["zeroed"])

    rollback = ["recover-rollback", "--model", str(tmp_path / "ft"), "--aligned", str(tmp_path / "aligned"),
                *data, "--steps", "2", "--warmup-steps", "1", "--save-every", "1", "--recovery-n", "4",
                "--val-n", "4", "--batch-size", "2", "--fa-max-new-tokens", "3", "--device", "cpu", "-q"]
    assert cli(*rollback, "--out", str(tmp_path / "rb1")).returncode == 0
    launch(*rollback, "--out", str(tmp_path / "rb2"))
    r1, r2 = (json.loads((tmp_path / d / "rollback.json").read_text()) for d in ("rb1", "rb2"))
    assert (r1["chosen_step"], r1["rollback_mode"], r1["checkpoints"]) == (
        r2["chosen_step"], r2["rollback_mode"], r2["checkpoints"])
    w1, w2 = (load_file(str(next((tmp_path / d / "model").glob("*.safetensors")))) for d in ("rb1", "rb2"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert _leftovers(tmp_path) == []
