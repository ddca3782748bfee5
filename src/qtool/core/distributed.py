"""Data-parallel stages on torch.distributed: the one mechanism calibrate, train-blockap and tune-e2e
share (NCCL between GPUs, gloo between CPU processes).

A run of N processes (ranks) is started by `--nproc N` (`qtool.stages.launch`: N processes on this
host) or by torchrun (`torchrun --nproc-per-node N -m qtool.cli ...`); both set
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and `init` joins the ranks from them.

What is split: the calibration windows, contiguously (rank r holds windows [r*n/N, (r+1)*n/N)), so
each rank captures and carries only its part of the float and quantized chains. What is shared:
per-channel statistics (`all_reduce`, MIN / MAX / SUM), the gradients of the trainable tensors
(`all_reduce_grads`, averaged), the windows of one global training batch (`take_rows`: rank r gets
its 1/N slice of the batch a single process would draw, fetched from the ranks that hold them), and
the journal's decisions (`SharedJournal`: rank 0 writes, every rank reads the same entries). Rank 0
alone writes the stage and prints progress.

Outside such a run (world size 1) every function here is the identity or a no-op, so one process
computes exactly what it computed before this module existed.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from qtool.core.errors import QtoolError

TIMEOUT_ENV = "QTOOL_DIST_TIMEOUT"  # seconds a rank waits for the others (joining, any collective)
DEFAULT_TIMEOUT_S = 1800

_state: dict = {"control": None, "device": torch.device("cpu")}


# -- who am I -------------------------------------------------------------------------------------


def launched() -> bool:
    """True in a process started as one rank of several (by `launch` or torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_writer() -> bool:
    """The rank that writes stage directories, journals and manifests, and prints progress."""
    return rank() == 0


def timeout_s() -> int:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise QtoolError(f"{TIMEOUT_ENV}={raw!r}: give the seconds a rank waits for the others (an integer >= 1)")
    return value


def init(device: torch.device) -> None:
    """Join the other ranks (once per process): NCCL when `device` is a GPU, else gloo. A rank that
    cannot reach the others within the timeout fails with one line instead of waiting forever."""
    if not launched() or active():
        return
    if not dist.is_available():
        raise QtoolError("this torch build has no torch.distributed; run with one process (--nproc 1)")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise QtoolError(
                f"rank {local} needs GPU {local} but {torch.cuda.device_count()} are visible: "
                "use at most one process per GPU (--nproc), or --device cpu"
            )
        torch.cuda.set_device(local)
        _state["device"] = torch.device("cuda", local)
    seconds = timeout_s()
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
        # small control messages (journal decisions, barriers) always travel on CPU tensors
        _state["control"] = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    except (RuntimeError, ValueError, dist.DistStoreError) as exc:
        raise QtoolError(
            f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')} could not join the others "
            f"within {seconds} s ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"check that every rank started (raise {TIMEOUT_ENV} for slow starts)"
        ) from None
    if rank() != 0:
        from qtool.core.progress import console

        console.quiet = True  # progress and summaries are printed once, by rank 0


def device(dev: torch.device) -> torch.device:
    """A rank's compute device: on GPUs, the GPU of its local rank."""
    if active() and dev.type == "cuda":
        return _state["device"]
    return dev


def _comm_device() -> torch.device:
    return _state["device"] if active() and dist.get_backend() == "nccl" else torch.device("cpu")


# -- splitting ------------------------------------------------------------------------------------


def require_split(flag: str, count: int, n: int) -> None:
    """Refuse, in one line, an option value `count` that does not split evenly over n processes."""
    if count % n:
        raise QtoolError(
            f"{flag} {count} does not split over {n} processes: "
            f"give a multiple of {n} (e.g. {flag} {-(-count // n) * n}) or another --nproc"
        )


def shard_range(n: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items (n divisible by the world size)."""
    size = world_size()
    if n % size:
        raise QtoolError(f"{n} windows do not split over {size} processes; give a multiple of {size}")
    per = n // size
    return rank() * per, (rank() + 1) * per


def shard(items):
    """This rank's contiguous 1/N of `items` (a tensor's rows or a list)."""
    start, stop = shard_range(len(items))
    return items[start:stop]


def my_slice(idx: torch.Tensor) -> torch.Tensor:
    """This rank's positional part of a global batch of window numbers: the r-th of N equal parts
    when the batch splits evenly, else the r-th of N nearly equal parts (tune-e2e's last step)."""
    size, me, n = world_size(), rank(), len(idx)
    return idx[me * n // size : (me + 1) * n // size]


def take_rows(local: torch.Tensor, idx: torch.Tensor, to: torch.device) -> torch.Tensor:
    """Rows `idx` (global window numbers, the same on every rank) of a chain split contiguously over
    the ranks, of which `local` is this rank's share: returns this rank's slice `my_slice(idx)`, on
    `to`, receiving the rows other ranks hold and sending them the rows they need from here."""
    if world_size() == 1:
        return local[idx].to(to)
    size, me, per, b = world_size(), rank(), local.shape[0], len(idx)
    comm = _comm_device()
    wanted = my_slice(idx)
    out = torch.empty((len(wanted), *local.shape[1:]), dtype=local.dtype, device=to)
    works, landing = [], []
    for pos, window in enumerate(idx.tolist()):
        owner, row = divmod(window, per)
        dest = next(r for r in range(size) if r * b // size <= pos < (r + 1) * b // size)
        slot = pos - dest * b // size
        if owner == dest:
            if me == owner:
                out[slot] = local[row].to(to)
        elif me == owner:
            works.append(dist.isend(local[row].to(comm).contiguous(), dst=dest, tag=pos))
        elif me == dest:
            buf = torch.empty(local.shape[1:], dtype=local.dtype, device=comm)
            works.append(dist.irecv(buf, src=owner, tag=pos))
            landing.append((slot, buf))
    for work in works:
        work.wait()
    for slot, buf in landing:
        out[slot] = buf.to(to)
    return out


# -- reductions -----------------------------------------------------------------------------------

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` reduced over the ranks with `op` (sum, min, max), on t's device and dtype; `t` itself
    where there is one process."""
    if world_size() == 1:
        return t
    buf = t.detach().to(_comm_device()).contiguous().clone()
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, _OPS[op]))
    return buf.to(t.device)


def all_reduce_stats(stats: dict[str, torch.Tensor], ops: dict[str, str]) -> dict[str, torch.Tensor]:
    """Statistics reduced over the ranks, each key with ops[key] (sum, min, max): one flat message per
    operator, keys in sorted order, so every rank holds the statistics of all the windows."""
    if world_size() == 1:
        return stats
    out = dict(stats)
    for op in sorted(set(ops.values())):
        keys = sorted(k for k in stats if ops[k] == op)
        flat = all_reduce(torch.cat([stats[k].reshape(-1).float() for k in keys]), op)
        for k, piece in zip(keys, flat.split([stats[k].numel() for k in keys])):
            out[k] = piece.reshape(stats[k].shape).to(stats[k].dtype)
    return out


def all_reduce_grads(params, average: bool = True) -> None:
    """Sum (average: then divide by N) the gradients of `params` over the ranks, in place, as one flat
    message; a parameter without a gradient counts as zeros. With equal shares of a global batch and
    each rank's loss the mean over its share, the average is the one-process gradient of that batch
    (up to the order of float additions)."""
    if world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce(torch.cat([g.reshape(-1).float() for g in grads]), "sum")
    if average:
        flat = flat / world_size()
    for p, piece in zip(params, flat.split([p.numel() for p in params])):
        p.grad = piece.reshape(p.shape).to(p.dtype)


def mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the ranks as the value, with the gradient of this rank's own `t`: a loss
    that is a nonlinear function of a batch mean (ABQ's -log|mean cos|) then has, after the gradients
    are averaged, the one-process gradient of the global batch."""
    if world_size() == 1:
        return t
    total = all_reduce(t.detach(), "sum") / world_size()
    return t + (total - t).detach()


def sum_value(x: float) -> float:
    """A Python number summed over the ranks (losses for progress and divergence checks)."""
    if world_size() == 1:
        return x
    return float(all_reduce(torch.tensor([x], dtype=torch.float64), "sum")[0])


def mean_value(x: float) -> float:
    """A Python number averaged over the ranks."""
    return sum_value(x) / world_size()


def leave() -> None:
    """Leave the group of ranks (the end of a rank's process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier(group=_state["control"])


def from_writer(value: int) -> int:
    """Rank 0's integer, on every rank (decisions every rank must take alike)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=0, group=_state["control"])
    return int(t[0])


class SharedJournal:
    """A journal every rank reads and rank 0 alone writes. Whether an entry exists is rank 0's
    answer, given to all, so every rank redoes or skips the same blocks; the entries themselves are
    read from the same files."""

    def __init__(self, make, reader):
        """make(): the writing journal (rank 0 only); reader(): a view that only reads its files."""
        self._journal = make() if is_writer() else None
        barrier()  # the journal (fresh, or the one resumed from) exists before any rank reads it
        self._reader = self._journal or reader()

    def load(self, block: int):
        found = from_writer(int(self._journal.load(block) is not None) if self._journal else 0)
        return self._reader.load(block) if found else None

    def latest(self):
        index = from_writer(self._journal.latest()[0] if self._journal and self._journal.latest() else -1)
        return (index, self._reader.load(index)) if index >= 0 else None

    def save(self, block: int, tensors) -> None:
        if self._journal is not None:
            self._journal.save(block, tensors)

    def prune(self, keep: int) -> None:
        if self._journal is not None:
            self._journal.prune(keep)

    def empty(self) -> bool:
        return self._journal.empty() if self._journal is not None else True

    def remove(self) -> None:
        if self._journal is not None:
            self._journal.remove()
