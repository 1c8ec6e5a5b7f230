"""Recipes and pipelines: `ftsafety run RECIPE [key=value ...]`.

A recipe (YAML, loaded strictly) names a model, data and the four stages
align -> finetune -> post -> evaluate, each with a method and its settings (`ftsafety.stages`).
A recipe with a `table:` section is a grid: one pipeline per row (its `set:` overrides) and per
harmful ratio p, which `ftsafety report` lays out like the papers' tables.

Stages are cached by their resolved config: a stage's directory is named by a hash of everything
that decides its output (its own settings, the data, the seed and its parent stage's hash), so a
finished stage is reused by every pipeline that shares it, across rows and across runs. A stage is
finished when its directory holds `stage.json`; one that was interrupted has none and is redone
(training stages continue from their last checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftsafety import __version__, prompt_sets
from ftsafety import stages as S
from ftsafety.attack_search import SearchConfig
from ftsafety.config import apply_overrides, build, load_yaml, set_dotted
from ftsafety.data import DataConfig
from ftsafety.defenses import DEFENSES
from ftsafety.errors import FtsafetyError
from ftsafety.options import config_key
from ftsafety.utils import OutputLocked, atomic_write_text, run_kind, run_lock, write_json

log = logging.getLogger(__name__)

STAGE_MARKER = "stage.json"
RESULT_KEYS = ("hs", "hs_plus", "cr", "fa", "or", "hs_n", "cr_n", "fa_n", "or_n")  # what a pipeline record keeps


@dataclass
class Row:
    """One row of a table recipe: a label, the overrides that make its pipeline, the papers' figures."""

    name: str
    set: dict[str, Any] = field(default_factory=dict)
    paper_hs: dict[str, float] = field(default_factory=dict)  # p (as written, e.g. "0.1") -> HS
    paper_fa: dict[str, float] = field(default_factory=dict)
    paper_note: str = ""


@dataclass
class Table:
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.1])
    rows: list[Row] = field(default_factory=list)
    paper_source: str = ""  # what the papers' figures in the table are (model, data, judge)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.ratios:
            raise FtsafetyError("table.ratios must list at least one harmful ratio p")
        for p in self.ratios:
            if not 0.0 <= p <= 1.0:
                raise FtsafetyError(f"table.ratios: harmful ratio p must be in [0, 1], got {p}")
        self.ratios = [p + 0.0 for p in self.ratios]  # -0.0 is 0.0
        shown = [p_name(p) for p in self.ratios]
        dup = next((s for s in shown if shown.count(s) > 1), None)
        if dup is not None:  # a record and a column are named by p: two ratios must not share the name
            raise FtsafetyError(f"table.ratios: p={dup} is listed twice (or two values print alike: "
                                f"{[p for p in self.ratios if p_name(p) == dup]})")
        if not self.rows:
            raise FtsafetyError("table.rows must list at least one row")
        names = [r.name for r in self.rows]
        if len(set(names)) != len(names):
            raise FtsafetyError("table.rows: row names must be unique")
        slugs = [slug(n) for n in names]
        clash = next((s for s in slugs if slugs.count(s) > 1), None)
        if clash is not None:  # each row's records are files named by its slug
            raise FtsafetyError(f"table.rows: rows {', '.join(repr(n) for n, s in zip(names, slugs) if s == clash)} "
                                f"would share the record name {clash!r}; rename one")


