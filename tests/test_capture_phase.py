"""Every run records the throughput of its capture phase in settings; --timing says where the time went."""

import json

import pytest

from capture_compare import SETTINGS, domains, reference, save_model  # noqa: F401 (fixture)
from moe_viz import store
from moe_viz.capture.timing import Timings, format_timings


def _phases(path):
    runs = store.list_runs(path)
    return runs, [json.loads(s)["capture_phase"] for s in runs.settings]


def test_an_in_memory_run_records_its_capture_phase(tmp_path, domains):
    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    reference(model_dir, domains, tmp_path / "s.duckdb")
    runs, phases = _phases(tmp_path / "s.duckdb")
    for phase, tokens in zip(phases, runs.tokens):
        assert phase["tokens"] == tokens > 0  # this domain's tokens
        assert 0 < phase["seconds"] < 60
        assert phase["tokens_per_s"] == pytest.approx(tokens / phase["seconds"], rel=1e-3)
    # not part of what identifies a capture: a re-capture still replaces the run
    reference(model_dir, domains, tmp_path / "s.duckdb")
    assert len(store.list_runs(tmp_path / "s.duckdb")) == 2


def test_a_run_saved_to_a_file_keeps_its_capture_phase(tmp_path, domains, monkeypatch):
    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    original = store._commit_run

    def locked(*args, **kwargs):
        raise store.StoreLockedError("locked for the test")

    monkeypatch.setattr(store, "_commit_run", locked)
    with pytest.raises(store.RunSavedToFile) as info:
        reference(model_dir, domains, tmp_path / "s.duckdb")
    monkeypatch.setattr(store, "_commit_run", original)
    run_id = store.import_run_file(info.value.saved, tmp_path / "s.duckdb")
    settings = json.loads(store.list_runs(tmp_path / "s.duckdb").set_index("run_id").settings[run_id])
    assert settings["capture_phase"]["tokens"] == 16 + 11 + 16 + 5 + 9  # the first domain (code)
    assert settings["world_size"] == 1  # the settings known at the start are kept


def test_timings_add_up_per_phase_and_print_in_capture_order():
    timings = Timings(started_at=None)
    timings.add("store", 0.5)
    timings.add("forward", 1.0)
    timings.add("forward", 2.0)
    assert timings.seconds == {"store": 0.5, "forward": 3.0}
    text = format_timings([timings.seconds, {"peak RSS": 812.4, "forward": 2.5}])
    assert text.splitlines() == ["moe-viz: timing rank 0 of 2: forward 3.00 s, store 0.50 s",
                                 "moe-viz: timing rank 1 of 2: forward 2.50 s, peak RSS 812 MiB"]


def test_phases_print_in_capture_order_not_alphabetically():
    text = format_timings([{"store": 0.25, "start-up": 1.0, "load model": 2.0, "zz extra": 0.5, "forward": 3.0}])
    assert text == ("moe-viz: timing rank 0 of 1: start-up 1.00 s, load model 2.00 s, forward 3.00 s, "
                    "store 0.25 s, zz extra 0.50 s")


def test_phase_times_wall_and_cpu_seconds_and_counts_a_body_that_raises(monkeypatch):
    """Fixed clocks (the time module's, not torch's): wall seconds from perf_counter, "NAME CPU" from
    process_time, added up per phase, and recorded when the body raises."""
    import itertools

    from moe_viz.capture import timing

    wall, cpu = itertools.count(10.0, 1.5), itertools.count(100.0, 0.25)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(wall))
    monkeypatch.setattr(timing.time, "process_time", lambda: next(cpu))
    timings = Timings()
    with timings.phase("forward", cpu=True):
        pass
    with pytest.raises(ValueError):
        with timings.phase("forward", cpu=True):
            raise ValueError("a failing batch")
    with timings.phase("store"):
        pass
    assert timings.seconds == {"forward": 3.0, "forward CPU": 0.5, "store": 1.5}
