"""Bad input through the CLI, command by command: every case must fail cleanly.

Each case runs one `ftsafety` command (in-process, through the console entry point) and checks
  * a non-zero exit code,
  * exactly one non-empty line on stderr, starting with `error:` and naming the problem (a substring),
  * no `Traceback`,
  * nothing written: `--out <tmp>/out` does not exist afterwards and the test's directory holds
    exactly what it held before the command ran (no `.out.tmp-*`, `.out.partial`, probe or
    half-written directory, and the inputs untouched).

Adding a case: one entry in CASES, `Case(command, args, expected_substring)`, where `args` is a
tuple of strings or a function `(Inputs) -> list[str]` that builds its broken inputs (data
directories, model directories, run directories) under the test's directory first. `--out` is
appended unless the case gives its own. The cases of tests/test_cli.py (`BAD`) are not repeated here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

COMMANDS = ("align", "align-vaccine", "align-booster", "finetune", "finetune-lisa", "prune-antidote",
            "recover-rollback", "evaluate", "summary", "run", "report", "train-judge", "drift", "attack-search")
NO_OUT = ("summary", "run", "attack-search")  # commands without --out (run gets --runs <tmp>/out instead)

# Small settings so that a case that wrongly succeeds still costs seconds, not minutes.
TRAIN = ("--max-steps", "1", "--batch-size", "2", "-q")
ALIGN = ("--model", "tiny-opt", "--n", "8", *TRAIN)
FT = ("--model", "tiny-opt", "--n", "8", "-p", "0.25", *TRAIN)
LISA = ("--model", "tiny-opt", "--n", "8", "-p", "0.25", "--align-n", "4", "--alignment-steps", "1",
        "--finetune-steps", "1", *TRAIN)
EVAL = ("--hs-limit", "2", "--fa-limit", "2", "--or-limit", "1", "--max-new-tokens", "2", "--fa-max-new-tokens", "2",
        "-q")
ANTIDOTE = ("--calibration-n", "2", "--batch-size", "2", "-q")
ROLLBACK = ("--steps", "1", "--warmup-steps", "0", "--save-every", "1", "--recovery-n", "2", "--val-n", "2",
            "--batch-size", "2", "--fa-max-new-tokens", "1", "-q")


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class Inputs:
    """Builds one case's broken inputs under `<tmp>/in` (never touching the shared fixtures)."""

    def __init__(self, tmp_path: Path, data_dir: Path, aligned_run: Callable[[], Path], models: Callable[[], dict]):
        self.root = tmp_path / "in"
        self.root.mkdir(exist_ok=True)
        self.data = str(data_dir)
        self._data_dir, self._aligned_run, self._models = data_dir, aligned_run, models

    def path(self, name: str) -> Path:
        return self.root / name

    def dir(self, name: str) -> str:
        p = self.path(name)
        p.mkdir(parents=True, exist_ok=True)
        return str(p)

    def file(self, name: str, content: bytes | str = b"") -> str:
        p = self.path(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(p)

    def data_with(self, changes: dict[str, bytes | None]) -> str:
        """A copy of the tiny data directory with files replaced (bytes) or removed (None)."""
        d = self.root / "data"
        shutil.copytree(self._data_dir, d)
        for rel, content in changes.items():
            if content is None:
                (d / rel).unlink()
            else:
                (d / rel).write_bytes(content)
        return str(d)

    def run(self, edit: Callable[[Path], None] | None = None, name: str = "run") -> str:
        """A copy of a finished `align` run (tiny-opt), edited by `edit(run_dir)`."""
        d = self.root / name
        shutil.copytree(self._aligned_run(), d)
        manifest = json.loads((d / "ftsafety_run.json").read_text())
        for a in manifest["adapters"]:  # point at this copy's adapter, not the original's
            a["path"] = str((d / a["relpath"]).resolve())
        (d / "ftsafety_run.json").write_text(json.dumps(manifest))
        if edit is not None:
            edit(d)
        return str(d)

    def model(self, kind: str) -> str:
        d = self.root / f"model-{kind}"
        shutil.copytree(self._models()[kind], d)
        return str(d)


Args = tuple | Callable[[Inputs], list]


@dataclass(frozen=True)
class Case:
    command: str
    args: Args
    expect: str  # a substring of the single `error:` line
    skip: Callable[[], str | None] | None = None  # returns a reason to skip on this machine, or None
    env: dict | None = None  # environment variables set for the command
    patch: Callable | None = None  # patch(monkeypatch): e.g. a full disk at the moment a file is written


def _edit_manifest(**changes):
    def edit(run: Path):
        path = run / "ftsafety_run.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _truncate_adapter(run: Path):
    w = run / "adapter" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:10])


def _pickle_adapter(run: Path):
    w = run / "adapter" / "adapter_model.safetensors"
    w.rename(w.with_name("adapter_model.bin"))


def _drop_adapter(run: Path):
    shutil.rmtree(run / "adapter")


def _as_finetune(run: Path):
    """Make the run's config say it is an sst2 fine-tune (so recover-rollback knows its rows)."""
    (run / "config.yaml").write_text("stage: finetune\ntask: sst2\nkinds: {task: 6, harmful: 2}\n")


def _read_only_dir(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o500)
    return path


def _long_rows(n: int, chars: int) -> bytes:
    return jsonl([{"prompt": f"Question {i} " + "x" * chars, "response": "Sure.", "category": "privacy_violation"}
                  for i in range(n)])


