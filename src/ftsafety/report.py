"""`ftsafety report RUNS_DIR`: the results table of a recipe's pipelines, rebuilt from their records.

Writes `table.md` (laid out like the papers' tables: one row per method, HS then FA per harmful ratio
p and their average, the paper's figure in parentheses), `table.csv`, `table.json` and `hs_fa.png`
(HS against FA per method). Every figure comes from the pipeline records that `ftsafety run` wrote
under RUNS_DIR/pipelines/<recipe>/, each of which points at its evaluation run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from ftsafety.errors import FtsafetyError
from ftsafety.evaluation.judges import judge_record
from ftsafety.evaluation.stats import two_proportion_p, wilson
from ftsafety.pipeline import RESULT_KEYS
from ftsafety.utils import atomic_write_text, check_name_lengths, run_lock, write_json

log = logging.getLogger(__name__)


def load_records(runs_dir: str | Path, recipe: str | None = None, judge=None, echo=None) -> tuple[str, list[dict]]:
    """A recipe's pipeline records, each with the results of its evaluation run; with `judge` (a judge
    object), of that evaluation re-judged by it (cached under RUNS_DIR/rejudged/)."""
    root = Path(runs_dir) / "pipelines"
    if not root.is_dir():
        raise FtsafetyError(f"{runs_dir}: no pipelines/ directory (run `ftsafety run RECIPE --runs {runs_dir}` first)")
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.json")))
    if not names:
        raise FtsafetyError(f"{root}: no pipeline records")
    if recipe is None:
        if len(names) > 1:
            raise FtsafetyError(f"{runs_dir} holds several recipes ({', '.join(names)}); pick one with --recipe")
        recipe = names[0]
    elif recipe not in names:
        raise FtsafetyError(f"{runs_dir}: no records of recipe {recipe!r}; found {', '.join(names)}")
    records, skipped = [], []
    for path in sorted((root / recipe).glob("*.json")):
        rec = read_json_object(path, "pipeline record")
        if "stages" not in rec and "recipe" not in rec:
            skipped.append(path)
            continue
        check_record(path, rec)
        ev = Path(rec["stages"][-1]["dir"])
        if judge is not None:
            ev = _rejudged(Path(runs_dir), ev, judge, echo)
            rec["judge"] = judge_record(judge)
        if (ev / "results.json").is_file():  # the evaluation run is the source of truth
            res = read_json_object(ev / "results.json", "evaluation result")
            check_results(ev / "results.json", res)
            rec["results"] = {k: res.get(k) for k in RESULT_KEYS}
        records.append(rec)
    if not records:
        raise FtsafetyError(f"{root / recipe}: no pipeline records"
                            + (f" ({len(skipped)} JSON file(s) that are not records)" if skipped else ""))
    for path in skipped:  # beside a table: say what was left out of it
        log.warning("%s: not a pipeline record (no recipe, no stages); skipped", path)
    records.sort(key=lambda r: (r.get("row_order", 0), r["p"]))
    return recipe, records


def _rejudged(runs_dir: Path, ev: Path, judge, echo=None) -> Path:
    """`ev` re-judged by `judge`, written once under RUNS_DIR/rejudged/ (named by the evaluation and the
    judge's name and weights) and reused after."""
    from ftsafety.evaluation.rejudge import rejudge, slug

    tag = (getattr(judge, "sha256", "") or judge.version)[:12]
    target = runs_dir / "rejudged" / f"{ev.name}-{slug(judge.name)}-{tag}"
    if not (target / "results.json").is_file():
        if echo is not None:
            echo(f"re-judging {ev.name} with {judge.name}")
        rejudge(ev, judge, target)
    return target


RATE_KEYS = ("hs", "hs_plus", "cr", "fa", "or")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from `path`; one line naming the file for anything else."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FtsafetyError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)}); not a readable {what}") from None
    except OSError as exc:
        raise FtsafetyError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(obj, dict):
        raise FtsafetyError(f"{path}: not {_a(what)} (expected a JSON object, got {type(obj).__name__})")
    return obj


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_results(path: Path, res: dict) -> None:
    """An evaluation's results.json as report and summary read it: rates finite in [0, 100] (or absent),
    counts whole and >= 0, the model a string and the judge an object with a name."""
    for k in RATE_KEYS:
        v = res.get(k)
        if v is not None and not (_number(v) and 0 <= v <= 100):
            raise FtsafetyError(f"{path}: {k} must be a rate in [0, 100], got {v!r}")
        n = res.get(f"{k}_n")
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise FtsafetyError(f"{path}: {k}_n must be a whole number >= 0, got {n!r}")
    if "model" in res and not isinstance(res["model"], str):
        raise FtsafetyError(f"{path}: model must be a string, got {res['model']!r:.60}")
    judge = res.get("judge", {})
    if not isinstance(judge, dict) or not isinstance(judge.get("name", ""), str):
        raise FtsafetyError(f"{path}: judge must be an object with a name, got {judge!r:.60}")


