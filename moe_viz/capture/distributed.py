"""Data-parallel capture on torch.distributed (launched by torchrun or accelerate launch).

The launcher sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (and the
rendezvous MASTER_ADDR/MASTER_PORT); nothing here starts processes. Each rank
runs a share of the batches of the same deterministic batching a single
process would use (`assign`: equal token counts per rank, as far as whole
batches allow), so every batch is computed exactly as a single-process capture
computes it; only the order of the float64 sums of the accumulators differs. Accumulators are combined with ``all_reduce``
(SUM, MAX for ``ean_max``) over gloo (CPU) or NCCL (GPU), and only rank 0
touches the store.

Failures: every rank reaches the same `together` points in the same order,
and there all ranks learn whether any rank failed (an ``all_gather`` of the
error messages), so no rank waits forever in a collective and rank 0 can mark
the run failed with the failing rank's message. Inside a long body (a pass over
the batches) ranks also exchange a one-element failure flag after every batch
(`Steps`), so a rank that fails early stops the others within a batch or two
instead of at the end of the pass.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from moe_viz.capture.routing_stats import LayerAccumulator
from moe_viz.errors import MoeVizError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# How long a rank waits for the others at a collective (layer-wise passes of huge models take hours).
TIMEOUT = timedelta(hours=int(os.environ.get("MOE_VIZ_DIST_TIMEOUT_H", "24")))


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def batches(self, tokens: list[int]) -> list[int]:
        """This rank's batch numbers, given every batch's token count (see `assign`), in increasing order."""
        owners = assign(tokens, self.world_size)
        return [number for number, owner in enumerate(owners) if owner == self.rank]

    def most_batches(self, tokens: list[int]) -> int:
        """The largest number of batches any rank runs (how many failure checks every rank makes)."""
        owners = assign(tokens, self.world_size)
        return max((owners.count(rank) for rank in range(self.world_size)), default=0)

    def gpus(self) -> list[int]:
        """This rank's GPUs: the machine's GPUs split evenly over the ranks on it (at least one each)."""
        count = torch.cuda.device_count()
        per = max(1, count // self.local_world_size)
        first = (self.local_rank * per) % count
        return list(range(first, min(first + per, count)))

    def device(self, device: str) -> str:
        """auto/cuda under a launcher: this rank's first GPU (cuda:LOCAL_RANK with one GPU per rank)."""
        if self.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.gpus()[0]}"
        return device

    def max_memory(self, device: str) -> dict | None:
        """For device_map="auto" inside a rank that owns several GPUs: only those (and its share of host memory)."""
        if not (self.distributed and device == "auto" and torch.cuda.is_available() and len(self.gpus()) > 1):
            return None
        import psutil

        return {**{gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in self.gpus()},
                "cpu": psutil.virtual_memory().available // self.local_world_size}


def assign(tokens: list[int], world_size: int) -> list[int]:
    """The rank that runs each batch: equal token counts per rank, as far as whole batches allow.

    Largest batch first (ties: lower batch number first) to the rank with the
    fewest tokens so far (ties: lower rank). Deterministic, so every rank
    computes the same assignment; with equal batches it is round robin.
    """
    load = [0] * world_size
    owners = [0] * len(tokens)
    for number in sorted(range(len(tokens)), key=lambda n: (-tokens[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[number] = rank
        load[rank] += tokens[number]
    return owners


def from_env(environ=os.environ) -> Ranks:
    """The launcher's rank variables, or a single process when they are absent."""
    if "WORLD_SIZE" not in environ:
        return Ranks()
    values = {}
    for name in ENV_VARS:
        raw = environ.get(name, "0" if name != "LOCAL_WORLD_SIZE" else environ["WORLD_SIZE"])
        try:
            values[name] = int(raw)
        except ValueError:
            raise MoeVizError(f"{name}={raw!r} is not an integer: launch with torchrun or accelerate launch") from None
    ranks = Ranks(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size:
        raise MoeVizError(f"RANK={ranks.rank} WORLD_SIZE={ranks.world_size} is not a valid rank assignment")
    return ranks


@contextmanager
def process_group(ranks: Ranks, device: str):
    """Join the launcher's process group for the body (gloo on CPU, NCCL on GPU); a no-op for one process."""
    if not ranks.distributed:
        yield
        return
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        raise MoeVizError(f"rank {ranks.rank} could not join the process group ({str(exc).splitlines()[0]}): "
                          "check MASTER_ADDR/MASTER_PORT and that every rank was launched") from exc
    global _flag_group
    try:
        # failure flags (Steps) travel on the CPU even under NCCL, so checking one never waits for the GPU
        _flag_group = dist.new_group(backend="gloo") if backend == "nccl" else None
        yield
    finally:
        _flag_group = None
        dist.destroy_process_group()


_flag_group = None  # the gloo group of the failure flags when the main group is NCCL


class PeerFailed(Exception):
    """Another rank failed (seen at a `Steps.step`); its message arrives at the enclosing `together`."""


class Steps:
    """A failure flag all-reduced (MAX) after each unit of work, so every rank learns promptly that one failed.

    Every rank must make the same number of steps inside one `together` body:
    each declares the same count with `plan` (e.g. the most batches any rank
    runs) *before* anything in the body can fail, and `together` issues the
    steps a rank did not make itself when the body ends (a rank with fewer
    batches) or fails (one step carrying the failure). A rank that sees
    another's failure raises PeerFailed.

    `slack`: the flag of step i is read at step i+1 (the reduction overlaps the
    next batch, so healthy ranks never wait on each other batch by batch); a
    failure then stops the others within two batches. A no-op for one process.
    """

    def __init__(self, ranks: Ranks, slack: bool = True):
        self.ranks = ranks
        self.slack = slack
        self.planned = 0
        self.issued = 0
        self.waited = 0.0  # seconds spent waiting for the flags (mostly: for slower ranks)
        self._pending = None  # (work, flag tensor) of the last step not read yet

    def plan(self, count: int) -> None:
        self.planned += count

    def _read(self) -> None:
        if self._pending is None:
            return
        work, flag = self._pending
        self._pending = None
        start = time.perf_counter()
        work.wait()
        self.waited += time.perf_counter() - start
        if int(flag.item()):
            raise PeerFailed("another rank failed")

    def step(self, failed: bool = False) -> None:
        """One step: raises PeerFailed if a rank reported a failure (at the previous step with `slack`)."""
        if not self.ranks.distributed:
            return
        import torch.distributed as dist

        if not failed:
            self._read()
        flag = torch.tensor([int(failed)], dtype=torch.int32)  # CPU: gloo, or the gloo side group under NCCL
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_flag_group, async_op=True), flag)
        self.issued += 1
        if failed:
            self._pending[0].wait()
            self._pending = None
        elif not self.slack:
            self._read()

    def sync(self) -> None:
        """A (planned) step every rank waits for, failures included: e.g. before a timed phase."""
        self.step()
        self._read()

    def finish(self) -> None:
        """End of the body: the steps this rank did not need (fewer batches), then the last flag."""
        while self.ranks.distributed and self.issued < self.planned:
            self.step()
        self._read()

    def abort(self) -> None:
        """This rank failed: tell the others at its next step (if any are left to make).

        Not if the last step already carried another rank's failure: that rank
        makes no further step, so neither may this one.
        """
        if not self.ranks.distributed or self.issued >= self.planned:
            return
        try:
            self._read()
        except PeerFailed:
            return
        self.step(failed=True)


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agree(ranks: Ranks, error: BaseException | None, what: str) -> None:
    """Called by every rank at the same point: raises on every rank if any rank failed.

    The failing rank re-raises its own exception; the others raise a
    MoeVizError naming the first failed rank and its message.
    """
    if not ranks.distributed:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    own = error if not isinstance(error, PeerFailed) else None
    message = None if own is None else (f"{type(own).__name__}: {own}" if str(own) else type(own).__name__)
    messages: list = [None] * ranks.world_size
    dist.all_gather_object(messages, message)
    failed = [(rank, m) for rank, m in enumerate(messages) if m]
    if own is not None:
        raise own
    if failed:
        rank, message = failed[0]
        raise MoeVizError(f"rank {rank} of {ranks.world_size} failed while {what}: {message}")
    if error is not None:  # PeerFailed with no message: cannot happen while ranks keep to the protocol
        raise MoeVizError(f"another rank failed while {what}")


@contextmanager
def together(ranks: Ranks, what: str):
    """Run the body on every rank, then `agree` on whether any rank failed in it.

    The body receives a `Steps` for per-batch failure checks (unused bodies make none).
    """
    error = None
    steps = Steps(ranks)
    try:
        yield steps
        steps.finish()
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the other ranks
        error = exc
        if not isinstance(exc, PeerFailed):
            try:
                steps.abort()
            except Exception:  # noqa: BLE001 - the process group itself failed: agree reports it
                pass
    agree(ranks, error, what)


def gather_objects(ranks: Ranks, value) -> list:
    """Every rank's `value`, in rank order (a collective: every rank calls it at the same point)."""
    if not ranks.distributed:
        return [value]
    import torch.distributed as dist

    values: list = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


def accumulator_tensors(acc: LayerAccumulator) -> dict[str, torch.Tensor]:
    """Every tensor of an accumulator's state by name (dict-valued attributes flattened as NAME.KEY)."""
    out = {}
    for name, value in vars(acc).items():
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
    return out


def reduce_op(name: str):
    """How a named accumulator tensor combines over ranks: a running maximum takes MAX, sums SUM."""
    import torch.distributed as dist

    return dist.ReduceOp.MAX if name.rsplit(".", 1)[-1].endswith("_max") else dist.ReduceOp.SUM


def reduce_accumulators(ranks: Ranks, accumulators: list[LayerAccumulator]) -> None:
    """Combine every rank's accumulators in place (all ranks end with the totals).

    Each tensor is reduced on the process group's device (the rank's current
    GPU for NCCL, the CPU for gloo) and copied back to where its layer lives.
    """
    if not ranks.distributed:
        return
    import torch.distributed as dist

    on = _collective_device()
    for acc in accumulators:
        for name, tensor in accumulator_tensors(acc).items():
            shared = tensor.to(on)
            dist.all_reduce(shared, op=reduce_op(name))
            tensor.copy_(shared)
        top_k = torch.tensor([acc.top_k or 0], device=on)  # a rank with no batch saw no k
        dist.all_reduce(top_k, op=dist.ReduceOp.MAX)
        acc.top_k = int(top_k.item()) or None