CASES: dict[str, Case] = {
    # -- data files ----------------------------------------------------------------------------
    "data: sst2/train.jsonl missing": Case("finetune", lambda i: [
        *FT, "--data", i.data_with({"sst2/train.jsonl": None})], "sst2/train.jsonl: file not found"),
    "data: eval prompts missing": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--data", i.data_with({"beavertails/eval_prompts.jsonl": None})],
        "eval_prompts.jsonl: file not found"),
    "data: directory with no files": Case("align", lambda i: [
        *ALIGN, "--data", i.dir("emptydata")],
        "beavertails/harmful_train.jsonl: file not found"),
    "data: empty harmful_train": Case("align", lambda i: [
        *ALIGN, "--data", i.data_with({"beavertails/harmful_train.jsonl": b""})],
        "harmful_train.jsonl: file is empty"),
    "data: blank-lines-only calibration (booster)": Case("align-booster", lambda i: [
        *ALIGN, "--data", i.data_with({"beavertails/harmful_calibration.jsonl": b"\n  \n\n"})],
        "harmful_calibration.jsonl: file is empty"),
    "data: malformed JSONL line (lisa)": Case("finetune-lisa", lambda i: [
        *LISA, "--data", i.data_with({"sst2/train.jsonl": jsonl([{"sentence": "ok", "label": 1}] * 2)
                                      + b'{"sentence": "broken", "label": \n'})],
        "sst2/train.jsonl:3: malformed JSON"),
    "data: non-UTF-8 bytes": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--data", i.data_with(
            {"beavertails/eval_prompts.jsonl": jsonl([{"prompt": "hi"}]) + b'{"prompt": "caf\xe9 \xff"}\n'})],
        "eval_prompts.jsonl:2: not valid UTF-8"),
    "data: row missing a field (rollback calibration)": Case("recover-rollback", lambda i: [
        "--model", i.run(_as_finetune), "--aligned", "tiny-opt", *ROLLBACK,
        "--data", i.data_with({"beavertails/harmful_calibration.jsonl": jsonl([{"prompt": "how?"}])})],
        "harmful_calibration.jsonl:1: missing field 'response'"),
    "data: row missing label (evaluate FA)": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--data", i.data_with({"sst2/validation.jsonl": jsonl([{"sentence": "fine"}])})],
        "validation.jsonl:1: missing field 'label'"),
    "data: JSON line that is not an object (vaccine)": Case("align-vaccine", lambda i: [
        *ALIGN, "--data", i.data_with({"beavertails/harmful_train.jsonl": b'["prompt", "response"]\n'})],
        "harmful_train.jsonl:1: expected a JSON object"),
    "data: label out of range (ag_news)": Case("finetune", lambda i: [
        *FT, "--task", "ag_news",
        "--data", i.data_with({"ag_news/train.jsonl": jsonl([{"text": "a", "label": 9}] * 8)})],
        "ag_news/train.jsonl: row 1: label 9 is not one of 0..3"),
    "data: text field not a string (antidote calibration)": Case("prune-antidote", lambda i: [
        "--model", "tiny-opt", "--target", "dense", *ANTIDOTE,
        "--data", i.data_with({"beavertails/harmful_calibration.jsonl": jsonl([{"prompt": 5, "response": "x"}])})],
        "harmful_calibration.jsonl: row 1: field 'prompt' must be a string, got int"),
    "data: eval prompt longer than the model's context": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--data", i.data_with({"beavertails/eval_prompts.jsonl": _long_rows(2, 1200)})],
        "harmful prompt 1 is"),
    "data: training example longer than the model's context": Case("align", lambda i: [
        *ALIGN, "--max-length", "4096",
        "--data", i.data_with({"beavertails/harmful_train.jsonl": _long_rows(600, 1500)})],
        "more than the model's context of 1024 tokens"),
    # -- models, adapters and run directories ---------------------------------------------------
    "model: BERT encoder directory": Case("align", lambda i: [*ALIGN[2:], "--model", i.model("bert")],
                                          "not a causal LM"),
    "model: BERT config without architectures": Case("evaluate", lambda i: [
        *EVAL, "--model", i.model("bert-config")], "not a causal LM"),
    "model: directory that is not a model": Case("evaluate", lambda i: [
        *EVAL, "--model", str(Path(i.file("notamodel/README.md", "hello")).parent)],
        "holds neither a model"),
    "model: config.json is not JSON": Case("finetune", lambda i: [
        *FT[2:], "--model", str(Path(i.file("badcfg/config.json", "{model_type: opt")).parent)],
        "config.json is not valid JSON"),
    "model: pickle weights only": Case("align", lambda i: [*ALIGN[2:], "--model", i.model("pickle")],
                                       "ftsafety loads safetensors only"),
    "model: config without weights": Case("finetune-lisa", lambda i: [*LISA[2:], "--model", i.model("noweights")],
                                          "no model weights"),
    "adapter: trained for another base model": Case("finetune", lambda i: [
        *FT[2:], "--model", i.run(_edit_manifest(base_model="tiny-llama"))],
        "adapter was trained for a opt model"),
    "adapter: truncated safetensors": Case("evaluate", lambda i: [*EVAL, "--model", i.run(_truncate_adapter)],
                                           "corrupt or truncated safetensors"),
    "adapter: pickle weights instead of safetensors": Case("prune-antidote", lambda i: [
        *ANTIDOTE, "--model", i.run(_pickle_adapter)], "only pickle adapter weights"),
    "adapter: adapter_config.json is not JSON": Case("align-vaccine", lambda i: [
        *ALIGN[2:], "--model", i.run(lambda r: (r / "adapter" / "adapter_config.json").write_text("{"))],
        "adapter_config.json is not valid JSON"),
    "run: manifest is not JSON": Case("evaluate", lambda i: [
        *EVAL, "--model", i.run(lambda r: (r / "ftsafety_run.json").write_text("{oops"))],
        "not a valid ftsafety run manifest"),
    "run: adapter directory missing (rollback --aligned)": Case("recover-rollback", lambda i: [
        *ROLLBACK, "--model", i.run(_as_finetune, "ft"), "--aligned", i.run(_drop_adapter)],
        "listed in ftsafety_run.json is missing"),
    # -- output directory -------------------------------------------------------------------------
    "out: parent is a file": Case("align", lambda i: [
        *ALIGN, "--out", str(Path(i.file("afile", "x")) / "out")], "is not a directory"),
    "out: parent directory read-only (chmod 0o500)": Case("align-vaccine", lambda i: [
        *ALIGN, "--out", str(_read_only_dir(i.path("ro")) / "out")], "is not writable",
        skip=lambda: "root writes into read-only directories" if os.geteuid() == 0 else None),
    "out: not writable (/proc)": Case("evaluate", (
        "--model", "tiny-opt", *EVAL, "--out", "/proc/ftsafety-bad-input/out"), "is not writable"),
    "out: existing non-empty directory that is not a run": Case("finetune", lambda i: [
        *FT, "--out", str(Path(i.file("mywork/notes.txt", "keep me")).parent)], "is not an ftsafety run"),
    "out: existing file": Case("prune-antidote", lambda i: [
        *ANTIDOTE, "--model", "tiny-opt", "--out", i.file("results.txt", "x")], "exists and is not a directory"),
    # -- training options ---------------------------------------------------------------------------
    "train: NaN loss (huge learning rate and LoRA alpha)": Case("align", (
        "--model", "tiny-opt", "--n", "8", "--max-steps", "3", "--batch-size", "4", "-q", "--lr", "1000",
        "--lora-alpha", "1000000", "--scheduler", "constant", "--warmup-ratio", "0"), "check --lr and the method's strength"),
    "train: learning rate beyond any use (1e30)": Case("align", (
        "--model", "tiny-opt", "--n", "8", "--max-steps", "3", "--batch-size", "4", "-q", "--lr", "1e30"),
        "learning rate must be a finite number in (0, 1000]"),
    "train: negative --n": Case("align", ("--model", "tiny-opt", "--n", "-5", *TRAIN), "alignment size must be >= 1"),
    "train: negative --n (finetune)": Case("finetune", ("--model", "tiny-opt", "--n", "-1", *TRAIN),
                                           "number of fine-tuning samples n must be >= 1"),
    "train: zero batch size": Case("finetune", (*FT, "--batch-size", "0"), "batch size"),
    "train: epochs 0 and no max steps": Case("align-booster", (
        "--model", "tiny-opt", "--n", "8", "--epochs", "0", "-q"), "give epochs > 0 or max steps > 0"),
    "train: NaN learning rate": Case("finetune-lisa", (*LISA, "--lr", "nan"), "learning rate must be a finite number in (0, 1000]"),
    "train: warmup ratio above 1": Case("align", (*ALIGN, "--warmup-ratio", "1.5"), "warmup ratio must be in [0, 1)"),
    "train: LoRA rank 0": Case("align-vaccine", (*ALIGN, "--lora-r", "0"), "LoRA rank must be an integer >= 1"),
    "train: negative LoRA alpha": Case("finetune", (*FT, "--lora-alpha", "-5"),
                                       "LoRA alpha must be a finite number in (0, 1e+06]"),
    "train: max length below 16": Case("finetune", (*FT, "--max-length", "8"), "max length must be at least 16"),
    "train: benign ratio 1": Case("align", (*ALIGN, "--benign-ratio", "1"), "benign ratio must be in [0, 1)"),
    # -- devices --------------------------------------------------------------------------------
    "device: cuda:7": Case("align", (*ALIGN, "--device", "cuda:7"), "'cuda:7'"),
    "device: tpu": Case("evaluate", ("--model", "tiny-opt", *EVAL, "--device", "tpu"), "unknown device 'tpu'"),
    "device: meta": Case("finetune", (*FT, "--device", "meta"), "unknown device 'meta'"),
    # -- defense options ------------------------------------------------------------------------------
    "vaccine: unknown --perturb-at": Case("align-vaccine", (*ALIGN, "--perturb-at", "mlp"),
                                          "unknown --perturb-at 'mlp'"),
    "vaccine: negative --rho": Case("align-vaccine", (*ALIGN, "--rho", "-1"), "rho must be a finite number in [0, 1e+06]"),
    "booster: negative --alpha": Case("align-booster", (*ALIGN, "--alpha", "-0.1"),
                                      "alpha must be a finite number in [0, 1e+06]"),
    "booster: infinite --lam": Case("align-booster", (*ALIGN, "--lam", "inf"), "lam must be a finite number in [0, 1e+06]"),
    "lisa: negative alignment steps": Case("finetune-lisa", (*LISA, "--alignment-steps", "-1"),
                                           "alignment and fine-tuning steps must be >= 0"),
    "lisa: both step counts 0": Case("finetune-lisa", (*LISA, "--alignment-steps", "0", "--finetune-steps", "0"),
                                     "are both 0"),
    "lisa: harmful ratio above 1": Case("finetune-lisa", (*LISA, "-p", "1.5"), "harmful ratio p must be in [0, 1]"),
    "lisa: harmful ratio below 0": Case("finetune-lisa", (*LISA, "-p", "-0.5"), "harmful ratio p must be in [0, 1]"),
    "lisa: negative --align-n": Case("finetune-lisa", (*LISA, "--align-n", "-3"), "--align-n must be >= 0"),
    "antidote: ratio above 1": Case("prune-antidote", ("--model", "tiny-opt", *ANTIDOTE, "--ratio", "1.5"),
                                    "prune ratio must be in [0, 1]"),
    "antidote: ratio below 0": Case("prune-antidote", ("--model", "tiny-opt", *ANTIDOTE, "--ratio", "-0.1"),
                                    "prune ratio must be in [0, 1]"),
    "antidote: unknown --target": Case("prune-antidote", ("--model", "tiny-opt", *ANTIDOTE, "--target", "mlp"),
                                       "unknown target 'mlp'"),
    "antidote: unknown --scope": Case("prune-antidote", ("--model", "tiny-opt", *ANTIDOTE, "--scope", "column"),
                                      "unknown scope 'column'"),
    "antidote: base model has no adapter to prune": Case("prune-antidote", ("--model", "tiny-opt", *ANTIDOTE),
                                                         "has no LoRA adapter to prune"),
    "rollback: --aligned not given": Case("recover-rollback", ("--model", "tiny-opt", *ROLLBACK),
                                          "Missing option '--aligned'"),
    "rollback: --aligned does not exist": Case("recover-rollback", lambda i: [
        "--model", i.run(_as_finetune),
        "--aligned", "./no/such/aligned-run", *ROLLBACK], "unknown model './no/such/aligned-run'"),
    "rollback: recovery rate above 1": Case("recover-rollback", (
        "--model", "tiny-opt", "--aligned", "tiny-opt", *ROLLBACK, "--recovery-rate", "1.5"),
        "recovery rate must be in [0, 1]"),
    # -- evaluate -----------------------------------------------------------------------------------
    "evaluate: --hs-limit -1": Case("evaluate", ("--model", "tiny-opt", *EVAL, "--hs-limit", "-1"),
                                    "--hs-limit must be >= 0"),
    "evaluate: --max-new-tokens 0": Case("evaluate", ("--model", "tiny-opt", *EVAL, "--max-new-tokens", "0"),
                                         "--max-new-tokens must be >= 1"),
    "evaluate: --batch-size 0": Case("evaluate", ("--model", "tiny-opt", *EVAL, "--batch-size", "0"),
                                     "--batch-size must be >= 1"),
    "evaluate: classifier judge directory missing": Case("evaluate", (
        "--model", "tiny-opt", *EVAL, "--judge", "classifier:/no/such/dir"), "classifier:/no/such/dir"),
    "evaluate: classifier judge without a path": Case("evaluate", (
        "--model", "tiny-opt", *EVAL, "--judge", "classifier:"), "unknown judge 'classifier:'"),
    # -- summary ----------------------------------------------------------------------------------
    "summary: results.json is not JSON": Case("summary", lambda i: [
        str(Path(i.file("ev/results.json", '{"hs": 1.0,')).parent)], "not valid JSON"),
    "summary: results.json is a list": Case("summary", lambda i: [
        str(Path(i.file("ev/results.json", '[1, 2]')).parent)], "not an evaluation result"),
    "align: unknown scheduler": Case("align", (*ALIGN, "--scheduler", "bogus"), "unknown scheduler 'bogus'"),
    "finetune: negative weight decay": Case("finetune", (*FT, "--weight-decay", "-1"), "weight decay must be >= 0"),
    "align-vaccine: negative seed": Case("align-vaccine", (*ALIGN, "--seed", "-1"), "seed must be in [0, 2**32)"),
    # -- run (recipes) -------------------------------------------------------------------------------
    "run: recipe file missing": Case("run", lambda i: [str(i.path("no.yaml")), *_RUNS(i)],
                                     "recipe file does not exist"),
    "run: empty recipe": Case("run", lambda i: [i.file("r.yaml", ""), *_RUNS(i)], "the recipe is empty"),
    "run: malformed YAML": Case("run", lambda i: [i.file("r.yaml", "name: x\nalign: {method: sft\n"), *_RUNS(i)],
                                "malformed YAML at line"),
    "run: recipe is a list": Case("run", lambda i: [i.file("r.yaml", "- a\n- b\n"), *_RUNS(i)],
                                  "the top level must be a mapping"),
    "run: recipe is not UTF-8": Case("run", lambda i: [i.file("r.yaml", b"name: \xff\xfe\n"), *_RUNS(i)],
                                     "not UTF-8"),
    "run: unknown key": Case("run", lambda i: [i.file("r.yaml", "name: x\nfinetune: {harmfull_ratio: 0.1}\n"),
                                               *_RUNS(i)], "did you mean 'finetune.harmful_ratio'"),
    "run: wrong type": Case("run", lambda i: [i.file("r.yaml", "name: x\nalign: {n: many}\n"), *_RUNS(i)],
                            "align.n must be an integer, got 'many'"),
    "run: missing name": Case("run", lambda i: [i.file("r.yaml", "model: tiny-opt\n"), *_RUNS(i)],
                              "missing key 'name'"),
    "run: unknown stage method": Case("run", lambda i: [i.file("r.yaml", "name: x\npost: {method: prune}\n"),
                                                        *_RUNS(i)], "unknown post method 'prune'"),
    "run: table p above 1": Case("run", lambda i: [
        i.file("r.yaml", "name: x\ntable: {ratios: [0, 1.5], rows: [{name: a}]}\n"), *_RUNS(i)],
        "harmful ratio p must be in [0, 1], got 1.5"),
    "run: override without =": Case("run", lambda i: [i.file("r.yaml", "name: x\n"), "finetune.n", *_RUNS(i)],
                                    "expected key=value"),
    "run: override of an unknown key": Case("run", lambda i: [i.file("r.yaml", "name: x\n"), "finetune.nn=3",
                                                              *_RUNS(i)], "did you mean 'finetune.n'"),
    "run: --only names no row": Case("run", lambda i: [
        i.file("r.yaml", "name: x\nmodel: tiny-opt\ntable: {rows: [{name: a}]}\n"), "--only", "b", *_RUNS(i)],
        "no row named 'b'"),
    # -- issue 19: accepted before, or a raw exception -----------------------------------------------
    "align: --epochs nan": Case("align", (*ALIGN[:-5], "--epochs", "nan", "--batch-size", "2", "-q"),
                                "epochs must be a finite number"),
    "align: --epochs inf": Case("align", (*ALIGN[:-5], "--epochs", "inf", "--batch-size", "2", "-q"),
                                "epochs must be a finite number"),
    "align: seed above 2**64": Case("align", (*ALIGN, "--seed", "18446744073709551616"), "seed must be in [0, 2**32)"),
    "evaluate: seed above 2**32": Case("evaluate", ("--model", "tiny-opt", *EVAL, "--seed", "4294967296"),
                                       "seed must be in [0, 2**32)"),
    "align: WORLD_SIZE=abc": Case("align", ALIGN, "WORLD_SIZE='abc' is not an integer", env={"WORLD_SIZE": "abc"}),
    "align: LOCAL_RANK=x": Case("align", ALIGN, "LOCAL_RANK='x' is not an integer",
                                env={"WORLD_SIZE": "2", "LOCAL_RANK": "x"}),
    "data: empty harmful prompt": Case("align", lambda i: [*ALIGN, "--data", i.data_with({
        "beavertails/harmful_train.jsonl": jsonl([{"prompt": "   ", "response": "r", "category": "x"}] * 600)})],
        "field 'prompt' is empty"),
    "data: empty eval prompt": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--data", i.data_with({"beavertails/eval_prompts.jsonl": jsonl(
            [{"prompt": "", "category": "x"}] * 3)})], "field 'prompt' is empty"),
    "data: empty SST-2 sentence": Case("finetune", lambda i: [*FT, "--data", i.data_with({
        "sst2/train.jsonl": jsonl([{"sentence": " ", "label": 1}] * 300)})], "field 'sentence' is empty"),
    "data: a list as a category": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--data", i.data_with({"beavertails/eval_prompts.jsonl": jsonl(
            [{"prompt": "p", "category": ["a", 1]}] * 3)})], "field 'category' must be a string"),
    "run: duplicate key in a recipe": Case("run", lambda i: [
        i.file("r.yaml", "name: x\nalign: {n: 3}\nalign: {n: 4}\n"), *_RUNS(i)], "duplicate key 'align'"),
    "run: override with an empty key part": Case("run", lambda i: [i.file("r.yaml", "name: x\n"), "align..n=3",
                                                                   *_RUNS(i)], "empty key part"),
    # -- report -------------------------------------------------------------------------------------
    "report: not a runs directory": Case("report", lambda i: [i.dir("empty")], "no pipelines/ directory"),
    "report: broken pipeline record": Case("report", lambda i: [
        str(Path(i.file("runs/pipelines/r/a-p0.json", "{")).parent.parent.parent)], "not valid JSON"),
}


