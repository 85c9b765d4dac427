"""Copy byte ranges from one file to another with the fastest primitive measured where it runs.

Which way of copying is fastest depends on the kernel, the filesystems and the disk:
`os.copy_file_range` copies inside the kernel (and may share blocks on filesystems
that can), `os.sendfile` also avoids the trip through user space, and plain
`pread`/`write` works everywhere. On this project's VM the first was ~1.5x faster
than the last; an earlier measurement on the same machine had found the opposite.
So the copier does not guess: the first bytes of an export are copied in chunks
handed to each available primitive in turn, each chunk timed; once every
primitive has copied `trial_bytes`, the fastest carries on, and that choice is
remembered for the rest of the process for the same pair of devices. A primitive
that fails (EXDEV, ENOSYS, EINVAL, ...) is dropped and its chunk is copied again
by the next one. `MOE_VIZ_COPY=<name>` forces one.

Memory stays flat: at most one chunk is held in user space (pread/write only).
"""

from __future__ import annotations

import os
import time
from typing import Callable

from moe_viz.models import MoeVizError

CHUNK = 16 << 20  # bytes per call: bounds pread/write memory whatever the tensor size
TRIAL_BYTES = 64 << 20  # bytes each primitive copies before the choice is made

Primitive = Callable[[int, int, int, int], int]  # (src_fd, dst_fd, src_offset, count) -> bytes copied


def _copy_file_range(src: int, dst: int, offset: int, count: int) -> int:
    return os.copy_file_range(src, dst, count, offset)  # writes at (and advances) dst's position


def _sendfile(src: int, dst: int, offset: int, count: int) -> int:
    return os.sendfile(dst, src, offset, count)


def _pread_write(src: int, dst: int, offset: int, count: int) -> int:
    data = os.pread(src, count, offset)
    view = memoryview(data)
    while view:
        view = view[os.write(dst, view):]
    return len(data)


def available_primitives() -> dict[str, Primitive]:
    """The primitives this Python offers, fastest-in-principle first."""
    found: dict[str, Primitive] = {}
    if hasattr(os, "copy_file_range"):
        found["copy_file_range"] = _copy_file_range
    if hasattr(os, "sendfile"):
        found["sendfile"] = _sendfile
    found["pread_write"] = _pread_write
    return found


class Trial:
    """What has been measured for one pair of devices: (bytes, seconds) per primitive, and the choice."""

    def __init__(self, primitives: dict[str, Primitive], trial_bytes: int):
        self.primitives = dict(primitives)
        self.trial_bytes = trial_bytes
        self.measured: dict[str, list[float]] = {name: [0, 0.0] for name in primitives}
        self.choice: str | None = None

    def next_primitive(self) -> str:
        """The chosen primitive, or the one with the fewest trial bytes; choose once each has had its share."""
        if self.choice is None:
            name = min(self.measured, key=lambda n: self.measured[n][0])
            if self.measured[name][0] < self.trial_bytes:
                return name
            self.choice = max(self.measured, key=lambda n: self.measured[n][0] / max(self.measured[n][1], 1e-9))
        return self.choice

    def record(self, name: str, count: int, seconds: float) -> None:
        if self.choice is None:
            self.measured[name][0] += count
            self.measured[name][1] += seconds

    def drop(self, name: str) -> None:
        """`name` failed between these files: never use it again here."""
        del self.primitives[name]
        self.measured.pop(name, None)
        if self.choice == name:
            self.choice = None


# (source device, destination device) -> its Trial, for the whole process: one export's shards
# share the measurement, and later exports between the same devices reuse the choice.
_trials: dict[tuple[int, int], Trial] = {}


def trial_for(src_fd: int, dst_fd: int) -> Trial:
    key = (os.fstat(src_fd).st_dev, os.fstat(dst_fd).st_dev)
    if key not in _trials:
        _trials[key] = Trial(available_primitives(), TRIAL_BYTES)
        forced = os.environ.get("MOE_VIZ_COPY")
        if forced:
            if forced not in _trials[key].primitives:
                del _trials[key]
                raise MoeVizError(f"MOE_VIZ_COPY={forced!r} is not one of {', '.join(available_primitives())}")
            _trials[key].choice = forced
    return _trials[key]


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int, trial: Trial | None = None,
               chunk: int = CHUNK) -> None:
    """Append bytes [offset, offset + length) of `src_fd` at the current position of `dst_fd`."""
    trial = trial if trial is not None else trial_for(src_fd, dst_fd)
    while length > 0:
        count = min(length, chunk)
        name = trial.next_primitive()
        position = os.lseek(dst_fd, 0, os.SEEK_CUR)
        start = time.perf_counter()
        try:
            _copy_chunk(trial.primitives[name], src_fd, dst_fd, offset, count)
        except OSError:
            if len(trial.primitives) == 1:
                raise
            trial.drop(name)  # e.g. EXDEV, ENOSYS, EINVAL: redo this chunk with another primitive
            os.ftruncate(dst_fd, position)
            os.lseek(dst_fd, position, os.SEEK_SET)
            continue
        trial.record(name, count, time.perf_counter() - start)
        offset += count
        length -= count


def _copy_chunk(primitive: Primitive, src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    while count > 0:
        copied = primitive(src_fd, dst_fd, offset, count)
        if copied == 0:
            raise MoeVizError("source shard ended early: is the checkpoint truncated?")
        offset += copied
        count -= copied