@dataclass
class Recipe:
    name: str
    description: str = ""
    model: str = "smollm2-135m"
    data: str = "builtin"
    template: str = "alpaca"
    max_length: int = 256
    device: str = "auto"
    dtype: str = "auto"  # auto | fp32 | bf16 (stages.Common.dtype)
    seed: int = 42
    trust_remote_code: bool = False
    # the stage classes are looked up when used: they are rebuilt when a defense is registered
    align: S.AlignStage = field(default_factory=lambda: S.AlignStage())
    finetune: S.FinetuneStage = field(default_factory=lambda: S.FinetuneStage())
    post: S.PostStage = field(default_factory=lambda: S.PostStage())
    evaluate: S.EvalStage = field(default_factory=lambda: S.EvalStage())
    table: Table | None = None
    attack_search: SearchConfig | None = None  # `ftsafety attack-search`'s defaults for this recipe

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise FtsafetyError(f"recipe name {self.name!r} must be letters, digits, '-', '_' or '.'")
        from ftsafety.utils import check_dtype

        check_dtype(self.dtype, "dtype")
        if self.post.method != "none" and self.finetune.method == "none":
            raise FtsafetyError("a post-fine-tuning defense needs a fine-tune stage (finetune.method is none)")

    def common(self, quiet: bool = False) -> S.Common:
        return S.Common(data=DataConfig(data=self.data, template=self.template, max_length=self.max_length),
                        device=self.device, dtype=self.dtype, seed=self.seed, trust_remote_code=self.trust_remote_code, quiet=quiet)


@dataclass
class Pipeline:
    recipe: Recipe
    row: str
    p: float
    paper_hs: float | None = None
    paper_fa: float | None = None
    paper_note: str = ""


@dataclass
class StagePlan:
    kind: str  # align | finetune | post | evaluate
    method: str
    key: str
    dir: Path
    config: dict
    parent: str  # the model the stage reads: a stage dir or the recipe's model
    aligned: str = ""  # rollback's aligned model: the align stage's dir or the recipe's model

    @property
    def done(self) -> bool:
        """Finished: marked by `ftsafety run` and still holding every file of its kind (a stage whose outputs
        were deleted or damaged since is redone, never trusted on its mark alone)."""
        from ftsafety.utils import run_kind

        return (self.dir / STAGE_MARKER).is_file() and run_kind(self.dir) is not None


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                trust_remote_code: bool = False) -> tuple[Recipe, dict]:
    """A recipe and the raw mapping it came from (after `key=value` overrides).

    Remote code is the command line's to grant (`--trust-remote-code`), never a file's: a recipe (or an
    override) that sets `trust_remote_code: true` is refused without the flag, and the flag turns it on."""
    raw = apply_overrides(load_yaml(path), overrides or [])
    if raw.get("trust_remote_code") is True and not trust_remote_code:
        raise FtsafetyError(f"{path}: the recipe sets trust_remote_code: true, which runs code shipped with the model; "
                            "pass --trust-remote-code on the command line to allow it")
    if trust_remote_code:
        raw["trust_remote_code"] = True
    return build(Recipe, raw, source=str(path)), raw


def pipelines(path: str | Path, overrides: list[str] | None = None,
              trust_remote_code: bool = False, after: dict[str, Any] | None = None) -> tuple[Recipe, list[Pipeline]]:
    """Every pipeline a recipe describes (one per table row and p, or just one), each validated. `after`:
    dotted keys set on every pipeline after its row's settings and p (an attack's knobs; a harmful ratio
    there replaces the column's p)."""
    recipe, raw = load_recipe(path, overrides, trust_remote_code)

    def built(data: dict, settings: list[tuple[str, Any]], source: str) -> Recipe:
        """`data` with `settings`, then `after`, set in that order (a later key wins, also over a section)."""
        data = copy.deepcopy(data)
        for key, value in [*settings, *(after or {}).items()]:
            set_dotted(data, key, value)
        return build(Recipe, data, source=source)

    if recipe.table is None:
        r = built(raw, [], str(path)) if after else recipe
        return recipe, [Pipeline(r, recipe.name, r.finetune.harmful_ratio)]
    base = {k: v for k, v in raw.items() if k != "table"}
    out = []
    for row in recipe.table.rows:
        for p in recipe.table.ratios:
            r = built(base, [*row.set.items(), ("finetune.harmful_ratio", p)], f"{path} (row {row.name!r}, p={p:g})")
            pk = f"{p:g}"
            out.append(Pipeline(r, row.name, r.finetune.harmful_ratio, _paper(row.paper_hs, pk),
                                _paper(row.paper_fa, pk), row.paper_note))
    return recipe, out


