"""copy_range: every primitive copies exactly; refused primitives fall through in order; real errors raise."""

import errno
import os

import pytest

from moe_viz.errors import MoeVizError
from moe_viz.prune import copy_ranges
from moe_viz.prune.copy_ranges import FALLBACK_ERRNOS, Copier, available_primitives, copy_range

RANGES = [(0, 1), (5, 70_001), (200_000, 3), (70_006, 130_000), (299_999, 1)]  # unequal, adjacent, at the end


def _source(tmp_path):
    data = os.urandom(300_000)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


def _copy(tmp_path, source, copier, chunk, name="out.bin", flags=0):
    out = tmp_path / name
    src = os.open(source, os.O_RDONLY)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags)
    try:
        os.write(dst, b"HEADER")
        for offset, length in RANGES:
            copy_range(src, dst, offset, length, copier, chunk=chunk)
    finally:
        os.close(src)
        os.close(dst)
    return out.read_bytes()


def _expected(data):
    return b"HEADER" + b"".join(data[o:o + n] for o, n in RANGES)


@pytest.mark.parametrize("name", list(available_primitives()))
def test_each_primitive_copies_the_ranges_exactly(tmp_path, name):
    source, data = _source(tmp_path)
    copier = Copier({name: available_primitives()[name]})
    assert _copy(tmp_path, source, copier, chunk=65_536) == _expected(data)


def test_the_kernel_copy_is_tried_first():
    # measured: copy_file_range >= 1.16x cp warm and cold; pread/write 0.55x warm (docs/BENCHMARKS.md)
    order = list(available_primitives())
    assert order[-1] == "pread_write"
    if hasattr(os, "copy_file_range"):
        assert order[0] == "copy_file_range"


def test_default_copier_uses_the_first_primitive_and_copies_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(copy_ranges, "_copiers", {})
    monkeypatch.delenv("MOE_VIZ_COPY", raising=False)
    source, data = _source(tmp_path)
    assert _copy(tmp_path, source, None, chunk=8_192) == _expected(data)
    (copier,) = copy_ranges._copiers.values()
    assert copier.name == next(iter(available_primitives()))


@pytest.mark.skipif(not hasattr(os, "copy_file_range") or not hasattr(os, "sendfile"), reason="Linux primitives")
def test_real_refusals_fall_through_to_pread_write(tmp_path, monkeypatch):
    # No injection: Linux refuses copy_file_range (EBADF) and sendfile (EINVAL) into an O_APPEND file.
    monkeypatch.setattr(copy_ranges, "_copiers", {})
    monkeypatch.delenv("MOE_VIZ_COPY", raising=False)
    source, data = _source(tmp_path)
    assert _copy(tmp_path, source, None, chunk=8_192, flags=os.O_APPEND) == _expected(data)
    (copier,) = copy_ranges._copiers.values()
    assert list(copier.primitives) == ["pread_write"]


@pytest.mark.parametrize("code", sorted(FALLBACK_ERRNOS))
def test_a_refused_primitive_falls_through_and_its_partial_bytes_are_cut(tmp_path, code):
    source, data = _source(tmp_path)
    calls = []

    def writes_then_refuses(src, dst, offset, count):
        calls.append(count)
        os.write(dst, b"garbage")  # bytes written before the failure must not survive
        raise OSError(code, os.strerror(code))

    copier = Copier({"refuses": writes_then_refuses, "also_refuses": writes_then_refuses,
                     "pread_write": available_primitives()["pread_write"]})
    assert _copy(tmp_path, source, copier, chunk=8_192) == _expected(data)
    assert list(copier.primitives) == ["pread_write"]
    assert len(calls) == 2  # each refused once, then never tried again


def test_a_primitive_that_copies_nothing_before_the_end_falls_through(tmp_path):
    source, data = _source(tmp_path)

    def copies_nothing(src, dst, offset, count):
        return 0  # what copy_file_range does on some filesystems instead of an error

    copier = Copier({"nothing": copies_nothing, "pread_write": available_primitives()["pread_write"]})
    assert _copy(tmp_path, source, copier, chunk=8_192) == _expected(data)
    assert list(copier.primitives) == ["pread_write"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_other_errors_are_raised_not_hidden_by_a_fallback(tmp_path, code):
    source, _ = _source(tmp_path)

    def fails(src, dst, offset, count):
        raise OSError(code, os.strerror(code))

    copier = Copier({"fails": fails, "pread_write": available_primitives()["pread_write"]})
    with pytest.raises(OSError) as info:
        _copy(tmp_path, source, copier, chunk=8_192)
    assert info.value.errno == code


def test_the_last_primitive_refusing_raises(tmp_path):
    source, _ = _source(tmp_path)

    def refuse(src, dst, offset, count):
        raise OSError(errno.ENOSYS, "not here")

    with pytest.raises(OSError):
        _copy(tmp_path, source, Copier({"only": refuse}), chunk=8_192)


def test_a_truncated_source_is_one_line_error(tmp_path):
    source, _ = _source(tmp_path)
    with open(source, "rb") as src, open(tmp_path / "out.bin", "wb") as dst:
        with pytest.raises(MoeVizError, match="ended early"):
            copy_range(src.fileno(), dst.fileno(), 299_000, 5_000, Copier(available_primitives()))


def test_moe_viz_copy_forces_a_primitive_and_rejects_unknown_names(tmp_path, monkeypatch):
    source, data = _source(tmp_path)
    monkeypatch.setattr(copy_ranges, "_copiers", {})
    monkeypatch.setenv("MOE_VIZ_COPY", "pread_write")
    assert _copy(tmp_path, source, None, chunk=8_192) == _expected(data)
    assert [list(c.primitives) for c in copy_ranges._copiers.values()] == [["pread_write"]]
    monkeypatch.setattr(copy_ranges, "_copiers", {})
    monkeypatch.setenv("MOE_VIZ_COPY", "teleport")
    with open(source, "rb") as src, open(tmp_path / "out.bin", "wb") as dst:
        with pytest.raises(MoeVizError, match="MOE_VIZ_COPY='teleport'"):
            copy_ranges.copier_for(src.fileno(), dst.fileno())


def test_partial_bytes_of_a_refused_primitive_are_cut_on_an_append_only_destination(tmp_path):
    """Seeking back is not enough where every write appends (O_APPEND): the bytes a refused primitive wrote
    before failing must be cut off (ftruncate), or they stay in the middle of the output."""
    source, data = _source(tmp_path)

    def writes_then_refuses(src, dst, offset, count):
        os.write(dst, b"garbage")
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    copier = Copier({"refuses": writes_then_refuses, "pread_write": available_primitives()["pread_write"]})
    assert _copy(tmp_path, source, copier, chunk=8_192, flags=os.O_APPEND) == _expected(data)
    assert list(copier.primitives) == ["pread_write"]
