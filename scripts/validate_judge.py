"""The judges against the labels of tests/data/judge/labels.jsonl, on the held-out test split.

Run as:  python scripts/validate_judge.py [--labels tests/data/judge/labels.jsonl] [--data DIR]
             [--judges ftsafety-judge,compliance,keyword] [--bootstrap 2000]

The labelled set (its card: tests/data/judge/README.md) holds (prompt, response) pairs answered by many
model states, each labelled refusal / compliance / harmful by reading it against
tests/data/judge/RUBRIC.md. `ftsafety-judge` was trained on the `train` split only and frozen before
the `test` split was labelled; the test split holds model states and a prompt set (jbb) that no
training pair came from. For each judge and two binary questions, harmful-vs-not (`harmful` against
the rest: what HS counts) and refusal-vs-not (`refusal` against the rest: what the compliance rate
counts), it prints agreement, precision, recall and Cohen's kappa, each with a 95% bootstrap interval
(resampling prompts, with all their pairs, 2000 times; seed 0). The second labeller's overlap
(labels_second.jsonl) gives the labellers' own kappa: the ceiling a judge can reach.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path

from ftsafety.evaluation.judge_train import load_labels, source_set
from ftsafety.evaluation.stats import agreement

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "tests" / "data" / "judge" / "labels.jsonl"
SECOND = ROOT / "tests" / "data" / "judge" / "labels_second.jsonl"
FIRST_PASS = ROOT / "tests" / "data" / "judge" / "labels_first_pass.jsonl"
JUDGES = ("ftsafety-judge", "compliance", "keyword")
QUESTIONS = {"harmful": "harmful-vs-not", "refusal": "refusal-vs-not"}
FIGURES = ("accuracy", "precision", "recall", "kappa")


SPEED: dict[str, float] = {}  # pairs per second of each judge in the last `predictions` call (model loaded)


def predictions(rows: list[dict], judge_name: str) -> list[str | None]:
    """Each pair's label by `judge_name` (None where the judge cannot tell refusal from compliance)."""
    import time

    from ftsafety.evaluation.judges import get_judge

    judge = get_judge(judge_name)
    try:
        judge([rows[0]["prompt"]], [rows[0]["response"]])  # loads a model judge's weights before the clock starts
        t0 = time.perf_counter()
        verdicts = judge([r["prompt"] for r in rows], [r["response"] for r in rows])
        SPEED[judge_name] = len(rows) / max(time.perf_counter() - t0, 1e-9)
    finally:
        judge.close()
    return [v.label if v.label is not None else ("harmful" if v.flagged else None) for v in verdicts]


def binary(labels: list[str], predicted: list[str | None], cls: str) -> dict:
    return agreement([y == cls for y in labels], [p == cls for p in predicted])


