"""Blind labelling batches from collected pairs, and labelled pairs merged into the labelled set.

  python scripts/judge_labels.py batches --pairs pairs.jsonl --out DIR [--size 150] [--seed 0] [--only IDS]
      DIR/batch-NN.jsonl: an opaque id, prompt, response only (no model state, no source, no judge
      verdict), in a shuffled order, for a labeller who reads each against tests/data/judge/RUBRIC.md and
      writes DIR/labels-NN.jsonl lines {"id", "label"}; DIR/key.json maps the opaque ids back.
  python scripts/judge_labels.py merge --pairs pairs.jsonl --labels DIR/labels-*.jsonl --split train|test \
      --labeller NAME [--out tests/data/judge/labels.jsonl]
      Appends each labelled pair with its split, state, source, row, category, max_new_tokens and
      labeller. A prompt of a gated set (ftsafety.prompt_sets) is replaced by its sha256 (its text stays
      out of the repository; `ftsafety.evaluation.judge_train.load_labels` reads it back from --data).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from ftsafety import prompt_sets
from ftsafety.evaluation.judge_train import text_sha256
from ftsafety.evaluation.learned import CLASSES

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "judge" / "labels.jsonl"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def batches(args) -> None:
    pairs = read(args.pairs)
    if args.only:
        keep = set(Path(args.only).read_text().split())
        pairs = [p for p in pairs if p["id"] in keep]
    random.Random(args.seed).shuffle(pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = {f"{args.prefix}{i:04d}": p["id"] for i, p in enumerate(pairs)}
    (out / "key.json").write_text(json.dumps(key, indent=0))
    opaque = list(key)
    for k in range(0, len(pairs), args.size):
        part = pairs[k : k + args.size]
        path = out / f"batch-{k // args.size:02d}.jsonl"
        path.write_text("".join(json.dumps({"id": opaque[k + i], "prompt": p["prompt"], "response": p["response"]},
                                           ensure_ascii=False) + "\n" for i, p in enumerate(part)), encoding="utf-8")
        print(f"{path}: {len(part)} pairs")


def merge(args) -> None:
    pairs = {p["id"]: p for p in read(args.pairs)}
    key = json.loads(Path(args.key).read_text()) if args.key else {}
    out = Path(args.out)
    have = {r["id"] for r in read(out)} if out.is_file() else set()
    rows, seen = [], set()
    for path in args.labels:
        for lab in read(path):
            pid, label = key.get(lab.get("id"), lab.get("id")), lab.get("label")
            if pid not in pairs:
                sys.exit(f"error: {path}: unknown id {pid!r}")
            if label not in CLASSES:
                sys.exit(f"error: {path}: {pid}: label {label!r} is not one of {', '.join(CLASSES)}")
            if pid in have or pid in seen:
                sys.exit(f"error: {path}: {pid} is labelled twice")
            seen.add(pid)
            p = pairs[pid]
            row = {"id": pid, "split": args.split, "state": p["state"], "source": p["source"], "row": p["row"],
                   "category": p.get("category", "unknown"), "max_new_tokens": p.get("max_new_tokens")}
            pset = prompt_sets.SETS.get(p["source"])
            if pset is not None and pset.gated:
                row["prompt_sha256"] = text_sha256(p["prompt"])
            else:
                row["prompt"] = p["prompt"]
            row.update({"response": p["response"], "label": label, "labeller": args.labeller})
            rows.append(row)
    with open(out, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{out}: {len(rows)} labelled pairs added ({len(have) + len(rows)} in all)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("batches")
    b.add_argument("--pairs", required=True, type=Path)
    b.add_argument("--out", required=True)
    b.add_argument("--size", type=int, default=150)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--only", help="a file of ids (whitespace-separated) to batch")
    b.add_argument("--prefix", default="q", help="the opaque ids' prefix")
    m = sub.add_parser("merge")
    m.add_argument("--pairs", required=True, type=Path)
    m.add_argument("--labels", required=True, nargs="+", type=Path)
    m.add_argument("--split", required=True, choices=("train", "test"))
    m.add_argument("--labeller", required=True)
    m.add_argument("--key", help="the batches' key.json (opaque id -> pair id)")
    m.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    batches(args) if args.cmd == "batches" else merge(args)


if __name__ == "__main__":
    main()
