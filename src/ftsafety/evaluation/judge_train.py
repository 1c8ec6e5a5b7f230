"""`ftsafety train-judge` (`make judge`): fit `ftsafety-judge` on the training split of a labelled set.

The labelled set (tests/data/judge/labels.jsonl) holds one JSON object per pair: id, split (train | test),
state (the model that answered), source (the prompt set) and row, prompt, response, label (refusal |
compliance | harmful). Prompts of gated sets are not in the file (their text stays out of the
repository): such a row carries `prompt_sha256` instead, and its text is read from the set's local
copy under `--data DIR/prompts/` (scripts/build_prompt_sets.py writes it) and checked against the hash.

Training reads only the `train` split. The features of every candidate layer are computed in one
pass; each (layer, L2 strength) is scored by 5-fold cross-validation grouped by prompt (a prompt's
pairs are never split between folds), on the mean of Cohen's kappa for harmful-vs-not and for
refusal-vs-not; the best (ties: fewer layers) is refitted on the whole split. Deterministic: the
folds come from a hash of the prompt, the fit is full-batch L-BFGS in float64.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from pathlib import Path

import torch

from ftsafety import __version__
from ftsafety.errors import FtsafetyError
from ftsafety.evaluation import learned as L
from ftsafety.evaluation.stats import agreement
from ftsafety.utils import locks_output

SPLITS = ("train", "test")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_labels(path: str | Path, data=None, need_text: bool = True) -> list[dict]:
    """The labelled pairs, each checked; a gated set's prompt is filled in from `data` (a --data
    directory or DataConfig) and checked against its sha256. `need_text=False` keeps such a row
    without its prompt (prompt None) instead of failing."""
    from ftsafety import prompt_sets

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise FtsafetyError(f"{path}: cannot read the labels ({exc.strerror or exc})") from None
    rows, cache = [], {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FtsafetyError(f"{path}:{i}: malformed JSON ({exc.msg})") from None
        for key in ("id", "split", "response", "label"):
            if key not in row:
                raise FtsafetyError(f"{path}:{i}: missing field {key!r}")
        if row["label"] not in L.CLASSES:
            raise FtsafetyError(f"{path}:{i}: label {row['label']!r} is not one of {', '.join(L.CLASSES)}")
        if row["split"] not in SPLITS:
            raise FtsafetyError(f"{path}:{i}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
        if row.get("prompt") is None:
            source = row.get("source")
            if "prompt_sha256" not in row or source not in prompt_sets.SETS:
                raise FtsafetyError(f"{path}:{i}: no prompt, and no prompt_sha256 with a named source to read it from")
            if source not in cache:
                try:
                    cache[source] = prompt_sets.items(source, "harmful", data)
                except FtsafetyError as exc:
                    if need_text:
                        raise FtsafetyError(f"{path}:{i}: its prompt is from the gated set {source}, whose text is not in "
                                            f"the repository: build {source} with scripts/build_prompt_sets.py and pass "
                                            f"--data DIR ({exc})") from None
                    cache[source] = None
            items = cache[source]
            if items is None:
                row = {**row, "prompt": None}
            else:
                text = items[int(row["row"])]["prompt"] if int(row["row"]) < len(items) else None
                if text is None or text_sha256(text) != row["prompt_sha256"]:
                    raise FtsafetyError(f"{path}:{i}: {source} row {row['row']} is not the prompt that was labelled "
                                        "(sha256 differs: another copy or version of the set)")
                row = {**row, "prompt": text}
        rows.append(row)
    if not rows:
        raise FtsafetyError(f"{path}: no labelled pairs")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise FtsafetyError(f"{path}: duplicate ids")
    return rows


SPLIT_SOURCES = ("beavertails", "builtin")  # sources named SET-SPLIT: beavertails-eval, builtin-calibration


def source_set(source: str) -> str:
    """The prompt set a labelled pair's source is drawn from: `beavertails-eval` and
    `beavertails-calibration` are two splits of `beavertails`; any other source is its own set."""
    origin, _, split = source.partition("-")
    return origin if origin in SPLIT_SOURCES and split else source


def fold_of(prompt: str, folds: int) -> int:
    return zlib.crc32(prompt.strip().lower().encode("utf-8")) % folds


def binary_kappas(labels: list[str], predicted: list[str]) -> dict[str, float]:
    return {"harmful": agreement([y == "harmful" for y in labels], [p == "harmful" for p in predicted])["kappa"],
            "refusal": agreement([y == "refusal" for y in labels], [p == "refusal" for p in predicted])["kappa"]}


def cross_validate(x: torch.Tensor, y: torch.Tensor, folds: list[int], l2: float) -> list[int]:
    """Out-of-fold predicted class of every row."""
    pred = torch.empty(len(y), dtype=torch.long)
    for f in sorted(set(folds)):
        test = torch.tensor([i for i, g in enumerate(folds) if g == f])
        train = torch.tensor([i for i, g in enumerate(folds) if g != f])
        head = L.fit_head(x[train], y[train], l2)
        pred[test] = L.head_probs(head, x[test]).argmax(1)
    return pred.tolist()


@locks_output("out_dir")
def train_judge(labels_path: str | Path, out_dir: str | Path, data=None, base: str = "smollm2-135m",
                layers: tuple[int, ...] = (4, 6, 8), l2_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                folds: int = 5, max_prompt_tokens: int = 64, max_response_tokens: int = 128, batch_size: int = 32,
                echo=print) -> dict:
    """Fit the judge on the `train` split of `labels_path` and write it to `out_dir`; returns its manifest."""
    from safetensors.torch import save_file

    from ftsafety import models
    from ftsafety.utils import atomic_dir, write_json

    if not layers or any(k < 1 for k in layers):
        raise FtsafetyError(f"--layers must list decoder layers >= 1, got {layers}")
    if not l2_grid or any(v <= 0 for v in l2_grid):
        raise FtsafetyError(f"--l2 must list positive strengths, got {l2_grid}")
    if folds < 2:
        raise FtsafetyError(f"--folds must be >= 2, got {folds}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / L.MANIFEST).is_file())):
        raise FtsafetyError(f"{out} exists and is not a judge directory (no {L.MANIFEST}): give a new or empty --out")
    rows = [r for r in load_labels(labels_path, data) if r["split"] == "train"]
    if len({r["label"] for r in rows}) < len(L.CLASSES):
        raise FtsafetyError(f"{labels_path}: the train split must hold every class ({', '.join(L.CLASSES)})")
    t0 = time.perf_counter()
    model, tok, _ = models.load(base, device="cpu", dtype=torch.float32)
    model = L.truncate_layers(model, max(layers))
    echo(f"features of {len(rows)} training pairs at layers {', '.join(map(str, layers))} ({base})")
    feats = L.features(model, tok, [r["prompt"] for r in rows], [r["response"] for r in rows], tuple(layers),
                       max_prompt_tokens, max_response_tokens, batch_size)
    y = torch.tensor([L.CLASSES.index(r["label"]) for r in rows])
    fold = [fold_of(r["prompt"], folds) for r in rows]
    truth = [r["label"] for r in rows]
    cv = []
    for k in sorted(layers):
        for l2 in l2_grid:
            pred = [L.CLASSES[i] for i in cross_validate(feats[k], y, fold, l2)]
            kap = binary_kappas(truth, pred)
            cv.append({"layers": k, "l2": l2, "kappa_harmful": round(kap["harmful"], 4),
                       "kappa_refusal": round(kap["refusal"], 4),
                       "accuracy": round(sum(a == b for a, b in zip(truth, pred)) / len(truth), 4)})
            echo(f"  layers {k:2d}  l2 {l2:<7g} kappa harmful {kap['harmful']:.3f}  refusal {kap['refusal']:.3f}")
    best = max(cv, key=lambda c: (round(c["kappa_harmful"] + c["kappa_refusal"], 4), -c["layers"], -c["l2"]))
    head = L.fit_head(feats[best["layers"]], y, best["l2"])
    counts = {c: truth.count(c) for c in L.CLASSES}
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in head.items()}, str(tmp / L.WEIGHTS))
        manifest = {
            "name": L.NAME, "version": "1", "base": base, "layers": best["layers"],
            "hidden_size": model.config.hidden_size, "max_prompt_tokens": max_prompt_tokens,
            "max_response_tokens": max_response_tokens, "classes": list(L.CLASSES),
            "sha256": L.sha256_file(tmp / L.WEIGHTS), "l2": best["l2"],
            "training": {"labels": Path(labels_path).name, "labels_sha256": L.sha256_file(labels_path),
                         "split": "train", "n": len(rows), "classes": counts,
                         "states": sorted({r.get("state", "?") for r in rows}),
                         "sources": sorted({r.get("source", "?") for r in rows}),
                         "cv": {"folds": folds, "grouped_by": "prompt", "selected_by": "kappa_harmful + kappa_refusal",
                                "candidates": cv},
                         "seconds": round(time.perf_counter() - t0, 1)},
            "ftsafety": __version__, "torch": torch.__version__,
        }
        write_json(tmp / L.MANIFEST, manifest)
    echo(f"chose layers {best['layers']}, l2 {best['l2']:g} (cross-validated kappa harmful {best['kappa_harmful']:.3f}, "
         f"refusal {best['kappa_refusal']:.3f}); wrote {out}")
    return manifest
