"""`ftsafety run RECIPE [key=value ...]` (pipelines from recipes) and `ftsafety report RUNS_DIR` (tables)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ftsafety.commands.common import Quiet, Verbose, _setup


def run(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file (see recipes/).", metavar="RECIPE")],
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="KEY=VALUE",
        help="key=value overrides, dotted: data=../shared/data finetune.harmful_ratio=0.2 'table.ratios=[0,0.2]'.")]
    = None,
    runs: Annotated[Path, typer.Option("--runs", help="Where stages and pipeline records go (shared cache).")]
    = Path("runs"),
    results: Annotated[Optional[Path], typer.Option(
        "--results", help="Write table.md/.csv/.json and hs_fa.png here when the pipelines finish.")] = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Run only this table row (repeatable).")]
    = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print every stage with its resolved config; run nothing.", metavar="")]
    = False,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="Run code shipped with a hub model (a recipe cannot turn this on by itself).",
        metavar="")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Run a recipe's pipelines (align -> finetune -> post -> evaluate), reusing finished stages."""
    from ftsafety import pipeline

    _setup(verbose, quiet)
    if dry_run:
        _, pipes = pipeline.pipelines(recipe, overrides or [], trust_remote_code)
        pipes = pipeline.select(pipes, only, recipe)
        typer.echo(pipeline.describe(pipes, runs))
        n = pipeline.check_data(pipes)
        hub = len(pipes) - n
        typer.echo((f"data: every stage's rows are there ({n} pipelines checked)" if n else "data:")
                   + (f"{';' if n else ''} {hub} pipelines read the hub: not checked offline" if hub else ""))
        return
    rec, records = pipeline.execute(recipe, overrides or [], runs, quiet=quiet, only=only, echo=typer.echo,
                                    trust_remote_code=trust_remote_code)
    for r in records:
        res = r["results"]
        typer.echo(f"  {r['row']:<28} p={r['p']:<5g} HS {_f(res.get('hs'))}  FA {_f(res.get('fa'))}")
    if results is not None:
        from ftsafety.report import write_report

        out = write_report(runs, results, rec.name, command=" ".join(["ftsafety", *map(shlex.quote, sys.argv[1:])]))
        typer.echo(f"wrote {out['out']}/table.md, table.csv, table.json, hs_fa.png")


def _f(x) -> str:
    return "  –  " if x is None else f"{x:5.1f}"


def report(
    runs_dir: Annotated[Path, typer.Argument(help="A --runs directory of `ftsafety run`.", metavar="RUNS_DIR")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for table.md/.csv/.json and hs_fa.png "
                                                "(default results, or results/judge-NAME with --judge).")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="Which recipe's table, when RUNS_DIR holds several.")] = None,
    judge: Annotated[Optional[str], typer.Option(
        "--judge", help="Re-judge every evaluation's cached answers with this judge (nothing is regenerated).")] = None,
    quiet: Quiet = False,
):
    """Rebuild the results table (Markdown, CSV, JSON) and the HS-vs-FA plot from run directories."""
    from ftsafety.report import write_report

    judge_obj = None
    if judge is not None:
        from ftsafety.evaluation.judges import get_judge
        from ftsafety.evaluation.rejudge import slug

        judge_obj = get_judge(judge)
        out = out or Path("results") / f"judge-{slug(judge)}"
    rep = write_report(runs_dir, out or Path("results"), recipe,
                       command=" ".join(["ftsafety", *map(shlex.quote, sys.argv[1:])]), judge=judge_obj,
                       echo=None if quiet else typer.echo)
    typer.echo((Path(rep["out"]) / "table.md").read_text())
    typer.echo(f"wrote {rep['out']}/table.md, table.csv, table.json, hs_fa.png")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("report")(report)
