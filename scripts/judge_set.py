"""Collect unlabelled (prompt, response) pairs from several model states for the judge's labelled set.

Run as:  python scripts/judge_set.py --data DIR --out pairs.jsonl \
             --state base=smollm2-135m --state sft-p0.2=runs/.../finetune-sft-... ... \
             --prompts beavertails-calibration --prompts advbench:0:400 ... [--per-state 135]

Prompt sources (`--prompts NAME[:START:END]`, rows START..END-1 of the source):
  beavertails-calibration, beavertails-eval   BeaverTails from --data (a directory, hub or builtin)
  builtin-calibration, builtin-eval           the project's own harmful prompts (ftsafety.builtin_data)
  advbench, strongreject, harmbench, jbb, ... a named prompt set (ftsafety.prompt_sets) from --data
The sources are interleaved in proportion to their sizes into one pool; state k answers the pool's items
k*per_state ... (k+1)*per_state - 1 (wrapping), so consecutive states see different prompts and every prompt
is answered by about (states * per_state / pool size) states. Each answer is greedy, in the evaluator's
template, with 64 or 128 new tokens (one third of the pairs, chosen by a hash of the pair's id, get 128:
the table scores 64, `ftsafety evaluate` 128 by default).

Each output line: id (state:source:row), state, source, row, category, prompt, response, max_new_tokens;
no label (labels are added by reading each pair against tests/data/judge/RUBRIC.md).
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

from ftsafety import data as D
from ftsafety import models, prompt_sets
from ftsafety.evaluation.generate import generate
from ftsafety.evaluation.judge_train import source_set

LONG = 128  # new tokens for a third of the pairs, SHORT for the rest
SHORT = 64


def source_rows(spec: str, cfg: D.DataConfig) -> tuple[str, list[dict]]:
    """(source name, [{"row", "prompt", "category"}]) of one --prompts spec."""
    name, *bounds = spec.split(":")
    if source_set(name) != name:
        origin, split = name.split("-", 1)
        data = cfg if origin == "beavertails" else D.DataConfig(data="builtin")
        rows = [{"prompt": r["prompt"], "category": D._category(r)} for r in D.rows(data, "beavertails", split)]
    else:
        rows = prompt_sets.items(name, "harmful", cfg)
    indexed = [{"row": i, **r} for i, r in enumerate(rows)]
    start, end = (int(bounds[0]), int(bounds[1])) if bounds else (0, len(indexed))
    return name, indexed[start:end]


def interleave(sources: list[tuple[str, list[dict]]]) -> list[dict]:
    """One pool, each source spread evenly through it (item i of a source of size n sits at i/n)."""
    keyed = [((i + 0.5) / len(rows), k, {"source": name, **r})
             for k, (name, rows) in enumerate(sources) for i, r in enumerate(rows)]
    return [item for _, _, item in sorted(keyed, key=lambda t: (t[0], t[1]))]


def max_new_tokens(pair_id: str) -> int:
    return LONG if zlib.crc32(pair_id.encode()) % 3 == 0 else SHORT


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", action="append", required=True, help="NAME=MODEL (alias, hub id or run directory)")
    ap.add_argument("--prompts", action="append", required=True, help="NAME[:START:END], repeatable")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--per-state", type=int, default=135)
    ap.add_argument("--first-state", type=int, default=0, help="pool position of the first state (k offset)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cfg = D.DataConfig(data=args.data)
    pool = interleave([source_rows(s, cfg) for s in args.prompts])
    out = Path(args.out)
    done = {json.loads(line)["state"] for line in out.read_text().splitlines()} if out.is_file() else set()
    for k, spec in enumerate(args.state, args.first_state):
        name, _, path = spec.partition("=")
        if name in done:
            print(f"{name}: already in {out}, skipped", flush=True)
            continue
        items = [dict(pool[(k * args.per_state + i) % len(pool)]) for i in range(args.per_state)]
        for it in items:
            it["id"] = f"{name}:{it['source']}:{it['row']}"
            it["max_new_tokens"] = max_new_tokens(it["id"])
        net, tok, _ = models.load(path, device="cpu")
        lines = []
        for mnt in (SHORT, LONG):
            part = [it for it in items if it["max_new_tokens"] == mnt]
            prompts = [D.format_prompt({"instruction": it["prompt"], "input": ""}, cfg.template, tok) for it in part]
            outs = generate(net, tok, prompts, mnt, args.batch_size) if prompts else []
            for it, response in zip(part, outs):
                lines.append({"id": it["id"], "state": name, "source": it["source"], "row": it["row"],
                              "category": it["category"], "prompt": it["prompt"], "response": response,
                              "max_new_tokens": mnt})
        lines.sort(key=lambda r: [it["id"] for it in items].index(r["id"]))
        with open(out, "a", encoding="utf-8") as fh:  # one state at a time: an interrupted run keeps the others
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
        print(f"{name}: {len(lines)} pairs from {path}", flush=True)
        del net


if __name__ == "__main__":
    main()
