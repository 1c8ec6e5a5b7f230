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
            "recover-rollback", "evaluate", "summary", "run", "report")
NO_OUT = ("summary", "run", "report")  # commands without --out (run gets --runs <tmp>/out instead)

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
    """A finished Antidote (antidote.json) or rollback (rollback.json) run's directory."""
    i.file(f"{name}/{kind_file}", "{}")
    i.file(f"{name}/ftsafety_run.json", '{"base_model": "tiny-opt", "adapters": []}')
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
    if case.patch is not None:
        case.patch(monkeypatch)
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