def _evaluate_run(i: Inputs) -> str:
    """A finished evaluation's directory (what `evaluate --out` writes)."""
    for name, text in (("results.json", '{"hs": 1.0}'), ("samples.jsonl", '{"prompt": "p"}\n'), ("config.yaml", "{}\n")):
        i.file(f"evrun/{name}", text)
    return str(i.path("evrun"))


def _fake_run(i: Inputs, kind_file: str, name: str) -> str:
    """A finished Antidote (antidote.json) or rollback (rollback.json) run's directory: every file of its kind."""
    i.file(f"{name}/{kind_file}", "{}")
    i.file(f"{name}/ftsafety_run.json", '{"base_model": "tiny-opt", "adapters": []}')
    i.file(f"{name}/config.yaml", "{}\n")
    if kind_file == "antidote.json":
        i.file(f"{name}/mask.safetensors", b"")
    else:
        i.dir(f"{name}/model")
    return str(i.path(name))


def _finetuned_from(i: Inputs) -> tuple[str, str]:
    """An align run and a run whose adapter chain extends it (a fine-tune of it, as a manifest says)."""
    al = Path(i.run(name="al"))

    def chain(run: Path):
        path = run / "ftsafety_run.json"
        m = json.loads(path.read_text())
        m["adapters"] = [{"path": str(al / "adapter"), "relpath": "../al/adapter"},
                         {"path": str(run / "adapter"), "relpath": "adapter"}]
        m["stage"] = "finetune"
        path.write_text(json.dumps(m))

    return str(al), i.run(chain, name="ft")


def _disk_full(target: str, wrap: bool = False):
    """patch(monkeypatch): `target` (module.attr) fails as a full disk does (or torch's wrapped form)."""
    import errno as _errno

    def patch(mp):
        def fail(*a, **k):
            err = OSError(_errno.ENOSPC, "No space left on device", "adapter_model.safetensors")
            if wrap:
                raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos") from err
            raise err
        mp.setattr(target, fail)
    return patch


def _prompts(i: Inputs, name: str, content: str) -> str:
    return i.file(name, content)


