"""Benchmark: step time and peak memory of the alignment defenses against plain SFT alignment.

Run as:  python scripts/bench_alignment.py [--model smollm2-135m] [--batch-size 8] [--steps 6] [--warmup 2]
         [--methods sft,vaccine,booster,booster-pa] [--max-length 256] [--device auto] [--threads N]

One run, one model, one fixed alignment batch (and, for Booster, one fixed harmful calibration batch of
the same size, cut to the alignment batch's length unless `--harmful-length natural`, so that every pass
costs the same and the ratios show the algorithms' overhead) for every method: `sft` (the `align` step), `vaccine` (2 passes, rho=2), `booster`
(3 passes, lam=5, alpha=0.1) and `booster-pa` (Booster + Vaccine, 4 passes). Each method starts from the
same LoRA weights with its own AdamW. A step is training_step + optimizer step.

Time: the methods take turns, one step each per round (their LoRA weights are swapped in and out
between steps, outside the timed region), so load from other jobs on a shared machine hits all of them
alike; --warmup rounds are not timed, then the median of --steps timed steps is reported. On a CPU
shared with other jobs, `--threads 1` gives the steadiest ratios (multi-threaded ops stall when a core
is taken away).

Peak memory, over --warmup + 1 steps of each method alone. CUDA: torch.cuda.max_memory_allocated, as
the total and as `extra`, the part above what was allocated before the first step (weights, batch).
CPU: each method runs in a fresh subprocess which, after loading the model, resets the kernel's
peak-RSS counter (`/proc/self/clear_refs`, value 5), trains, and reports `extra` = peak RSS (VmHWM)
minus the RSS just before the first step: what training added (activations, gradients, optimizer
state, eps and weight copies, allocator caching). Where the counter cannot be reset it falls back to
the child's ru_maxrss minus the RSS after loading, which then also holds any higher peak of loading.
The ratios to SFT use `extra` (the weights are the same for every method).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

METHODS = ("sft", "vaccine", "booster", "booster-pa")
TARGETS = {"vaccine": 2.05, "booster": 3.05}  # issue #9
PASSES = {"sft": 1, "vaccine": 2, "booster": 3, "booster-pa": 4}  # forward+backward passes per step


def _trainer_spec(method: str):
    from ftsafety.defenses.booster import BoosterTrainer
    from ftsafety.defenses.vaccine import VaccineTrainer
    from ftsafety.trainer import FtTrainer

    return {
        "sft": (FtTrainer, {}),
        "vaccine": (VaccineTrainer, {"rho": 2.0}),
        "booster": (BoosterTrainer, {"lam": 5.0, "alpha": 0.1}),
        "booster-pa": (BoosterTrainer, {"lam": 5.0, "alpha": 0.1, "perturb_aware": True, "rho": 5.0}),
    }[method]


def _rss_kib(field: str = "VmRSS") -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def fixed_batches(tok, data: str, batch_size: int, max_length: int, match: bool = True):
    """The benches' fixed batches: one alignment batch (30% benign) and one harmful calibration batch, cut to
    the alignment batch's length when `match` (the same tokens per pass). Returns (collator, alignment
    dataset, harmful dataset, batch, harmful batch)."""
    from ftsafety import data as D

    dcfg = D.DataConfig(data=data, max_length=max_length)
    collate = D.Collator(tok.pad_token_id)
    align = D.SFTDataset(D.alignment_examples(dcfg, batch_size, 0.3, seed=0), tok, dcfg)
    harm_ds = D.SFTDataset(D.harmful_examples(dcfg, "calibration")[:batch_size], tok, dcfg)
    batch = collate([align[i] for i in range(len(align))])
    harmful = collate([harm_ds[i] for i in range(len(harm_ds))])
    width = batch["input_ids"].shape[1]
    if match and harmful["input_ids"].shape[1] > width:
        harmful = {k: v[:, :width] for k, v in harmful.items()}
    return collate, align, harm_ds, batch, harmful


class Bench:
    """The shared model (fresh LoRA), the fixed batches, and one trainer + optimizer + LoRA state per method."""

    def __init__(self, args):
        from ftsafety import models
        from ftsafety.utils import resolve_device, seed_everything

        seed_everything(0)
        self.args, self.dev = args, resolve_device(args.device)
        model, self.tok, _ = models.load(args.model, device=self.dev)
        self.model = models.attach_lora(model, models.LoraSettings())
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.init = [p.detach().clone() for p in self.params]
        self.collate, _, self.harm_ds, self.batch, self.harmful = fixed_batches(
            self.tok, args.data, args.batch_size, args.max_length, match=args.harmful_length == "match")
        self.runners: dict[str, dict] = {}

    def runner(self, method: str) -> dict:
        from ftsafety.train import TrainConfig, training_args

        if method not in self.runners:
            cls, kw = _trainer_spec(method)
            if method.startswith("booster"):
                kw = {**kw, "harmful_dataset": self.harm_ds}
            with tempfile.TemporaryDirectory() as scratch:
                targs = training_args(TrainConfig(batch_size=self.args.batch_size, seed=0), self.dev, scratch)
                trainer = cls(model=self.model, args=targs, data_collator=self.collate, **kw)
            trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we bypass
            if method.startswith("booster"):
                trainer.harmful.next = lambda: self.harmful  # the same harmful batch every step
            trainer.create_optimizer()
            self.runners[method] = {"trainer": trainer, "state": [v.clone() for v in self.init]}
        return self.runners[method]

    def step(self, method: str) -> float:
        """One training step of `method` from its own LoRA state; returns its seconds."""
        r = self.runner(method)
        with torch.no_grad():
            for p, v in zip(self.params, r["state"]):
                p.copy_(v)
        cuda = self.dev.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r["trainer"].training_step(self.model, self.batch)
        r["trainer"].optimizer.step()
        r["trainer"].optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        with torch.no_grad():
            for p, v in zip(self.params, r["state"]):
                v.copy_(p)
        return secs

    def memory(self, method: str) -> dict:
        """Peak memory of --warmup + 1 steps of `method` alone (call first in a fresh process on CPU)."""
        self.runner(method)
        return peak_memory(lambda: self.step(method), self.args.warmup + 1, self.dev)


def peak_memory(step, n_steps: int, dev: torch.device) -> dict:
    """Peak memory of `n_steps` calls of `step`, and the part above what was allocated before the first."""
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_ok = _reset_peak_rss()
        base = _rss_kib() * 1024
    for _ in range(n_steps):
        step()
    if cuda:
        peak, how = torch.cuda.max_memory_allocated(), "CUDA max_memory_allocated"
    else:
        peak = (_rss_kib("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        how = "peak RSS (VmHWM after clear_refs)" if reset_ok else "ru_maxrss"
    return {"peak_mib": peak / 2**20, "extra_mib": (peak - base) / 2**20, "memory_measure": how}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--harmful-length",
        choices=("match", "natural"),
        default="match",
        help="Cut the harmful batch to the alignment batch's length (match) or keep it (natural).",
    )
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default).")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return ap


def run(model: str = "smollm2-135m", data: str = "builtin", batch_size: int = 8, max_length: int = 256,
        steps: int = 6, warmup: int = 2, methods=METHODS, device: str = "auto", harmful_length: str = "match",
        threads: int = 0) -> dict:
    """Step times (interleaved rounds, median) and peak memory of each method; ratios to SFT."""
    methods = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if any(m not in METHODS for m in methods) or steps < 1 or warmup < 0:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, steps >= 1, warmup >= 0")
    methods = ["sft"] + [m for m in methods if m != "sft"]
    if threads > 0:
        torch.set_num_threads(threads)
    args = argparse.Namespace(model=model, data=data, batch_size=batch_size, max_length=max_length, steps=steps,
                              warmup=warmup, device=device, harmful_length=harmful_length, threads=threads)
    bench = Bench(args)
    from ftsafety.defenses import _perturb

    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(warmup + steps):
        for m in methods:
            secs = bench.step(m)
            if i >= warmup:
                times[m].append(secs)
    report = {
        "model": model,
        "device": str(bench.dev),
        "threads": torch.get_num_threads(),
        "batch_shape": list(bench.batch["input_ids"].shape),
        "harmful_batch_shape": list(bench.harmful["input_ids"].shape),
        # positions the loss scores (the LM head runs on these only): the passes' cost differs with them
        "scored_tokens": {"alignment": int(_perturb.loss_tokens(bench.batch)),
                          "harmful": int(_perturb.loss_tokens(bench.harmful))},
        "warmup_rounds": warmup,
        "s_per_step": {m: [round(x, 4) for x in t] for m, t in times.items()},
    }
    if bench.dev.type == "cuda":
        report["device"] = torch.cuda.get_device_name(bench.dev)
        mem = {m: bench.memory(m) for m in methods}
    else:
        del bench
        mem = {}
        for m in methods:
            cmd = [
                sys.executable, os.path.abspath(__file__), "--memory-child", m, "--model", model, "--data", data,
                "--batch-size", str(batch_size), "--max-length", str(max_length), "--warmup", str(warmup),
                "--threads", str(threads), "--harmful-length", harmful_length, "--device", device,
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"memory run of {m} failed:\n{res.stderr[-2000:]}")
            mem[m] = json.loads(res.stdout.strip().splitlines()[-1])
    med = {m: statistics.median(t) for m, t in times.items()}
    sft_extra = mem["sft"]["extra_mib"]
    report.update(
        median_s_per_step={m: round(v, 4) for m, v in med.items()},
        step_ratio_to_sft={m: round(med[m] / med["sft"], 4) for m in methods},
        # spread of the per-round ratios (method's step / SFT's step of the same round): the timing noise
        step_ratio_range={m: [round(min(a / b for a, b in zip(times[m], times["sft"])), 4),
                              round(max(a / b for a, b in zip(times[m], times["sft"])), 4)] for m in methods},
        passes={m: PASSES[m] for m in methods},
        memory=mem,
        memory_ratio_to_sft={
            m: (round(mem[m]["extra_mib"] / sft_extra, 4) if sft_extra > 0 else None) for m in methods
        },
    )
    return report


def main(argv: list[str] | None = None) -> dict | None:
    args = _parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_child:  # CPU memory: one fresh process per method
        print(json.dumps(Bench(args).memory(args.memory_child)))
        return None
    try:
        report = run(args.model, args.data, args.batch_size, args.max_length, args.steps, args.warmup, args.methods,
                     args.device, args.harmful_length, args.threads)
    except (ValueError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    mem, med = report["memory"], report["median_s_per_step"]
    print(json.dumps({k: v for k, v in report.items() if k not in ("memory",)}))
    print(f"memory: {mem['sft']['memory_measure']}; extra = peak minus memory before the first step")
    print(
        f"{'method':11s} {'s/step':>8s} {'x SFT':>6s} {'target':>11s} {'peak MiB':>9s} {'extra MiB':>10s} {'x SFT':>6s}"
    )
    for m in med:
        ratio = report["step_ratio_to_sft"][m]
        target = TARGETS.get(m)
        mark = "" if target is None else f"<={target} " + ("ok" if ratio <= target else "MISS")
        mem_ratio = report["memory_ratio_to_sft"][m]
        print(
            f"{m:11s} {med[m]:8.3f} {ratio:6.2f} {mark:>11s} {mem[m]['peak_mib']:9.1f} "
            f"{mem[m]['extra_mib']:10.1f} {mem_ratio if mem_ratio is not None else float('nan'):6.2f}"
        )
    return report


if __name__ == "__main__":
    main()
