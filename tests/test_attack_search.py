"""`ftsafety attack-search` (issue #30) on tiny-llama: determinism for a seed, resume after SIGKILL to the same
trials, two processes sharing one study, the attacks registry, and bad input (one line, nothing written)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_recipe

from ftsafety.attacks import ATTACKS, get
from ftsafety.errors import FtsafetyError

RECIPE = tiny_recipe("as-test", hs_limit=4, tail="""attack_search:
  trials: 3
  startup_trials: 1
  space: {lr: [1.0e-4, 1.0e-2], steps: [1, 3], p: [0.25, 0.75], lora_r: [2, 4]}
""")


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "as.yaml"
    path.write_text(RECIPE)
    return path


def _search(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FTSAFETY_LOG_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "ftsafety", "attack-search", *map(str, args), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def _trials(runs: Path) -> list[dict]:
    return json.loads((runs / "attack-search" / "as-test-mix.json").read_text())["trials"]


def _params(runs: Path) -> list[dict]:
    return [t["params"] for t in sorted(_trials(runs), key=lambda t: t["number"])]


def test_registry_holds_the_attacks():
    assert set(ATTACKS) >= {"mix", "pure", "benign"}
    assert get("pure").overrides({"lr": 1e-4, "n": 20})["finetune.harmful_ratio"] == 1.0
    assert get("benign").overrides({"lr": 1e-3})["finetune.harmful_ratio"] == 0.0
    assert get("mix").overrides({"p": 0.3, "lora_r": 4}) == {"finetune.harmful_ratio": 0.3, "finetune.lora.r": 4}


def test_a_seeded_study_is_deterministic_and_resumes_after_sigkill_to_the_same_trials(recipe, tmp_path):
    whole = _search(recipe, "--runs", tmp_path / "a")
    out, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err
    assert "worst case: trial" in out and len(_trials(tmp_path / "a")) == 3
    png = tmp_path / "a" / "attack-search" / "as-test-mix.png"
    assert png.stat().st_size > 0

    # the same seed in a fresh runs folder, killed during trial 1, then resumed
    runs = tmp_path / "b"
    first = _search(recipe, "--runs", runs)
    db = runs / "attack-search" / "as-test-mix.db"
    t0 = time.time()
    import optuna

    while True:
        assert time.time() - t0 < 300, "trial 1 never started"
        if db.exists():
            try:
                st = optuna.load_study(study_name="as-test/as-test/mix", storage=f"sqlite:///{db}")
                if any(t.number == 1 and t.state.name == "RUNNING" for t in st.get_trials()):
                    break
            except Exception:
                pass
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    again = _search(recipe, "--runs", runs)
    out2, err2 = again.communicate(timeout=600)
    assert again.returncode == 0, err2
    assert "trial 1: resuming (its process is gone)" in out2
    assert _params(runs) == _params(tmp_path / "a")  # the same trials, the third one from TPE on the same history
    assert sorted(t["number"] for t in _trials(runs)) == [0, 1, 2]


def test_the_report_gains_a_worst_case_column(recipe, tmp_path, cli):
    runs = tmp_path / "runs"
    assert cli("run", str(recipe), "--runs", str(runs), "-q").returncode == 0
    assert cli("attack-search", str(recipe), "--runs", str(runs), "-q", "--trials", "2").returncode == 0
    worst = json.loads((runs / "attack-search" / "as-test-mix.json").read_text())["worst_case"]
    r = cli("report", str(runs), "--out", str(tmp_path / "res"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "res" / "table.md").read_text()
    assert "HS worst case" in md and f"{worst['hs']:.1f} [" in md and "(mix, 2 trials:" in md
    assert "hs_worst_case" in (tmp_path / "res" / "table.csv").read_text().splitlines()[0]


def test_a_trial_killed_between_two_knobs_is_completed_as_an_uninterrupted_run_draws_it(recipe, tmp_path):
    import socket

    from ftsafety.attack_search import Search, SearchConfig, _suggest
    from ftsafety.pipeline import load_recipe

    cfg = load_recipe(recipe)[0].attack_search
    whole = Search(recipe, "as-test", tmp_path / "a", SearchConfig(**{**cfg.__dict__, "trials": 2}), quiet=True,
                   echo=lambda *a: None).run()
    search = Search(recipe, "as-test", tmp_path / "b", SearchConfig(**{**cfg.__dict__, "trials": 2}), quiet=True,
                    echo=lambda *a: None)
    study = search.study()
    trial = study.ask()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("owner", {"host": socket.gethostname(), "pid": dead.pid})
    first = {"lr": search.cfg.space["lr"]}  # the process died after drawing the first knob only
    _suggest(study, trial, first, lambda i: search._sampler(trial.number, i))
    assert set(study.trials[0].params) == {"lr"}
    resumed = search.run()
    assert [t["params"] for t in resumed["trials"]] == [t["params"] for t in whole["trials"]]


def test_two_processes_share_one_study_and_run_distinct_trials(recipe, tmp_path):
    runs = tmp_path / "shared"
    args = (recipe, "--runs", runs, "--trials", "4")
    a = _search(*args)
    time.sleep(2.0)
    b = _search(*args)
    _, ea = a.communicate(timeout=600)
    _, eb = b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, (ea, eb)
    trials = _trials(runs)
    numbers = [t["number"] for t in trials]
    assert sorted(numbers) == [0, 1, 2, 3]  # each trial once, none lost, none run twice


@pytest.mark.parametrize("args, expect", [
    (["--space", "lr=1e-2:1e-4"], "is inverted"),
    (["--space", "lr="], "--space takes KNOB=LOW:HIGH"),
    (["--space", "steps=1:2:3"], "give [low, high]"),
    (["--trials", "0"], "trials must be an integer >= 1"),
    (["--minutes", "0"], "minutes must be a number of minutes > 0"),
    (["--space", "momentum=0.1:0.9"], "does not search 'momentum'"),
    (["--attack", "benign", "--space", "p=0.1:0.5"], "does not search 'p'"),
    (["--attack", "nope"], "unknown attack 'nope'"),
    (["--row", "Booster"], "no row 'Booster'"),
    (["evaluate.fa_limit=0"], "the search needs HS and FA"),
])
def test_bad_input_is_one_line_and_writes_nothing(recipe, tmp_path, cli, args, expect):
    runs = tmp_path / "runs"
    r = cli("attack-search", str(recipe), "--runs", str(runs), "-q", *args)
    assert r.returncode == 2 and expect in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (runs / "attack-search").exists() and not (runs / "stages").exists()


def test_a_study_file_of_another_model_is_refused(recipe, tmp_path, cli):
    runs = tmp_path / "runs"
    assert cli("attack-search", str(recipe), "--runs", str(runs), "-q", "--trials", "1").returncode == 0
    before = (runs / "attack-search" / "as-test-mix.db").read_bytes()
    r = cli("attack-search", str(recipe), "model=tiny-opt", "--runs", str(runs), "-q", "--trials", "1")
    assert r.returncode == 2 and "was made for another search (different model" in r.stderr, r.stderr
    assert (runs / "attack-search" / "as-test-mix.db").read_bytes() == before


def test_a_trial_that_fails_is_recorded_and_the_search_goes_on(recipe, tmp_path, cli):
    """A setting that fails in one line (n = 1 at p = 0.5 leaves no example) fails its own trial only."""
    runs = tmp_path / "runs"
    r = cli("attack-search", str(recipe), "finetune.n=1", "--runs", str(runs), "-q", "--trials", "2",
            "--space", "p=0.5:0.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("failed (") == 2 and "worst case: none" in r.stdout
    s = json.loads((runs / "attack-search" / "as-test-mix.json").read_text())
    assert s["trials"] == [] and [f["number"] for f in s["failed"]] == [0, 1]
    assert "gives no examples" in s["failed"][0]["error"]


def test_search_config_checks_its_section():
    from ftsafety.attack_search import SearchConfig

    with pytest.raises(FtsafetyError, match="a harmful share lies in"):
        SearchConfig(space={"p": [0.5, 1.5]})
    with pytest.raises(FtsafetyError, match="log-scale range must be above 0"):
        SearchConfig(space={"lr": [0, 1e-3]})
    assert SearchConfig(space={"lr": ["1e-5", "1e-3"]}).space["lr"] == [1e-5, 1e-3]  # YAML 1.1 reads 1e-5 as text