def _paper(figures: dict[str, float], p: str) -> float | None:
    for k, v in figures.items():
        try:
            if f"{float(k):g}" == p:
                return v
        except ValueError:
            raise FtsafetyError(f"paper figures must be keyed by p (a number), got {k!r}") from None
    return None


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _data_key(recipe: Recipe) -> dict:
    d = recipe.data
    if d not in ("builtin", "hub") and Path(d).expanduser().is_dir():
        d = str(Path(d).expanduser().resolve())
    return {"data": d, "template": recipe.template, "max_length": recipe.max_length}


def _precision_key(recipe: Recipe) -> dict:
    """The arithmetic that will run, in the stage keys only where it is not what ran before --dtype existed
    (fp32 on CPU, bf16 on CUDA): the cached stages of those runs keep their keys, and a bf16 run on CPU (or
    an fp32 one on CUDA) gets stages of its own."""
    from ftsafety.utils import resolve_device, resolve_precision

    try:
        prec = resolve_precision(recipe.dtype, resolve_device(recipe.device))
    except FtsafetyError:  # a device this machine lacks (a dry run of a GPU recipe): the asked dtype stands
        return {} if recipe.dtype == "auto" else {"dtype": recipe.dtype}
    return {} if prec.legacy else {"dtype": prec.ran}


def plan(pipe: Pipeline, runs_dir: Path) -> list[StagePlan]:
    """The stages of one pipeline, each with its cache key and directory."""
    r = pipe.recipe
    common = {"version": __version__.split("+")[0], "data": _data_key(r), "seed": r.seed, **_precision_key(r)}
    stages_dir = runs_dir / "stages"
    out: list[StagePlan] = []
    parent, parent_key, aligned = r.model, _hash({"model": r.model}), r.model

    def add(kind: str, method: str, config: dict) -> StagePlan:
        nonlocal parent, parent_key
        key = _hash({"kind": kind, "parent": parent_key, "config": config, **common})
        sp = StagePlan(kind, method, key, stages_dir / f"{kind}-{method}-{key}", config, parent, aligned)
        out.append(sp)
        parent, parent_key = str(sp.dir), key
        return sp

    if r.align.method != "none":
        aligned = str(add("align", r.align.method, r.align.resolved()).dir)
        aligned_key = out[-1].key
    else:
        aligned_key = r.model
    if r.finetune.method != "none":
        add("finetune", r.finetune.method, r.finetune.resolved())
    if r.post.method != "none":
        cfg = r.post.resolved()
        if DEFENSES[r.post.method].needs_aligned:  # it also reads the aligned model and the task
            cfg = {**cfg, "aligned": aligned_key, "task": r.finetune.task}
        add("post", r.post.method, cfg)
    add("evaluate", r.evaluate.judge.split(":")[0], {**config_key(r.evaluate), "task": r.finetune.task})
    return out


def rejudge_source(sp: StagePlan) -> Path | None:
    """A finished evaluation of the same model with the same settings but another judge, whose answers an
    evaluate stage can re-judge instead of generating them again (None when there is none)."""
    if sp.kind != "evaluate" or not sp.dir.parent.is_dir():
        return None
    want = {k: v for k, v in sp.config.items() if k != "judge"}
    for d in sorted(sp.dir.parent.glob("evaluate-*")):
        try:
            st = json.loads((d / STAGE_MARKER).read_text())
        except (OSError, ValueError):
            continue
        cfg = st.get("config") or {}
        if (d != sp.dir and st.get("parent") == sp.parent and {k: v for k, v in cfg.items() if k != "judge"} == want
                and run_kind(d) == "evaluate"):
            return d
    return None


