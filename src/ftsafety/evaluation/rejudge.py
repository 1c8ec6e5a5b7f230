"""Re-judge an evaluation without regenerating: score the answers in its `samples.jsonl` with another
judge and write a new evaluation run (HS, CR and per-category HS from the new judge; FA and OR, which
no judge decides, and the answers themselves copied unchanged).

Used by `ftsafety report RUNS --judge NAME` (every evaluation of a table, cached under
RUNS/rejudged/) and by `ftsafety run` when a recipe's judge changes (the cached evaluation with the
same model and settings is re-judged instead of generated again).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import yaml

from ftsafety.errors import FtsafetyError
from ftsafety.evaluation.evaluate import score_hs
from ftsafety.evaluation.judges import judge_record
from ftsafety.rundir import write_run
from ftsafety.utils import locks_output, write_jsonl

JUDGED_KEYS = ("hs", "hs_plus", "hs_n", "hs_by_category", "cr", "cr_n", "labels")  # what a judge decides


def read_evaluation(run: Path) -> tuple[dict, list[dict], dict]:
    """(results, samples, config) of a finished evaluation run; one line for anything missing or broken."""
    from ftsafety import data as D

    try:
        results = json.loads((run / "results.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except FileNotFoundError as exc:
        raise FtsafetyError(f"{run}: not a finished evaluation (no {Path(exc.filename).name})") from None
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FtsafetyError(f"{run}: unreadable evaluation ({type(exc).__name__})") from None
    samples = D.read_jsonl(run / "samples.jsonl") if (run / "samples.jsonl").is_file() else []
    if results.get("hs_n") and len([s for s in samples if s.get("kind") == "harmful"]) != results["hs_n"]:
        raise FtsafetyError(f"{run}: samples.jsonl does not hold the {results['hs_n']} judged answers")
    return results, samples, config


@locks_output("out")
def rejudge(run: str | Path, judge, out: str | Path) -> dict:
    """Write `out`, the evaluation `run` re-judged by `judge` (a judge object); returns its results."""
    run = Path(run)
    t0 = time.perf_counter()
    results, samples, config = read_evaluation(run)
    harmful = [s for s in samples if s.get("kind") == "harmful"]
    new = {k: v for k, v in results.items() if k not in JUDGED_KEYS}
    new_samples = [s for s in samples if s.get("kind") != "harmful"]
    if harmful:
        items = [{"prompt": s["prompt"], "category": s.get("category", "unknown")} for s in harmful]
        part, judged = score_hs(judge, items, [s["response"] for s in harmful])
        for old, s in zip(harmful, judged):  # keep what the generation recorded beside each answer
            s.update({k: v for k, v in old.items() if k not in s and k not in ("flagged", "verdict", "label")})
        new.update(part)
        new_samples = judged + new_samples
    new["judge"] = judge_record(judge)
    new["rejudged_from"] = {"run": str(run), "judge": results.get("judge", {})}
    new.setdefault("timings", {})["rejudge_s"] = round(time.perf_counter() - t0, 2)
    config = {**config, "judge": judge.name}
    return write_run(out, config=config, results_file="results.json", results=new,
                     files=lambda tmp: write_jsonl(tmp / "samples.jsonl", new_samples))


def slug(judge_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", judge_name).strip("-") or "judge"
