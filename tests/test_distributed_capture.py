"""Data-parallel capture under a real torchrun launch (2 CPU processes, gloo) stores what one process stores.

Each rank runs batches rank, rank+2, ... of the single-process batching, so
counts are equal and float sums differ at most by float64 summation order
(bound as in test_layerwise: rtol 1e-12). Only rank 0 writes, once.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

from capture_compare import SETTINGS, assert_same_statistics, domains, reference, save_model  # noqa: F401 (fixture)
from moe_viz import store

ROOT = Path(__file__).resolve().parent.parent


def _sql(path, query, *params):
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(query, list(params)).df()


def torchrun(args, timeout=600):
    """`torchrun --standalone --nproc-per-node 2 -m moe_viz ...` (standalone: it picks a free port itself)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "moe_viz", "--threads", "1", "capture", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def capture_args(model_dir, domains, store_path, *extra):
    args = ["--model", model_dir, "--store", str(store_path), "--device", "cpu",
            "--seq-len", str(SETTINGS.seq_len), "--batch-size", str(SETTINGS.batch_size)]
    for domain in domains:
        args += ["--domain", domain]
    return args + list(extra)


@pytest.mark.parametrize("mode", ["in-memory", "layerwise"])
def test_two_ranks_store_what_one_process_stores(tmp_path, domains, mode):
    model_dir = save_model(tmp_path / "model", "deepseek_v3")
    ref_ids = reference(model_dir, domains, tmp_path / "one.duckdb")
    extra = ["--layerwise"] if mode == "layerwise" else []
    done = torchrun(capture_args(model_dir, domains, tmp_path / "two.duckdb", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    # only rank 0 (the writer) names the store: once in the two ranks' combined output
    assert (done.stdout + done.stderr).count("moe-viz: store ") == 1, done.stderr[-3000:]
    assert f"moe-viz: store {(tmp_path / 'two.duckdb').absolute()}\n" in done.stderr
    runs = store.list_runs(tmp_path / "two.duckdb")
    assert len(runs) == 2 and set(runs.status) == {"complete"}  # one run per domain, written once
    settings = [json.loads(s) for s in runs.settings]
    assert [s["world_size"] for s in settings] == [2, 2]
    assert [s["layerwise"] for s in settings] == [mode == "layerwise"] * 2
    ids = runs.set_index("domain").loc[["code", "prose"]].run_id.tolist()
    assert_same_statistics(tmp_path / "one.duckdb", ref_ids, tmp_path / "two.duckdb", ids)
    if mode == "in-memory":  # rank 0 traces its own batches (0, 2, ...): one process's rows at those (seq, pos)
        for ref, got in zip(ref_ids, ids):
            query = "SELECT seq, pos, layer, slot, expert, gate FROM token_routes WHERE run_id = $1"
            one = _sql(tmp_path / "one.duckdb", query, ref)
            two = _sql(tmp_path / "two.duckdb", query, got)
            assert len(two) > 0 and set(two.seq // SETTINGS.batch_size % 2) == {0}
            merged = two.merge(one, on=["seq", "pos", "layer", "slot"], suffixes=("", "_one"))
            assert len(merged) == len(two) and (merged.expert == merged.expert_one).all()
            np.testing.assert_allclose(merged.gate, merged.gate_one, rtol=1e-6)


def test_a_failing_rank_fails_the_run_on_every_rank_with_no_rows(tmp_path, domains):
    """Rank 1 cannot create its layer-wise state directory (a file of ours is in the way); rank 0 could."""
    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    path = tmp_path / "two.duckdb"
    obstacle = tmp_path / "two.duckdb.layerwise" / "rank-1-of-2"
    obstacle.parent.mkdir()
    obstacle.write_text("not a directory")
    done = torchrun(capture_args(model_dir, domains, path, "--layerwise"))
    assert done.returncode != 0
    assert "rank 1 of 2 failed while running the layer-wise pass" in done.stderr
    assert "cannot create the layer-wise state directory" in done.stderr
    runs = store.list_runs(path)
    assert runs.status.tolist() == ["failed"]  # the first domain's run, marked by rank 0
    assert "rank 1 of 2 failed" in runs.error.iloc[0]
    for table in (store.expert_stats(path, runs.run_id.tolist()), store.layer_stats(path, runs.run_id.tolist())):
        assert table.empty
    assert obstacle.read_text() == "not a directory"  # never destroy what moe_viz did not create


def test_ranks_come_from_the_launcher_environment():
    from moe_viz.capture.distributed import Ranks, from_env
    from moe_viz.models import MoeVizError

    assert from_env({}) == Ranks()  # not launched: one process
    ranks = from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert ranks == Ranks(3, 4, 1, 2) and not ranks.main and ranks.distributed
    # 11 batches over 4 ranks: rank 3 runs 3 and 7; together the ranks run each batch exactly once
    assert ranks.batches(11) == [3, 7]
    assert sorted(b for r in range(4) for b in Ranks(r, 4).batches(11)) == list(range(11))
    assert Ranks(5, 8).batches(3) == []  # more ranks than batches: this rank only joins the reductions
    with pytest.raises(MoeVizError, match="RANK='x' is not an integer"):
        from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(MoeVizError, match="not a valid rank assignment"):
        from_env({"RANK": "2", "WORLD_SIZE": "2"})
