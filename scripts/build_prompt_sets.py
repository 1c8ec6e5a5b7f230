"""Write named harmful prompt sets as `prompts/<name>.jsonl` files with their hub fields, from the
original releases' public files, so that `--data DIR` reads them offline exactly as the hub would.

Run as:  python scripts/build_prompt_sets.py --out DIR \
             [--advbench harmful_behaviors.csv] [--strongreject strongreject_dataset.csv] \
             [--harmbench harmbench_behaviors_text_all.csv] [--jbb behaviors.csv | artifact.json]

The files come from the sets' own releases (MIT): AdvBench's `data/advbench/harmful_behaviors.csv`
(llm-attacks), StrongREJECT's `strongreject_dataset.csv`, HarmBench's
`data/behavior_datasets/harmbench_behaviors_text_all.csv` (its `standard` behaviours, as the hub's
`standard` config), and JailbreakBench's behaviours (its `behaviors.csv`, or any attack artifact JSON of
the JailbreakBench artifacts repository, whose 100 entries carry goal, behavior and category). Nothing
is downloaded and none of these texts is shipped with ftsafety: `--out` is the user's data directory.
Each output row keeps the hub set's field names (`ftsafety.prompt_sets.SETS`).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return [dict(r) for r in csv.DictReader(fh)]


def advbench(path: Path) -> list[dict]:
    """walledai/AdvBench fields: prompt, target (the release's goal, target)."""
    return [{"prompt": r["goal"].strip(), "target": r.get("target", "").strip()} for r in _csv(path) if r["goal"].strip()]


def strongreject(path: Path) -> list[dict]:
    """walledai/StrongREJECT fields: prompt, category, source (the release's forbidden_prompt, ...)."""
    return [{"prompt": r["forbidden_prompt"].strip(), "category": r.get("category", ""), "source": r.get("source", "")}
            for r in _csv(path) if r["forbidden_prompt"].strip()]


def harmbench(path: Path) -> list[dict]:
    """walledai/HarmBench `standard` fields: prompt, category (the standard behaviours only)."""
    return [{"prompt": r["Behavior"].strip(), "category": r.get("SemanticCategory", "")}
            for r in _csv(path) if r.get("FunctionalCategory", "standard") == "standard" and r["Behavior"].strip()]


def jbb(path: Path) -> list[dict]:
    """JailbreakBench/JBB-Behaviors (behaviors, harmful) fields: Index, Goal, Target, Behavior, Category, Source."""
    if path.suffix.lower() == ".json":
        entries = json.loads(path.read_text(encoding="utf-8"))["jailbreaks"]
        rows = [{"Index": int(e["index"]) + 1, "Goal": e["goal"].strip(), "Behavior": e.get("behavior", ""),
                 "Category": e.get("category", "")} for e in entries]
    else:
        rows = [{"Index": int(r.get("Index") or i), "Goal": r["Goal"].strip(), "Target": r.get("Target", ""),
                 "Behavior": r.get("Behavior", ""), "Category": r.get("Category", ""), "Source": r.get("Source", "")}
                for i, r in enumerate(_csv(path), 1)]
    return sorted(rows, key=lambda r: r["Index"])


BUILDERS = {"advbench": advbench, "strongreject": strongreject, "harmbench": harmbench, "jbb": jbb}


def main(argv: list[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="a data directory; the files go to OUT/prompts/")
    for name in BUILDERS:
        ap.add_argument(f"--{name}", type=Path, help=f"the {name} release file")
    args = ap.parse_args(argv)
    todo = {name: getattr(args, name) for name in BUILDERS if getattr(args, name) is not None}
    if not todo:
        ap.error("give at least one release file (--advbench, --strongreject, --harmbench, --jbb)")
    out = Path(args.out) / "prompts"
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, path in todo.items():
        if not path.is_file():
            sys.exit(f"error: {name}: no such file {path}")
        try:
            rows = BUILDERS[name](path)
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            sys.exit(f"error: {name}: {path} is not the release file (missing or bad field {exc})")
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out / f"{name}.jsonl")
        counts[name] = len(rows)
        print(f"{name}: {len(rows)} prompts -> {out / (name + '.jsonl')}")
    return counts


if __name__ == "__main__":
    main()
