"""Recipes: every file under recipes/ loads strictly; the smoke recipes run end to end, reuse their
cached stages on a rerun and rebuild the table from run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftsafety import pipeline
from ftsafety.errors import FtsafetyError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(p for p in RECIPES.rglob("*.yaml") if "accelerate" not in p.parts)


def test_the_recipe_tree_is_not_empty():
    kinds = {p.parent.name for p in ALL}
    assert {"small", "smoke", "paper"} <= kinds, kinds


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(RECIPES)) for p in ALL])
def test_every_recipe_loads_and_says_what_it_reproduces(path, tmp_path):
    text = path.read_text()
    head = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert head and text.startswith("#"), "a recipe starts with a comment"
    assert any("Reproduces:" in ln for ln in head), "the comment says what it reproduces"
    assert any("ftsafety run" in ln or "make " in ln for ln in head), "the comment gives the command"
    recipe, pipes = pipeline.pipelines(path)
    assert pipes and all(p.recipe.name == recipe.name for p in pipes)
    for p in pipes:  # every pipeline plans (keys and directories) without touching a model
        steps = pipeline.plan(p, tmp_path)
        assert steps[-1].kind == "evaluate"


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


STRICT = {
    "unknown top key": ("name: x\nmodle: tiny-opt\n", "unknown key 'modle' (did you mean 'model'?)"),
    "unknown nested key": ("name: x\nfinetune: {harmfull_ratio: 0.1}\n",
                           "unknown key 'finetune.harmfull_ratio' (did you mean 'finetune.harmful_ratio'?)"),
    "wrong type": ("name: x\nfinetune: {n: lots}\n", "finetune.n must be an integer, got 'lots'"),
    "bool for a number": ("name: x\nalign: {train: {lr: true}}\n", "align.train.lr must be a number"),
    "section given a value": ("name: x\nalign: sft\n", "align must be a mapping"),
    "bad method": ("name: x\nalign: {method: magic}\n", "unknown align method 'magic'"),
    "p out of range": ("name: x\nfinetune: {harmful_ratio: 1.5}\n", "harmful ratio p must be in [0, 1]"),
    "empty file": ("", "the recipe is empty"),
    "malformed yaml": ("name: x\nalign: {method: sft\n", "malformed YAML"),
    "list at top": ("- a\n- b\n", "the top level must be a mapping"),
    "missing name": ("model: tiny-opt\n", "name"),
    "table row unknown key": ("name: x\ntable: {rows: [{name: a, sett: {}}]}\n", "did you mean 'table.rows[0].set'"),
    "row sets unknown key": ("name: x\ntable: {rows: [{name: a, set: {align.mehtod: sft}}]}\n",
                             "unknown key 'align.mehtod'"),
}


@pytest.mark.parametrize("case", sorted(STRICT))
def test_recipes_load_strictly(case, tmp_path):
    text, message = STRICT[case]
    with pytest.raises(FtsafetyError) as exc:
        pipeline.pipelines(_write(tmp_path, text))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_overrides_are_checked_like_the_file(tmp_path):
    path = RECIPES / "smoke" / "tiny-opt.yaml"
    _, pipes = pipeline.pipelines(path, ["finetune.n=20", "table.ratios=[0.5]", "finetune.train.lr=5e-5"])
    assert {p.p for p in pipes} == {0.5} and all(p.recipe.finetune.n == 20 for p in pipes)
    assert all(p.recipe.finetune.train.lr == 5e-5 for p in pipes)  # YAML 1.1 would read "5e-5" as a string
    with pytest.raises(FtsafetyError, match="did you mean 'finetune.n'"):
        pipeline.pipelines(path, ["finetune.nn=20"])
    with pytest.raises(FtsafetyError, match="expected key=value"):
        pipeline.pipelines(path, ["finetune.n"])


def test_stage_keys_share_what_is_shared(tmp_path):
    """SFT, Antidote and rollback at one p share their align and finetune stages; Vaccine does not."""
    _, pipes = pipeline.pipelines(RECIPES / "smoke" / "tiny-opt.yaml")
    plans = {(p.row, p.p): pipeline.plan(p, tmp_path) for p in pipes}
    sft, anti, vac = plans[("SFT", 0.25)], plans[("Antidote", 0.25)], plans[("Vaccine", 0.25)]
    assert [s.key for s in sft[:2]] == [s.key for s in anti[:2]]
    assert sft[0].key != vac[0].key and sft[1].key != vac[1].key  # a new parent changes the child's key
    assert plans[("SFT", 0.0)][0].key == sft[0].key and plans[("SFT", 0.0)][1].key != sft[1].key
    assert [s.kind for s in plans[("Non-aligned", 0.25)]] == ["finetune", "evaluate"]
    roll = plans[("Rollback", 0.25)][2]
    assert roll.aligned == str(sft[0].dir)
    # a key that does not decide a stage's output (another method's knobs) leaves its key alone
    _, pipes2 = pipeline.pipelines(RECIPES / "smoke" / "tiny-opt.yaml", ["align.vaccine.rho=7"])
    sft2 = next(pipeline.plan(p, tmp_path) for p in pipes2 if (p.row, p.p) == ("SFT", 0.25))
    assert sft2[0].key == sft[0].key


def test_smoke_table_runs_reuses_its_stages_and_reports(tmp_path, cli):
    runs, results = tmp_path / "runs", tmp_path / "results"
    r = cli("run", str(RECIPES / "smoke" / "tiny-opt.yaml"), "--runs", str(runs), "--results", str(results), "-q")
    assert r.returncode == 0, r.stderr
    assert "16 pipelines, 37 distinct stages, 37 to run" in r.stdout
    table = json.loads((results / "table.json").read_text())
    assert [row["row"] for row in table["rows"]][:3] == ["Non-aligned", "SFT", "Vaccine"]
    assert len(table["rows"]) == 8 and table["ratios"] == ["0", "0.25"]
    for row in table["rows"]:
        assert all(row["hs"][p] is not None and row["fa"][p] is not None for p in table["ratios"])
    md = (results / "table.md").read_text()
    assert "| Method | HS p=0 | HS p=0.25 | HS avg | CR p=0 | CR p=0.25 | CR avg | FA p=0 | FA p=0.25 | FA avg |" in md
    for row in table["rows"]:  # every cell carries its n and 95% interval; rows but SFT their test against SFT
        for m in ("hs", "fa"):
            assert all(row[f"{m}_n"][p] and row[f"{m}_ci"][p][0] <= row[m][p] <= row[f"{m}_ci"][p][1]
                       for p in table["ratios"])
            assert set(row[f"{m}_p_vs_sft"]) == (set() if row["row"] == "SFT" else set(table["ratios"]))
    assert "95% Wilson interval" in md and "two-proportion" in md
    secs = table["stage_seconds"]  # where the time went: the 37 distinct stages once each, by kind
    assert secs["total"]["stages"] == 37 and "Time: 37 distinct stages" in md
    assert sum(v["stages"] for k, v in secs.items() if k != "total") == 37
    assert abs(sum(v["seconds"] for k, v in secs.items() if k != "total") - secs["total"]["seconds"]) < 0.1
    assert (results / "table.csv").read_text().count("\n") == 1 + 16
    # the rerun finds every stage finished and runs none
    r = cli("run", str(RECIPES / "smoke" / "tiny-opt.yaml"), "--runs", str(runs), "-q")
    assert r.returncode == 0 and "37 distinct stages, 0 to run" in r.stdout, r.stdout
    # a stage that was interrupted (no stage.json) is redone; the others are reused
    victim = next((runs / "stages").glob("evaluate-*"))
    (victim / pipeline.STAGE_MARKER).unlink()
    r = cli("run", str(RECIPES / "smoke" / "tiny-opt.yaml"), "--runs", str(runs), "-q")
    assert "37 distinct stages, 1 to run" in r.stdout
    # report rebuilds the same table from the run directories alone
    r = cli("report", str(runs), "--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    again = json.loads((tmp_path / "again" / "table.json").read_text())["rows"]
    assert [(r["row"], r["hs"], r["fa"]) for r in again] == [(r["row"], r["hs"], r["fa"]) for r in table["rows"]]


def test_stage_seconds_count_a_shared_stage_once():
    from ftsafety.report import _time_line, stage_seconds

    align = {"kind": "align", "method": "sft", "key": "a1", "seconds": 100.0}
    recs = [{"stages": [align, {"kind": "finetune", "method": "sft", "key": "f1", "seconds": 30.0},
                        {"kind": "evaluate", "method": "keyword", "key": "e1", "seconds": 5.0}]},
            {"stages": [align, {"kind": "finetune", "method": "sft", "key": "f2", "seconds": 40.0},
                        {"kind": "evaluate", "method": "keyword", "key": "e2", "seconds": 6.0}]}]
    secs = stage_seconds(recs)
    assert list(secs) == ["align", "finetune", "evaluate", "total"]
    assert secs["align"] == {"stages": 1, "seconds": 100.0} and secs["finetune"] == {"stages": 2, "seconds": 70.0}
    assert secs["total"] == {"stages": 5, "seconds": 181.0}
    assert _time_line(secs).startswith("Time: 5 distinct stages, 181 s = 0.05 h of stage time (align 1 (100 s), ")
    assert _time_line({}) == ""


def test_smoke_llama_stack_runs(tmp_path, cli):
    runs = tmp_path / "runs"
    r = cli("run", str(RECIPES / "smoke" / "tiny-llama.yaml"), "--runs", str(runs), "-q")
    assert r.returncode == 0, r.stderr
    rec = json.loads(next((runs / "pipelines" / "smoke-tiny-llama").glob("*.json")).read_text())
    assert rec["methods"] == ["align:vaccine", "finetune:lisa", "post:rollback", "evaluate:keyword"]
    cfg = (Path(rec["stages"][1]["dir"]) / "config.yaml").read_text()
    assert "stage: finetune-lisa" in cfg


def test_dry_run_prints_resolved_stages_and_runs_nothing(tmp_path, cli):
    r = cli("run", str(RECIPES / "small" / "table.yaml"), "--runs", str(tmp_path / "runs"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "align-booster" in r.stdout and "lam: 5.0" in r.stdout and "to run" in r.stdout
    assert not (tmp_path / "runs").exists()


def test_report_errors_are_one_line(tmp_path, cli):
    r = cli("report", str(tmp_path / "nothing"))
    assert r.returncode != 0 and "no pipelines/ directory" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", str(tmp_path / "missing.yaml"))
    assert r.returncode != 0 and "recipe file does not exist" in r.stderr


def test_data_needs_checked_before_anything_runs(tmp_path, cli, tiny_data_dir):
    """`run` and `--dry-run` build every stage's data first: a recipe asking for more rows than the data
    has fails in one line naming the row, and nothing is trained (issue 17, item 8)."""
    recipe = str(RECIPES / "smoke" / "tiny-llama.yaml")
    r = cli("run", recipe, f"data={tiny_data_dir}", "--runs", str(tmp_path / "runs"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "data: every stage's rows are there (1 pipelines checked)" in r.stdout
    for override, msg in [("finetune.n=1000", "only 300 rows are available"),
                          ("evaluate.hs_limit=41", "evaluate.hs_limit asks for 41 rows but the data has 40"),
                          ("align.n=900", "alignment needs")]:
        for extra in (["--dry-run"], []):
            r = cli("run", recipe, f"data={tiny_data_dir}", override, "--runs", str(tmp_path / "runs"), *extra)
            assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (override, r.stderr)
            assert "row 'smoke-tiny-llama'" in r.stderr or "p=" in r.stderr
    assert not (tmp_path / "runs" / "stages").exists()


def test_secrets_in_a_recipe_are_redacted_in_every_file_written(tmp_path, cli):
    """A token-shaped value in a recipe's description, in the file and as an override (issue 19), reaches
    neither the pipeline's recipe.yaml nor table.md / table.csv / table.json."""
    recipe = tmp_path / "r.yaml"
    text = (RECIPES / "smoke" / "tiny-opt.yaml").read_text()
    recipe.write_text(text.replace("name: smoke-tiny-opt", "name: smoke-tiny-opt\ndescription: key hf_abcdefghijklmnopqrstuvwxyz0123"))
    runs, results = tmp_path / "runs", tmp_path / "results"
    r = cli("run", str(recipe), "table.ratios=[0]", "description=sk-abcdefghijklmnopqrstuvwxyz012345", "--runs",
            str(runs), "--results", str(results), "-q")
    assert r.returncode == 0, r.stderr
    written = [p for p in [*runs.rglob("*"), *results.rglob("*")] if p.is_file() and p.suffix in
               (".yaml", ".json", ".jsonl", ".md", ".csv")]
    assert any(p.name == "recipe.yaml" for p in written) and any(p.name == "table.md" for p in written)
    for p in written:
        body = p.read_text(errors="replace")
        assert "hf_abcdefghij" not in body and "sk-abcdefghij" not in body, p


