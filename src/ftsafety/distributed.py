"""Several processes (`accelerate launch`, `torchrun`): rank, barriers, sums and object exchange.

Every helper is the identity (or a no-op) in a single process: a run that is not launched with
several processes takes exactly the code path it took before this module existed.

Two channels:
  * tensors (gradients, norms, statistics) go through the default process group (NCCL on CUDA,
    gloo on CPU) with `all_reduce_sum_` / `all_reduce_sum_tensors`;
  * Python objects (generated texts, the main process's results, its errors) and the barriers
    where the other processes wait for the main one (writing a run directory, judging, a whole
    rollback run) go through a separate gloo group with a long timeout (FTSAFETY_DIST_TIMEOUT,
    seconds, default 12 h): NCCL's default of 10 minutes is shorter than a 7B judge pass. A process
    that dies takes the others down with it (torchrun stops the whole job), so a long timeout
    never leaves a hung job behind.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from ftsafety.errors import FtsafetyError

T = TypeVar("T")
_OBJECT_GROUP = None


def launched() -> bool:
    """True when this process is one of several started by torchrun / accelerate launch (WORLD_SIZE > 1)."""
    many = env_int("WORLD_SIZE", 1) > 1
    if many:  # the launcher's other variables, checked before anything uses them
        env_int("LOCAL_RANK", 0)
        env_int("RANK", 0)
    return many


def env_int(name: str, default: int) -> int:
    """An integer environment variable set by a launcher; anything else is a one-line error (before any
    loading or training), not a silent single-process run or a raw ValueError."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise FtsafetyError(f"environment variable {name}={raw!r} is not an integer (unset it, or start the "
                            "command with torchrun / accelerate launch)") from None
    if value < 0:
        raise FtsafetyError(f"environment variable {name}={raw!r} must be >= 0")
    return value


def active() -> bool:
    """True when a process group of more than one process is up."""
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size() -> int:
    import torch.distributed as tdist

    return tdist.get_world_size() if active() else 1


def rank() -> int:
    import torch.distributed as tdist

    return tdist.get_rank() if active() else 0


def local_rank() -> int:
    """This process's index on its machine (its GPU), 0 in a single process."""
    return env_int("LOCAL_RANK", 0) if launched() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> int:
    """Join the process group of a torchrun / accelerate launch (gloo on CPU, NCCL on CUDA, through
    accelerate's `PartialState`, as the Trainer does); returns the number of processes (1 when not
    launched)."""
    if not launched():
        return 1
    import torch.distributed as tdist

    if not tdist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=device.type != "cuda")
    if not active():
        raise FtsafetyError(
            f"launched with WORLD_SIZE={os.environ.get('WORLD_SIZE')} but no process group came up "
            f"on device {device} (on a machine without GPUs pass --device cpu)"
        )
    return world_size()


def _timeout() -> datetime.timedelta:
    try:
        seconds = float(os.environ.get("FTSAFETY_DIST_TIMEOUT", "") or 12 * 3600)
    except ValueError:
        seconds = 12 * 3600
    return datetime.timedelta(seconds=max(seconds, 60.0))


def _object_group():
    """A gloo group with a long timeout (made once, at the first call, which every process reaches)."""
    global _OBJECT_GROUP
    if _OBJECT_GROUP is None:
        import torch.distributed as tdist

        _OBJECT_GROUP = tdist.new_group(backend="gloo", timeout=_timeout())
    return _OBJECT_GROUP


def barrier() -> None:
    """Wait until every process gets here (no-op in a single process)."""
    if active():
        import torch.distributed as tdist

        tdist.barrier(group=_object_group())


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` of process `src`, on every process (picklable objects)."""
    if not active():
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=src, group=_object_group())
    return box[0]


def gather_objects(obj: Any) -> list:
    """The `obj` of every process, in rank order, on every process."""
    if not active():
        return [obj]
    import torch.distributed as tdist

    out: list = [None] * world_size()
    tdist.all_gather_object(out, obj, group=_object_group())
    return out


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the processes, in place (the identity in a single process)."""
    if active():
        import torch.distributed as tdist

        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_reduce_sum_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over the processes, in place, with one all-reduce per (dtype, device)."""
    tensors = list(tensors)
    if not active() or not tensors:
        return tensors
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for idx in groups.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        all_reduce_sum_(flat)
        for i, part in zip(idx, torch.split(flat, [tensors[i].numel() for i in idx])):
            tensors[i].copy_(part.view_as(tensors[i]))
    return tensors


def run_on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` on the main process only; every process returns its result, or raises its error
    (an FtsafetyError with the same message on the others), once it is done."""
    if not active():
        return fn(*args, **kwargs)
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            broadcast_object(("error", isinstance(exc, FtsafetyError), type(exc).__name__, str(exc)))
            raise
        broadcast_object(("ok", result))
        return result
    status, *payload = broadcast_object(None)
    if status == "error":
        ours, name, message = payload
        raise FtsafetyError(message if ours else f"the main process failed: {name}: {message}")
    return payload[0]


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: every world_size-th one, from its rank on."""
    return list(items[rank() :: world_size()]) if active() else list(items)


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise): a forward
    through it uses the same parameters but never arms DDP's gradient all-reduce."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
