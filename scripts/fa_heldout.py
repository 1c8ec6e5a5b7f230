"""FA of finished runs on task test items that a calibration did not look at (issue #15's held-out check).

Run as:  python scripts/fa_heldout.py --data ../shared/data [--task sst2] [--skip 300] [--limit 0]
         [--batch-size 100] [--max-new-tokens 6] [--out fa_heldout.json] LABEL=RUN_DIR [LABEL=RUN_DIR ...]

The small table's FA reads the first 300 SST-2 validation items, and its settings were chosen on them, so
a chosen setting's FA there is optimistic. This script scores the same models on the items after the
first `--skip` (572 for SST-2's 872), with the evaluator's decoding (greedy, `--max-new-tokens`) and the
task's scoring rule, and prints each model's FA with its 95% Wilson interval and its FA per gold label.
RUN_DIR is anything `--model` takes (a finished stage directory, an alias).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ftsafety import data as D
from ftsafety import models
from ftsafety.evaluation.evaluate import _score_fa
from ftsafety.evaluation.generate import generate
from ftsafety.evaluation.stats import wilson
from ftsafety.utils import write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--skip", type=int, default=300, help="test items to leave out from the start (default 300)")
    ap.add_argument("--limit", type=int, default=0, help="items after the skipped ones (0: all)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    a = ap.parse_args(argv)
    pairs = [r.split("=", 1) for r in a.runs]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        ap.error("each run is LABEL=RUN_DIR")
    data = D.DataConfig(data=a.data)
    exs = D.task_examples(data, a.task, "test", None)[a.skip:]
    exs = exs[: a.limit] if a.limit else exs
    if not exs:
        ap.error(f"no {a.task} test items after the first {a.skip}")
    out = {"task": a.task, "data": a.data, "items": f"{a.skip}..{a.skip + len(exs) - 1}", "runs": {}}
    for label, run in pairs:
        t0 = time.perf_counter()
        model, tok, _ = models.load(run, device="cpu")
        prompts = [D.format_prompt(e, data.template, tok) for e in exs]
        answers = generate(model, tok, prompts, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
        part, samples = _score_fa(a.task, exs, answers)  # the evaluator's FA: the task's rule, per gold label
        lo, hi = wilson(sum(s["correct"] for s in samples), part["fa_n"])
        res = {"run": run, "fa": round(part["fa"], 1), "n": part["fa_n"],
               "interval": [round(100 * lo, 1), round(100 * hi, 1)],
               "by_gold": part.get("fa_by_gold", {}), "seconds": round(time.perf_counter() - t0, 1)}
        out["runs"][label] = res
        per = ", ".join(f"{g} {v['fa']:.1f}" for g, v in res["by_gold"].items())
        print(f"{label}: FA {res['fa']:.1f} [{res['interval'][0]:.1f}, {res['interval'][1]:.1f}] n={res['n']}"
              f"{'  (' + per + ')' if per else ''}  {res['seconds']:.0f}s", flush=True)
    if a.out:
        write_json(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