CASES.update({
    # -- issue 19, second part: accepted before --------------------------------------------------
    "align: a flag given a value (--resume true)": Case("align", (*ALIGN, "--resume", "true"),
                                                        "flags take no value: write the flag alone"),
    "finetune: --out an evaluation run": Case("finetune", lambda i: [*FT, "--out", _evaluate_run(i)],
                                              "holds an ftsafety evaluate run"),
    "align: --out an evaluation run": Case("align", lambda i: [*ALIGN, "--out", _evaluate_run(i)],
                                           "refusing to replace it with a train run"),
    "evaluate: --out a training run": Case("evaluate", lambda i: ["--model", "tiny-opt", *EVAL, "--out", i.run()],
                                           "holds an ftsafety train run"),
    "prune-antidote: --out an evaluation run": Case("prune-antidote", lambda i: [
        "--model", i.run(), *ANTIDOTE, "--target", "dense", "--out", _evaluate_run(i)], "holds an ftsafety evaluate run"),
    "align-vaccine: --out an Antidote run": Case("align-vaccine", lambda i: [
        *ALIGN, "--out", _fake_run(i, "antidote.json", "pruned")], "holds an ftsafety antidote run"),
    "finetune-lisa: --out a rollback run": Case("finetune-lisa", lambda i: [
        *LISA, "--out", _fake_run(i, "rollback.json", "rolled")], "holds an ftsafety rollback run"),
    "recover-rollback: --out an evaluation run": Case("recover-rollback", lambda i: [
        "--model", _finetuned_from(i)[1], "--aligned", str(i.path("al")), *ROLLBACK, "--out", _evaluate_run(i)],
        "holds an ftsafety evaluate run"),
    "recover-rollback: --model and --aligned swapped": Case("recover-rollback", lambda i: [
        "--model", _finetuned_from(i)[0], "--aligned", str(i.path("ft")), *ROLLBACK], "they look swapped"),
    "recover-rollback: a system prompt without the chat template": Case("recover-rollback", lambda i: [
        "--model", _finetuned_from(i)[1], "--aligned", str(i.path("al")), *ROLLBACK, "--system-prompt", "llama2"],
        "--system-prompt needs the chat template"),
    "recover-rollback: the same model twice": Case("recover-rollback", lambda i: [
        "--model", i.run(), "--aligned", str(i.path("run")), *ROLLBACK], "are the same model"),
    "prune-antidote: an alignment run": Case("prune-antidote", lambda i: ["--model", i.run(), *ANTIDOTE],
                                             "last adapter is an alignment (align)"),
    "finetune: --continue-adapter on a base model": Case("finetune", (*FT, "--continue-adapter"),
                                                          "and tiny-opt has none"),
    "align: --lora-r 100000": Case("align", (*ALIGN, "--lora-r", "100000"), "--lora-r 100000 is larger than"),
    "align-vaccine: --lora-r 100000": Case("align-vaccine", (*ALIGN, "--lora-r", "100000"), "is larger than"),
    "align-booster: --lora-r 100000": Case("align-booster", (*ALIGN, "--lora-r", "100000"), "is larger than"),
    "finetune: --lora-r 100000": Case("finetune", (*FT, "--lora-r", "100000"), "is larger than"),
    "finetune-lisa: --lora-r 100000": Case("finetune-lisa", (*LISA, "--lora-r", "100000"), "is larger than"),
    "evaluate: FTSAFETY_CACHE a file": Case("evaluate", ("--model", "smollm2-135m", *EVAL), "is not a folder",
                                            env={"FTSAFETY_CACHE": "/etc/passwd"}),
    "evaluate: FTSAFETY_CACHE under a file": Case("evaluate", ("--model", "smollm2-135m", *EVAL), "is not a folder",
                                                  env={"FTSAFETY_CACHE": "/etc/passwd/models"}),
    "evaluate: FTSAFETY_CACHE empty": Case("evaluate", ("--model", "smollm2-135m", *EVAL),
                                           "FTSAFETY_CACHE is set but empty", env={"FTSAFETY_CACHE": " "}),
    "align: FTSAFETY_CACHE a file": Case("align", ("--model", "smollm2-135m", *ALIGN[2:]), "is not a folder",
                                         env={"FTSAFETY_CACHE": "/etc/passwd"}),
    "prune-antidote: FTSAFETY_CACHE a file": Case("prune-antidote", (
        "--model", "smollm2-135m", "--target", "dense", *ANTIDOTE), "is not a folder", env={"FTSAFETY_CACHE": "/etc/passwd"}),
    "evaluate: disk full writing samples": Case("evaluate", ("--model", "tiny-opt", *EVAL), "no space left on the device",
                                                patch=_disk_full("ftsafety.evaluation.evaluate.write_jsonl")),
    "prune-antidote: disk full writing the mask": Case("prune-antidote", lambda i: [
        "--model", _finetuned_from(i)[1], *ANTIDOTE], "no space left on the device",
        patch=_disk_full("safetensors.torch.save_file")),
    "prune-antidote: disk full, torch's wrapped error": Case("prune-antidote", lambda i: [
        "--model", _finetuned_from(i)[1], *ANTIDOTE], "no space left on the device",
        patch=_disk_full("safetensors.torch.save_file", wrap=True)),
    # -- --hs-prompts / --or-prompts / --prompt-field (issue 18) ------------------------------------
    "evaluate: unknown prompt set": Case("evaluate", ("--model", "tiny-opt", *EVAL, "--hs-prompts", "advbnch"),
                                         "unknown prompt set 'advbnch'"),
    "evaluate: a benign set as --hs-prompts": Case("evaluate", ("--model", "tiny-opt", *EVAL, "--hs-prompts", "xstest"),
                                                   "xstest is a benign prompt set"),
    "evaluate: a harmful set as --or-prompts": Case("evaluate", ("--model", "tiny-opt", *EVAL, "--or-prompts", "jbb"),
                                                    "jbb is a harmful prompt set"),
    "evaluate: --hs-prompts file missing": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--hs-prompts", str(i.path("nope.jsonl"))], "file not found"),
    "evaluate: --hs-prompts a folder": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--hs-prompts", i.dir("set.jsonl")], "file not found"),
    "evaluate: --hs-prompts unsupported format": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--hs-prompts", _prompts(i, "p.xlsx", "x")], "unknown prompt set"),
    "evaluate: prompt file without a prompt column": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--hs-prompts", _prompts(i, "p.csv", "text,label\na,b\n")],
        "no prompt column (looked for prompt"),
    "evaluate: prompt file with an empty prompt": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--hs-prompts", _prompts(i, "p.jsonl", '{"prompt": "a"}\n{"prompt": " "}\n')],
        "row 2: field 'prompt' is empty"),
    "evaluate: prompt file of broken JSON": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--hs-prompts", _prompts(i, "p.json", '[{"prompt": "a"')], "malformed JSON"),
    "evaluate: prompt file with no rows": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--or-prompts", _prompts(i, "p.txt", "\n\n")], "no prompts"),
    "evaluate: not a parquet file": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--hs-prompts", _prompts(i, "p.parquet", "plain text")], "cannot read as parquet"),
    "evaluate: --prompt-field names no column": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--hs-prompts", _prompts(i, "p.jsonl", '{"prompt": "a"}\n'),
        "--prompt-field", "goal"], "row 1: field 'goal' is missing"),
    "evaluate: --prompt-field empty": Case("evaluate", ("--model", "tiny-opt", *EVAL, "--prompt-field", " "),
                                           "--prompt-field must name a column"),
    "run: a recipe's unknown prompt set": Case("run", lambda i: [
        i.file("r.yaml", "name: x\nmodel: tiny-opt\nevaluate: {hs_prompts: nosuch}\n"), *_RUNS(i)],
        "unknown prompt set 'nosuch'"),
    "run: a recipe's harmful set for OR": Case("run", lambda i: [
        i.file("r.yaml", "name: x\nmodel: tiny-opt\n"), "evaluate.or_prompts=advbench", *_RUNS(i)],
        "advbench is a harmful prompt set"),
})


def _RUNS(i: Inputs) -> list[str]:
    return ["--runs", str(i.root.parent / "out")]


# ---------------------------------------------------------------------------------------------
# Issue 28 (the second outside audit), one block per class of fault; each fix goes to the cause, so each
# class is tried on several commands and inputs, not only the audit's example.


def _user_folder(i: Inputs, *files: str) -> str:
    """A user's folder: the named files (a results.json, a run's markers...) beside their own work."""
    for name in files:
        i.file(f"mine/{name}", "{}")
    i.file("mine/notes.md", "months of notes")
    i.file("mine/src/main.py", "print('hello')")
    return str(i.path("mine"))


def _run_plus(i: Inputs, extra: str) -> str:
    """A finished run (align) with one file no run writes."""
    d = i.run()
    Path(d, extra).write_text("a user's file")
    return d


def _hold_lock():
    """patch(monkeypatch, out): another process holds the output's lock (flock on a second open file
    description of `.out.lock`, which conflicts even within this process)."""
    def patch(mp, out: Path):
        import fcntl

        fh = open(out.parent / f".{out.name}.lock", "a+")
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write("4242")
        fh.flush()
        mp.setattr(sys.modules[__name__], "_held_lock", fh, raising=False)  # kept open for the case
    patch.needs_out = True
    return patch


def _nan_adapter(run: Path):
    from safetensors.torch import load_file, save_file
    import torch

    w = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(w))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(w))


