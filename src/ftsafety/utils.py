"""Small shared helpers: seeding, devices, provenance and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ftsafety.errors import FtsafetyError

# Keys whose values never go into manifests, logs or results.
_SECRET_MARKERS = ("token", "secret", "password", "api_key", "apikey")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def resolve_device(device: str | None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise FtsafetyError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FtsafetyError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA (the papers train in bf16)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def git_hash() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("ftsafety", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment() -> dict[str, Any]:
    return {
        "versions": package_versions(),
        "git": git_hash(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def scrub(obj: Any) -> Any:
    """Drop secrets (hub tokens and the like) before anything is written."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if any(m in str(k).lower() for m in _SECRET_MARKERS) else scrub(v))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that it appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(scrub(obj), indent=2, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    atomic_write_text(
        path, "".join(json.dumps(scrub(r), ensure_ascii=False, default=_json_default) + "\n" for r in rows)
    )


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    import yaml

    data = json.loads(json.dumps(scrub(obj), default=_json_default))
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `final` only on success.

    A run killed halfway leaves a `.final.tmp-*` directory that no later stage reads, never a
    half-written `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Fail early, in one line, when an output directory cannot be written."""
    path = Path(path)
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if path.exists() and not path.is_dir():
        raise FtsafetyError(f"output path {path} exists and is not a directory")
    if not os.access(parent, os.W_OK):
        raise FtsafetyError(f"output directory {path} is not writable")
    return path
