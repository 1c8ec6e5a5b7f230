"""One test matrix over the defense registry: every registered defense, with no edit here when one is
added. For each: its neutral setting reduces to the plain stage bit for bit (through the same stage
functions the CLI and recipes call), an interrupted run resumes to the same weights, its command has
an option for every config knob, and a non-finite value for any float knob is refused in one line.
`test_example_defense_end_to_end` declares a sixth defense in this file and runs it through the
registry path: stage dispatch, recipe schema, generated command."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import pytest
import torch
import typer
from safetensors.torch import load_file

from ftsafety import models, stages
from ftsafety import train as T
from ftsafety.commands.stage import stage_commands
from ftsafety.data import DataConfig
from ftsafety.defenses import DEFENSES, Defense, Paper, TrainerSetup, register
from ftsafety.errors import FtsafetyError
from ftsafety.trainer import FtTrainer

LORA = models.LoraSettings(r=4, dropout=0.1)  # dropout on: the neutral runs must use the RNG as the plain one
TRAINING = [n for n, d in DEFENSES.items() if d.stage in ("align", "finetune")]
POST = [n for n, d in DEFENSES.items() if d.stage == "post"]


def _common(tiny_data_dir) -> stages.Common:
    return stages.Common(data=DataConfig(data=str(tiny_data_dir), max_length=64), device="cpu", quiet=True)


def _stage(kind: str, method: str, config=None, steps: int = 4):
    cls = stages.AlignStage if kind == "align" else stages.FinetuneStage
    train = T.TrainConfig(max_steps=steps, batch_size=2, lr=1e-2, scheduler="constant", weight_decay=0.0,
                          logging_steps=1)
    kw = {"n": 12} if kind == "align" else {"n": 12, "harmful_ratio": 0.25}
    st = cls(method=method, train=train, lora=LORA, **kw)
    if config is not None:
        setattr(st, method, config)
    return st


# test-sized settings where a default would need more data or steps than a tiny run has
SMALL = {"lisa": {"alignment_steps": 1, "finetune_steps": 2, "align_n": 4}, "antidote": {"calibration_n": 4},
         "rollback": {"steps": 2, "warmup_steps": 1, "save_every": 1, "recovery_n": 4, "val_n": 8,
                      "fa_max_new_tokens": 2}}


def _config(d: Defense, neutral: bool = False):
    """The defense's config at its defaults (or its neutral setting), test-sized."""
    small = {k: v for k, v in SMALL.get(d.name, {}).items() if k in {f.name for f in dataclasses.fields(d.config_cls)}}
    return d.config_cls(**{**small, **(d.neutral if neutral else {})})


def _neutral(d: Defense):
    return _config(d, neutral=True)


def _run(kind, st, out, c, parent="tiny-llama", **kw):
    fn = stages.align if kind == "align" else stages.finetune
    fn(st, parent, out, c, **kw)
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and bool(a) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", TRAINING)
def test_neutral_setting_is_the_plain_stage(name, tmp_path, tiny_data_dir):
    d, c = DEFENSES[name], _common(tiny_data_dir)
    plain = _run(d.stage, _stage(d.stage, "sft"), tmp_path / "plain", c)
    neutral = _run(d.stage, _stage(d.stage, name, _neutral(d)), tmp_path / "neutral", c)
    assert _equal(plain, neutral), f"{name} at {d.neutral} differs from the plain {d.stage}"
    active = _run(d.stage, _stage(d.stage, name, _config(d)), tmp_path / "active", c)  # its defaults change something
    assert not _equal(plain, active), f"{name} at its defaults trained the same weights as the plain {d.stage}"


@pytest.mark.parametrize("name", POST)
def test_neutral_post_defense_is_the_identity(name, tmp_path, tiny_data_dir):
    d, c = DEFENSES[name], _common(tiny_data_dir)
    aligned, ft = tmp_path / "aligned", tmp_path / "ft"
    _run("align", _stage("align", "sft", steps=2), aligned, c)
    _run("finetune", _stage("finetune", "sft", steps=2), ft, c, parent=str(aligned))
    cfg = _neutral(d)
    stages.post(stages.PostStage(method=name, **{name: cfg}), str(ft), str(aligned), "sst2", tmp_path / "post", c)
    before = models.load(str(ft), device="cpu")[0].state_dict()
    after = models.load(str(tmp_path / "post"), device="cpu")[0].state_dict()
    assert _equal(before, after), f"{name} at {d.neutral} changed the fine-tuned model"


class _Kill(T._NaNGuard):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            raise KeyboardInterrupt