def run_stage(sp: StagePlan, pipe: Pipeline, quiet: bool = False, rejudge_from: Path | None = None) -> dict:
    """Run one stage into its directory and mark it finished, holding the stage's lock the whole time (a
    second process on the same cache waits for nothing: it fails at once, naming the holder)."""
    sp.dir.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(sp.dir):
        if sp.done:  # another process finished it while this one was planning
            return {"seconds": json.loads((sp.dir / STAGE_MARKER).read_text()).get("seconds") or 0.0, "summary": None}
        return _run_stage(sp, pipe, quiet, rejudge_from)


def _run_stage(sp: StagePlan, pipe: Pipeline, quiet: bool, rejudge_from: Path | None) -> dict:
    """Run one stage into its directory and mark it finished; returns its summary. An evaluate stage with
    `rejudge_from` re-judges that evaluation's answers instead of generating them."""
    r = pipe.recipe
    c = r.common(quiet)
    if (sp.dir / STAGE_MARKER).is_file():  # marked finished once, but its files are no longer all there
        log.warning("%s: its files are incomplete (deleted or damaged since it finished); redoing it", sp.dir.name)
        shutil.rmtree(sp.dir)
    t0 = time.perf_counter()
    marker: dict = {}
    if rejudge_from is not None:
        from ftsafety.evaluation.judges import get_judge
        from ftsafety.evaluation.rejudge import rejudge
        from ftsafety.utils import resolve_device

        judge = get_judge(r.evaluate.judge, device=resolve_device(c.device))
        try:
            summary = rejudge(rejudge_from, judge, sp.dir)
        finally:
            judge.close()
        marker["rejudged_from"] = str(rejudge_from)
    elif sp.kind == "align":
        summary = S.align(r.align, sp.parent, sp.dir, c)
    elif sp.kind == "finetune":
        summary = S.finetune(r.finetune, sp.parent, sp.dir, c)
    elif sp.kind == "post":
        summary = S.post(r.post, sp.parent, sp.aligned, r.finetune.task, sp.dir, c)
    else:
        summary = S.evaluate(r.evaluate, sp.parent, r.finetune.task, sp.dir, c)
    seconds = time.perf_counter() - t0
    write_json(sp.dir / STAGE_MARKER, {"kind": sp.kind, "method": sp.method, "key": sp.key, "parent": sp.parent,
                                       "config": sp.config, "seconds": round(seconds, 2), "version": __version__,
                                       **marker})
    return {"seconds": seconds, "summary": summary}


def _warn_unaligned_reference(pipes: list[Pipeline]) -> None:
    """A post-fine-tuning defense that reads the aligned model (rollback) with no alignment stage reads the
    recipe's own model instead: right for an aligned chat model (the paper's Llama-2-chat), wrong for a base
    model. Said once per recipe."""
    seen = set()
    for pipe in pipes:
        r = pipe.recipe
        d = DEFENSES.get(r.post.method)
        if d is not None and d.needs_aligned and r.align.method == S.NO_STAGE and (r.model, d.name) not in seen:
            seen.add((r.model, d.name))
            log.warning("%s (row %r): no alignment stage, so %s restores weights from %s itself; that is right only "
                        "if %s is already safety-aligned (a chat model)", d.name, pipe.row, d.name, r.model, r.model)


def _cached_stage_hint(message: str, runs_dir: Path) -> str:
    """A failure that names a file inside a cached stage also says how to retrain that stage."""
    stages = (runs_dir / "stages").resolve()
    for word in message.replace("(", " ").replace(")", " ").split():
        try:
            path = Path(word.rstrip(":;,")).resolve()
        except (OSError, ValueError):
            continue
        if stages in path.parents:
            stage = stages / path.relative_to(stages).parts[0]
            return f"{message}; delete {stage} and rerun to redo that stage"
    return message