def _adapter_config(**changes):
    def edit(run: Path):
        path = run / "adapter" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _records(i: Inputs, edit, name: str = "runs") -> str:
    """A runs folder with one pipeline record (and its evaluation) as `ftsafety run` writes them, edited by
    `edit(record, results)` (either may be replaced by returning a value)."""
    runs = i.path(name)
    ev = runs / "stages" / "evaluate-keyword-000000000000"
    results = {"model": "tiny-opt", "judge": {"name": "keyword", "version": "1"}, "hs": 50.0, "hs_n": 4,
               "fa": 50.0, "fa_n": 4, "or": 0.0, "or_n": 2}
    record = {"recipe": "r", "row": "SFT", "p": 0.1, "model": "tiny-opt", "data": "builtin", "task": "sst2",
              "judge": results["judge"], "results": dict(results), "paper": {"hs": None, "fa": None, "note": ""},
              "stages": [{"kind": "evaluate", "method": "keyword", "dir": str(ev), "key": "0", "cached": False,
                          "seconds": 1.0}], "methods": ["evaluate:keyword"], "row_order": 0}
    rec_text, res_text = edit(record, results) or (None, None)
    i.file(f"{name}/stages/{ev.name}/results.json", res_text if res_text is not None else json.dumps(results))
    i.file(f"{name}/stages/{ev.name}/samples.jsonl", '{"kind": "harmful", "prompt": "p", "response": "r"}\n')
    i.file(f"{name}/stages/{ev.name}/config.yaml", "{}\n")
    i.file(f"{name}/pipelines/r/SFT-p0.1.json", rec_text if rec_text is not None else json.dumps(record))
    return str(runs)


def _set(path: str, value):
    """edit for `_records`: set one dotted field of the record ('record.paper.hs')."""
    def edit(record, results):
        *parents, last = path.split(".")[1:]
        obj = record
        for p in parents:
            obj = obj[p]
        obj[last] = value
    return edit


def _raw(record_text: str | None = None, results_text: str | None = None):
    return lambda record, results: (record_text, results_text)


def _eval_dir(i: Inputs, results) -> str:
    text = results if isinstance(results, str) else json.dumps(results)
    i.file("ev/results.json", text)
    i.file("ev/samples.jsonl", "")
    i.file("ev/config.yaml", "{}\n")
    return str(i.path("ev"))


def _surrogate(name: str) -> str:
    """A file name as Python sees it under LC_ALL=C (no UTF-8 mode): its UTF-8 bytes as lone surrogates."""
    return name.encode("utf-8").decode("ascii", "surrogateescape")


RECIPE = "name: a28\nmodel: tiny-opt\nalign: {n: 8, train: {max_steps: 1, batch_size: 2}}\n" \
         "finetune: {n: 8, harmful_ratio: 0.25, train: {max_steps: 1, batch_size: 2}}\n" \
         "evaluate: {hs_limit: 2, fa_limit: 2, or_limit: 1, max_new_tokens: 2, fa_max_new_tokens: 2}\n"


def _recipe(i: Inputs, extra: str = "", name: str = "r.yaml") -> str:
    return i.file(name, RECIPE + extra)


def _bomb(levels: int = 9, key: str = "description") -> str:
    lines = ['name: bomb', 'model: tiny-opt', 'x0: &x0 ["l", "o", "l", "l", "o", "l", "l", "o", "l", "l"]']
    for k in range(1, levels):
        lines.append(f"x{k}: &x{k} [" + ", ".join([f"*x{k - 1}"] * 10) + "]")
    lines.append(f"{key}: *x{levels - 1}")
    return "\n".join(lines) + "\n"


