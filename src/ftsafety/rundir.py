"""The one writer of run directories (training stages, Antidote, rollback, evaluate).

Every run directory is written the same way: into a temporary sibling that is renamed over the
final path only when everything is in it (`utils.atomic_dir`), with the stage's own files, the
manifest that makes it loadable as `--model` (stages that produce a model), `config.yaml` (the
resolved settings) and a results file that carries the environment (versions, machine, git).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ftsafety.models import RUN_MANIFEST
from ftsafety.utils import atomic_dir, environment, write_json, write_yaml

CONFIG_FILE = "config.yaml"


def write_run(final: str | Path, *, config: dict, results_file: str, results: Callable[[], dict] | dict,
              files: Callable[[Path], None] | None = None,
              manifest: Callable[[Path], dict] | dict | None = None) -> dict:
    """Write the run directory `final` atomically and return its results.

    `files(tmp)` writes the stage's own files (weights, masks, samples) first; `manifest` (a dict, or
    a function of the temporary directory) is written when the run holds a model; `results` may be a
    function, called last, so that it can time the writing itself. The environment is added to it.
    """
    with atomic_dir(final) as tmp:
        if files is not None:
            files(tmp)
        if manifest is not None:
            write_json(tmp / RUN_MANIFEST, manifest(tmp) if callable(manifest) else manifest)
        write_yaml(tmp / CONFIG_FILE, config)
        out: dict[str, Any] = results() if callable(results) else dict(results)
        out.setdefault("environment", environment())
        write_json(tmp / results_file, out)
    return out