def check_data(pipes: list[Pipeline]) -> int:
    """Build (or count) every stage's data, not its model, before anything trains: a recipe that asks
    for more rows than its data has fails here in one line, naming the pipeline. Hub data is not
    read (it needs the network): its needs are checked against the hub splits' known sizes instead
    (`_check_hub_sizes`); returns the number of pipelines checked."""
    from ftsafety.evaluation.judges import check_judge_spec, get_judge

    for spec in sorted({p.recipe.evaluate.judge for p in pipes}):  # a judge that cannot load fails before training
        get_judge(spec).close()
        check_judge_spec(spec)
    checked = 0
    for pipe in pipes:
        r = pipe.recipe
        where = f"row {pipe.row!r}, p={pipe.p:g}"
        if r.data == "hub":
            try:
                _check_hub_sizes(r)
            except FtsafetyError as exc:
                raise FtsafetyError(f"{where}: {exc}") from None
            continue
        c = r.common(quiet=True)
        try:
            _check_pipeline_data(r, c)
        except FtsafetyError as exc:
            raise FtsafetyError(f"{where}: {exc}") from None
        checked += 1
    return checked


# BeaverTails' 30k splits on the hub (HF viewer counts, safe and unsafe rows together): an upper bound on what
# any of its filtered sets (is_safe / not is_safe) can give
BEAVERTAILS_30K_ROWS = {"train": 27186, "test": 3021}


def _check_hub_sizes(r: Recipe) -> None:
    """A hub recipe's row needs against the hub splits' sizes, without the network: each task split's
    exact size, and BeaverTails' 30k split sizes as an upper bound (its safe/unsafe shares are not
    known offline, so a need below the bound may still fail when the data is read)."""
    from ftsafety import data as D
    from ftsafety.tasks import TASKS

    need = D.check_rows
    bt_train, bt_test = BEAVERTAILS_30K_ROWS["train"], BEAVERTAILS_30K_ROWS["test"]

    def task_rows(task: str, split: str) -> int | None:
        return TASKS[task].hub_rows.get(split) if task in TASKS else None

    if r.align.method != S.NO_STAGE:
        st = r.align
        n_harm = st.n - int(round(st.n * st.benign_ratio))
        if st.alignment_data == "beavertails-safe":
            need("align.n (BeaverTails 30k_train)", st.n, bt_train)
        else:
            need("align (BeaverTails 30k_train rows from the alignment offset)", r.common(quiet=True).data.offset() + n_harm,
                 bt_train)
    ft = r.finetune
    need("finetune harmful rows (BeaverTails 30k_train)", int(ft.n * ft.harmful_ratio), bt_train)
    rows = task_rows(ft.task, "train")
    if rows is not None:
        need(f"finetune task rows ({ft.task} train)", ft.n - int(ft.n * ft.harmful_ratio), rows)
    lisa = getattr(ft, "lisa", None)
    if ft.method == "lisa" and lisa is not None and lisa.align_n:
        need("finetune.lisa.align_n (BeaverTails 30k_train)", lisa.align_n, bt_train)
    ev = r.evaluate
    if ev.hs_limit and ev.hs_prompts == "beavertails":
        need("evaluate.hs_limit (BeaverTails 30k_test)", ev.hs_limit, bt_test)
    rows = task_rows(ft.task, "test")
    if ev.fa_limit and rows is not None:
        need(f"evaluate.fa_limit ({ft.task} test)", ev.fa_limit, rows)


