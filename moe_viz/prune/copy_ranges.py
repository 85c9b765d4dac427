"""Copy byte ranges from one file to another inside the kernel where it can, with fallbacks.

Order: `os.copy_file_range` (the kernel copies; filesystems that can share
blocks, e.g. XFS or btrfs, reflink instead), then `os.sendfile`, then plain
`pread`/`write`. Why this order and no timing trial (docs/BENCHMARKS.md, streaming
export): per byte written, `copy_file_range` forced reached 1.20x `cp` warm and
1.16x cold on this project's VM, `sendfile` 1.23x warm but 0.87x cold, `pread`/
`write` 0.55x warm. An earlier trial that timed 64 MB per primitive measured only
how fast each filled the page cache, not writeback, and chose `pread`/`write` in
some runs (0.79x `cp`).

A primitive that the kernel or filesystem refuses for this pair of files (errno in
FALLBACK_ERRNOS: EXDEV, ENOSYS, EINVAL, EOPNOTSUPP, EBADF e.g. on an O_APPEND
destination, EPERM from some container sandboxes, ...) is dropped for this pair
of devices for the rest of the process, the destination is cut back to where the
chunk started and the chunk is copied again by the next primitive; so is one that
copies 0 bytes where the source has bytes. Any other error (ENOSPC, EIO, ...) is raised. `MOE_VIZ_COPY=<name>` forces one primitive
(no fallback).

Memory stays flat: at most one chunk is held in user space (pread/write only).
"""

from __future__ import annotations

import errno
import os
from typing import Callable

from moe_viz.errors import MoeVizError

CHUNK = 16 << 20  # bytes per call: bounds pread/write memory whatever the tensor size

Primitive = Callable[[int, int, int, int], int]  # (src_fd, dst_fd, src_offset, count) -> bytes copied

# "This primitive cannot copy between these two files": try the next one.
FALLBACK_ERRNOS = frozenset(
    getattr(errno, name) for name in
    ("EXDEV", "ENOSYS", "EINVAL", "EOPNOTSUPP", "ENOTSUP", "EBADF", "EPERM", "ETXTBSY", "ENOTSOCK")
    if hasattr(errno, name)
)


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
    """The primitives this Python offers, in the order they are tried."""
    found: dict[str, Primitive] = {}
    if hasattr(os, "copy_file_range"):
        found["copy_file_range"] = _copy_file_range
    if hasattr(os, "sendfile"):
        found["sendfile"] = _sendfile
    found["pread_write"] = _pread_write
    return found


class Copier:
    """The primitives still usable between one pair of devices, in order; the first is used."""

    def __init__(self, primitives: dict[str, Primitive]):
        self.primitives = dict(primitives)

    @property
    def name(self) -> str:
        return next(iter(self.primitives))

    def drop(self, name: str) -> None:
        del self.primitives[name]


# (source device, destination device) -> its Copier, for the whole process: a primitive the
# kernel refused once between two filesystems is not tried again for every chunk.
_copiers: dict[tuple[int, int], Copier] = {}


def copier_for(src_fd: int, dst_fd: int) -> Copier:
    key = (os.fstat(src_fd).st_dev, os.fstat(dst_fd).st_dev)
    if key not in _copiers:
        primitives = available_primitives()
        forced = os.environ.get("MOE_VIZ_COPY")
        if forced:
            if forced not in primitives:
                raise MoeVizError(f"MOE_VIZ_COPY={forced!r} is not one of {', '.join(primitives)}")
            primitives = {forced: primitives[forced]}
        _copiers[key] = Copier(primitives)
    return _copiers[key]


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int, copier: Copier | None = None,
               chunk: int = CHUNK) -> None:
    """Append bytes [offset, offset + length) of `src_fd` at the current position of `dst_fd`."""
    copier = copier if copier is not None else copier_for(src_fd, dst_fd)
    while length > 0:
        count = min(length, chunk)
        name = copier.name
        position = os.lseek(dst_fd, 0, os.SEEK_CUR)
        try:
            _copy_chunk(copier.primitives[name], src_fd, dst_fd, offset, count)
        except OSError as exc:
            if exc.errno not in FALLBACK_ERRNOS or len(copier.primitives) == 1:
                raise
            copier.drop(name)  # redo this chunk with the next primitive
            os.ftruncate(dst_fd, position)
            os.lseek(dst_fd, position, os.SEEK_SET)
            continue
        offset += count
        length -= count


class _NoProgress(OSError):
    """A kernel primitive copied nothing although the source has bytes there (seen with copy_file_range on
    some filesystems, e.g. FUSE or procfs-like ones): treated like a refusal, so the next primitive is tried."""

    def __init__(self) -> None:
        super().__init__(errno.EINVAL, "copied 0 bytes before the end of the source")


def _copy_chunk(primitive: Primitive, src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    while count > 0:
        copied = primitive(src_fd, dst_fd, offset, count)
        if copied == 0:
            if os.fstat(src_fd).st_size > offset:
                raise _NoProgress()
            raise MoeVizError("source shard ended early: is the checkpoint truncated?")
        offset += copied
        count -= copied
