"""Benchmark report (issue #9): each defense's cost against plain SFT and evaluation speed, in one run.

Run as:  python scripts/bench.py [--model smollm2-135m] [--threads 0] [--parts align,lisa,eval,post]
         [--data builtin] [--out results] [--quick]          (`make bench`)

Four parts, one process, the same model (each part loads it afresh):
  align  Vaccine and Booster step time and peak memory over SFT's (scripts/bench_alignment.py)
  lisa   Lisa step time and peak memory over plain fine-tuning's (scripts/bench_lisa.py)
  eval   our generation loop's speed over batched `model.generate` on the same batches (scripts/bench_eval.py)
  post   Antidote's calibration and rollback's recovery time over the fine-tune's (scripts/bench_post.py)
Each ratio is printed and written, next to its target with PASS/MISS (and by how much, and why, for a
miss), to `<out>/bench.md` and `<out>/bench.json` (both atomically), with the date, the machine and
the settings. `--quick` runs every part on tiny-llama with a few steps (a smoke test of the plumbing:
its numbers say nothing about the targets). The full run on the embedded model takes about 35 minutes
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_alignment
import bench_dtype
import bench_eval
import bench_lisa
import bench_post

from ftsafety.defenses.rollback import RollbackConfig
from ftsafety.utils import BF16_CPU_FLAGS, atomic_write_text, cpu_flags, write_json

PARTS = ("align", "lisa", "eval", "post", "dtype")

# key: (what, op, target, part); the targets for the embedded model on this machine
TARGETS = {
    "vaccine_step_x_sft": ("Vaccine step time / SFT step time", "<=", 2.05, "align"),
    "booster_step_x_sft": ("Booster step time / SFT step time", "<=", 3.05, "align"),
    "lisa_step_x_sft": ("Lisa step time / fine-tune (SFT) step time", "<=", 1.02, "lisa"),
    "antidote_calibration_x_finetune": ("Antidote calibration time / fine-tune time", "<=", 0.05, "post"),
    "rollback_x_finetune": ("Rollback recovery time / fine-tune time", "<=", 0.25, "post"),
    # issue #14: our loop is kept only where it is >= 1.3x batched model.generate (batch 128, 128 new tokens:
    # the evaluator's HS setting)
    "eval_x_generate": ("Generation speed, our loop / batched model.generate (batch 128, 128 new tokens)", ">=",
                        1.3, "eval"),
    # issue #29: on a CPU with AVX512-BF16 or AMX (elsewhere bf16 is emulated and the verdict says so)
    **{f"bf16_{m}_step_x_fp32": (f"{m.capitalize() if m != 'sft' else 'SFT'} LoRA step speed, bf16 autocast / fp32",
                                 ">=", 1.8, "dtype") for m in bench_dtype.METHODS},
    "bf16_generate_x_fp32": ("Generation speed, bf16 autocast / fp32 (our loop)", ">=", 1.8, "dtype"),
}

FULL = {
    # 14 timed rounds: on 2 threads single steps vary by +-30% (other processes stall one of the two
    # threads), and 6 rounds left the median of the ratio 0.1 off (EXPERIMENTS.md, 2026-11-23)
    "align": {"batch_size": 8, "max_length": 256, "steps": 14, "warmup": 2},
    "lisa": {"batch_size": 8, "max_length": 256, "steps": 16, "warmup": 2},
    # max_new_tokens 128: Vaccine's pred.py (the other repos generate up to 512); 32: short answers
    "eval": {"n": 128, "max_new_tokens": (32, 128), "batch_sizes": (16, 64, 128)},
    "post": {"ft_n": 1000, "ft_epochs": 1.0, "batch_size": 8, "calibration_n": 500, "val_n": 100,
             "fa_max_new_tokens": 16, "rollback": {}},
    # the step shape (batch 8 x 128 tokens) and a 64 x 32-token generation
    "dtype": {"batch_size": 8, "max_length": 128, "steps": 4, "warmup": 1, "gen_n": 64, "gen_max_new": 32,
              "gen_batch": 32},
}
# a CPU without bf16 instructions emulates bf16 (a GEMM ~50x slower than fp32): the full shapes would take hours
# there, and these smaller ones show the same ratio
EMULATED_BF16 = {"batch_size": 2, "max_length": 64, "steps": 2, "warmup": 1, "gen_n": 16, "gen_max_new": 16,
                 "gen_batch": 16}
QUICK = {
    "align": {"batch_size": 4, "max_length": 64, "steps": 2, "warmup": 1, "methods": ("sft", "vaccine", "booster")},
    "lisa": {"batch_size": 4, "max_length": 64, "steps": 2, "warmup": 1},
    "eval": {"n": 16, "max_new_tokens": (8,), "batch_sizes": (4, 16)},
    "post": {"ft_n": 16, "ft_epochs": 1.0, "batch_size": 4, "align_steps": 1, "calibration_n": 8, "val_n": 8,
             "fa_max_new_tokens": 4,
             "rollback": {"steps": 2, "warmup_steps": 1, "save_every": 1, "recovery_n": 8, "batch_size": 4}},
    "dtype": {"batch_size": 2, "max_length": 32, "steps": 1, "warmup": 1, "gen_n": 4, "gen_max_new": 4,
              "gen_batch": 4},
}


# ---------------------------------------------------------------------------------------------
# The machine


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bf16_flags": sorted(cpu_flags() & set(BF16_CPU_FLAGS)),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return info


# ---------------------------------------------------------------------------------------------
# Ratios, verdicts and the reasons for a miss


def _verdict(value: float, op: str, target: float) -> tuple[bool, str]:
    ok = value <= target if op == "<=" else value >= target
    if ok:
        return True, ""
    if op == "<=":
        return False, f"{value - target:.3g} over ({(value / target - 1) * 100:.0f}% above the target)"
    return False, f"{target - value:.3g} short ({(1 - value / target) * 100:.0f}% below the target)"


def _scored_note(method: str, a: dict) -> str:
    """Booster's harmful passes score more positions than the alignment pass (longer answers in the same
    width): the LM head and the cross-entropy run on scored positions only, so those passes cost more."""
    st = a.get("scored_tokens")
    if not method.startswith("booster") or not st or st["harmful"] <= st["alignment"]:
        return ""
    return (f" Part of the excess is the data, not the method: the harmful batch has {st['harmful']} scored "
            f"positions against the alignment batch's {st['alignment']} ({st['harmful'] / st['alignment'] - 1:+.0%}), "
            "and the LM head and the loss run on scored positions only, so each harmful pass costs a little "
            "more than the SFT pass.")


def _why(key: str, value: float, target: float, parts: dict) -> str:
    """Why a target was missed, from this run's own measurements."""
    if key.startswith("bf16_"):
        d = parts["dtype"]
        cpu, gemm = d["cpu"], d.get("gemm") or {}
        rate = (f" In the same run a {'x'.join(map(str, gemm['shape']))} GEMM ran at {gemm['gflops']['fp32']} GFLOP/s "
                f"in fp32 and {gemm['gflops']['bf16']} in bf16 ({gemm['bf16_x_fp32']}x).") if gemm else ""
        if d["device"].startswith("cpu") and not cpu["bf16_flags"]:
            return (f"This CPU has no AVX512-BF16 or AMX ({cpu['torch_cpu_capability']}): torch emulates bf16 "
                    f"arithmetic, so bf16 is slower, not faster, and `--dtype auto` runs fp32 here ({cpu['auto_why']})."
                    f"{rate} The target is for CPUs with bf16 instructions; it is not tested on this machine.")
        return (f"bf16 instructions present ({', '.join(cpu['bf16_flags']) or d['device']}), yet the measured speed-up "
                f"is {value:.2f}x.{rate} Parts of the step that stay fp32 (optimizer, LoRA's small matmuls, "
                f"norms, the loss) bound the gain.")
    if key in ("vaccine_step_x_sft", "booster_step_x_sft"):
        a = parts["align"]
        m = key.split("_")[0]
        passes = a["passes"][m]
        lo, hi = a["step_ratio_range"][m]
        return (
            f"{m.capitalize()} runs {passes} forward+backward passes per step where SFT runs 1, so its floor is "
            f"about {passes}x (a little under, as the optimizer step is paid once by both); the measured "
            f"{value:.2f}x adds {value - passes:+.2f} SFT steps of the method's own work beyond the passes "
            f"(perturbing, gradient norms, weight copies). Batch {a['batch_shape'][0]} x {a['batch_shape'][1]} "
            f"tokens, median of {len(a['s_per_step']['sft'])} interleaved rounds at {a['threads']} thread(s); "
            f"the per-round ratios ranged {lo:.2f}-{hi:.2f}, so the timing noise of this machine is "
            f"{'as large as' if hi - lo >= abs(value - target) else 'smaller than'} the shortfall."
            + _scored_note(m, a)
        )
    if key == "lisa_step_x_sft":
        lr = parts["lisa"]
        q1, q3 = lr["ratio_paired_quartiles"]
        text = (
            f"Lisa's step is the fine-tune's step plus the proximal term ({lr['proximal_update_ms']:.2f} ms, "
            f"{lr['proximal_share_of_step'] * 100:.2f}% of a step) and the trainer's state check; the paired "
            f"per-step ratios have quartiles {q1:.3f}-{q3:.3f} over {lr['timed_steps_per_trainer']} steps, "
        )
        if q1 <= target:
            return text + (f"so the median of {value:.3f} is within the step-to-step noise of this machine, "
                           "not a cost the method adds.")
        return text + (f"all above {target}: a real overhead of about {(q1 - 1) * 100:.1f}-{(q3 - 1) * 100:.1f}% "
                       f"per step, of which the proximal term explains {lr['proximal_share_of_step'] * 100:.2f}%; "
                       "the rest is the Lisa trainer's per-step bookkeeping (state switch, batch swap).")
    if key == "antidote_calibration_x_finetune":
        p = parts["post"]
        ft, an = p["finetune"], p["antidote"]
        ft_s, cal_s = ft["seconds"], an["calibration_seconds"]
        text = (
            f"Calibration is one forward pass over {an['calibration_n']} harmful pairs "
            f"({an['calibration_tokens']} tokens, {cal_s:.3g} s); the fine-tune it repairs is {ft['steps']} "
            f"forward+backward steps ({ft_s:.3g} s"
        )
        if ft.get("tokens"):
            ft_tok, cal_tok = ft["tokens"], an["calibration_tokens"]
            cal_rate, ft_rate = cal_s / max(cal_tok, 1), ft_s / max(ft_tok, 1)
            need_tok = cal_s / target / ft_rate
            # Antidote's own setting (ALGORITHMS.md 4): 2000 calibration pairs; the fine-tune n=5000 x 20 epochs
            paper = value * (2000 / an["calibration_n"]) / (5000 * 20 / (ft["n"] * ft["epochs"]))
            text += (
                f", {ft_tok:.0f} tokens: n={ft['n']} x {ft['epochs']:g} epoch(s)). Per token the calibration "
                f"costs {cal_rate / ft_rate:.2f}x a fine-tuning token, and it sees {cal_tok / ft_tok:.2f}x as many "
                f"tokens, hence {value:.1%}. Reaching {target:.0%} at these rates takes a fine-tune of "
                f"~{need_tok:.0f} tokens (~{need_tok / ft_tok * ft['epochs']:.1f} epochs of this set) or a "
                f"calibration set of ~{cal_tok * target / value:.0f} tokens. The miss is the bench's short "
                f"fine-tune, not the calibration: in Antidote's own setting (2000 calibration pairs against a "
                f"fine-tune of n=5000 x 20 epochs), the same per-example rates give {paper:.2%}."
            )
        else:
            text += ")."
        return text
    if key == "rollback_x_finetune":
        p = parts["post"]
        ft, rb = p["finetune"], p["rollback"]
        mode = " and as many over task prompts (rollback mode)" if rb["rollback_mode"] else ""
        return (
            f"Recovery ran {rb['steps_run']} steps ({rb['seconds_steps']:.1f} s, "
            f"{rb['seconds_per_step']:.2f} s each): every step is a forward+backward with full-weight gradients "
            f"through layers < K={rb['layer']} of {rb['num_layers']} over {rb['recovery_n']} harmful prompts "
            f"({rb['harmful_prompt_tokens']} tokens){mode}, plus {rb['checks']} task checks on {rb['val_n']} prompts "
            f"({rb['seconds_eval']:.1f} s). That is the algorithm's own work (steps x prompts), against a "
            f"fine-tune of {ft['steps']} LoRA steps ({ft['seconds']:.1f} s); at these rates {target:.0%} needs a "
            f"fine-tune of ~{rb['seconds'] / target:.0f} s, {rb['seconds'] / target / ft['seconds']:.1f}x this one "
            f"(~{rb['seconds'] / target / ft['seconds'] * ft['n'] * ft['epochs']:.0f} examples of this mix; the "
            f"paper's fine-tunes take a task's whole training set plus 1,500 harmful answers of up to 512 tokens, "
            f"in 4-bit QLoRA). The step cost is the gradient through K layers of the full weights, which the "
            f"method needs to rank them; we found no cheaper exact way to get it."
        )
    if key == "eval_x_generate":
        e = parts["eval"]
        r = _eval_row(e)
        return (
            f"On the same {e['prompts']} prompts and batches, model.generate took {r['generate_seconds']:.1f} s and our "
            f"loop {r['ours_seconds']:.1f} s at batch {r['batch_size']} x {r['max_new_tokens']} new tokens "
            f"({e['threads']} thread(s), transformers {e['transformers']}). Both run the same forward passes on a "
            f"machine near its FLOP limit; what our loop saves (the shared template prefix run once, less padding "
            f"in the prefill, finished rows dropped) is only part of the work, and {r['responses_at_max_new_tokens']:.0%} "
            f"of the answers ran to max_new_tokens, so few rows finish early."
        )
    return ""