def _check_pipeline_data(r: Recipe, c: S.Common) -> None:
    from ftsafety import data as D

    need = D.check_rows
    for kind in ("align", "finetune"):
        st = getattr(r, kind)
        if st.method == S.NO_STAGE:
            continue
        if kind == "align":
            D.alignment_examples(c.data, st.n, st.benign_ratio, c.seed, st.benign_task)
        else:
            D.finetune_mix(c.data, st.task, st.n, st.harmful_ratio, c.seed)
        d = DEFENSES.get(st.method)
        if d is not None and d.check_data is not None:
            d.check_data(getattr(st, st.method), c, r.finetune.task)
    if r.post.method != S.NO_STAGE:
        d = DEFENSES[r.post.method]
        if d.check_data is not None:
            d.check_data(getattr(r.post, r.post.method), c, r.finetune.task)
    ev = r.evaluate
    if ev.hs_limit:
        need("evaluate.hs_limit", ev.hs_limit, len(prompt_sets.items(ev.hs_prompts, "harmful", c.data, None, ev.prompt_field)))
    if ev.fa_limit:
        need("evaluate.fa_limit", ev.fa_limit, len(D.task_examples(c.data, r.finetune.task, "test")))
    if ev.or_limit:
        need("evaluate.or_limit", ev.or_limit, len(prompt_sets.items(ev.or_prompts, "benign", c.data, None, ev.prompt_field)))


def describe(pipes: list[Pipeline], runs_dir: Path) -> str:
    """What `--dry-run` prints: every distinct stage with its resolved config and cache state."""
    seen: dict[str, StagePlan] = {}
    lines = []
    for pipe in pipes:
        steps = plan(pipe, runs_dir)
        lines.append(f"# {pipe.row} (p={pipe.p:g}): " + " -> ".join(f"{s.kind}:{s.method}" for s in steps))
        for s in steps:
            if s.key in seen:
                lines.append(f"  {s.kind}-{s.method} {s.key}: shared with an earlier pipeline")
                continue
            seen[s.key] = s
            state = "cached" if s.done else "to run"
            lines.append(f"  {s.kind}-{s.method} {s.key} ({state}) -> {s.dir}")
            lines.append(f"    reads: {s.parent}")
            lines += ["    " + ln for ln in yaml.safe_dump(s.config, sort_keys=False).rstrip().splitlines()]
    todo = sum(1 for s in seen.values() if not s.done)
    lines.append(f"{len(pipes)} pipelines, {len(seen)} distinct stages, {todo} to run, {len(seen) - todo} cached")
    return "\n".join(lines)


def select(pipes: list[Pipeline], only: list[str] | None, path) -> list[Pipeline]:
    """The pipelines of the rows named by --only (all when none is named); an unknown row is an error."""
    if not only:
        return pipes
    unknown = sorted(set(only) - {p.row for p in pipes})
    if unknown:
        raise FtsafetyError(f"--only: no row named {', '.join(map(repr, unknown))} in {path}; rows: "
                            f"{', '.join(dict.fromkeys(p.row for p in pipes))}")
    return [p for p in pipes if p.row in only]


def slug(row: str) -> str:
    """A row's name as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", row).strip("-") or "row"


def p_name(p: float) -> str:
    """A harmful ratio as it names a record and a table column (0.25, not 0.2500)."""
    return f"{p + 0.0:g}"


def record_path(runs_dir: Path, recipe: Recipe, pipe: Pipeline) -> Path:
    return runs_dir / "pipelines" / recipe.name / f"{slug(pipe.row)}-p{p_name(pipe.p)}.json"


def _warn_if_replacing(path: Path, rec: dict) -> None:
    """A row's record written by other settings (a variant run with KEY=VALUE overrides into the same runs
    directory) is replaced, so the table shows the last run; say so, and how to keep both."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if [s.get("key") for s in old.get("stages", [])] != [s["key"] for s in rec["stages"]]:
        log.warning("%s p=%g: replacing its record in %s, written with other settings; to keep both tables, "
                    "give the variant its own name (e.g. name=%s-variant)", rec["row"], rec["p"], path.parent,
                    rec["recipe"])