def check_record(path: Path, rec: dict) -> None:
    """A pipeline record as `ftsafety run` writes it; one line naming the file and the field otherwise."""
    if not isinstance(rec.get("row"), str):
        raise FtsafetyError(f"{path}: row must be a string, got {rec.get('row')!r:.60}")
    p = rec.get("p")
    if not (_number(p) and 0 <= p <= 1):
        raise FtsafetyError(f"{path}: p must be a number in [0, 1], got {p!r}")
    stages = rec.get("stages")
    if not isinstance(stages, list) or not stages or not all(
            isinstance(s, dict) and isinstance(s.get("dir"), str) and isinstance(s.get("kind"), str) for s in stages):
        raise FtsafetyError(f"{path}: stages must be a non-empty list of stages (each with a kind and a dir)")
    for key in ("results", "paper"):
        if not isinstance(rec.get(key, {}), dict):
            raise FtsafetyError(f"{path}: {key} must be an object, got {type(rec[key]).__name__}")
    check_results(path, rec.get("results", {}))
    for s in stages:
        if s.get("seconds") is not None and not _number(s["seconds"]):
            raise FtsafetyError(f"{path}: a stage's seconds must be a number, got {s['seconds']!r}")
    methods = rec.get("methods", [])
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise FtsafetyError(f"{path}: methods must be a list of strings")
    paper = rec.get("paper", {})
    for k in ("hs", "fa"):
        if paper.get(k) is not None and not _number(paper[k]):
            raise FtsafetyError(f"{path}: paper.{k} must be a number, got {paper[k]!r}")
    if not isinstance(paper.get("note", ""), str):
        raise FtsafetyError(f"{path}: paper.note must be a string")
    for k in ("model", "data", "task", "recipe"):
        if k in rec and not isinstance(rec[k], str):
            raise FtsafetyError(f"{path}: {k} must be a string, got {rec[k]!r:.60}")
    rec.setdefault("paper", {})
    rec.setdefault("results", {})


def _md(text) -> str:
    """Text for one Markdown table cell or list item: a '|' would start a new cell, a newline end the row."""
    return " ".join(str(text).splitlines()).replace("|", "\\|")


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def build_table(records: list[dict]) -> dict:
    """Rows (methods in recipe order) x columns (HS, FA and OR per p, plus their average)."""
    ratios = sorted({r["p"] for r in records})
    rows: dict[str, dict] = {}
    for rec in records:
        row = rows.setdefault(rec["row"], {"row": rec["row"], "methods": rec.get("methods", []),
                                           **{k: {} for m in METRICS for k in (m, f"{m}_n", f"paper_{m}")},
                                           "note": rec["paper"].get("note", ""), "seconds": {}})
        p = f"{rec['p']:g}"
        for m in METRICS:
            row[m][p] = rec["results"].get(m)
            row[f"{m}_n"][p] = rec["results"].get(f"{m}_n")
        row["paper_hs"][p] = rec["paper"].get("hs")
        row["paper_fa"][p] = rec["paper"].get("fa")
        row["seconds"][p] = sum(s.get("seconds") or 0 for s in rec["stages"])
    for row in rows.values():
        for m in METRICS:
            vals = [v for v in row[m].values() if v is not None]
            row[f"{m}_avg"] = sum(vals) / len(vals) if len(vals) == len(ratios) else None
    _intervals_and_tests(rows)
    sets = {k: sorted({str(rec["results"].get(f"{k}_prompts", d)) for rec in records})
            for k, d in (("hs", "beavertails"), ("or", "builtin"))}
    return {"ratios": [f"{p:g}" for p in ratios], "rows": list(rows.values()), "significance_alpha": ALPHA,
            "prompt_sets": sets, "stage_seconds": stage_seconds(records)}


STAGE_KINDS = ("align", "finetune", "post", "evaluate")