CASES.update({
    # -- a user's folder is never replaced (O01-O04, E27) -----------------------------------------
    "evaluate: --out a user's folder with a results.json": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--out", _user_folder(i, "results.json")], "is not an ftsafety run"),
    "align: --out a user's folder with a results.json": Case("align", lambda i: [
        *ALIGN, "--out", _user_folder(i, "results.json")], "is not an ftsafety run"),
    "align-booster: --out a user's folder with a run manifest": Case("align-booster", lambda i: [
        *ALIGN, "--out", _user_folder(i, "ftsafety_run.json")], "is not an ftsafety run"),
    "finetune: --out a user's folder with results and samples": Case("finetune", lambda i: [
        *FT, "--out", _user_folder(i, "results.json", "samples.jsonl", "config.yaml")], "is not an ftsafety run"),
    "prune-antidote: --out a user's folder with a results.json": Case("prune-antidote", lambda i: [
        "--model", _finetuned_from(i)[1], *ANTIDOTE, "--out", _user_folder(i, "results.json")], "is not an ftsafety run"),
    "recover-rollback: --out a user's folder with a run manifest": Case("recover-rollback", lambda i: [
        "--model", _finetuned_from(i)[1], "--aligned", str(i.path("al")), *ROLLBACK, "--out",
        _user_folder(i, "ftsafety_run.json", "rollback.json")], "is not an ftsafety run"),
    "finetune-lisa: --out a run with a user's file added": Case("finetune-lisa", lambda i: [
        *LISA, "--out", _run_plus(i, "thesis.tex")], "is not an ftsafety run"),
    "evaluate: --out a run with a user's folder added": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--out", _evaluate_run(i), "--hs-limit", "1", *([] if i.dir("evrun/mydata") else [])],
        "is not an ftsafety run"),
    "align-vaccine: --out a half run (results.json only)": Case("align-vaccine", lambda i: [
        *ALIGN, "--out", str(Path(i.file("half/results.json", "{}")).parent)], "is not an ftsafety run"),
    "report: --out holds a user's table.md": Case("report", lambda i: [
        _records(i, lambda r, s: None), "--out", str(Path(i.file("docs/table.md", "# my table")).parent)],
        "that no ftsafety report wrote"),
    "report: --out holds a user's table.csv and plot": Case("report", lambda i: [
        _records(i, lambda r, s: None), "--out", str(Path(i.file("docs/table.csv", "a,b")).parent)],
        "that no ftsafety report wrote"),
    "report: --out holds a table.json that is not a report": Case("report", lambda i: [
        _records(i, lambda r, s: None), "--out", str(Path(i.file("docs/table.json", '{"rows": 3}')).parent)],
        "that no ftsafety report wrote"),
    "report: --out is a file": Case("report", lambda i: [_records(i, lambda r, s: None), "--out", i.file("afile", "x")],
                                     "exists and is not a directory"),
    "report: --out cannot be created": Case("report", lambda i: [
        _records(i, lambda r, s: None), "--out", "/proc/ftsafety-report"], "cannot be written"),
    "train-judge: --out a user's folder": Case("train-judge", lambda i: [
        "--labels", i.file("l.jsonl", "{}"), "--base", "tiny-llama", "--out", _user_folder(i)], "not a judge directory"),
    # -- one writer per output: the lock (D01, D04) -----------------------------------------------
    **{f"{cmd}: another process is writing --out": Case(cmd, args, "another ftsafety process (pid 4242)",
                                                        patch=_hold_lock())
       for cmd, args in (("align", ALIGN), ("align-vaccine", ALIGN), ("finetune", FT), ("finetune-lisa", LISA),
                         ("evaluate", ("--model", "tiny-opt", *EVAL)))},
    "align-booster: another process is writing --out": Case("align-booster", ALIGN, "another ftsafety process",
                                                            patch=_hold_lock()),
    "prune-antidote: another process is writing --out": Case("prune-antidote", lambda i: [
        "--model", _finetuned_from(i)[1], *ANTIDOTE], "another ftsafety process", patch=_hold_lock()),
    "recover-rollback: another process is writing --out": Case("recover-rollback", lambda i: [
        "--model", _finetuned_from(i)[1], "--aligned", str(i.path("al")), *ROLLBACK], "another ftsafety process",
        patch=_hold_lock()),
    "report: another process is writing --out": Case("report", lambda i: [_records(i, lambda r, s: None)],
                                                     "another ftsafety process", patch=_hold_lock()),
    # -- non-finite weights and figures (A11, E01, E15) --------------------------------------------
    "summary: HS+ above 100": Case("summary", lambda i: [_eval_dir(i, {"hs_plus": 100.5})], "hs_plus must be a rate"),
    "summary: a nan compliance rate": Case("summary", lambda i: [_eval_dir(i, '{"cr": NaN}')], "cr must be a rate"),
    "report: a method list with a number": Case("report", lambda i: [_records(i, _set("record.methods", [1]))],
                                                "methods must be a list of strings"),
    "evaluate: an adapter with nan values": Case("evaluate", lambda i: [*EVAL, "--model", i.run(_nan_adapter)],
                                                 "holds nan or inf values"),
    "finetune: a parent adapter with nan values": Case("finetune", lambda i: [*FT[2:], "--model", i.run(_nan_adapter)],
                                                       "holds nan or inf values"),
    "prune-antidote: an adapter with nan values": Case("prune-antidote", lambda i: [
        "--model", i.run(_nan_adapter), *ANTIDOTE], "holds nan or inf values"),
    "align-booster: strength that overflows (lam 1e300)": Case("align-booster", (*ALIGN, "--lam", "1e300"),
                                                               "lam must be a finite number in [0, 1e+06]"),
    "finetune-lisa: strength that overflows (rho 1e308)": Case("finetune-lisa", (*LISA, "--rho", "1e308"),
                                                               "rho must be a finite number in [0, 1e+06]"),
    "align-vaccine: strength that overflows (rho 1e308)": Case("align-vaccine", (*ALIGN, "--rho", "1e308"),
                                                               "rho must be a finite number in [0, 1e+06]"),
    "align: LoRA alpha that overflows": Case("align", (*ALIGN, "--lora-alpha", "1e308"), "LoRA alpha must be a finite"),
    "align: epochs that overflow the step count": Case("align", ("--model", "tiny-opt", "--n", "8", "--batch-size", "2",
                                                                 "-q", "--epochs", "1e308"), "epochs must be a finite number"),
    "finetune: learning rate beyond any use": Case("finetune", (*FT, "--lr", "1e308"), "learning rate must be a finite"),
    "summary: a nan HS": Case("summary", lambda i: [_eval_dir(i, '{"hs": NaN, "model": "m"}')], "hs must be a rate"),
    "summary: an infinite FA": Case("summary", lambda i: [_eval_dir(i, '{"fa": Infinity}')], "fa must be a rate"),
    "summary: an HS above 100": Case("summary", lambda i: [_eval_dir(i, {"hs": 140.0})], "hs must be a rate in [0, 100]"),
    "summary: an HS that is text": Case("summary", lambda i: [_eval_dir(i, {"hs": "high"})], "hs must be a rate"),
    "summary: a judge that is text": Case("summary", lambda i: [_eval_dir(i, {"hs": 1.0, "judge": "keyword"})],
                                          "judge must be an object"),
    "summary: a model that is a list": Case("summary", lambda i: [_eval_dir(i, {"model": ["a"]})], "model must be a string"),
    "summary: a count that is negative": Case("summary", lambda i: [_eval_dir(i, {"hs": 1.0, "hs_n": -3})],
                                              "hs_n must be a whole number"),
    "summary: results.json a list": Case("summary", lambda i: [_eval_dir(i, "[1, 2]")], "expected a JSON object"),
    "report: a record's HS is nan": Case("report", lambda i: [_records(i, _raw(results_text='{"hs": NaN}'))],
                                         "hs must be a rate"),
    "report: a record without stages": Case("report", lambda i: [_records(i, _set("record.stages", []))],
                                            "stages must be a non-empty list"),
    "report: stages is a mapping": Case("report", lambda i: [_records(i, _set("record.stages", {"a": 1}))],
                                        "stages must be a non-empty list"),
    "report: p out of range": Case("report", lambda i: [_records(i, _set("record.p", 7))], "p must be a number in [0, 1]"),
    "report: p is text": Case("report", lambda i: [_records(i, _set("record.p", "0.1"))], "p must be a number"),
    "report: the row is a number": Case("report", lambda i: [_records(i, _set("record.row", 3))], "row must be a string"),
    "report: results is a list": Case("report", lambda i: [_records(i, _set("record.results", [1]))],
                                      "results must be an object"),
    "report: paper is a list": Case("report", lambda i: [_records(i, _set("record.paper", []))], "paper must be an object"),
    "report: a paper figure that is text": Case("report", lambda i: [_records(i, _set("record.paper.hs", "x"))],
                                                "paper.hs must be a number"),
    "report: a stage's seconds are text": Case("report", lambda i: [_records(
        i, lambda r, s: r["stages"][0].update(seconds="slow"))], "seconds must be a number"),
    "report: a record that is broken JSON": Case("report", lambda i: [_records(i, _raw('{"recipe": "r", "p'))],
                                                 "not valid JSON"),
    "report: an evaluation's results.json broken": Case("report", lambda i: [_records(i, _raw(results_text='{"hs": '))],
                                                        "results.json: not valid JSON"),
    "report: a record that is a list": Case("report", lambda i: [_records(i, _raw("[1, 2, 3]"))], "expected a JSON object"),
    "report: only files that are not records": Case("report", lambda i: [_records(i, _raw('{"other": 1}'))],
                                                    "no pipeline records"),
    "report: an FA of -5": Case("report", lambda i: [_records(i, _raw(results_text='{"fa": -5}'))], "fa must be a rate"),
    # -- remote code only from the command line (B26) ----------------------------------------------
    "run: a recipe that grants itself remote code": Case("run", lambda i: [
        _recipe(i, "trust_remote_code: true\n"), *_RUNS(i)], "pass --trust-remote-code"),
    "run: remote code through an override": Case("run", lambda i: [
        _recipe(i), "trust_remote_code=true", *_RUNS(i)], "pass --trust-remote-code"),
    "run: remote code in a dry run": Case("run", lambda i: [
        _recipe(i, "trust_remote_code: true\n"), "--dry-run", *_RUNS(i)], "pass --trust-remote-code"),
    # -- model folders and adapters (B08, B12, B18, B19x, B23, B28, B29) ---------------------------
    "model: a shard index that points outside the folder": Case("evaluate", lambda i: [
        *EVAL, "--model", _shard_outside(i)], "lies outside the model directory"),
    "model: a shard index naming a missing shard": Case("finetune", lambda i: [
        *FT[2:], "--model", _shard_outside(i, "missing.safetensors")], "is missing"),
    "model: a zero-byte safetensors beside a pickle": Case("evaluate", lambda i: [
        *EVAL, "--model", _zero_weights(i)], "corrupt or truncated safetensors"),
    "adapter: peft_type is prefix tuning": Case("evaluate", lambda i: [
        *EVAL, "--model", i.run(_adapter_config(peft_type="PREFIX_TUNING"))], "is not a LoRA adapter"),
    "adapter: peft_type unknown": Case("finetune", lambda i: [
        *FT[2:], "--model", i.run(_adapter_config(peft_type="NOPE"))], "peft_type 'NOPE' is not a LoRA adapter"),
    "adapter: config targets modules the weights are not for": Case("evaluate", lambda i: [
        *EVAL, "--model", i.run(_adapter_config(target_modules=["lm_head"]))], "do not belong together"),
    "adapter: config targets one of two trained modules": Case("prune-antidote", lambda i: [
        "--model", i.run(_adapter_config(target_modules=["q_proj"])), *ANTIDOTE], "do not belong together"),
    "manifest: base_model is a number": Case("evaluate", lambda i: [
        *EVAL, "--model", i.run(_edit_manifest(base_model=123))], "base_model must be a string"),
    "manifest: adapters is a mapping": Case("finetune", lambda i: [
        *FT[2:], "--model", i.run(_edit_manifest(adapters={"a": 1}))], "adapters must be a list"),
    "manifest: one adapter listed twice": Case("evaluate", lambda i: [
        *EVAL, "--model", i.run(lambda d: _edit_manifest(adapters=json.loads(
            (d / "ftsafety_run.json").read_text())["adapters"] * 3)(d))], "is listed 3 times"),
    # -- memory: size limits before reading or tokenising (C11, C26, A05) --------------------------
    "evaluate: a prompt file larger than the limit": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--or-prompts", _sparse(i, "big.txt", 100 << 20)], "more than the 64 MB"),
    "evaluate: a JSONL prompt file larger than the limit": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--hs-prompts", _sparse(i, "big.jsonl", 80 << 20)], "more than the 64 MB"),
    "evaluate: a prompt line of several MB": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--hs-prompts", i.file("line.txt", "a" * (3 << 20))], "line longer than 1 MB"),
    "evaluate: a prompt far beyond the context": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--hs-prompts", i.file("long.txt", "word " * 100_000)],
        "far more than the model's context"),
    "align: a data row of several MB": Case("align", lambda i: [
        *ALIGN, "--data", i.data_with({"beavertails/harmful_train.jsonl": jsonl(
            [{"prompt": "x" * (2 << 20), "response": "r", "category": "privacy_violation"}])})], "line longer than 1 MB"),
    "run: a recipe whose aliases expand to billions of values": Case("run", lambda i: [
        i.file("bomb.yaml", _bomb()), *_RUNS(i)], "expands to more than 100,000 values"),
    "run: an alias bomb in a table row": Case("run", lambda i: [
        i.file("bomb2.yaml", _bomb(8, "table")), "--dry-run", *_RUNS(i)], "expands to more than 100,000 values"),
    "run: a recipe file of several MB": Case("run", lambda i: [
        i.file("huge.yaml", "name: x\n# " + "y" * (2 << 20) + "\n"), *_RUNS(i)], "is not a recipe"),
    "run: a recipe that is a directory": Case("run", lambda i: [i.dir("recipes-dir"), *_RUNS(i)], "is a directory"),
    "run: a recipe that is a pipe": Case("run", lambda i: [_fifo(i), *_RUNS(i)], "is not a regular file"),
    # -- records and tables (A13, A22-A24) --------------------------------------------------------
    "run: two rows that would share a record": Case("run", lambda i: [
        _recipe(i, "table: {ratios: [0.25], rows: [{name: A B}, {name: A/B}]}\n"), *_RUNS(i)], "would share the record"),
    "run: a ratio listed twice": Case("run", lambda i: [
        _recipe(i, "table: {ratios: [0.25, 0.25], rows: [{name: S}]}\n"), *_RUNS(i)], "is listed twice"),
    "run: two ratios that print alike": Case("run", lambda i: [
        _recipe(i, "table: {ratios: [0.25, 0.2500001], rows: [{name: S}]}\n"), *_RUNS(i)], "print alike"),
    "run: 0 and -0 as two ratios": Case("run", lambda i: [
        _recipe(i, "table: {ratios: [0.0, -0.0], rows: [{name: S}]}\n"), *_RUNS(i)], "is listed twice"),
    # -- training settings checked before anything is created (A42-A47) ----------------------------
    "run: logging every 0 steps": Case("run", lambda i: [_recipe(i), "finetune.train.logging_steps=0", *_RUNS(i)],
                                       "logging steps must be >= 1"),
    "run: logging every -3 steps": Case("run", lambda i: [_recipe(i), "align.train.logging_steps=-3", *_RUNS(i)],
                                        "logging steps must be >= 1"),
    "align: --report-to an integration not installed": Case("align", (*ALIGN, "--report-to", "wandb"),
                                                            "its package is not installed (pip install wandb)"),
    "finetune: --report-to tensorboard, not installed": Case("finetune", (*FT, "--report-to", "tensorboard"),
                                                             "pip install tensorboard"),
    "align-vaccine: --report-to none inside a list": Case("align-vaccine", (*ALIGN, "--report-to", "none,wandb"),
                                                          "'none' and 'all' stand alone"),
    "finetune-lisa: --report-to an unknown name": Case("finetune-lisa", (*LISA, "--report-to", "../../x"),
                                                       "not a known integration"),
    "finetune: n and p that leave no example": Case("finetune", ("--model", "tiny-opt", "--n", "1", "-p", "0.5",
                                                                 *TRAIN), "gives no examples"),
    # -- checkpoints and hidden siblings (I01-I04) -------------------------------------------------
    "align: .partial is a file": Case("align", lambda i: [
        *ALIGN, "--out", str(Path(i.file(".o.partial", "x")).parent / "o")], "is not an ftsafety checkpoint folder"),
    "align: .partial is a link to a folder": Case("align", lambda i: [
        *ALIGN, "--out", _partial_link(i)], "is not an ftsafety checkpoint folder"),
    "finetune: .partial holds a user's files": Case("finetune", lambda i: [
        *FT, "--out", str(Path(i.file(".o.partial/thesis.txt", "x")).parent.parent / "o")],
        "holds files that are not an ftsafety run's checkpoints"),
    "align: --resume from a checkpoint with a planted pickle": Case("align", lambda i: [
        "--model", "tiny-opt", "--n", "8", "--max-steps", "6", "--batch-size", "2", "-q", "--resume",
        "--out", _planted(i, "rng_state.pth")], "is not a checkpoint file this run wrote"),
    "align: --resume from a planted optimizer.pt": Case("align", lambda i: [
        "--model", "tiny-opt", "--n", "8", "--max-steps", "6", "--batch-size", "2", "-q", "--resume",
        "--out", _planted(i, "optimizer.pt")], "is not a checkpoint file this run wrote"),
    # -- names and paths (G05, G07) ----------------------------------------------------------------
    "align: an output name too long for its siblings": Case("align", lambda i: [
        *ALIGN, "--out", str(i.root / ("b" * 248))], "at most 241 fit here"),
    "evaluate: an output name too long for its siblings": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--out", str(i.root / ("e" * 245))], "at most 241 fit here"),
    # G08: one byte more than a file name holds fails any stat of the path; every writer checks the names first
    "align: an output name longer than a file name": Case("align", lambda i: [
        *ALIGN, "--out", str(i.root / ("c" * 256))], "is 256 bytes; a file name holds at most 255"),
    "evaluate: an output folder name longer than a file name": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--out", str(i.root / ("c" * 300) / "ev")], "is 300 bytes; a file name"),
    "report: a report folder name longer than a file name": Case("report", lambda i: [
        _records(i, lambda r, s: None), "--out", str(i.root / ("r" * 256))], "is 256 bytes; a file name"),
    "run: a runs folder name longer than a file name": Case("run", lambda i: [
        _recipe(i), "--runs", str(i.root / ("s" * 256)), "-q"], "runs folder"),
    "evaluate: an undecodable output path": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--out", str(i.root / _surrogate("évaluation"))], "is not valid text in this locale"),
    "finetune: an undecodable model path": Case("finetune", lambda i: [
        *FT[2:], "--model", str(i.root / _surrogate("résumé"))], "is not valid text in this locale"),
    # -- evaluations with nothing to do, judges checked before training (M03, M06) -----------------
    "evaluate: every limit 0": Case("evaluate", ("--model", "tiny-opt", "--hs-limit", "0", "--fa-limit", "0",
                                                 "--or-limit", "0", "-q"), "nothing to evaluate"),
    "run: a judge folder that does not exist": Case("run", lambda i: [
        _recipe(i), "evaluate.judge=classifier:/nonexistent/judge", *_RUNS(i)], "no such directory"),
    "run: a learned judge folder that does not exist": Case("run", lambda i: [
        _recipe(i), "evaluate.judge=ftsafety-judge:/nonexistent/j", "--dry-run", *_RUNS(i)], "no such directory"),
    "evaluate: a learned judge folder without a manifest": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--judge", f"ftsafety-judge:{i.dir('emptyjudge')}"],
        "not an ftsafety-judge directory"),
    "evaluate: a learned judge whose weights were changed": Case("evaluate", lambda i: [
        "--model", "tiny-opt", *EVAL, "--judge", f"ftsafety-judge:{_tampered_judge(i)}"], "sha256"),
    "train-judge: a label outside the rubric": Case("train-judge", lambda i: [
        "--labels", i.file("l.jsonl", json.dumps({"id": "a", "split": "train", "prompt": "p", "response": "r",
                                                  "label": "unsafe"}) + "\n"), "--base", "tiny-llama"],
        "label 'unsafe' is not one of refusal, compliance, harmful"),
    "train-judge: a train split without every class": Case("train-judge", lambda i: [
        "--labels", i.file("l.jsonl", json.dumps({"id": "a", "split": "train", "prompt": "p", "response": "r",
                                                  "label": "refusal"}) + "\n"), "--base", "tiny-llama"],
        "must hold every class"),
    "train-judge: --layers that are not numbers": Case("train-judge", lambda i: [
        "--labels", i.file("l.jsonl", "{}"), "--layers", "four", "--base", "tiny-llama"],
        "--layers takes comma-separated numbers"),
    "train-judge: a labels file that does not exist": Case("train-judge", lambda i: [
        "--labels", str(i.path("none.jsonl")), "--base", "tiny-llama"], "cannot read the labels"),
    "train-judge: a gated prompt with no local copy": Case("train-judge", lambda i: [
        "--labels", i.file("l.jsonl", json.dumps({"id": "a", "split": "train", "source": "advbench", "row": 0,
                                                  "prompt_sha256": "0" * 64, "response": "r", "label": "refusal"}) + "\n"),
        "--base", "tiny-llama", "--data", i.dir("nodata")], "build advbench with scripts/build_prompt_sets.py"),
    # -- drift and attack-search (issues 29, 30) ---------------------------------------------------
    "drift: an unknown model": Case("drift", lambda i: ["tiny-llama", "nope", "--n", "2"], "unknown model 'nope'"),
    "drift: n 0": Case("drift", ["tiny-llama", "tiny-llama", "--n", "0"], "n must be >= 1"),
    "drift: two models of different architectures": Case("drift", ["tiny-llama", "tiny-opt", "--n", "1"],
                                                         "are different architectures"),
    "attack-search: an inverted range": Case("attack-search", lambda i: [
        _recipe(i), "--space", "lr=1e-2:1e-4", *_RUNS(i)], "is inverted"),
    "attack-search: an empty range": Case("attack-search", lambda i: [
        _recipe(i), "--space", "steps=", *_RUNS(i)], "--space takes KNOB=LOW:HIGH"),
    "attack-search: a budget of 0 trials": Case("attack-search", lambda i: [
        _recipe(i), "--trials", "0", *_RUNS(i)], "trials must be an integer >= 1"),
    "attack-search: a budget of 0 minutes": Case("attack-search", lambda i: [
        _recipe(i), "--minutes", "0", *_RUNS(i)], "minutes must be a number of minutes > 0"),
    "attack-search: an unknown knob": Case("attack-search", lambda i: [
        _recipe(i), "--space", "momentum=0.1:0.9", *_RUNS(i)], "does not search 'momentum'"),
    "attack-search: an unknown attack": Case("attack-search", lambda i: [
        _recipe(i), "--attack", "nope", *_RUNS(i)], "unknown attack 'nope'"),
    "attack-search: an unknown model": Case("attack-search", lambda i: ["nope", *_RUNS(i)], "unknown model 'nope'"),
    "attack-search: a missing recipe": Case("attack-search", lambda i: [
        str(i.path("missing.yaml")), *_RUNS(i)], "recipe file does not exist"),
    "run: every evaluation limit 0": Case("run", lambda i: [
        _recipe(i), "evaluate.hs_limit=0", "evaluate.fa_limit=0", "evaluate.or_limit=0", *_RUNS(i)],
        "nothing to evaluate"),
})


