"""The CLI as a user meets it: end-to-end smoke runs and one-line errors for bad input."""

import json
import shutil

import pytest

from conftest import run_cli


@pytest.mark.parametrize("alias", ["tiny-opt", "tiny-llama"])
def test_end_to_end_align_finetune_evaluate(tmp_path, alias, cli):
    """align -> finetune (p=0.25) -> evaluate, through the real console entry point."""
    steps = ["--max-steps", "3", "--batch-size", "4", "-q"]
    r = cli("align", "--model", alias, "--n", "12", *steps, "--out", str(tmp_path / "align"))
    assert r.returncode == 0, r.stderr
    r = cli("finetune", "--model", str(tmp_path / "align"), "--n", "12", "-p", "0.25", *steps,
                "--out", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "ft" / "ftsafety_run.json").read_text())
    assert manifest["base_model"] == alias and len(manifest["adapters"]) == 2
    cfg = (tmp_path / "ft" / "config.yaml").read_text()
    assert "harmful: 3" in cfg and "task: 9" in cfg
    r = cli("evaluate", "--model", str(tmp_path / "ft"), "--hs-limit", "6", "--fa-limit", "4", "--or-limit", "2",
                "--max-new-tokens", "4", "--fa-max-new-tokens", "3", "-q", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["hs_n"] == 6 and res["fa_n"] == 4 and res["or_n"] == 2
    r = cli("summary", str(tmp_path / "ev"))
    assert r.returncode == 0 and "| ev |" in r.stdout


def _bad_jsonl_dir(tiny_data_dir, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(tiny_data_dir, d)
    with open(d / "beavertails" / "harmful_train.jsonl", "a") as fh:
        fh.write('{"prompt": "unterminated\n')
    return d


BAD = {
    "unknown model": (["evaluate", "--model", "llama9-1t"], "unknown model 'llama9-1t'"),
    "missing model dir": (["finetune", "--model", "./no/such/run"], "unknown model"),
    "missing data dir": (["align", "--model", "tiny-opt", "--data", "/no/such/dir"], "does not exist"),
    "p above 1": (["finetune", "--model", "tiny-opt", "-p", "1.5"], "harmful ratio p must be in [0, 1]"),
    "p below 0": (["finetune", "--model", "tiny-opt", "-p", "-0.2"], "harmful ratio p must be in [0, 1]"),
    "unknown task": (["finetune", "--model", "tiny-opt", "--task", "mnli"], "unknown task 'mnli'"),
    "unknown judge": (["evaluate", "--model", "tiny-opt", "--judge", "gpt5"], "unknown judge 'gpt5'"),
    "unknown template": (["align", "--model", "tiny-opt", "--template", "vicuna"], "unknown template"),
    "bad lr": (["align", "--model", "tiny-opt", "--lr", "-1"], "learning rate must be a finite number in"),
    "bad lora targets": (["align", "--model", "tiny-opt", "--lora-targets", "nope_proj", "--max-steps", "1"],
                         "match no linear layer"),
    "n too large": (["finetune", "--model", "tiny-opt", "--n", "100000", "-p", "0.1"], "rows are available"),
    "not a number": (["finetune", "--model", "tiny-opt", "-p", "abc"], "valid number"),
    "unknown option": (["align", "--model", "tiny-opt", "--rho", "2"], "No such option"),
    "summary of missing run": (["summary", "/no/such/eval"], "no results.json"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_error(case, tmp_path, cli):
    args, expected = BAD[case]
    out = tmp_path / "out"
    r = cli(*args, "--out", str(out)) if args[0] != "summary" else cli(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert expected in lines[0], lines[0]
    assert not out.exists()


def test_malformed_jsonl_names_file_and_line(tiny_data_dir, tmp_path, cli):
    d = _bad_jsonl_dir(tiny_data_dir, tmp_path)
    r = cli("finetune", "--model", "tiny-opt", "--data", str(d), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "harmful_train.jsonl:601: malformed JSON" in r.stderr
    assert not (tmp_path / "o").exists()


def test_real_entry_point_prints_one_line(tmp_path):
    """The installed console script (a subprocess, as a user runs it) gives one line and exit 2."""
    r = run_cli("finetune", "--model", "tiny-opt", "-p", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: harmful ratio p must be in [0, 1], got 2.0"


def test_env_prints_ranges_and_lock(cli):
    """`ftsafety env`: the supported ranges from the package metadata, the locked set shipped with the
    package, and which installed packages differ from it."""
    r = cli("env")
    assert r.returncode == 0, r.stderr
    deps = json.loads(r.stdout)["dependencies"]
    spec = next(x.replace(" ", "") for x in deps["supported"] if x.startswith("transformers"))
    assert {">=5.23", "<6"} <= set(spec[len("transformers"):].split(",")), spec
    assert deps["locked"]["transformers"] and deps["locked"]["torch"]
    assert isinstance(deps["installed_differs_from_lock"], dict)


def test_lock_pins_every_requirement():
    """Every runtime and test requirement has an exact version in the lock, inside the supported range."""
    import re
    from importlib.metadata import requires

    from ftsafety.utils import locked_requirements

    locked = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in locked_requirements().items()}
    for req in requires("ftsafety"):
        if "extra ==" in req and not re.search(r"extra == \"(test|plot)\"", req):
            continue
        name = re.split(r"[<>=!~; \[]", req, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in locked, f"{name} is not in the lock"


def test_bare_command_and_short_help(cli):
    """Bare `ftsafety` prints the help and exits 0 (no error line); -h is --help (issue 19)."""
    r = cli()
    assert r.returncode == 0 and "Usage" in r.stdout and r.stderr.strip() == ""
    for args in (("-h",), ("align", "-h")):
        r = cli(*args)
        assert r.returncode == 0 and "Usage" in r.stdout, args


def test_evaluate_takes_trust_remote_code(cli, monkeypatch, tiny_data_dir, tmp_path):
    """A model aligned with --trust-remote-code can be evaluated with it (issue 19): the flag reaches the
    loader (off by default)."""
    from ftsafety import models

    seen = []
    real = models.load

    def spy(spec, *a, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(spec, *a, **kw)

    monkeypatch.setattr(models, "load", spy)
    base = ("evaluate", "--model", "tiny-opt", "--data", str(tiny_data_dir), "--hs-limit", "1", "--fa-limit", "0",
            "--or-limit", "0", "--max-new-tokens", "2", "-q")
    assert cli(*base, "--out", str(tmp_path / "a")).returncode == 0
    assert cli(*base, "--trust-remote-code", "--out", str(tmp_path / "b")).returncode == 0
    assert seen == [False, True]


def test_flags_take_no_value_in_help(cli):
    """Issue 19: a flag (--resume, --quiet, --trust-remote-code, --dry-run, ...) is shown without a
    `<bool>` value, and placeholders are named in capitals."""
    for command in ("align", "align-vaccine", "finetune-lisa", "prune-antidote", "recover-rollback", "evaluate",
                    "run", "report"):
        r = cli(command, "--help")
        assert r.returncode == 0, r.stderr
        flagged = [line for line in r.stdout.splitlines() if "<bool>" in line and "--help" not in line]
        assert flagged == [], f"{command}: {flagged}"
    assert "{RECIPE} [KEY=VALUE]..." in cli("run", "--help").stdout
