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

from capture_compare import (  # noqa: F401 (fixture)
    SETTINGS, assert_same_statistics, domains, reference, save_model, write_domain,
)
from moe_viz import store
from moe_viz.models.fingerprint import model_fingerprint
from moe_viz.models.loading import load_model

ROOT = Path(__file__).resolve().parent.parent


def _sql(path, query, *params):
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(query, list(params)).df()


def torchrun(args, timeout=600, pythonpath=(), env_extra=None):
    """`torchrun --standalone --nproc-per-node 2 -m moe_viz ...` (standalone: it picks a free port itself)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(ROOT)]), "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
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
    done = torchrun(capture_args(model_dir, domains, tmp_path / "two.duckdb", "--timing", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):  # rank 0 prints every rank's phases
        assert f"moe-viz: timing rank {rank} of 2: start-up " in done.stderr, done.stderr[-3000:]
    # only rank 0 (the writer) names the store: once in the two ranks' combined output
    assert (done.stdout + done.stderr).count("moe-viz: store ") == 1, done.stderr[-3000:]
    assert f"moe-viz: store {(tmp_path / 'two.duckdb').absolute()}\n" in done.stderr
    runs = store.list_runs(tmp_path / "two.duckdb")
    assert len(runs) == 2 and set(runs.status) == {"complete"}  # one run per domain, written once
    settings = [json.loads(s) for s in runs.settings]
    assert [s["world_size"] for s in settings] == [2, 2]
    for s, tokens in zip(settings, runs.tokens):  # the capture phase of all ranks together
        phase = s["capture_phase"]
        assert phase["tokens"] == (sum(runs.tokens) if mode == "layerwise" else tokens)
        assert phase["seconds"] > 0 and phase["tokens_per_s"] == pytest.approx(phase["tokens"] / phase["seconds"],
                                                                                rel=1e-3)
    assert [s["layerwise"] for s in settings] == [mode == "layerwise"] * 2
    ids = runs.set_index("domain").loc[["code", "prose"]].run_id.tolist()
    assert_same_statistics(tmp_path / "one.duckdb", ref_ids, tmp_path / "two.duckdb", ids)
    # rank 0 traces its own batches: one process's rows at those (seq, pos). Shares by tokens: in memory
    # per domain (code 27, 21, 9 tokens: rank 0 runs batch 0; prose 23, 13: batch 0); layer-wise over
    # both domains together (27, 21, 9, 23, 13: rank 0 runs code 0 and 2, prose 1)
    rank0 = {"in-memory": [{0}, {0}], "layerwise": [{0, 2}, {1}]}[mode]
    for ref, got, batches in zip(ref_ids, ids, rank0):
        query = "SELECT seq, pos, layer, slot, expert, gate FROM token_routes WHERE run_id = $1"
        one = _sql(tmp_path / "one.duckdb", query, ref)
        two = _sql(tmp_path / "two.duckdb", query, got)
        assert len(two) > 0 and set(two.seq // SETTINGS.batch_size) == batches
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
    # the pass never loaded a layer; the failed run still names the model (what an in-memory capture records)
    model, _ = load_model(model_dir, device="cpu")
    assert runs.model_fingerprint.tolist() == [model_fingerprint(model)]
    for table in (store.expert_stats(path, runs.run_id.tolist()), store.layer_stats(path, runs.run_id.tolist())):
        assert table.empty
    assert obstacle.read_text() == "not a directory"  # never destroy what moe_viz did not create


# Loaded by every process of the launch (sitecustomize): rank 1 raises on its first batch, rank 0 counts its batches.
FAIL_ON_RANK_1 = """
import os
if os.environ.get("RANK") in ("0", "1"):
    import moe_viz.capture.observe as observe
    original = observe.RoutingObserver.set_attention_mask

    def set_attention_mask(self, mask):
        if os.environ["RANK"] == "1":
            raise RuntimeError("injected failure on rank 1's first batch")
        with open(os.environ["BATCHES_FILE"], "a") as handle:
            handle.write("batch\\n")
        return original(self, mask)

    observe.RoutingObserver.set_attention_mask = set_attention_mask
