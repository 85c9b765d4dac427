"""copy_range: every primitive copies exactly; the trial mixes them; a failing one is dropped."""

import errno
import os

import pytest

from moe_viz.models import MoeVizError
from moe_viz.prune import copy_ranges
from moe_viz.prune.copy_ranges import Trial, available_primitives, copy_range

RANGES = [(0, 1), (5, 70_001), (200_000, 3), (70_006, 130_000), (299_999, 1)]  # unequal, adjacent, at the end


def _source(tmp_path):
    data = os.urandom(300_000)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


def _copy(tmp_path, source, trial, chunk, name="out.bin"):
    out = tmp_path / name
    with open(source, "rb") as src, open(out, "wb") as dst:
        dst.write(b"HEADER")
        dst.flush()
        for offset, length in RANGES:
            copy_range(src.fileno(), dst.fileno(), offset, length, trial, chunk=chunk)
    return out.read_bytes()


def _expected(data):
    return b"HEADER" + b"".join(data[o:o + n] for o, n in RANGES)


@pytest.mark.parametrize("name", list(available_primitives()))
def test_each_primitive_copies_the_ranges_exactly(tmp_path, name):
    source, data = _source(tmp_path)
    trial = Trial(available_primitives(), trial_bytes=0)
    trial.choice = name
    assert _copy(tmp_path, source, trial, chunk=65_536) == _expected(data)


def test_trial_measures_every_primitive_then_keeps_the_fastest(tmp_path):
    source, data = _source(tmp_path)
    trial = Trial(available_primitives(), trial_bytes=20_000)
    assert _copy(tmp_path, source, trial, chunk=8_192) == _expected(data)
    assert set(trial.measured) == set(available_primitives())
    assert all(copied >= 20_000 for copied, _ in trial.measured.values())
    speeds = {n: b / s for n, (b, s) in trial.measured.items()}
    assert trial.choice == max(speeds, key=speeds.get)


def test_a_primitive_that_fails_midway_is_dropped_and_its_chunk_redone(tmp_path):
    source, data = _source(tmp_path)

    def half_then_fail(src, dst, offset, count):
        os.write(dst, b"garbage")  # bytes written before the failure must not survive
        raise OSError(errno.EXDEV, "cross-device")

    primitives = {"broken": half_then_fail, **available_primitives()}
    trial = Trial(primitives, trial_bytes=10_000)
    assert _copy(tmp_path, source, trial, chunk=8_192) == _expected(data)
    assert "broken" not in trial.primitives and "broken" not in trial.measured


def test_the_last_primitive_failing_raises(tmp_path):
    source, _ = _source(tmp_path)

    def fail(src, dst, offset, count):
        raise OSError(errno.ENOSYS, "not here")

    with pytest.raises(OSError):
        _copy(tmp_path, source, Trial({"only": fail}, trial_bytes=0), chunk=8_192)


def test_a_truncated_source_is_one_line_error(tmp_path):
    source, _ = _source(tmp_path)
    with open(source, "rb") as src, open(tmp_path / "out.bin", "wb") as dst:
        with pytest.raises(MoeVizError, match="ended early"):
            copy_range(src.fileno(), dst.fileno(), 299_000, 5_000, Trial(available_primitives(), 0))


def test_moe_viz_copy_forces_a_primitive_and_rejects_unknown_names(tmp_path, monkeypatch):
    source, _ = _source(tmp_path)
    monkeypatch.setattr(copy_ranges, "_trials", {})
    monkeypatch.setenv("MOE_VIZ_COPY", "pread_write")
    with open(source, "rb") as src, open(tmp_path / "out.bin", "wb") as dst:
        assert copy_ranges.trial_for(src.fileno(), dst.fileno()).choice == "pread_write"
    monkeypatch.setattr(copy_ranges, "_trials", {})
    monkeypatch.setenv("MOE_VIZ_COPY", "teleport")
    with open(source, "rb") as src, open(tmp_path / "out.bin", "wb") as dst:
        with pytest.raises(MoeVizError, match="MOE_VIZ_COPY='teleport'"):
            copy_ranges.trial_for(src.fileno(), dst.fileno())
