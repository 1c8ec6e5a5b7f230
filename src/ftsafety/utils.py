"""Small shared helpers: seeding, devices, provenance and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ftsafety.errors import FtsafetyError

# Secrets are found by the shape of their value wherever it appears (hub, OpenAI/Anthropic, GitHub, AWS,
# Slack tokens), never because a key merely contains "token" or "password": data carries such words
# (a prompt category `password_cracking`, counts such as `max_new_tokens`) and its figures must stay.
# Besides, a *string* under a key that is exactly a credential parameter's name (the libraries' `token`,
# `hub_token`, `api_key`, `password`, ...) is dropped, whatever its shape.
_SECRET_KEYS = frozenset(("token", "hf_token", "hub_token", "use_auth_token", "auth_token", "access_token",
                          "api_key", "apikey", "password", "passwd", "secret", "client_secret", "private_key",
                          "auth", "authorization"))
_SECRET_VALUE = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,}|sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|xox[abpors]-[A-Za-z0-9-]{10,})"
)
REDACTED = "<redacted>"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def resolve_device(device: str | None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU; anything else must exist on this machine.

    Launched with several processes (torchrun / accelerate launch), 'auto' and 'cuda' mean this
    process's own GPU, cuda:LOCAL_RANK; on CPU every process uses the CPU."""
    from ftsafety import distributed

    if device in (None, "", "auto"):
        if torch.cuda.is_available() and distributed.launched():
            return resolve_device("cuda")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is not None and dev.type == "cuda" and dev.index is None and distributed.launched():
        dev = torch.device("cuda", distributed.local_rank())
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise FtsafetyError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FtsafetyError(f"device {device!r} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FtsafetyError(
                f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FtsafetyError(f"device {device!r} asked for, but MPS is not available on this machine")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA (the papers train in bf16)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


DTYPES = ("auto", "fp32", "bf16")
# CPU instructions that multiply bf16 natively; without them torch converts, and a bf16 GEMM is slower than fp32
# (measured on an AVX2-only EPYC: ~60x slower, EXPERIMENTS.md 2026-12-04)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@dataclass(frozen=True)
class Precision:
    """What arithmetic a run uses: `asked` (auto | fp32 | bf16), `ran` (fp32 | bf16) and why.

    bf16 on CPU is autocast: weights, gradients and optimizer state stay fp32 and the matmuls run in bf16
    (the Trainer's `bf16=True`, `torch.autocast` around generation). On CUDA bf16 is what it always was:
    the weights are loaded in bf16 and the Trainer autocasts."""

    asked: str
    ran: str
    why: str
    device_type: str

    @property
    def weights(self) -> torch.dtype:
        return torch.bfloat16 if self.ran == "bf16" and self.device_type == "cuda" else torch.float32

    @property
    def legacy(self) -> bool:
        """True where this is what ftsafety ran before --dtype existed (fp32 on CPU and MPS, bf16 on CUDA):
        stage cache keys and training fingerprints then stay those of the runs made before."""
        return self.ran == ("bf16" if self.device_type == "cuda" else "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where bf16 runs (the evaluator's generation); a no-op for fp32."""
        if self.ran != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def record(self) -> dict:
        return {"asked": self.asked, "ran": self.ran, "why": self.why}


def check_dtype(dtype: str | None, key: str | None = None) -> str:
    """`--dtype`'s value, lower-cased (None is auto); one line naming the choices for anything else (`key`: the
    recipe key it was read from, named in that line)."""
    value = str(dtype or "auto").lower()
    if value not in DTYPES:
        bad = f"{key}: unknown value {dtype!r}" if key else f"unknown dtype {value!r}"
        raise FtsafetyError(f"{bad}; choose one of {', '.join(DTYPES)}")
    return value


def resolve_precision(dtype: str | None, device: torch.device, flags: set[str] | None = None) -> Precision:
    """`--dtype` on `device`: `auto` is bf16 where the device multiplies bf16 fast (CUDA with bf16; a CPU
    with AVX512-BF16 or AMX), fp32 elsewhere. `flags`: the CPU's flags (read from the machine by default)."""
    dtype = check_dtype(dtype)
    kind = device.type
    if dtype == "fp32":
        return Precision(dtype, "fp32", "asked for", kind)
    if kind == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if dtype == "bf16" and not ok:
            raise FtsafetyError(f"--dtype bf16 asked for, but {torch.cuda.get_device_name(device)} has no bf16")
        if dtype == "bf16":
            return Precision(dtype, "bf16", "asked for", kind)
        return Precision(dtype, "bf16" if ok else "fp32",
                         "CUDA device with bf16" if ok else "CUDA device without bf16", kind)
    if kind != "cpu":
        if dtype == "bf16":
            raise FtsafetyError(f"--dtype bf16 is supported on CPU and CUDA, not on {kind}; use fp32 or auto")
        return Precision(dtype, "fp32", f"{kind}: fp32 only", kind)
    if dtype == "bf16":
        return Precision(dtype, "bf16", "asked for (CPU autocast)", kind)
    have = sorted((cpu_flags() if flags is None else flags) & set(BF16_CPU_FLAGS))
    if have:
        return Precision(dtype, "bf16", f"CPU has {'+'.join(have)} (autocast)", kind)
    return Precision(dtype, "fp32", "CPU without AVX512-BF16 or AMX (bf16 would be emulated, slower)", kind)


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


def locked_requirements() -> dict[str, str]:
    """The locked set shipped with the package (`locked-requirements.txt`): name -> exact version."""
    from importlib.resources import files

    try:
        text = files("ftsafety").joinpath("locked-requirements.txt").read_text()
    except (FileNotFoundError, OSError):  # pragma: no cover - a broken install
        return {}
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[name.strip()] = ver.strip()
    return out


def dependency_report() -> dict[str, Any]:
    """The supported ranges (the package's metadata), the locked set, and where what is installed differs
    from the lock (`ftsafety env`)."""
    import re
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        reqs = requires("ftsafety") or []
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without an install
        reqs = []
    ranges = [r for r in reqs if "extra ==" not in r]
    extras = [r for r in reqs if "extra ==" in r]
    locked = locked_requirements()
    differs = {}
    for name, want in locked.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            continue
        if re.sub(r"\+.*$", "", have) != want:
            differs[name] = {"installed": have, "locked": want}
    return {"supported": ranges, "optional": extras, "locked": locked, "installed_differs_from_lock": differs}


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


def is_secret_key(key: Any) -> bool:
    """True for a key that is exactly a credential parameter's name (token, HF_TOKEN, api_key, password, ...);
    a key that only contains such a word (max_new_tokens, password_cracking) is not one."""
    return str(key).strip().lower().replace("-", "_") in _SECRET_KEYS


def scrub(obj: Any) -> Any:
    """Drop secrets before anything is written: token-shaped strings (hf_..., sk-..., ghp_..., AKIA...)
    wherever they appear, and a string under a credential parameter's own name. Numbers, and keys that
    only resemble such names (a category `password_cracking`), are kept as they are."""
    if isinstance(obj, dict):
        return {
            (_SECRET_VALUE.sub(REDACTED, k) if isinstance(k, str) else k): (
                REDACTED if is_secret_key(k) and isinstance(v, str) and v else scrub(v)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
        import dataclasses

        return scrub(dataclasses.asdict(obj))
    if isinstance(obj, str):
        return _SECRET_VALUE.sub(REDACTED, obj)
    if isinstance(obj, os.PathLike):
        text = os.fspath(obj)
        return _SECRET_VALUE.sub(REDACTED, text) if _SECRET_VALUE.search(text) else obj
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that it appears complete or not at all, token-shaped secrets (hf_..., sk-...)
    redacted: every file ftsafety writes goes through here (JSON, YAML and JSONL are scrubbed by key as
    well, before they are serialised)."""
    path = Path(path)
    text = _SECRET_VALUE.sub(REDACTED, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
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


def check_not_input(out: str | os.PathLike, inputs) -> None:
    """Refuse, in one line, an output directory that is (or holds) one of the run's inputs: the atomic
    rename would replace the model or adapter the run reads (and a manifest would list itself)."""
    out_r = Path(os.path.realpath(out))
    for item in inputs:
        if not item:
            continue
        p = Path(str(item)).expanduser()
        if not p.exists():
            continue
        p_r = Path(os.path.realpath(p))
        if p_r == out_r or out_r in p_r.parents:
            raise FtsafetyError(f"--out {out} is where this run's input {item} lives: writing the run there would "
                                "replace it; choose another --out")


# Files that mark a directory as an ftsafety run (training/defense stages, evaluate), which a
# new run may replace; any other non-empty directory is refused rather than overwritten.
# What each kind of run writes: the files that must all be there, and those that may be. A directory is a
# run (which a rerun may replace) only when it holds every required file of its kind and nothing that run
# does not write; anything else is a user's folder and is never replaced. `stage.json` is the mark
# `ftsafety run` adds to a finished stage.
RUN_FILES: dict[str, tuple[frozenset, frozenset]] = {
    "train": (frozenset({"ftsafety_run.json", "train_results.json", "config.yaml", "adapter"}),
              frozenset({"metrics.jsonl", "logs"})),
    # a full-parameter fine-tune (--full-parameter) holds its whole model instead of an adapter
    "train_full": (frozenset({"ftsafety_run.json", "train_results.json", "config.yaml", "model"}),
                   frozenset({"metrics.jsonl", "logs"})),
    "antidote": (frozenset({"antidote.json", "config.yaml", "mask.safetensors"}),
                 frozenset({"ftsafety_run.json", "adapter", "model"})),
    "rollback": (frozenset({"rollback.json", "config.yaml", "ftsafety_run.json", "model"}), frozenset()),
    "evaluate": (frozenset({"results.json", "samples.jsonl", "config.yaml"}), frozenset()),
}
STAGE_MARK = "stage.json"


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def run_kind(path: Path) -> str | None:
    """The kind of ftsafety run `path` holds (its complete files and nothing else), or None."""
    try:
        names = {e.name for e in Path(path).iterdir()}
    except OSError:
        return None
    for kind, (required, optional) in RUN_FILES.items():
        if required <= names and not names - required - optional - {STAGE_MARK}:
            return "train" if kind == "train_full" else kind
    return None


# The longest name ftsafety gives a sibling of an output NAME: ".NAME.tmp-" + 8 random characters (atomic_dir)
SIBLING_SUFFIX_BYTES = 1 + len(".tmp-") + 8


def check_path_text(path: str | os.PathLike, what: str = "path") -> None:
    """A path must be text that can be written into results (UTF-8): under a C locale, a non-ASCII name
    arrives as undecodable bytes and would be recorded as escapes, not as the path."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise FtsafetyError(f"{what} {os.fspath(path)!r} is not valid text in this locale (LC_ALL=C?); run under a "
                            "UTF-8 locale (e.g. LC_ALL=C.UTF-8) or use an ASCII name") from None


class OutputLocked(FtsafetyError):
    """Another live process holds the output's lock (`run_lock`)."""


def check_name_lengths(path: str | os.PathLike, what: str = "output path") -> None:
    """Every component of `path` must fit a file name (NAME_MAX bytes, 255 on the usual file systems): a
    longer one makes any stat of the path fail with ENAMETOOLONG before the real checks can say why."""
    try:
        name_max = os.pathconf(".", "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise FtsafetyError(f"{what} {os.fspath(path)[:40]}...: the name {part[:40]}... is {size} bytes; a file "
                                f"name holds at most {name_max} here")


def check_writable_dir(path: str | os.PathLike, kind: str | None = None) -> Path:
    """Fail early, in one line, when an output directory cannot be written (or must not be replaced).

    The run is written to a sibling temporary directory and renamed over `path` at the end, so `path`
    may be missing, an empty directory or an earlier ftsafety run; a non-empty directory of anything
    else is refused (it would be deleted). Writability is probed with a real (removed) directory,
    since os.access says yes to root even on read-only or virtual file systems.

    A symlink is written through: the run goes to its target (returned), and the link stays. `kind`
    (a RUN_FILES key): an earlier run of another kind is refused too (a fine-tune must not replace an
    evaluation's samples)."""
    path = Path(path)
    if not str(path).strip():
        raise FtsafetyError("--out is empty; give the run directory to write")
    check_path_text(path)
    check_name_lengths(path)
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.parent.is_dir():
            raise FtsafetyError(f"output path {path} is a symlink to {target}, whose folder does not exist")
        path = target
    if path.exists() and not path.is_dir():
        raise FtsafetyError(f"output path {path} exists and is not a directory")
    if path.is_dir():
        try:
            entries = list(path.iterdir())
        except OSError as exc:
            raise FtsafetyError(f"output directory {path} cannot be read ({exc.strerror or exc})") from None
        found = run_kind(path) if entries else None
        if entries and found is None:
            raise FtsafetyError(
                f"output directory {path} is not empty and is not an ftsafety run (it holds files no ftsafety run "
                "writes); refusing to replace it (choose a new --out)"
            )
        if kind is not None and found is not None and found != kind:
            raise FtsafetyError(
                f"output directory {path} holds an ftsafety {found} run; refusing to replace it with {_a(kind)} run "
                "(choose a new --out, or delete it first)"
            )
    anchor = path.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise FtsafetyError(f"output directory {path} cannot be created: {anchor} is not a directory")
    try:
        name_max = os.pathconf(anchor, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    room = name_max - SIBLING_SUFFIX_BYTES
    if len(os.fsencode(path.name)) > room:
        raise FtsafetyError(f"output name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes; with the hidden "
                            f"siblings written beside it (.NAME.partial, .NAME.tmp-...) at most {room} fit here")
    try:
        probe = tempfile.mkdtemp(prefix=".ftsafety-probe-", dir=anchor)
        os.rmdir(probe)
    except OSError as exc:
        raise FtsafetyError(f"output directory {path} is not writable ({exc.strerror or exc})") from None
    return path


# ---------------------------------------------------------------------------------------------
# One writer per output: an OS lock held for a run's whole life

_HELD: dict[str, list] = {}


@contextlib.contextmanager
def run_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the output `path` (`.<name>.lock` beside it, with the holder's pid) while
    the run writes it: a second process aimed at the same output (a run directory, a cached stage, a
    report folder) fails at once, in one line naming the holder, instead of deleting the first one's
    checkpoints or interleaving its metrics. Re-entrant within a process; the non-main processes of a
    launched job rely on their main process's lock. Where `path`'s folder does not exist yet, no one can
    be writing there and nothing is created."""
    import fcntl

    final = Path(os.path.abspath(path))
    check_name_lengths(path)
    key = str(final)
    if os.environ.get("RANK", "0") != "0" or not final.parent.is_dir():
        yield
        return
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    lock_path = final.parent / f".{final.name}.lock"
    try:
        fh = open(lock_path, "a+", encoding="utf-8")
    except OSError:
        yield  # a folder we cannot write: the run's own checks say so
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise OutputLocked(f"another ftsafety process (pid {holder}) is writing {final}; wait for it to finish, "
                           "or choose another output") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    _HELD[key] = [fh, 1]
    try:
        yield
    finally:
        _HELD.pop(key, None)
        try:
            lock_path.unlink()
        except OSError:
            pass
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def locks_output(param: str = "out_dir"):
    """Decorator: the function holds `run_lock` on its argument `param` (when given) for its whole call."""
    import functools
    import inspect

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            out = sig.bind_partial(*args, **kwargs).arguments.get(param)
            if out is None or not str(out).strip():
                return fn(*args, **kwargs)
            with run_lock(out):
                return fn(*args, **kwargs)

        return inner

    return wrap