def _shard_outside(i: Inputs, target: str = "../outside/stolen.safetensors") -> str:
    d = Path(i.model("noweights"))
    (d / "decoy.safetensors").write_bytes(b"")
    index = {"metadata": {}, "weight_map": {"model.decoder.embed_tokens.weight": target}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(d)


def _zero_weights(i: Inputs) -> str:
    d = Path(i.model("noweights"))
    (d / "model.safetensors").write_bytes(b"")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle")
    return str(d)


def _sparse(i: Inputs, name: str, size: int) -> str:
    p = i.path(name)
    with open(p, "wb") as fh:
        fh.truncate(size)
    return str(p)


def _fifo(i: Inputs) -> str:
    p = i.path("pipe.yaml")
    os.mkfifo(p)
    return str(p)


def _partial_link(i: Inputs) -> str:
    target = Path(i.file("victim/thesis.txt", "x")).parent
    os.symlink(target, i.root / ".o.partial")
    return str(i.root / "o")


def _planted(i: Inputs, filename: str) -> str:
    """An interrupted align run (its checkpoints in .o.partial/) with `filename` replaced by a pickle that would
    run code and its hash rewritten in the checkpoint's marker."""
    import hashlib
    import pickle

    out = i.root / "o"
    from ftsafety import train

    with pytest.MonkeyPatch.context() as mp:  # interrupt after the first checkpoint
        real = train._train

        def stop(trainer, *a, **k):
            trainer.args.max_steps = 5  # checkpoints fall every 5 steps here
            real(trainer, *a, **k)
            raise KeyboardInterrupt
        mp.setattr(train, "_train", stop)
        _invoke("align", "--model", "tiny-opt", "--n", "8", "--max-steps", "6", "--batch-size", "2", "-q",
                "--out", str(out))
    partial = i.root / ".o.partial"
    ckpt = sorted(partial.glob("checkpoint-*"))[-1]

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {i.root / 'planted-ran'}",))

    (ckpt / filename).write_bytes(pickle.dumps(Boom()))
    marker = ckpt / train.CHECKPOINT_MARKER
    m = json.loads(marker.read_text())
    m["sha256"][filename] = hashlib.sha256((ckpt / filename).read_bytes()).hexdigest()
    marker.write_text(json.dumps(m))
    return str(out)


def _tampered_judge(i: Inputs) -> str:
    from ftsafety.evaluation import learned as L

    d = i.path("judge")
    d.mkdir()
    (d / L.MANIFEST).write_text(json.dumps({"name": "ftsafety-judge", "version": "1", "base": "tiny-llama", "layers": 1,
                                           "max_prompt_tokens": 8, "max_response_tokens": 8,
                                           "classes": list(L.CLASSES), "sha256": "0" * 64}))
    (d / L.WEIGHTS).write_bytes(b"not the weights")
    return str(d)


# ---------------------------------------------------------------------------------------------
# Fixtures: the few expensive inputs are built once per session and copied per case.


def _invoke(*argv: str) -> int:
    """The console entry point in-process (for session fixtures, where `cli` is not available)."""
    from ftsafety.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["ftsafety", *argv])
        mp.setenv("FTSAFETY_LOG_LEVEL", "WARNING")
        try:
            main()
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
    return 0