def _eval_row(e: dict) -> dict:
    """The eval part's row of the targeted setting: the largest batch at the most new tokens."""
    return max(e["rows"], key=lambda r: (r["max_new_tokens"], r["batch_size"]))


def ratios(parts: dict) -> dict:
    """The targeted ratios (value, target, PASS/MISS, shortfall, why) and the others (info)."""
    vals: dict[str, float] = {}
    info: dict[str, float | None] = {}
    if "align" in parts:
        a = parts["align"]
        for m, r in a["step_ratio_to_sft"].items():
            if m != "sft":
                (vals if f"{m}_step_x_sft" in TARGETS else info)[f"{m.replace('-', '_')}_step_x_sft"] = r
        for m, r in a["memory_ratio_to_sft"].items():
            if m != "sft":
                info[f"{m.replace('-', '_')}_peak_memory_x_sft"] = r
    if "lisa" in parts:
        lr = parts["lisa"]
        vals["lisa_step_x_sft"] = lr["ratio_paired_median"]
        info["lisa_step_x_sft_ratio_of_medians"] = lr["ratio_of_medians"]
        if lr.get("memory_ratio") is not None:
            info["lisa_peak_memory_x_sft"] = lr["memory_ratio"]
    if "eval" in parts:
        e = parts["eval"]
        vals["eval_x_generate"] = _eval_row(e)["ours_x_generate"]
        for key, ratio in e["ours_x_generate"].items():
            info[f"eval_ours_x_generate_{key}"] = ratio
    if "dtype" in parts:
        d = parts["dtype"]
        for m, r in d["step"].items():
            vals[f"bf16_{m}_step_x_fp32"] = r["bf16_x_fp32"]
        vals["bf16_generate_x_fp32"] = d["generate"]["bf16_x_fp32"]
        if d.get("gemm"):
            info["bf16_gemm_x_fp32"] = d["gemm"]["bf16_x_fp32"]
    if "post" in parts:
        p = parts["post"]
        vals["antidote_calibration_x_finetune"] = p["antidote_calibration_over_finetune"]
        vals["rollback_x_finetune"] = p["rollback_over_finetune"]
        info["antidote_command_x_finetune"] = p["antidote_command_over_finetune"]
        info["rollback_command_x_finetune"] = p["rollback_command_over_finetune"]
    out = {}
    for key, (what, op, target, _part) in TARGETS.items():
        if key not in vals:
            continue
        ok, short = _verdict(vals[key], op, target)
        out[key] = {"what": what, "value": vals[key], "op": op, "target": target, "pass": ok, "shortfall": short,
                    "why": "" if ok else _why(key, vals[key], target, parts)}
    return {"targets": out, "info": info}


