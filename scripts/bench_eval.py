"""Benchmark: our greedy generation loop against transformers' batched `model.generate`, on the same batches.

Run as:  python scripts/bench_eval.py [--model smollm2-135m] [--n 128] [--max-new-tokens 32,128]
         [--batch-sizes 16,64,128] [--threads 0] [--data builtin]

One run, one model, the same N BeaverTails evaluation prompts (Alpaca template). For every
(max_new_tokens, batch size) both engines decode exactly the same batches: `generate_from_ids` encodes
each prompt once, sorts the prompts by token length (longest first) and cuts the batches, then either
  * `engine="hf"`: one batched `model.generate` call per batch (greedy, left padding, stop at EOS), what
    a user of transformers would write; or
  * `engine="ftsafety"`: our loop (the batch's shared template prefix run once, the rest prefilled in
    groups of similar length, KV cache reserved for the whole generation, finished rows dropped); the
    engine that actually ran is recorded. (`engine="auto"`, the default, picks ours only at batch sizes
    where this benchmark found it at least 1.3x faster: `FAST_MIN_ROWS`.)
The two take turns (hf first in one setting, ours first in the next), so load from other jobs hits both
alike. Throughput is generated tokens (EOS excluded) per second of wall time; the ratio is ours over
model.generate's (> 1: our loop is faster). Outputs are compared prompt by prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import transformers

from ftsafety import data as D
from ftsafety import models, prompt_sets
from ftsafety.evaluation.generate import encode_prompts, fast_path_reason, generate_from_ids


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(net, tok, encoded, max_new_tokens: int, bs: int, engine: str, dev) -> tuple[list[list[int]], float, dict]:
    _sync(dev)
    t0 = time.perf_counter()
    stats: dict = {}
    toks = generate_from_ids(net, tok, encoded, max_new_tokens, bs, engine=engine, stats=stats)
    _sync(dev)
    return toks, time.perf_counter() - t0, stats


def run(model: str = "smollm2-135m", data: str = "builtin", n: int = 128, max_new_tokens: tuple[int, ...] = (32, 128),
        batch_sizes: tuple[int, ...] = (16, 64, 128), device: str = "auto", threads: int = 0, loaded=None) -> dict:
    """Time both engines on the same batches; returns the measurements (see the module docstring)."""
    if threads > 0:
        torch.set_num_threads(threads)
    if loaded is None:
        net, tok, _ = models.load(model, device=device)
    else:
        net, tok = loaded
    dev = next(net.parameters()).device
    cfg = D.DataConfig(data=data)
    items = prompt_sets.items("beavertails", "harmful", cfg, n)
    prompts = [D.format_prompt({"instruction": p["prompt"]}, cfg.template, tok) for p in items]
    encoded = encode_prompts(tok, prompts)
    n = len(prompts)
    generate_from_ids(net, tok, encoded[:2], 4, 2, engine="ftsafety" if fast_path_reason(net) is None else "hf")
    generate_from_ids(net, tok, encoded[:2], 4, 2, engine="hf")  # warm-up, both engines
    reason = fast_path_reason(net)
    rows = []
    flip = False
    for mnt in max_new_tokens:
        for bs in batch_sizes:
            order = ("ftsafety", "hf") if flip else ("hf", "ftsafety")
            flip = not flip
            res = {e: _timed(net, tok, encoded, mnt, bs, e if reason is None or e == "hf" else "hf", dev)
                   for e in order}
            (ours, ours_s, stats), (hf, hf_s, _) = res["ftsafety"], res["hf"]
            tokens = sum(map(len, hf))
            lengths = [len(t) for t in hf]
            rows.append({
                "max_new_tokens": mnt, "batch_size": bs, "first": order[0],
                "generate_seconds": round(hf_s, 3), "ours_seconds": round(ours_s, 3), "generated_tokens": tokens,
                "generate_tokens_per_s": round(tokens / hf_s, 2), "ours_tokens_per_s": round(sum(map(len, ours)) / ours_s, 2),
                "ours_x_generate": round(hf_s / ours_s, 3),
                "identical": f"{sum(a == b for a, b in zip(ours, hf))}/{n}",
                "ours_engine": stats.get("engine", "ftsafety" if reason is None else "hf"),
                "responses_at_max_new_tokens": round(sum(x >= mnt for x in lengths) / n, 3),
                "prefill_tokens_over_prompt_tokens": round(
                    stats.get("prefill_tokens", stats.get("padded_prompt_tokens", 0)) / max(stats.get("prompt_tokens", 1), 1), 4),
            })
            print(f"  max_new_tokens {mnt:>4}, batch {bs:>4}: model.generate {hf_s:7.1f} s, ours {ours_s:7.1f} s, "
                  f"ours/generate speed {hf_s / ours_s:.2f}x, identical {rows[-1]['identical']}", flush=True)
    return {
        "model": model, "device": str(dev), "threads": torch.get_num_threads(), "prompts": n,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "fast_path": reason or "available", "max_new_tokens": list(max_new_tokens), "batch_sizes": list(batch_sizes),
        "prompt_tokens_median": statistics.median(len(e) for e in encoded), "rows": rows,
        "ours_x_generate": {f"{r['max_new_tokens']}x{r['batch_size']}": r["ours_x_generate"] for r in rows},
    }


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--max-new-tokens", default="32,128")
    ap.add_argument("--batch-sizes", default="16,64,128")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--json", default="", help="also write the report to this file")
    args = ap.parse_args(argv)
    report = run(args.model, args.data, args.n, _ints(args.max_new_tokens), _ints(args.batch_sizes), args.device,
                 args.threads)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