"""


@pytest.mark.parametrize("mode", ["in-memory", "layerwise"])
def test_a_rank_failing_on_its_first_batch_stops_the_others_at_once(tmp_path, mode):
    """Rank 1 fails on its first batch; rank 0, with 12 batches to run (per layer), stops after at most 2."""
    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    counted = tmp_path / "rank0-batches.txt"
    one = f"many={write_domain(tmp_path / 'many.jsonl', 3, [16] * 48)}"  # 24 batches of 2: 12 per rank
    path = tmp_path / "two.duckdb"
    extra = ["--layerwise"] if mode == "layerwise" else []
    done = torchrun(capture_args(model_dir, [one], path, *extra), pythonpath=[inject],
                    env_extra={"BATCHES_FILE": str(counted)})
    assert done.returncode != 0
    assert "injected failure on rank 1's first batch" in done.stderr
    runs = store.list_runs(path)
    assert runs.status.tolist() == ["failed"] and "rank 1 of 2 failed" in runs.error.iloc[0]
    assert store.expert_stats(path, runs.run_id.tolist()).empty
    batches = counted.read_text().count("batch") if counted.exists() else 0
    assert batches <= 2, f"rank 0 ran {batches} batches after rank 1 had failed"  # each check overlaps a batch


def test_ranks_come_from_the_launcher_environment():
    from moe_viz.capture.distributed import Ranks, from_env
    from moe_viz.errors import MoeVizError

    assert from_env({}) == Ranks()  # not launched: one process
    ranks = from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert ranks == Ranks(3, 4, 1, 2) and not ranks.main and ranks.distributed
    # 11 equal batches over 4 ranks: round robin, rank 3 runs 3 and 7; each batch runs exactly once
    assert ranks.batches([8] * 11) == [3, 7]
    assert sorted(b for r in range(4) for b in Ranks(r, 4).batches([8] * 11)) == list(range(11))
    assert Ranks(5, 8).batches([8] * 3) == []  # more ranks than batches: this rank only joins the reductions
    assert Ranks(0, 4).most_batches([8] * 11) == 3 and Ranks(0, 8).most_batches([8] * 3) == 1
    # unequal batches: equal token counts, not equal batch counts (round robin would give 40 vs 13 tokens)
    tokens = [16, 4, 16, 4, 4, 4, 4, 1]
    assert [sum(tokens[b] for b in Ranks(r, 2).batches(tokens)) for r in range(2)] == [28, 25]
    assert Ranks(0, 2).batches(tokens) == [0, 1, 4, 6] and Ranks(0, 2).most_batches(tokens) == 4
    with pytest.raises(MoeVizError, match="RANK='x' is not an integer"):
        from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(MoeVizError, match="not a valid rank assignment"):
        from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_a_launcher_without_local_variables_means_one_machine():
    """Without LOCAL_RANK / LOCAL_WORLD_SIZE every rank is on one machine: local world = WORLD_SIZE."""
    from moe_viz.capture.distributed import Ranks, from_env

    assert from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Ranks(1, 2, 0, 2)
    assert from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}) == Ranks(2, 4, 2, 4)


# Rank 1 raises on its first batch of the second decoder layer (it runs 2 batches per layer of the `domains` fixture).
FAIL_ON_RANK_1_IN_LAYER_2 = """
import os
if os.environ.get("RANK") == "1":
    import moe_viz.capture.observe as observe
    original = observe.RoutingObserver.set_attention_mask
    calls = []

    def set_attention_mask(self, mask):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in layer 2")
        return original(self, mask)

    observe.RoutingObserver.set_attention_mask = set_attention_mask
"""


def test_resume_where_one_rank_has_no_state_starts_that_rank_over(tmp_path, domains):
    """Rank 0 resumes at layer 2, rank 1 (its state gone) runs from layer 1: the per-batch checks still pair
    up (a finished layer still makes its checks) and the store equals one process's."""
    import shutil

    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    ref_ids = reference(model_dir, domains, tmp_path / "one.duckdb")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_ON_RANK_1_IN_LAYER_2)
    path = tmp_path / "two.duckdb"
    done = torchrun(capture_args(model_dir, domains, path, "--layerwise"), pythonpath=[inject])
    assert done.returncode != 0 and "injected failure in layer 2" in done.stderr
    states = tmp_path / "two.duckdb.layerwise"
    manifests = {p.parent.parent.name: json.loads(p.read_text())["next_layer"] for p in states.rglob("state.json")}
    assert manifests == {"rank-0-of-2": 1, "rank-1-of-2": 1}
    shutil.rmtree(states / "rank-1-of-2")
    done = torchrun(capture_args(model_dir, domains, path, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = store.list_runs(path)
    ids = runs[runs.status == "complete"].set_index("domain").loc[["code", "prose"]].run_id.tolist()
    assert_same_statistics(tmp_path / "one.duckdb", ref_ids, path, ids)
    assert not states.exists()