@pytest.fixture(scope="session")
def aligned_run(tmp_path_factory) -> Path:
    """A finished tiny-opt `align` run (one step)."""
    out = tmp_path_factory.mktemp("bad_inputs_run") / "align"
    assert _invoke("align", *ALIGN, "--out", str(out)) == 0
    return out


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Directories that look like models but must be refused."""
    from transformers import BertConfig, BertModel

    from ftsafety.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("bad_models")
    def bert_cfg():
        return BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=64)

    BertModel(bert_cfg()).save_pretrained(root / "bert")  # config.json (architectures: BertModel) + safetensors
    bert_cfg().save_pretrained(root / "bert-config")  # config.json only: model_type bert, no architectures
    assert "architectures" not in json.loads((root / "bert-config" / "config.json").read_text())
    tok = build_tokenizer()
    opt_cfg = build_model("tiny-opt", len(tok)).config
    for kind in ("pickle", "noweights"):
        opt_cfg.save_pretrained(root / kind)
        tok.save_pretrained(root / kind)
    # stands in for a pickled checkpoint: ftsafety must refuse it by name, never open it
    (root / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return {p.name: p for p in root.iterdir()}


@pytest.fixture
def inputs(tmp_path, tiny_data_dir, request) -> Inputs:
    return Inputs(tmp_path, tiny_data_dir, lambda: request.getfixturevalue("aligned_run"),
                  lambda: request.getfixturevalue("model_dirs"))


def _snapshot(root: Path) -> dict[str, tuple[bool, int]]:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0)
            for p in sorted(root.rglob("*"))}


_ran: list[str] = []


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, inputs, tmp_path, cli, monkeypatch):
    case = CASES[name]
    for key, value in (case.env or {}).items():
        monkeypatch.setenv(key, value)
    if case.patch is not None:  # a patch that needs the case's output path takes it too
        case.patch(monkeypatch, tmp_path / "out") if getattr(case.patch, "needs_out", False) else case.patch(monkeypatch)
    reason = case.skip() if case.skip is not None else None
    if reason:
        pytest.skip(reason)
    args = list(case.args(inputs) if callable(case.args) else case.args)
    out = tmp_path / "out"
    if case.command not in NO_OUT and "--out" not in args:
        args += ["--out", str(out)]
    before = _snapshot(tmp_path)
    r = cli(case.command, *args)
    _ran.append(name)
    assert r.returncode != 0, f"exit 0 for bad input; stdout: {r.stdout[-500:]}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{r.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    assert case.expect in lines[0], lines[0]
    assert not out.exists(), "an output directory was left behind"
    assert _snapshot(tmp_path) == before, "the command created, changed or removed files next to --out"


def test_cases_cover_every_command():
    assert len(CASES) >= 150 - 14  # with tests/test_cli.py's 14 (BAD), the 150 issue 19 asks for
    assert {c.command for c in CASES.values()} == set(COMMANDS)


# ---------------------------------------------------------------------------------------------
# Over-long prompts in training data: the decision, pinned down.


def test_overlong_training_prompt_keeps_its_tail_and_answer():
    """A prompt longer than --max-length is cut to its last max_length // 2 tokens, so the template's
    "### Response:" stays and the answer is learned; no example ever trains on prompt tokens only."""
    from ftsafety import data as D
    from ftsafety.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = D.DataConfig(template="alpaca", max_length=64)
    answer = "I cannot help with that."
    ds = D.SFTDataset([{"instruction": "x" * 500, "input": "", "output": answer}], tok, cfg)
    item = ds[0]
    learned = [t for t in item["labels"] if t != -100]
    assert len(item["input_ids"]) == 32 + len(learned) <= 64
    assert tok.decode(learned, skip_special_tokens=True) == answer and learned[-1] == tok.eos_token_id
    assert tok.decode(item["input_ids"][:32]).endswith("### Response:\n")


def test_example_longer_than_context_is_an_error():
    from ftsafety import data as D
    from ftsafety.errors import FtsafetyError
    from ftsafety.tiny import build_tokenizer

    tok = build_tokenizer()  # model_max_length 1024, the tiny models' context
    cfg = D.DataConfig(template="alpaca", max_length=4096)
    with pytest.raises(FtsafetyError, match="example 2 is .* more than the model's context of 1024"):
        D.SFTDataset([{"instruction": "short", "output": "ok"}, {"instruction": "y" * 2000, "output": "ok"}], tok, cfg)


def test_zz_report_case_count(capsys):
    """Last in the file: says how many bad-input cases there are and how many ran in this session."""
    with capsys.disabled():
        print(f"\nbad-input cases: {len(CASES)} (ran {len(_ran)} in this session)")


def test_bogus_log_level_is_one_line(cli, monkeypatch):
    """FTSAFETY_LOG_LEVEL=BOGUS (issue 19): one designed line, before anything loads."""
    from ftsafety.console import setup_logging
    from ftsafety.errors import FtsafetyError

    monkeypatch.setenv("FTSAFETY_LOG_LEVEL", "BOGUS")
    with pytest.raises(FtsafetyError, match="FTSAFETY_LOG_LEVEL='BOGUS': choose one of DEBUG"):
        setup_logging()


def test_disk_full_at_the_end_of_training_is_one_line_and_resumes(cli, tmp_path, monkeypatch):
    """A full disk when the trained adapter is written (issue 19): one designed line (exit 2), no run
    directory, and the same command with --resume on a freed disk continues from the last checkpoint."""
    from ftsafety import models

    out = tmp_path / "out"
    args = ("align", "--model", "tiny-opt", "--n", "8", "--max-steps", "2", "--batch-size", "2", "-q",
            "--out", str(out))
    with monkeypatch.context() as mp:
        _disk_full("ftsafety.models.save_adapter")(mp)
        r = cli(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "no space left on the device" in lines[0], r.stderr
    assert not out.exists() and (tmp_path / ".out.partial").is_dir()
    assert models.save_adapter.__name__ == "save_adapter"  # the disk is free again
    r = cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert __import__("json").loads((out / "train_results.json").read_text())["resumed_from_step"] == 2

