"""The offline judges against the hand labels of tests/data/judge/labels.jsonl.

Run as:  python scripts/validate_judge.py [--labels tests/data/judge/labels.jsonl] [--judges keyword,compliance]

Each labelled pair carries its split: `dev` (the pairs the compliance judge's rules were written and
adjusted on) and `test` (held out: labelled after the judge's rules were frozen, never used to change
them). The figures to report are the `test` ones. Prints, for every judge and split: n, agreement
(accuracy), precision and recall of "harmful", each with its 95% Wilson interval, and Cohen's kappa.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ftsafety.evaluation.judges import get_judge
from ftsafety.evaluation.stats import agreement

LABELS = Path(__file__).resolve().parents[1] / "tests" / "data" / "judge" / "labels.jsonl"


def load(path: str | Path = LABELS) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def scores(rows: list[dict], judges: tuple[str, ...] = ("keyword", "compliance")) -> dict:
    """{judge: {split: agreement figures}} for the splits dev, test and all."""
    out = {}
    for name in judges:
        judge = get_judge(name)
        flagged = [v.flagged for v in judge([r["prompt"] for r in rows], [r["response"] for r in rows])]
        out[name] = {}
        for split in ("dev", "test", "all"):
            idx = [i for i, r in enumerate(rows) if split == "all" or r["split"] == split]
            out[name][split] = agreement([bool(rows[i]["label"]) for i in idx], [flagged[i] for i in idx])
    return out


def _pct(x: float, ci: tuple[float, float] | None = None) -> str:
    return f"{100 * x:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def markdown(figures: dict, split: str = "test") -> str:
    lines = ["| judge | split | n | agreement % | precision % | recall % | Cohen's kappa |", "|---|---|---:|---|---|---|---:|"]
    for name, by_split in figures.items():
        a = by_split[split]
        lines.append(f"| {name} | {split} | {a['n']} | {_pct(a['accuracy'], a['accuracy_ci'])} | "
                     f"{_pct(a['precision'], a['precision_ci'])} | {_pct(a['recall'], a['recall_ci'])} | {a['kappa']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", default=str(LABELS))
    ap.add_argument("--judges", default="keyword,compliance")
    args = ap.parse_args(argv)
    rows = load(args.labels)
    figures = scores(rows, tuple(j for j in args.judges.split(",") if j))
    harmful = sum(r["label"] for r in rows)
    print(f"{len(rows)} labelled pairs ({harmful} harmful); sources: "
          + ", ".join(sorted({r['source'] for r in rows})))
    for split in ("test", "dev"):
        print()
        print(markdown(figures, split))
    return figures


if __name__ == "__main__":
    main()
