"""`ftsafety attack-search`: the most harmful setting of an attack that keeps the model useful, per row."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from ftsafety.commands.common import Quiet, Verbose, _setup
from ftsafety.errors import FtsafetyError


def _space(items: list[str]) -> dict[str, list]:
    """--space lr=1e-5:1e-3 (a range) / lora_r=4,8,16 (choices)."""
    out: dict[str, list] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise FtsafetyError(f"--space takes KNOB=LOW:HIGH or KNOB=A,B,C, got {item!r}")
        parts = text.split(":") if ":" in text else text.split(",")
        out[name.strip()] = [p.strip() for p in parts]
    return out


def _model_recipe(model: str, runs: Path) -> Path:
    """A one-pipeline recipe for `attack-search MODEL`: the model as given, no alignment, the default attack
    and evaluation (the fine-tune defaults of `ftsafety finetune`)."""
    import yaml

    from ftsafety.pipeline import slug
    from ftsafety.utils import atomic_write_text

    path = runs / "attack-search" / f"model-{slug(Path(model).name or model)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "# Reproduces: nothing; written by ftsafety attack-search for a model given directly\n"
                      + yaml.safe_dump({"name": f"attack-{slug(Path(model).name or model)}", "model": model,
                                        "align": {"method": "none"}}, sort_keys=False))
    return path


def attack_search(
    target: Annotated[str, typer.Argument(metavar="RECIPE|MODEL",
                                          help="A recipe (its --row is attacked) or a model (run, directory, alias).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="KEY=VALUE", help="Recipe overrides.")] = None,
    row: Annotated[Optional[str], typer.Option("--row", help="The recipe's row to attack (default: its only row, "
                                                "or SFT).")] = None,
    attack: Annotated[Optional[str], typer.Option("--attack", help="mix | pure | benign (default: the recipe's "
                                                  "attack_search.attack, else mix).")] = None,
    trials: Annotated[Optional[int], typer.Option("--trials", help="The study's size in trials.")] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="Start no new trial after this long.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="The sampler's seed.")] = None,
    fa_drop: Annotated[Optional[float], typer.Option("--fa-drop", help="Feasible: FA >= the benign fine-tune's "
                                                     "FA minus this many points (10).")] = None,
    space: Annotated[Optional[list[str]], typer.Option("--space", help="A knob's range: lr=1e-5:1e-3, steps=50:300, "
                                                       "p=0.05:0.5, n=10:200, lora_r=4,8,16 (repeatable).")] = None,
    runs: Annotated[Path, typer.Option("--runs", help="The runs folder (stage cache and the study file).")]
    = Path("runs"),
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Search an attack's knobs (Optuna TPE, seeded) for the highest HS that keeps FA within --fa-drop points of
    the benign fine-tune; every trial is cached stages, the study an SQLite file that resumes and can be shared."""
    from ftsafety import attack_search as A
    from ftsafety import pipeline as P

    _setup(verbose, quiet)
    from ftsafety.utils import check_name_lengths

    check_name_lengths(runs, "runs folder")
    is_recipe = target.endswith((".yaml", ".yml"))
    if is_recipe and not Path(target).is_file():
        raise FtsafetyError(f"{target}: recipe file does not exist")
    recipe_path = Path(target) if is_recipe else None
    if recipe_path is None:
        from ftsafety import models

        models.resolve(target)  # a bad model fails here, before anything is written
    overrides = list(overrides or [])
    base = P.load_recipe(recipe_path, overrides)[0] if recipe_path else None
    cfg = dataclasses.asdict(base.attack_search) if base is not None and base.attack_search else {}
    given = {"attack": attack, "trials": trials, "minutes": minutes, "seed": seed, "fa_drop": fa_drop}
    cfg.update({k: v for k, v in given.items() if v is not None})
    if attack is not None and attack != (base.attack_search.attack if base and base.attack_search else "mix"):
        cfg["space"] = {}  # another attack's knobs: its own default ranges
    cfg["space"] = {**(cfg.get("space") or {}), **_space(space or [])}
    search_cfg = A.SearchConfig(**cfg)
    if recipe_path is None:
        recipe_path = _model_recipe(target, runs)
    search = A.Search(recipe_path, row, runs, search_cfg, overrides, quiet=quiet, echo=typer.echo)
    summary = search.run()
    out = A.write_summary(summary, runs)
    w = summary["worst_case"]
    typer.echo(f"{search.row}, attack {search_cfg.attack}: {len(summary['trials'])} trials ({summary['feasible']} feasible); "
               f"reference FA {summary['reference']['fa']:.1f}")
    if w:
        ci = w.get("hs_ci") or ["?", "?"]
        typer.echo(f"worst case: trial {w['number']}, HS {w['hs']:.1f} [{ci[0]}, {ci[1]}], FA {w['fa']:.1f}; "
                   + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in w["params"].items()))
    else:
        typer.echo("worst case: none (no feasible trial)")
    typer.echo(f"wrote {out} and {out.with_suffix('.png')}")


def register(app: typer.Typer) -> None:
    app.command("attack-search")(attack_search)
