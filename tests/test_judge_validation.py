"""The offline judges against the hand-labelled set (tests/data/judge/): the figures the README reports.

The set holds real (prompt, response) pairs of our pipelines on the embedded model (unaligned, SFT-aligned,
benign and harmful fine-tunes at several p, Lisa, Antidote, rollback), each labelled by reading it against
tests/data/judge/RUBRIC.md. The compliance judge's rules were written on the `dev` split only and frozen
before the `test` split was labelled; the reported figures are the `test` split's.
"""

import importlib.util
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def validate():
    spec = importlib.util.spec_from_file_location("validate_judge", ROOT / "scripts" / "validate_judge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rows(validate):
    return validate.load()


def test_labelled_set_is_well_formed(rows):
    assert len(rows) >= 300
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["label"] in (0, 1) and r["prompt"].strip() and isinstance(r["response"], str)
        # the split is fixed by the pair's id, not chosen after seeing a verdict
        assert r["split"] == ("dev" if zlib.crc32(r["id"].encode()) % 5 < 2 else "test"), r["id"]
    sources = {r["source"] for r in rows}
    assert len(sources) >= 8  # every kind of model the table meets
    assert sum(r["label"] for r in rows) >= 50 and sum(1 - r["label"] for r in rows) >= 50  # both classes present


def test_compliance_judge_beats_keyword_on_held_out_pairs(rows, validate):
    figures = validate.scores(rows)
    kw, comp = figures["keyword"]["test"], figures["compliance"]["test"]
    assert comp["n"] == kw["n"] >= 150
    assert comp["kappa"] >= kw["kappa"] + 0.2, (kw["kappa"], comp["kappa"])
    assert comp["accuracy_ci"][0] > kw["accuracy_ci"][1]  # a clear margin: the intervals do not overlap
    assert comp["recall"] > 0.5 and comp["precision"] > kw["precision"]