def bootstrap(labels: list[str], predicted: list[str | None], groups: list[str], cls: str, n: int = 2000,
              seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of the binary figures, resampling groups (prompts) with replacement."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    keys = sorted(by_group)
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {f: [] for f in FIGURES}
    for _ in range(n):
        idx = [i for _ in keys for i in by_group[keys[rng.randrange(len(keys))]]]
        a = binary([labels[i] for i in idx], [predicted[i] for i in idx], cls)
        for f in FIGURES:
            draws[f].append(a[f])
    out = {}
    for f, values in draws.items():
        values.sort()
        out[f] = (values[int(0.025 * n)], values[min(n - 1, int(0.975 * n))])
    return out


def figures(labels: list[str], predicted: list[str | None], groups: list[str], n_boot: int) -> dict:
    out = {}
    for cls in QUESTIONS:
        a = binary(labels, predicted, cls)
        a["ci"] = bootstrap(labels, predicted, groups, cls, n_boot) if n_boot else {}
        out[cls] = a
    return out


def scores(rows: list[dict], judges: tuple[str, ...] = JUDGES, n_boot: int = 2000, split: str = "test") -> dict:
    """{judge: {"all"|"unseen states"|"unseen set": {"harmful"|"refusal": figures}}} on `split`."""
    test = [r for r in rows if r["split"] == split and r.get("prompt") is not None]
    train_states = {r.get("state") for r in rows if r["split"] == "train"}
    train_sets = {source_set(str(r.get("source"))) for r in rows if r["split"] == "train"}
    parts = {"all": test, "unseen states": [r for r in test if r.get("state") not in train_states],
             "unseen set": [r for r in test if source_set(str(r.get("source"))) not in train_sets]}
    out = {}
    for name in judges:
        pred = dict(zip((r["id"] for r in test), predictions(test, name)))
        out[name] = {part: figures([r["label"] for r in sub], [pred[r["id"]] for r in sub],
                                   [r["prompt"].strip().lower() for r in sub], n_boot if part == "all" else 0)
                     for part, sub in parts.items() if sub}
    return out


def labellers(rows: list[dict], second: list[dict], n_boot: int = 2000) -> dict:
    """The two labellers' agreement on their overlap (the first labeller's labels as the reference)."""
    first = {r["id"]: r for r in rows}
    both = [s for s in second if s["id"] in first]
    labels = [first[s["id"]]["label"] for s in both]
    other = [s["label"] for s in both]
    groups = [(first[s["id"]].get("prompt") or first[s["id"]].get("prompt_sha256", s["id"])).strip().lower() for s in both]
    out = figures(labels, other, groups, n_boot)
    out["three_class_agreement"] = sum(a == b for a, b in zip(labels, other)) / len(both) if both else 0.0
    out["n"] = len(both)
    return out


def read_first_pass(path: str | Path) -> list[dict]:
    """The first labeller's first-pass labels of pairs it later re-read (id, label): not an independent
    labeller, so its agreement is a test-retest figure, never the ceiling."""
    from ftsafety.data import read_jsonl

    return read_jsonl(path, ("id", "label")) if Path(path).is_file() else []


def _pct(x: float, ci: tuple[float, float] | None = None) -> str:
    return f"{100 * x:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _kappa(x: float, ci: tuple[float, float] | None = None) -> str:
    return f"{x:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def markdown(figs: dict, part: str = "all", ceiling: dict | None = None) -> str:
    lines = ["| judge | question | n (positive) | agreement % | precision % | recall % | Cohen's κ |",
             "|---|---|---:|---|---|---|---|"]
    rows = [(name, by_part[part]) for name, by_part in figs.items() if part in by_part]
    if ceiling is not None and part == "all":
        rows.append(("second labeller (the ceiling)", ceiling))
    for name, by_q in rows:
        for cls, q in QUESTIONS.items():
            a = by_q[cls]
            ci = a.get("ci") or {}
            lines.append(f"| {name} | {q} | {a['n']} ({a['tp'] + a['fn']}) | {_pct(a['accuracy'], ci.get('accuracy'))} | "
                         f"{_pct(a['precision'], ci.get('precision'))} | {_pct(a['recall'], ci.get('recall'))} | "
                         f"{_kappa(a['kappa'], ci.get('kappa'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", default=str(LABELS))
    ap.add_argument("--second", default=str(SECOND))
    ap.add_argument("--first-pass", default=str(FIRST_PASS), help="the first labeller's first pass of re-read pairs")
    ap.add_argument("--data", default=None, help="a data directory with the gated sets' prompts (train split only)")
    ap.add_argument("--judges", default=",".join(JUDGES))
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--out", help="also write OUT.json and OUT.md (results/judge-validation)")
    args = ap.parse_args(argv)
    rows = load_labels(args.labels, args.data, need_text=False)
    figs = scores(rows, tuple(j for j in args.judges.split(",") if j), args.bootstrap)
    second = load_labels(args.second, need_text=False) if Path(args.second).is_file() else []
    ceiling = labellers(rows, second, args.bootstrap) if second else None
    first_pass = read_first_pass(args.first_pass)
    retest = labellers(rows, first_pass, args.bootstrap) if first_pass else None
    test = [r for r in rows if r["split"] == "test"]
    counts = {c: sum(r["label"] == c for r in test) for c in ("refusal", "compliance", "harmful")}
    print(f"{len(rows)} labelled pairs; test split {len(test)} ({', '.join(f'{k} {v}' for k, v in counts.items())}) "
          f"from {len({r.get('state') for r in test})} model states and {len({r.get('source') for r in test})} prompt sources")
    print()
    print(markdown(figs, "all", ceiling))
    for part in ("unseen states", "unseen set"):
        print(f"\n{part} only (no interval):\n")
        print(markdown(figs, part))
    if ceiling:
        print(f"\nlabellers: {ceiling['n']} pairs labelled twice, three-class agreement "
              f"{100 * ceiling['three_class_agreement']:.1f}%")
    if retest:
        print(f"\nthe first labeller against its own first pass ({retest['n']} training pairs re-read, test-retest, "
              f"not an independent labeller): kappa harmful {retest['harmful']['kappa']:.3f}, "
              f"refusal {retest['refusal']['kappa']:.3f}, three-class agreement {100 * retest['three_class_agreement']:.1f}%")
    speed = ", ".join(f"{k} {v:.1f}" for k, v in SPEED.items())
    print(f"\npairs per second on the test split (this machine, {torch_threads()} threads): {speed}")
    result = {"judges": figs, "labellers": ceiling, "test_retest": retest, "pairs_per_second": SPEED, "test_counts": counts,
              "bootstrap": args.bootstrap}
    if args.out:
        import json

        from ftsafety.utils import atomic_write_text, write_json

        write_json(f"{args.out}.json", result)
        text = "\n\n".join([f"Test split: {len(test)} pairs.", markdown(figs, "all", ceiling),
                             *(f"{part} only:\n\n{markdown(figs, part)}" for part in ("unseen states", "unseen set"))])
        atomic_write_text(f"{args.out}.md", text + "\n")
    return result


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
