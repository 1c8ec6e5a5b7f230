"""Rich at the edge: the shared console, progress bars, and a Trainer progress callback."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

console = Console(stderr=True)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    level = os.environ.get("FTSAFETY_LOG_LEVEL") or ("DEBUG" if verbose else "WARNING" if quiet else "INFO")
    if level.upper() not in LEVELS:
        from ftsafety.errors import FtsafetyError

        raise FtsafetyError(f"FTSAFETY_LOG_LEVEL={level!r}: choose one of {', '.join(LEVELS)}")
    level = level.upper()
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)], force=True
    )
    for noisy in ("transformers", "peft", "accelerate", "datasets", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def progress(disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False, disable=disable,
    )


class RichTrainCallback(TrainerCallback):
    """Progress bar plus a metrics.jsonl log line per logging step."""

    def __init__(self, description: str, metrics_path: Path | None = None, disable: bool = False):
        self.description, self.metrics_path, self.disable = description, metrics_path, disable
        self.progress = None
        self.task = None
        self.t0 = 0.0
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, **kw):
        self.progress = progress(self.disable)
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps, info="")
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs:
            return
        row = {"step": state.global_step, "elapsed_s": round(time.perf_counter() - self.t0, 2), **logs}
        self.history.append(row)
        if "loss" in logs:
            self.progress.update(self.task, info=f"loss {logs['loss']:.4f}")
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def on_train_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress.stop()