def test_recipe_numbers_as_people_write_them(tmp_path):
    """`lr: 1e-3` (which YAML 1.1 reads as a string) is a number in a recipe (issue 19)."""
    from ftsafety import pipeline

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nalign: {train: {lr: 1e-3}}\nfinetune: {train: {lr: 5E-5}}\n")
    r, _ = pipeline.pipelines(recipe)
    assert r.align.train.lr == 1e-3 and r.finetune.train.lr == 5e-5


def test_stage_keys_do_not_move_when_knobs_are_added(tmp_path):
    """Finished stages stay reusable across releases: a knob added later (`key_when_set`) leaves every key of
    a recipe that does not set it as it was (these keys were computed before `evaluate.hs_prompts` existed).
    Change them only with a change that is meant to invalidate users' caches. (The fine-tune's key moved
    once, on purpose, in issue 28: the smoke recipe's partial `finetune.train` section used to fall back to
    TrainConfig's class defaults, lr 1e-3 and cosine, and now keeps the fine-tune's own, 1e-4 and constant.)"""
    _, pipes = pipeline.pipelines(RECIPES / "smoke" / "tiny-opt.yaml")
    sft0 = next(p for p in pipes if (p.row, p.p) == ("SFT", 0.0))
    assert [(s.kind, s.key) for s in pipeline.plan(sft0, tmp_path)] == [
        ("align", "754a53f47ce1"), ("finetune", "9696e1c464a6"), ("evaluate", "8bb0cf012f51")]
    _, pipes = pipeline.pipelines(RECIPES / "smoke" / "tiny-opt.yaml", ["evaluate.hs_prompts=jbb"])
    keys = [s.key for s in pipeline.plan(next(p for p in pipes if (p.row, p.p) == ("SFT", 0.0)), tmp_path)]
    assert keys[:2] == ["754a53f47ce1", "9696e1c464a6"] and keys[2] != "8bb0cf012f51"


