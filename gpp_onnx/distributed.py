"""Several processes under ``torchrun``: torch's process group and DistributedDataParallel.

``setup(env, device)`` is called once, at the command-line entry, with torchrun's
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); the
library never reads the environment. It starts the default process group: gloo when the
run stays on the CPU, ``cpu:gloo,cuda:nccl`` when it trains on CUDA (each process on
``cuda:LOCAL_RANK``; CUDA tensors go through NCCL, the few CPU values below through gloo).
Without a group (one process, the default) every helper here is the identity: rank 0 of
a world of 1, nothing is communicated.

What runs where, with world size W:

* training (``train.Trainer``): the net is wrapped in DistributedDataParallel; each global
  batch of ``batch_size`` images (the same seeded shuffle on every rank) is split into W
  contiguous, disjoint shares (``data.iter_batches(part=part())``), so every rank takes
  the same number of steps; DDP averages the gradients. ``CrossEntropy`` is the sum
  over a rank's share divided by the global batch size, times W, so the averaged
  gradient is the full batch's; ``PushLoss`` sums its class statistics over the ranks
  (a differentiable all-reduce) before their EMA update, so every rank holds the same
  statistics. Steps on 2 ranks equal one process's on the whole batch (to float32
  rounding, tests/test_distributed.py).
* the repair after a cut: computed on rank 0 and broadcast, like the plan.
* channel scores and the plan: computed on rank 0 and broadcast (:func:`from_writer`).
  [design] Broadcast rather than an average: the GPP criterion is an eigenproblem on a
  small per-class sample, not a sum over images, so averaging scores that each rank
  computed on its own share would not equal the one-process scores; rank 0 computing
  them alone gives exactly the one-process plan, and a latency target is timed once,
  undisturbed.
* held-out accuracy: each rank counts the correct answers on its share, the counts are
  summed (:func:`all_sum`).
* logs, printed results and files: rank 0 only (:func:`is_writer`).

Every rank must see the same data: :func:`check_same` all-gathers a digest and raises
``RanksDisagree`` (an InputError) on every rank when they differ.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TypeVar

from .errors import InputError

logger = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT = timedelta(minutes=60)   # rank 0 scores and times alone while the others wait


class RanksDisagree(InputError):
    """The processes of one run were given different inputs (reported once, by rank 0)."""


def _group():
    """torch.distributed when a process group is up, else None (torch is not imported
    for that: without torch there is no group)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def setup(env: Mapping[str, str], device: str = "auto") -> bool:
    """Start the process group when `env` (torchrun's environment) describes a world of
    more than one process; `device` is the run's --device. Returns whether it started."""
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise InputError("WORLD_SIZE, RANK and LOCAL_RANK must be integers - start the "
                         "processes with torchrun") from None
    if world <= 1 or _group() is not None:
        return False
    import torch
    import torch.distributed as dist

    cuda = str(device).lower() != "cpu" and torch.cuda.is_available()
    if cuda:
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but {torch.cuda.device_count()} GPUs are "
                             "visible - start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    logger.debug("rank %d of %d started (%s)", rank, world, backend)
    return True


def teardown() -> None:
    """End the process group. The ranks first free their DDP wrappers (a wrapper's
    reducer holds gloo work) and wait for each other: a rank that closed its end while
    the other was still finishing aborted now and then ("terminate called without an
    active exception")."""
    dist = _group()
    if dist is not None:
        import gc

        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist is not None else 1


def is_writer() -> bool:
    """Rank 0 logs, prints and writes files; the other ranks only compute."""
    return rank() == 0


def part() -> tuple[int, int]:
    """(rank, world size): which contiguous share of each global batch this rank takes
    (``data.iter_batches(part=...)``)."""
    return rank(), world_size()


def all_sum(value: float | int) -> float | int:
    """`value` summed over the ranks (a number; no gradient)."""
    dist = _group()
    if dist is None:
        return value
    import torch

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return type(value)(t.item())


def sum_tensor(t):
    """`t` summed over the ranks, differentiable: the backward pass sums the gradients
    over the ranks too, so a loss computed from summed statistics has the gradient of
    the loss over the whole global batch."""
    if _group() is None:
        return t
    return _summed().apply(t)


@functools.lru_cache(maxsize=None)
def _summed():
    """Autograd function: forward and backward both sum over the ranks."""
    import torch
    import torch.distributed as dist

    class Summed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            out = t.clone()
            dist.all_reduce(out)
            return out

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad)
            return grad

    return Summed


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (any picklable object)."""
    dist = _group()
    if dist is None:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here."""
    dist = _group()
    if dist is not None:
        dist.barrier()


def broadcast_tensors(tensors) -> None:
    """Overwrite each tensor in place with rank 0's."""
    dist = _group()
    if dist is not None:
        for t in tensors:
            dist.broadcast(t.data, src=0)


def from_writer(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` computed on rank 0 only and broadcast to every rank; `fn`
    must not communicate."""
    if _group() is None:
        return fn(*args, **kwargs)
    return broadcast(fn(*args, **kwargs) if is_writer() else None)


def all_gather(obj) -> list:
    """Every rank's `obj`, in rank order."""
    dist = _group()
    if dist is None:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same(what: str, fields: Mapping[str, object], fix: str) -> None:
    """Raise RanksDisagree on every rank unless all ranks hold the same `fields`
    (compared by digest; the message names the first field that differs)."""
    if _group() is None:
        return
    digests = {k: hashlib.sha256(repr(v).encode()).hexdigest()[:16] for k, v in fields.items()}
    every = all_gather(digests)
    for key in digests:
        seen = [d[key] for d in every]
        if len(set(seen)) > 1:
            odd = next(r for r, d in enumerate(seen) if d != seen[0])
            verb = "differ" if key.endswith("s") else "differs"
            raise RanksDisagree(f"the processes see different {what}: rank {odd}'s {key} "
                                f"{verb} from rank 0's - {fix}")


def same_tensors(named, what: str) -> None:
    """Every rank holds the same values in `named` ((name, tensor) pairs), else RuntimeError:
    a run whose ranks drift apart would write one rank's model and report another's."""
    if _group() is None:
        return
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    seen = all_gather(h.hexdigest())
    if len(set(seen)) > 1:
        raise RuntimeError(f"the ranks hold different {what} after training - the run is not "
                       "reproducible across processes; rerun in one process")
