"""bench/peer_llmcompressor.py's agreement column: what it counts as the same, on hand-made score tables."""

import pytest
from bench_scripts import bench_module


@pytest.fixture(scope="module")
def compare():
    return bench_module("peer_llmcompressor").compare


def scores(layers):
    """{"layers": {"layer": {"count": [...], "reap": [...]}}}, as both tools' result files read back from JSON."""
    return {"layers": {layer: {"count": list(c), "reap": list(r)} for layer, (c, r) in layers.items()}}


MINE = scores({"0": ([5, 3, 0, 4], [2.0, 1.0, 0.0, 4.0]), "1": ([6, 2, 3, 1], [1.0, 3.0, 2.0, 0.5])})


def test_identical_scores_agree_everywhere(compare):
    theirs = scores({k: (v["count"], v["reap"]) for k, v in MINE["layers"].items()})
    assert compare(MINE, theirs, keep=2) == {"same_counts": 2, "max_rel": 0.0, "same_kept": 2, "layers": 2,
                                            "moved_layer0": 0, "slots_layer0": 12}


def test_moved_slots_relative_differences_and_kept_sets(compare):
    # Layer 0: one slot of expert 0 went to expert 2 (two counts change by one: one slot moved); expert 2
    # is unrouted on our side, so its REAP (9.0 there, 0.0 here) does not enter the relative difference,
    # but it does top the peer's ranking: kept (keep=1) {2} vs our {3}. Layer 1: expert 2's REAP is 0.25
    # there (|2 - 0.25| / 0.25 = 7) and both keep expert 1, though the least salient experts differ.
    theirs = scores({"0": ([4, 3, 1, 4], [2.0, 1.0, 9.0, 4.0]), "1": ([6, 2, 3, 1], [1.0, 3.0, 0.25, 0.5])})
    got = compare(MINE, theirs, keep=1)
    assert got == {"same_counts": 1, "max_rel": 7.0, "same_kept": 1, "layers": 2, "moved_layer0": 1,
                   "slots_layer0": 12}