# ---------------------------------------------------------------------------------------------
# The report


HOW = {
    "align": (
        "**Vaccine, Booster vs SFT** (`scripts/bench_alignment.py`): one model with a fresh LoRA, one fixed "
        "alignment batch (and for Booster one harmful batch cut to the same length, so every pass costs the "
        "same); each method keeps its own LoRA weights and AdamW. A step is `training_step` + optimizer step. "
        "The methods take turns, one step each per round, so load from other jobs hits all alike; the warm-up "
        "rounds are dropped and the ratio is of the medians of the timed steps. Peak memory: on CPU each "
        "method trains alone in a fresh subprocess; `extra` = peak RSS (VmHWM, reset after loading) minus RSS "
        "before the first step (CUDA: `max_memory_allocated` above what was allocated before); the ratio is "
        "of the extras."
    ),
    "lisa": (
        "**Lisa vs fine-tuning** (`scripts/bench_lisa.py`): the `Trainer` and `LisaTrainer` on the same LoRA "
        "model and batch, switching and the proximal term on; a step is `training_step` + clipping + "
        "optimizer/scheduler step. They alternate step by step (order flipped each round); the ratio is the "
        "median of the per-round ratios. Peak memory as above."
    ),
    "eval": (
        "**Generation, our loop vs batched `model.generate`** (`scripts/bench_eval.py`): the same N BeaverTails "
        "prompts (Alpaca template), encoded once, sorted by length and cut into the same batches for both; "
        "greedy, stop at EOS. `model.generate` = one batched call per batch (left padding), what a transformers "
        "user writes; ours = the batch's shared template prefix run once, the rest prefilled in groups of 16 "
        "padded to their own longest prompt, KV cache reserved, finished rows dropped. The two take turns, the "
        "order flipped from one setting to the next. Ratio = model.generate's seconds over ours (> 1: ours is "
        "faster); the outputs are compared prompt by prompt."
    ),
    "post": (
        "**Antidote and rollback vs the fine-tune** (`scripts/bench_post.py`): in one process a brief "
        "alignment, then the fine-tune (p=0.1 harmful on SST-2; its training time, no checkpoints), then "
        "Antidote (ratio: its calibration forward pass) and rollback recovery (ratio: its steps + task checks, "
        "without loading/saving models) on that fine-tune; the whole commands are given beside them."
    ),
    "dtype": (
        "**bf16 against fp32** (`scripts/bench_dtype.py`): the processor's bf16 flags and a GEMM at the LoRA "
        "step's MLP shape in both; then two copies of the model (fresh LoRA, same seed), one fp32 and one with "
        "the bf16 autocast wrap `--dtype bf16` trains under (fp32 weights and AdamW state), each step of SFT, "
        "Vaccine, Booster and Lisa timed on the same batch in both, the order flipped every round; then our "
        "generation loop on the same BeaverTails prompts in both. Ratio = fp32 seconds over bf16 seconds "
        "(> 1: bf16 is faster)."
    ),
}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown(report: dict) -> str:
    m, r = report["machine"], report["ratios"]
    lines = [
        "# Benchmark: the defenses' cost and evaluation speed",
        "",
        f"- date: {report['date']}",
        (f"- machine: {m['cpu']} (bf16 instructions: {', '.join(m.get('bf16_flags') or []) or 'none'}), "
         f"{m['cpus_usable']} usable of {m['cpu_count']} CPUs, torch threads "
         f"{m['torch_threads']}, CUDA: {m['cuda'] or 'none'}; load average at the start "
         f"{m.get('load_average', '-')}, at the end {report.get('load_average_end', '-')}"),
        f"- software: Python {m['python']}, torch {m['torch']}, transformers {m.get('transformers', '-')}",
        f"- model: `{report['model']}`, data: `{report['data']}`{' (--quick: plumbing only)' if report['quick'] else ''}",
        f"- command: `{report['command']}` ({report['seconds']:.0f} s)",
    ]
    dates = report.get("part_dates", {})
    if any(d != report["date"] for d in dates.values()):
        lines.append("- parts carried from an earlier run (this run measured the others): " + ", ".join(
            f"{p} measured {d}" for p, d in dates.items() if d != report["date"]))
    lines += [
        "",
        "## Ratios against the targets",
        "",
        "| measure | ratio | target | verdict |",
        "|---|---|---|---|",
    ]
    for t in r["targets"].values():
        verdict = "PASS" if t["pass"] else f"MISS: {t['shortfall']}"
        lines.append(f"| {t['what']} | {t['value']:.3f} | {t['op']} {t['target']:g} | {verdict} |")
    misses = {k: t for k, t in r["targets"].items() if not t["pass"]}
    if misses:
        lines += ["", "### Why the misses", ""]
        for t in misses.values():
            lines.append(f"- **{t['what']}** ({t['value']:.3f} against {t['op']} {t['target']:g}): {t['why']}")
    if r["info"]:
        lines += ["", "## Other ratios (no target)", "", "| measure | ratio |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in r["info"].items()]
    lines += ["", "## Settings and raw figures", ""]
    parts = report["parts"]
    if "align" in parts:
        a = parts["align"]
        lines.append(
            f"- align: batch {a['batch_shape'][0]} x {a['batch_shape'][1]} tokens, {len(a['s_per_step']['sft'])} timed "
            f"rounds after {a['warmup_rounds']} warm-up; median s/step "
            + ", ".join(f"{k} {v:.4f}" for k, v in a["median_s_per_step"].items())
            + "; extra MiB " + ", ".join(f"{k} {v['extra_mib']:.1f}" for k, v in a["memory"].items())
        )
    if "lisa" in parts:
        lr = parts["lisa"]
        lines.append(
            f"- lisa: batch {lr['batch_size']} x {lr['tokens_per_example']} tokens, {lr['timed_steps_per_trainer']} "
            f"timed steps each; median s/step finetune {lr['finetune_s_per_step']['median']:.4f}, lisa "
            f"{lr['lisa_s_per_step']['median']:.4f}; proximal update {lr['proximal_update_ms']:.2f} ms"
        )
    if "eval" in parts:
        e = parts["eval"]
        lines.append(
            f"- eval: {e['prompts']} prompts, transformers {e['transformers']}, fast path: {e['fast_path']}; "
            + "; ".join(f"{r['max_new_tokens']} new tokens, batch {r['batch_size']}: model.generate "
                        f"{r['generate_seconds']:.1f} s, ours {r['ours_seconds']:.1f} s ({r['ours_x_generate']:.2f}x), "
                        f"identical outputs {r['identical']}" for r in e["rows"])
        )
    if "dtype" in parts:
        d = parts["dtype"]
        g, gm = d["generate"], d.get("gemm")
        lines.append(
            f"- dtype: bf16 flags {', '.join(d['cpu']['bf16_flags']) or 'none'} ({d['cpu']['torch_cpu_capability']}); "
            f"`--dtype auto` picks {d['cpu']['auto_picks']}; "
            + (f"GEMM {'x'.join(map(str, gm['shape']))} fp32 {gm['gflops']['fp32']} / bf16 {gm['gflops']['bf16']} "
               f"GFLOP/s; " if gm else "")
            + f"{d['threads']} torch thread(s), batch {d['batch_shape'][0]} x {d['batch_shape'][1]} tokens"
            + (f" ({report['settings']['dtype']['why']})" if (report.get("settings") or {}).get("dtype", {}).get("why") else "")
            + ", median s/step fp32 / bf16: "
            + ", ".join(f"{m} {r['s_per_step']['fp32']:.3f} / {r['s_per_step']['bf16']:.3f}" for m, r in d["step"].items())
            + f"; generation {g['prompts']} prompts x {g['max_new_tokens']} new tokens: fp32 {g['seconds']['fp32']:.1f} s,"
            f" bf16 {g['seconds']['bf16']:.1f} s, identical answers {g['identical']}"
        )
    if "post" in parts:
        p = parts["post"]
        ft, an, rb = p["finetune"], p["antidote"], p["rollback"]
        lines.append(
            f"- post: fine-tune {ft['steps']} steps (n={ft['n']}, {ft['epochs']} epoch(s), batch {ft['batch_size']}) "
            f"{ft['seconds']:.1f} s; Antidote calibration {an['calibration_seconds']:.1f} s over "
            f"{an['calibration_n']} pairs (command {an['command_seconds']:.1f} s); rollback {rb['seconds']:.1f} s = "
            f"{rb['steps_run']} steps {rb['seconds_steps']:.1f} s + task checks {rb['seconds_eval']:.1f} s "
            f"(rollback mode: {rb['rollback_mode']}; command {rb['command_seconds']:.1f} s)"
        )
    lines += ["", "## How each ratio is measured", "",
              ("All parts run in one `scripts/bench.py` run on the same model, one after another, each with "
               "the same thread count."), ""]
    lines += [f"- {HOW[p]}" for p in PARTS if p in parts]
    lines += ["", "Raw figures of every part: `bench.json` beside this file.", ""]
    return "\n".join(lines)


def print_table(report: dict) -> None:
    print(f"{'measure':55s} {'ratio':>8s} {'target':>8s}  verdict")
    for t in report["ratios"]["targets"].values():
        verdict = "PASS" if t["pass"] else f"MISS ({t['shortfall']})"
        print(f"{t['what']:55s} {t['value']:8.3f} {t['op']:>3s}{t['target']:5g}  {verdict}")
    for k, v in report["ratios"]["info"].items():
        print(f"{k:55s} {_fmt(v):>8s}")


# ---------------------------------------------------------------------------------------------
# The run


def run(model: str = "smollm2-135m", data: str = "builtin", parts=PARTS, threads: int = 0, quick: bool = False,
        device: str = "auto", out: str | Path | None = "results", command: str = "") -> dict:
    parts = [p for p in PARTS if p in parts]
    if threads > 0:
        torch.set_num_threads(threads)
    cfg = QUICK if quick else FULL
    t_start = time.perf_counter()
    report = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
              "model": model, "data": data, "quick": quick, "threads": threads, "parts_run": parts,
              "settings": {p: cfg[p] for p in parts}, "command": command or "scripts/bench.py", "parts": {}}
    res = report["parts"]
    if "align" in parts:
        c = cfg["align"]
        res["align"] = bench_alignment.run(model, data, c["batch_size"], c["max_length"], c["steps"], c["warmup"],
                                           c.get("methods", bench_alignment.METHODS), device, "match", threads)
    if "lisa" in parts:
        c = cfg["lisa"]
        res["lisa"] = bench_lisa.run(model, c["batch_size"], c["max_length"], c["warmup"], c["steps"],
                                     device=device, threads=threads)
    if "eval" in parts:
        c = cfg["eval"]
        res["eval"] = bench_eval.run(model, data, c["n"], c["max_new_tokens"], c["batch_sizes"], device=device,
                                     threads=threads)
    if "dtype" in parts:
        c = cfg["dtype"]
        if not quick and torch.device(device if device != "auto" else "cpu").type == "cpu" and not torch.cuda.is_available() \
                and not (cpu_flags() & set(BF16_CPU_FLAGS)):
            c = report["settings"]["dtype"] = {**EMULATED_BF16, "why": "this CPU emulates bf16: smaller shapes"}
        res["dtype"] = bench_dtype.run(model, data, c["batch_size"], c["max_length"], c["steps"], c["warmup"],
                                       c["gen_n"], c["gen_max_new"], c["gen_batch"], device=device, threads=threads)
    if "post" in parts:
        c = cfg["post"]
        res["post"] = bench_post.run(model, data, c["ft_n"], c["ft_epochs"], c["batch_size"],
                                     align_steps=c.get("align_steps", 2), calibration_n=c["calibration_n"],
                                     rollback=RollbackConfig(**c["rollback"]), val_n=c["val_n"],
                                     fa_max_new_tokens=c["fa_max_new_tokens"], device=device, threads=threads)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    try:
        report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    report["part_dates"] = {p: report["date"] for p in parts}
    if out is not None:
        _carry_other_parts(report, Path(out) / "bench.json")
    report["ratios"] = ratios(res)
    if out is not None:
        out = Path(out)
        write_json(out / "bench.json", report)
        atomic_write_text(out / "bench.md", markdown(report))
    return report


