"""Does a defense beat its baseline? The answer issue #29 asks of Booster and Vaccine, from a table's runs.

Run as:  python scripts/defense_answer.py RUNS_DIR [--recipe paper-small]
             [--pair "Vaccine=SFT" --pair "Booster (continued LoRA)=SFT (continued LoRA)"]
             [--drift-n 64] [--out results/paper-small]

For each (defense row, baseline row) pair and each p > 0 of the table:
  * HS of both with 95% Wilson intervals and the two-sided two-proportion test; FA of both and the
    difference. The defense *works* at that p when its HS is significantly below the baseline's
    (p < 0.05) with FA within 3 points of it (the issue's criterion);
  * the distance the fine-tune moved each model: Vaccine's embedding drift on alignment data and the
    weights' distance (`ftsafety.evaluation.drift`), fine-tuned model against its own aligned model;
  * the loss curves of every alignment and fine-tune stage of the pairs (`losses.png`).
Writes `answer.md` and `answer.json` (atomically) to --out; prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ftsafety.errors import FtsafetyError
from ftsafety.evaluation.stats import two_proportion_p, wilson
from ftsafety.report import load_records
from ftsafety.utils import atomic_write_text, write_json

FA_MARGIN = 3.0  # points: "FA within 3 points" of the baseline
ALPHA = 0.05


def _count(rate: float, n: int) -> int:
    return round(rate * n / 100)


def _stage(rec: dict, kind: str) -> str | None:
    return next((s["dir"] for s in rec["stages"] if s["kind"] == kind), None)


def _aligned_dir(rec: dict) -> str | None:
    """The model the fine-tune started from: its parent (the align stage, or the base model)."""
    ft = _stage(rec, "finetune")
    if ft is None:
        return None
    try:
        return json.loads((Path(ft) / "stage.json").read_text())["parent"]
    except (OSError, ValueError, KeyError):
        return _stage(rec, "align")


def compare(d: dict, b: dict) -> dict:
    """One p: HS and FA of defense `d` and baseline `b` (records), with intervals and the test."""
    out = {}
    for m in ("hs", "fa"):
        rd, rb = d["results"][m], b["results"][m]
        nd, nb = d["results"][f"{m}_n"], b["results"][f"{m}_n"]
        kd, kb = _count(rd, nd), _count(rb, nb)
        out[m] = {"defense": rd, "baseline": rb, "n": [nd, nb],
                  "defense_ci": [round(100 * x, 1) for x in wilson(kd, nd)],
                  "baseline_ci": [round(100 * x, 1) for x in wilson(kb, nb)],
                  "p_value": two_proportion_p(kd, nd, kb, nb)}
    hs_cut = out["hs"]["defense"] < out["hs"]["baseline"] and out["hs"]["p_value"] < ALPHA
    fa_kept = abs(out["fa"]["defense"] - out["fa"]["baseline"]) <= FA_MARGIN
    out["works"] = bool(hs_cut and fa_kept)
    out["hs_cut_significant"], out["fa_within_margin"] = bool(hs_cut), bool(fa_kept)
    return out


def _losses(stage_dir: str) -> list[tuple[int, float]]:
    path = Path(stage_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kinds = sorted({k.split(": ")[0] for k in curves})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        drawn = 0
        for name, pts in curves.items():
            if name.startswith(kind + ": ") and pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], label=name.split(": ", 1)[1])
                drawn += 1
        ax.set_title(f"{kind} loss" + ("" if drawn else " (no logged steps)"))
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def answer(runs: Path, recipe: str | None, pairs: list[tuple[str, str]], drift_n: int, data: str | None,
           device: str = "auto") -> dict:
    from ftsafety.data import DataConfig
    from ftsafety.evaluation.drift import embedding_drift

    name, records = load_records(runs, recipe)
    by = {(r["row"], r["p"]): r for r in records}
    rows = {r["row"] for r in records}
    for d, b in pairs:
        for row in (d, b):
            if row not in rows:
                raise FtsafetyError(f"no row {row!r} in {runs} ({', '.join(sorted(rows))})")
    ratios = sorted({r["p"] for r in records if r["p"] > 0})
    out = {"recipe": name, "runs": str(runs), "fa_margin": FA_MARGIN, "alpha": ALPHA, "pairs": []}
    curves: dict[str, list] = {}
    drift_cache: dict[tuple[str, str], dict] = {}
    for d, b in pairs:
        entry = {"defense": d, "baseline": b, "by_p": {}}
        for p in ratios:
            rd, rb = by.get((d, p)), by.get((b, p))
            if rd is None or rb is None:
                continue
            c = compare(rd, rb)
            if drift_n:
                for who, rec in (("defense", rd), ("baseline", rb)):
                    start, ft = _aligned_dir(rec), _stage(rec, "finetune")
                    if start and ft:
                        key = (start, ft)
                        if key not in drift_cache:
                            dcfg = DataConfig(data=data or rec["data"])
                            drift_cache[key] = embedding_drift(start, ft, dcfg, n=drift_n, device=device)
                        c.setdefault("drift", {})[who] = {k: drift_cache[key][k] for k in (
                            "attn_drift", "attn_drift_relative", "final_drift", "final_drift_relative",
                            "weight_distance", "weight_distance_relative")}
            entry["by_p"][f"{p:g}"] = c
            for who, rec in ((d, rd), (b, rb)):
                for kind in ("align", "finetune"):
                    s = _stage(rec, kind)
                    label = f"{kind}: {who}" + (f" p={p:g}" if kind == "finetune" else "")
                    if s and label not in curves:
                        curves[label] = _losses(s)
        entry["works_at"] = [p for p, c in entry["by_p"].items() if c["works"]]
        out["pairs"].append(entry)
    out["curves"] = {k: v for k, v in curves.items()}
    return out


def markdown(res: dict) -> str:
    lines = [f"# Does the defense beat its baseline? ({res['recipe']})", "",
             f"Criterion: HS significantly below the baseline's (two-sided two-proportion test, p < {res['alpha']}) "
             f"with FA within {res['fa_margin']:g} points of it. Drift: the fine-tuned model against the model its "
             "fine-tune started from, on alignment data (Vaccine's embedding drift; per token) and in weights.", ""]
    for e in res["pairs"]:
        lines += [f"## {e['defense']} against {e['baseline']}", "",
                  "| p | HS defense | HS baseline | p-value | FA defense | FA baseline | works | attn drift d / b | "
                  "weights moved d / b |", "|---|---|---|---|---|---|---|---|---|"]
        for p, c in e["by_p"].items():
            hs, fa = c["hs"], c["fa"]
            dr = c.get("drift", {})
            drift = " / ".join(f"{dr[w]['attn_drift']:.3g}" if w in dr else "-" for w in ("defense", "baseline"))
            moved = " / ".join(f"{dr[w]['weight_distance']:.3g}" if w in dr else "-" for w in ("defense", "baseline"))
            lines.append(
                f"| {p} | {hs['defense']:.1f} [{hs['defense_ci'][0]:.1f}, {hs['defense_ci'][1]:.1f}] "
                f"| {hs['baseline']:.1f} [{hs['baseline_ci'][0]:.1f}, {hs['baseline_ci'][1]:.1f}] | {hs['p_value']:.3g} "
                f"| {fa['defense']:.1f} | {fa['baseline']:.1f} | {'yes' if c['works'] else 'no'} | {drift} | {moved} |")
        verdict = (f"works at p = {', '.join(e['works_at'])}" if e["works_at"]
                   else "does not beat its baseline at any p measured")
        lines += ["", f"**{e['defense']}**: {verdict}.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--pair", action="append", default=None,
                    help='"DEFENSE ROW=BASELINE ROW" (repeatable; default: Vaccine=SFT and Booster (continued '
                         'LoRA)=SFT (continued LoRA))')
    ap.add_argument("--drift-n", type=int, default=64, help="alignment examples for the drift (0: no drift)")
    ap.add_argument("--data", default=None, help="data for the drift's alignment examples (default: the runs')")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    pairs = []
    for text in a.pair or ["Vaccine=SFT", "Booster (continued LoRA)=SFT (continued LoRA)"]:
        if "=" not in text:
            ap.error(f"--pair takes DEFENSE=BASELINE, got {text!r}")
        d, b = (x.strip() for x in text.split("=", 1))
        pairs.append((d, b))
    try:
        res = answer(a.runs, a.recipe, pairs, a.drift_n, a.data, a.device)
    except FtsafetyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    md = markdown(res)
    print(md)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        plot_losses(res["curves"], a.out / "losses.png")
        write_json(a.out / "answer.json", res)
        atomic_write_text(a.out / "answer.md", md)
    return res


if __name__ == "__main__":
    main()