def stage_seconds(records: list[dict]) -> dict:
    """Where the table's time went: each distinct stage once (pipelines share stages), as recorded when it
    ran, summed by kind. {kind: {"stages": n, "seconds": s}, ..., "total": {...}}."""
    seen: dict[tuple, dict] = {}
    for rec in records:
        for s in rec["stages"]:
            seen.setdefault((s["kind"], s["method"], s.get("key") or s.get("dir")), s)
    out: dict[str, dict] = {}
    for (kind, _, _), s in seen.items():
        for k in (kind, "total"):
            slot = out.setdefault(k, {"stages": 0, "seconds": 0.0})
            slot["stages"] += 1
            slot["seconds"] = round(slot["seconds"] + (s.get("seconds") or 0.0), 2)
    order = [k for k in STAGE_KINDS if k in out] + sorted(k for k in out if k not in STAGE_KINDS and k != "total")
    return {k: out[k] for k in [*order, "total"] if k in out}


def _time_line(secs: dict) -> str:
    total = secs.get("total")
    if not total:
        return ""
    parts = ", ".join(f"{k} {v['stages']} ({v['seconds']:,.0f} s)" for k, v in secs.items() if k != "total")
    return (f"Time: {total['stages']} distinct stages, {total['seconds']:,.0f} s = {total['seconds'] / 3600:.2f} h "
            f"of stage time ({parts}), each stage counted once and timed when it ran (on a shared machine "
            "the seconds include the contention; a cached stage costs nothing on a rerun).")


def _count(rate: float | None, n: int | None) -> int | None:
    return None if rate is None or not n else round(rate * n / 100)


METRICS = ("hs", "cr", "fa", "or")  # harmful score, compliance rate, fine-tune accuracy, over-refusal
BASELINE, ALPHA = "SFT", 0.05  # each row is tested against the SFT row at the same p, two-sided, at 5%


def _intervals_and_tests(rows: dict[str, dict]) -> None:
    """Each HS/FA cell's 95% Wilson interval (from its n), and for every row but the baseline the
    two-sided two-proportion test against the baseline row at the same p (significant below ALPHA)."""
    base = rows.get(BASELINE)
    for row in rows.values():
        for m in METRICS:
            row[f"{m}_ci"], row[f"{m}_p_vs_sft"] = {}, {}
            for p, rate in row[m].items():
                n = row[f"{m}_n"].get(p)
                k = _count(rate, n)
                if k is None:
                    continue
                lo, hi = wilson(k, n)
                row[f"{m}_ci"][p] = [round(100 * lo, 1), round(100 * hi, 1)]
                if base is None or row is base:
                    continue
                nb = base[f"{m}_n"].get(p)
                kb = _count(base[m].get(p), nb)
                if kb is not None:
                    row[f"{m}_p_vs_sft"][p] = two_proportion_p(k, n, kb, nb)


def _cell(row: dict, m: str, p: str) -> str:
    """'12.5 [8.1, 18.3]*' : the rate, its 95% interval, * where it differs from SFT's at this p (p < ALPHA)."""
    text = _fmt(row[m].get(p))
    ci = row[f"{m}_ci"].get(p)
    if ci:
        text += f" [{ci[0]:.1f}, {ci[1]:.1f}]"
    pv = row[f"{m}_p_vs_sft"].get(p)
    if pv is not None and pv < ALPHA:
        text += "*"
    return text


