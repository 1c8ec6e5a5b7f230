"""`scripts/fa_heldout.py` end to end on tiny-llama: the items after --skip are scored, and the figures
written agree with themselves (per-label counts add up to n; the interval holds FA)."""

import json

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def fa_heldout():
    return load_script("fa_heldout")


def test_scores_the_items_after_skip(fa_heldout, tmp_path, capsys):
    out = tmp_path / "fa.json"
    assert fa_heldout.main(["--skip", "2", "--limit", "5", "--max-new-tokens", "2", "--out", str(out),
                            "tiny=tiny-llama"]) == 0
    res = json.loads(out.read_text())
    assert res["items"] == "2..6" and res["task"] == "sst2"
    run = res["runs"]["tiny"]
    assert run["n"] == 5 and sum(v["n"] for v in run["by_gold"].values()) == 5
    assert run["interval"][0] <= run["fa"] <= run["interval"][1]
    assert "tiny: FA" in capsys.readouterr().out


def test_bad_run_argument_is_one_line(fa_heldout):
    with pytest.raises(SystemExit) as e:
        fa_heldout.main(["no-equals-sign"])
    assert e.value.code == 2