@pytest.mark.parametrize("name", TRAINING)
def test_interrupted_defense_resumes_to_the_same_weights(name, tmp_path, tiny_data_dir, monkeypatch):
    d, c = DEFENSES[name], _common(tiny_data_dir)
    cfg = _config(d)
    ref = _run(d.stage, _stage(d.stage, name, cfg, steps=5), tmp_path / "ref", c)
    monkeypatch.setattr(T, "_NaNGuard", _Kill)
    with pytest.raises(T.TrainingInterrupted) as info:
        _run(d.stage, _stage(d.stage, name, cfg, steps=5), tmp_path / "run", c)
    monkeypatch.undo()
    assert info.value.checkpoint_step is not None and info.value.checkpoint_step < 3
    resumed = _run(d.stage, _stage(d.stage, name, cfg, steps=5), tmp_path / "run", c, resume=True)
    assert _equal(ref, resumed)


@pytest.mark.parametrize("name", list(DEFENSES))
def test_command_has_every_knob_and_refuses_non_finite_floats(name, cli):
    d = DEFENSES[name]
    usage = cli(d.command, "--help").stdout
    hints = {f.name: f.type for f in dataclasses.fields(d.config_cls)}
    for f in dataclasses.fields(d.config_cls):
        assert "--" + f.name.replace("_", "-") in usage, f"{d.command} has no option for {f.name}"
    floats = [n for n, tp in hints.items() if tp in (float, "float")]
    assert floats, f"{name} declares no float knob"
    for knob in floats:
        for bad in (math.nan, math.inf):
            with pytest.raises(FtsafetyError):
                d.config_cls(**{knob: bad})
    res = cli(d.command, "--model", "tiny-llama", f"--{floats[0].replace('_', '-')}", "nan")
    assert res.returncode == 2 and res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1


# --- a sixth defense, declared here, through the registry path ------------------------------------


@dataclass
class ScaleConfig:
    factor: float = field(default=2.0, metadata={"help": "Multiplies the alignment loss."})

    def __post_init__(self):
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise FtsafetyError(f"factor must be a finite number > 0, got {self.factor}")


class ScaleTrainer(FtTrainer):
    def __init__(self, *args, factor: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.factor = factor

    def compute_loss(self, model, inputs, return_outputs=False, **kw):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)
        return (out[0] * self.factor, out[1]) if return_outputs else out * self.factor


EXAMPLE = Defense(
    name="scale", stage="align", command="align-scale", config_cls=ScaleConfig,
    paper=Paper("An example defense", "tests", "0000.00000", "none"), summary="Alignment with a scaled loss.",
    neutral={"factor": 1.0},
    setup=lambda cfg, common, stage: TrainerSetup(ScaleTrainer, kwargs=dataclasses.asdict(cfg),
                                           record={"scale": dataclasses.asdict(cfg)}),
)


@pytest.fixture
def example_defense():
    register(EXAMPLE)
    stages.rebuild()
    yield EXAMPLE
    del DEFENSES[EXAMPLE.name]
    stages.rebuild()


def test_example_defense_end_to_end(example_defense, tmp_path, tiny_data_dir, monkeypatch):
    from typer.testing import CliRunner

    from ftsafety import pipeline

    c = _common(tiny_data_dir)
    assert "scale" in stages.methods("align")
    # the matrix's neutral check, by the same helpers
    plain = _run("align", _stage("align", "sft"), tmp_path / "plain", c)
    assert _equal(plain, _run("align", _stage("align", "scale", ScaleConfig(1.0)), tmp_path / "neutral", c))
    # the recipe schema knows align.scale.factor; a typo is refused with the nearest key
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: ex\nmodel: tiny-llama\ndata: {tiny_data_dir}\nalign: {{method: scale, scale: {{factor: 3}}}}\n")
    r, pipes = pipeline.pipelines(recipe)
    assert pipes[0].recipe.align.scale == ScaleConfig(3.0)
    recipe.write_text("name: ex\nalign: {method: scale, scale: {factr: 3}}\n")
    with pytest.raises(FtsafetyError, match="did you mean 'align.scale.factor'"):
        pipeline.pipelines(recipe)
    # the generated command: its option, its validation, its run directory
    app = typer.Typer()
    cmds = stage_commands()
    app.command("align-scale")(cmds["align-scale"])
    app.command("evaluate")(cmds["evaluate"])
    runner = CliRunner()
    assert "--factor" in runner.invoke(app, ["align-scale", "--help"]).output
    out = tmp_path / "cli"
    res = runner.invoke(app, ["align-scale", "--model", "tiny-llama", "--data", str(tiny_data_dir), "--n", "12",
                              "--max-steps", "2", "--batch-size", "2", "--factor", "1.5", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "align-scale: 2 steps" in res.output and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "factor: 1.5" in (out / "config.yaml").read_text()
