"""Collect (prompt, response) pairs from several models for the judge's labelled set (tests/data/judge/).

Run as:  python scripts/judge_set.py --data ../shared/data --out pairs.jsonl \
             --model unaligned=smollm2-135m --model sft=runs/.../align ... [--per-model 24] [--max-new-tokens 64]

The prompts are BeaverTails' *calibration* prompts (`harmful_calibration.jsonl`), which no table reports
HS on; model k answers prompts offset + k*per_model onwards, per_model of them (wrapping), so the set covers many
prompts. Greedy generation, the evaluator's Alpaca template and `generate`. Each line: source, category,
id, source, category, prompt, response (no label: labels are added by reading each pair against
tests/data/judge/RUBRIC.md; the split, dev or test, follows from the id: crc32(id) % 5 < 2 is dev).
"""

from __future__ import annotations

import argparse
import json

from ftsafety import data as D
from ftsafety import models
from ftsafety.evaluation.generate import generate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=MODEL (alias, hub id or run directory)")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--per-model", type=int, default=24)
    ap.add_argument("--offset", type=int, default=0, help="first calibration prompt (model k starts at offset + k*per_model)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cfg = D.DataConfig(data=args.data)
    pool = D.harmful_examples(cfg, "calibration")
    with open(args.out, "a") as fh:
        for k, spec in enumerate(args.model):
            name, _, path = spec.partition("=")
            net, tok, _ = models.load(path, device="cpu")
            start = args.offset + k * args.per_model
            items = [pool[(start + i) % len(pool)] for i in range(args.per_model)]
            prompts = [D.format_prompt({"instruction": it["instruction"], "input": ""}, cfg.template, tok) for it in items]
            outs = generate(net, tok, prompts, args.max_new_tokens, args.batch_size)
            for i, (it, out) in enumerate(zip(items, outs)):
                fh.write(json.dumps({"id": f"{name}-{i:02d}", "source": name, "category": it["category"],
                                     "prompt": it["instruction"], "response": out}) + "\n")
            fh.flush()
            print(f"{name}: {len(outs)} pairs", flush=True)
            del net


if __name__ == "__main__":
    main()