def markdown(table: dict, meta: dict) -> str:
    ps = table["ratios"]
    shown = [m for m in METRICS if any(r[m].get(p) is not None for r in table["rows"] for p in ps)]
    worst = any(r.get("worst_case") for r in table["rows"])
    head = ["Method"] + [h for m in shown for h in [f"{m.upper()} p={p}" for p in ps] + [f"{m.upper()} avg"]
                         + (["HS worst case"] if m == "hs" and worst else [])]
    lines = [f"# {meta['title']}", "",
             f"{meta['date']} · {meta['machine']} · model `{meta['model']}` · data `{meta['data']}` · "
             f"task {meta['task']} · judge `{meta['judge']}`", "",
             f"Command: `{meta['command']}`", "",
             *([f"Every answer re-judged by `{meta['judge']}` from the evaluations' cached answers (nothing "
                "regenerated; FA and OR unchanged).", ""] if meta.get("rejudged") else []),
             "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for row in table["rows"]:
        cells = [_md(row["row"])]
        for m in shown:
            for p in ps:
                ours, paper = _cell(row, m, p), row[f"paper_{m}"].get(p)
                cells.append(ours if paper is None else f"{ours} ({paper:.1f})")
            cells.append(_fmt(row[f"{m}_avg"]))
            if m == "hs" and worst:
                cells.append(_worst_cell(row.get("worst_case")))
        lines.append("| " + " | ".join(cells) + " |")
    ns = sorted({", ".join(f"{m.upper()} n={r[f'{m}_n'].get(p)}" for m in shown) for r in table["rows"] for p in ps
                 if any(r[f"{m}_n"].get(p) for m in shown)})
    sets = table.get("prompt_sets", {})
    hs_set = "" if sets.get("hs", ["beavertails"]) == ["beavertails"] else f" ({', '.join(sets['hs'])})"
    or_set = "" if sets.get("or", ["builtin"]) == ["builtin"] else f" ({', '.join(sets['or'])})"
    lines += ["", f"HS: harmful score, % of held-out harmful prompts{hs_set} whose answer the judge flags (lower is better). "
              + ("CR: compliance rate, % of the same prompts whose answer is not a refusal (the judge's `compliance` "
                 "or `harmful`: agreed to help, with or without specific help; lower is better). " if "cr" in shown else "") +
              "FA: fine-tune accuracy, % of the task's test items answered correctly (higher is better). "
              + (f"OR: over-refusal, % of benign instructions{or_set} refused (lower is better). " if "or" in shown else "") +
              "p: share of harmful examples in the user's fine-tuning data. Averages are over the p columns. "
              "In brackets: the 95% Wilson interval of each rate"
              + (f" ({'; '.join(ns)})" if ns else "") + ". * : different from SFT at the same p "
              f"(two-sided two-proportion z-test, p < {ALPHA:g}); no star, no significant difference."]
    if worst:
        lines += ["", "HS worst case: the highest HS `ftsafety attack-search` found for the row among its trials "
                  "whose FA stayed within the search's FA drop of the row's benign fine-tune (95% interval; the "
                  "attack, the trial's knobs and the study's size beside it)."]
    if meta.get("paper_source"):
        lines += ["", f"In parentheses: the paper's figure — {meta['paper_source']}. "
                  "Our setting differs (model, data size, judge), so compare the direction of each change, "
                  "not the level."]
    notes = [f"- **{_md(r['row'])}**: {_md(r['note'])}" for r in table["rows"] if r["note"]]
    if notes:
        lines += ["", *notes]
    lines += ["", "Pipelines (stage:method, in order):", ""]
    lines += [f"- {_md(r['row'])}: {' → '.join(r['methods'])}" for r in table["rows"]]
    time_line = _time_line(table.get("stage_seconds", {}))
    if time_line:
        lines += ["", time_line]
    return "\n".join(lines) + "\n"


def _worst_cell(w: dict | None) -> str:
    if not w:
        return "–"
    ci = f" [{w['hs_ci'][0]:.1f}, {w['hs_ci'][1]:.1f}]" if w.get("hs_ci") else ""
    knobs = ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in w["params"].items())
    return f"{w['hs']:.1f}{ci} ({w['attack']}, {w['trials']} trials: {_md(knobs)})"


def to_csv(table: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "p", *(f"{m}{suffix}" for m in METRICS
                                 for suffix in ("", "_n", "_ci_low", "_ci_high", "_p_vs_sft")),
                "paper_hs", "paper_fa", "pipeline_seconds", "hs_worst_case", "hs_worst_case_attack"])
    for row in table["rows"]:
        for p in table["ratios"]:
            cells = [row["row"], p]
            for m in METRICS:
                ci = row[f"{m}_ci"].get(p) or [None, None]
                pv = row[f"{m}_p_vs_sft"].get(p)
                cells += [row[m].get(p), row[f"{m}_n"].get(p), *ci, None if pv is None else round(pv, 4)]
            wc = row.get("worst_case") or {}
            w.writerow([*cells, row["paper_hs"].get(p), row["paper_fa"].get(p), round(row["seconds"].get(p) or 0, 1),
                        wc.get("hs"), wc.get("attack")])
    return buf.getvalue()


