"""Benchmark: batched evaluation generation against one prompt at a time (the original pred.py way).

Run as:  python scripts/bench_eval.py [--model smollm2-135m] [--n 32] [--max-new-tokens 64] [--batch-size 32]
Both timings come from one run on the same prompts; the script prints tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ftsafety import data as D
from ftsafety import models
from ftsafety.evaluation.generate import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    model, tok, _ = models.load(args.model, device="auto")
    cfg = D.DataConfig(data=args.data)
    prompts = [D.format_prompt({"instruction": p["prompt"]}, cfg.template, tok) for p in D.harmful_eval_prompts(cfg, args.n)]
    generate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up
    rows = {}
    for name, bs in (("one_at_a_time", 1), ("batched", args.batch_size)):
        t0 = time.perf_counter()
        outs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=bs)
        secs = time.perf_counter() - t0
        toks = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
        rows[name] = {"seconds": round(secs, 2), "generated_tokens": toks, "tokens_per_s": round(toks / secs, 1), "outputs": outs}
    same = sum(a == b for a, b in zip(rows["one_at_a_time"].pop("outputs"), rows["batched"].pop("outputs")))
    speedup = rows["one_at_a_time"]["seconds"] / rows["batched"]["seconds"]
    report = {"model": args.model, "prompts": args.n, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), **rows, "identical_outputs": f"{same}/{args.n}",
              "speedup_wall_time": round(speedup, 2)}
    print(json.dumps(report, indent=2))
    print(f"batched evaluation is {speedup:.1f}x faster than one prompt at a time "
          f"({rows['batched']['tokens_per_s']} vs {rows['one_at_a_time']['tokens_per_s']} generated tokens/s)")


if __name__ == "__main__":
    main()