def test_a_partial_section_keeps_the_stages_own_defaults(tmp_path):
    """Audit A02-A04: one key under finetune.train (in the recipe or as an override) used to reset every other
    fine-tune setting to the alignment's (TrainConfig's) defaults: lr 1e-3, cosine, weight decay 0.1, 2 epochs."""
    from ftsafety.stages import FinetuneStage

    own = FinetuneStage().train
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: tiny-llama\nfinetune: {method: sft, n: 8, train: {max_steps: 1}}\n")
    for overrides in ([], ["finetune.train.batch_size=4"]):
        r, _ = pipeline.load_recipe(recipe, overrides)
        t = r.finetune.train
        assert (t.lr, t.scheduler, t.weight_decay, t.epochs, t.max_steps) == (own.lr, own.scheduler, own.weight_decay,
                                                                             own.epochs, 1)
    recipe.write_text("name: t\nmodel: tiny-llama\nalign: {train: &t {max_steps: 2}}\nfinetune: {train: *t}\n")
    r, _ = pipeline.load_recipe(recipe)
    assert (r.finetune.train.lr, r.finetune.train.max_steps, r.align.train.lr) == (own.lr, 2, 1e-3)


def test_rows_run_in_parts_keep_the_recipes_order(tmp_path, cli):
    """`--only` runs (the table in parts) record each row's place in the recipe, so the report's rows
    come in the recipe's order whatever order the parts ran in."""
    runs = tmp_path / "runs"
    for row in ("Booster", "SFT"):
        r = cli("run", str(RECIPES / "smoke" / "tiny-opt.yaml"), "--only", row, "--runs", str(runs), "-q",
                "--results", str(tmp_path / "results"))
        assert r.returncode == 0, r.stderr
    r = cli("report", str(runs), "--out", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr
    rows = [row["row"] for row in json.loads((tmp_path / "report" / "table.json").read_text())["rows"]]
    assert rows == ["SFT", "Booster"]  # not the order they ran in, nor the alphabet


def test_a_variant_run_names_itself_or_is_told_it_replaces_the_rows_record(tmp_path, cli):
    """A row run again with other settings (KEY=VALUE overrides) replaces that row's record, with a warning;
    `name=...` keeps the variant's records (and its table) apart, reusing the shared finished stages."""
    recipe, runs = str(RECIPES / "smoke" / "tiny-opt.yaml"), str(tmp_path / "runs")
    base = (recipe, "table.ratios=[0]", "--only", "SFT", "--runs", runs, "-q")
    assert cli("run", *base).returncode == 0
    r = cli("run", *base)  # the same settings: all cached, nothing said
    assert r.returncode == 0 and "replacing its record" not in r.stderr, r.stderr
    r = cli("run", *base, "name=lr-variant", "finetune.train.lr=3e-4")
    assert r.returncode == 0 and "2 to run" in r.stdout and "replacing" not in r.stderr, (r.stdout, r.stderr)
    assert sorted(p.name for p in (tmp_path / "runs" / "pipelines").iterdir()) == ["lr-variant", "smoke-tiny-opt"]
    r = cli("run", *base, "finetune.train.lr=3e-4")  # the variant's stages are cached; the default row's record goes
    assert r.returncode == 0 and "0 to run" in r.stdout, r.stdout
    assert "SFT p=0: replacing its record" in r.stderr and "name=smoke-tiny-opt-variant" in r.stderr, r.stderr


@pytest.mark.parametrize("override,msg", [
    ("finetune.n=100000", "finetune task rows (sst2 train) asks for 90000 rows but the data has 67349"),
    ("evaluate.hs_limit=5000", "evaluate.hs_limit (BeaverTails 30k_test) asks for 5000 rows but the data has 3021"),
    ("align.n=30000", "align.n (BeaverTails 30k_train) asks for 30000 rows but the data has 27186"),
])
def test_hub_recipes_are_checked_against_the_hub_split_sizes(override, msg, cli, tmp_path):
    """Issue 17: `--dry-run` of a hub recipe checks its row needs offline, against the hub splits' sizes."""
    for path in sorted((RECIPES / "paper").glob("*.yaml")):  # every paper recipe fits as written
        r = cli("run", str(path), "--dry-run", "--runs", str(tmp_path / "runs"))
        assert r.returncode == 0, (path.name, r.stderr)
    r = cli("run", str(RECIPES / "paper" / "lisa.yaml"), override, "--dry-run", "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2 and msg in r.stderr, r.stderr