def _carry_other_parts(report: dict, previous: Path) -> None:
    """A run of some parts (`--parts eval`) keeps the other parts' figures from the previous report of the
    same model and mode, each with the date it was measured (`part_dates`), so bench.md stays whole."""
    import json

    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        return
    if old.get("model") != report["model"] or bool(old.get("quick")) != bool(report["quick"]):
        return
    for part, figures in old.get("parts", {}).items():
        if part in PARTS and part not in report["parts"]:
            report["parts"][part] = figures
            report["settings"][part] = old.get("settings", {}).get(part)
            report["part_dates"][part] = old.get("part_dates", {}).get(part, old.get("date"))
    report["parts"] = {p: report["parts"][p] for p in PARTS if p in report["parts"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model alias or run (default smollm2-135m; tiny-llama with --quick)")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default, one per "
                                                            "core; 1 is the steadiest on a shared CPU)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="tiny-llama, a few steps: a smoke test of the plumbing")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results", help="directory for bench.md and bench.json")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        ap.error(f"--parts takes a comma-separated subset of {','.join(PARTS)}")
    model = args.model or ("tiny-llama" if args.quick else "smollm2-135m")
    command = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = run(model, args.data, parts, args.threads, args.quick, args.device, args.out, command.strip())
    print_table(report)
    print(f"wrote {Path(args.out) / 'bench.md'} and bench.json ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