def run_pipeline(pipe: Pipeline, steps: list[StagePlan], runs_dir: Path, quiet: bool = False, echo=print,
                 counter: list[int] | None = None) -> tuple[list[dict], dict]:
    """Run one pipeline's stages that are not finished yet (the others are reused); returns each stage's row
    (kind, method, dir, key, cached, seconds) and the evaluation's results. `counter` = [stages run so far,
    stages to run] numbers the progress lines across pipelines."""
    counter = counter if counter is not None else [0, sum(1 for s in steps if not s.done)]
    stage_rows = []
    for s in steps:
        cached = s.done
        if cached:
            seconds = json.loads((s.dir / STAGE_MARKER).read_text()).get("seconds")
        else:
            counter[0] += 1
            source = rejudge_source(s)
            how = f" re-judging {source.name}" if source else ""
            echo(f"[{counter[0]}/{counter[1]}] {pipe.row} p={pipe.p:g}: {s.kind} ({s.method}){how} -> {s.dir}")
            try:
                seconds = round(run_stage(s, pipe, quiet=quiet, rejudge_from=source)["seconds"], 2)
            except OutputLocked as exc:  # a live process on the same stage: nothing to delete or redo
                raise OutputLocked(str(exc).replace("or choose another output", "or give this run another --runs "
                                                    "folder")) from exc
            except FtsafetyError as exc:
                raise FtsafetyError(_cached_stage_hint(str(exc), runs_dir)) from exc
        stage_rows.append({"kind": s.kind, "method": s.method, "dir": str(s.dir), "key": s.key,
                           "cached": cached, "seconds": seconds})
    return stage_rows, json.loads((steps[-1].dir / "results.json").read_text())


def execute(path: str | Path, overrides: list[str] | None, runs_dir: str | Path, quiet: bool = False,
            only: list[str] | None = None, echo=print, trust_remote_code: bool = False) -> tuple[Recipe, list[dict]]:
    """Run every pipeline of a recipe (reusing finished stages); write one record per pipeline."""
    recipe, pipes = pipelines(path, overrides, trust_remote_code)
    order = list(dict.fromkeys(p.row for p in pipes))  # the recipe's row order, whichever rows --only runs
    pipes = select(pipes, only, path)
    runs_dir = Path(runs_dir)
    from ftsafety.utils import check_name_lengths

    check_name_lengths(runs_dir, "runs folder")
    check_data(pipes)
    _warn_unaligned_reference(pipes)
    plans = [plan(p, runs_dir) for p in pipes]
    distinct = {s.key: s for ps in plans for s in ps}
    total = sum(1 for s in distinct.values() if not s.done)
    echo(f"{recipe.name}: {len(pipes)} pipelines, {len(distinct)} distinct stages, {total} to run")
    records = []
    t_start = time.perf_counter()
    counter = [0, total]
    for pipe, steps in zip(pipes, plans):
        stage_rows, results = run_pipeline(pipe, steps, runs_dir, quiet, echo, counter)
        rec = {
            "recipe": recipe.name, "row": pipe.row, "p": pipe.p, "model": pipe.recipe.model,
            "data": pipe.recipe.data, "task": pipe.recipe.finetune.task, "judge": results.get("judge", {}),
            "results": {k: results.get(k) for k in RESULT_KEYS},
            "paper": {"hs": pipe.paper_hs, "fa": pipe.paper_fa, "note": pipe.paper_note},
            "paper_source": recipe.table.paper_source if recipe.table else "",
            "stages": stage_rows, "methods": [f"{s['kind']}:{s['method']}" for s in stage_rows],
            "row_order": order.index(pipe.row), "date": time.strftime("%Y-%m-%d"),
            "environment_eval": results.get("environment", {}),
        }
        out = record_path(runs_dir, recipe, pipe)
        _warn_if_replacing(out, rec)
        write_json(out, rec)
        records.append(rec)
    echo(f"{recipe.name}: done in {time.perf_counter() - t_start:.0f}s ({counter[0]} stages run, "
         f"{len(distinct) - total} reused)")
    atomic_write_text(runs_dir / "pipelines" / recipe.name / "recipe.yaml",
                      yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
    return recipe, records