def plot(table: dict, path: Path, title: str) -> bool:
    """HS against FA, one marker per method and p; False (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'ftsafety[plot]'): no %s", path.name)
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    markers = "os^Dv<>P*X"
    for i, row in enumerate(table["rows"]):
        pts = [(row["fa"].get(p), row["hs"].get(p), p) for p in table["ratios"]]
        pts = [t for t in pts if t[0] is not None and t[1] is not None]
        if not pts:
            continue
        ax.plot([t[0] for t in pts], [t[1] for t in pts], marker=markers[i % len(markers)], linestyle=":",
                label=row["row"])
        for fa, hs, p in pts:
            ax.annotate(f"p={p}", (fa, hs), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("FA: fine-tune accuracy (%)  → better")
    ax.set_ylabel("HS: harmful score (%)  ↓ better")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return True


def worst_cases(runs_dir: str | Path, recipe: str) -> dict[str, dict]:
    """Row -> its worst case under `ftsafety attack-search` (the feasible trial of highest HS over every
    attack searched for that row of `recipe`), from RUNS/attack-search/*.json; {} when none was run."""
    out: dict[str, dict] = {}
    for path in sorted((Path(runs_dir) / "attack-search").glob("*.json")):
        try:
            s = json.loads(path.read_text())
            ident, worst = s["identity"], s.get("worst_case")
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: not an attack-search summary; skipped", path)
            continue
        if ident.get("recipe") != recipe or not worst:
            continue
        cell = {"hs": worst["hs"], "hs_n": worst.get("hs_n"), "hs_ci": worst.get("hs_ci"), "fa": worst.get("fa"),
                "attack": ident["attack"], "params": worst["params"], "trial": worst["number"],
                "trials": len(s.get("trials", [])), "feasible": s.get("feasible")}
        if ident["row"] not in out or cell["hs"] > out[ident["row"]]["hs"]:
            out[ident["row"]] = cell
    return out


def write_report(runs_dir: str | Path, out_dir: str | Path, recipe: str | None = None,
                 command: str = "", judge=None, echo=None) -> dict:
    """Write the table files of a recipe's runs to `out_dir`; with `judge` (a judge object), every
    evaluation re-judged by it from its cached answers."""
    name, records = load_records(runs_dir, recipe, judge, echo)
    table = build_table(records)
    worst = {} if judge is not None else worst_cases(runs_dir, name)  # a search is scored by its own judge
    for row in table["rows"]:
        row["worst_case"] = worst.get(row["row"])
    first = records[0]
    env = first.get("environment_eval", {})
    meta = {
        "title": f"ftsafety results: {name}", "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(env), "model": first["model"], "data": first["data"], "task": first["task"],
        "judge": first.get("judge", {}).get("name", "?"), "paper_source": first.get("paper_source", ""),
        "rejudged": judge is not None,
        "command": command or f"ftsafety report {runs_dir}",
    }
    with run_lock(out_dir):
        out = check_report_dir(out_dir)
        for stale in out.glob(".report-*"):  # a writer killed (SIGKILL, SIGTERM) mid-way; the lock says none is live
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
        try:  # every file is made first, then all are moved into place together
            atomic_write_text(staging / "table.md", markdown(table, meta))
            atomic_write_text(staging / "table.csv", to_csv(table))
            write_json(staging / "table.json", {"meta": meta, **table})
            plot(table, staging / "hs_fa.png", f"{name}: HS vs FA ({meta['model']}, judge {meta['judge']})")
            _move_together(staging, out, REPORT_FILES)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {"meta": meta, "table": table, "out": str(out)}


REPORT_FILES = ("table.md", "table.csv", "table.json", "hs_fa.png")


def _ours(out: Path) -> bool:
    """Whether the report files in `out` are an earlier report's (its table.json names its rows and meta)."""
    try:
        obj = json.loads((out / "table.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and {"meta", "rows", "ratios"} <= set(obj)


def check_report_dir(out_dir: str | Path) -> Path:
    """The report folder, created if needed; one line when it cannot be written, or when it holds a
    table.md / table.csv / table.json / hs_fa.png that no earlier report wrote (a user's own files are
    never replaced; other files in the folder are left alone)."""
    out = Path(out_dir)
    check_name_lengths(out, "report folder")
    if out.exists() and not out.is_dir():
        raise FtsafetyError(f"report folder {out} exists and is not a directory (choose another --out)")
    present = [n for n in REPORT_FILES if (out / n).exists()]
    if present and not _ours(out):
        raise FtsafetyError(f"report folder {out} holds {', '.join(present)} that no ftsafety report wrote; refusing "
                            "to replace them (choose another --out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".ftsafety-probe-", dir=out))
    except OSError as exc:
        raise FtsafetyError(f"report folder {out} cannot be written ({exc.strerror or exc})") from None
    return out


def _move_together(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    """Rename each file of `src` over `dst` with SIGINT/SIGTERM held back: the folder never shows half of
    the new report beside half of the old one (a held signal is delivered right after)."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        for name in names:
            if (src / name).exists():
                os.replace(src / name, dst / name)
            elif (dst / name).exists():  # an old plot the new report could not draw (no matplotlib)
                os.unlink(dst / name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _machine(env: dict) -> str:
    cuda = env.get("cuda")
    threads = env.get("cpu_threads")
    if cuda:
        return f"{cuda}"
    return f"{platform.machine()} CPU, {threads} threads" if threads else platform.machine()
