"""Layer-wise streaming capture stores exactly what an in-memory capture stores.

Each test saves a tiny random model to disk (so the streamed path really reads
safetensors shards through transformers' key conversion), captures it once
with the whole model loaded (`capture_model`, the reference) and once layer by
layer (`capture(..., layerwise=True)`), and compares the stored rows.

Bound: counts (routed/top-1 tokens, co-activation, layer tokens) must be equal;
float sums within rtol 1e-12. Both paths run each decoder layer on the same
input tensors with the same kernels and add in float64 in the same order, so
the sums agree to the last bit in practice; 1e-12 leaves room only for a
different float64 summation order, far below any real discrepancy (a wrong
mask or a skipped layer moves them by >1e-3).
"""

import json

import pandas as pd
import pytest

from capture_compare import SETTINGS, assert_same_statistics, domains, reference, save_model  # noqa: F401 (fixture)
from moe_viz import store
from moe_viz.capture.layerwise import LayerwiseState, layerwise_reason, unrun_tensors
from moe_viz.capture.run import capture
from moe_viz.errors import MoeVizError

# deepseek_v3: a dense first layer, a shared expert, a sigmoid router with group-limited top-k.
# qwen2_moe: shared expert with its own gate. gpt_oss: sliding-window and full-attention layers
# (window 4 < 16 tokens, so the two masks differ), router bias. jamba: mamba and attention layers,
# a dense MLP on every other layer. qwen3_next: gated-delta-net linear attention beside full attention.
CASES = {
    "deepseek_v3": {},
    "qwen2_moe": {},
    "gpt_oss": {"sliding_window": 4},
    "jamba": {},
    "qwen3_next": {},
}


def assert_same_trace(store_a, ids_a, store_b, ids_b):
    """The token trace tables of two captures are equal, domain by domain (gates to float32 rounding)."""
    import duckdb

    def rows(path, table, order, run_id):
        with duckdb.connect(str(path), read_only=True) as con:
            query = f"SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = ? ORDER BY {order}"
            return con.execute(query, [run_id]).df()

    for run_a, run_b in zip(ids_a, ids_b):
        # (token_pieces differ only by tokenizer: the reference captures without one)
        for table, order in (("run_tokens", "seq, pos"), ("token_routes", "layer, seq, pos, slot")):
            a, b = rows(store_a, table, order, run_a), rows(store_b, table, order, run_b)
            assert len(a) > 0, table
            pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, obj=table)


@pytest.mark.parametrize("family", list(CASES))
def test_layerwise_equals_in_memory(tmp_path, domains, family):
    model_dir = save_model(tmp_path / "model", family, **CASES[family])
    ref_ids = reference(model_dir, domains, tmp_path / "mem.duckdb")
    ids = capture(model_dir, domains, store_path=tmp_path / "lw.duckdb", settings=SETTINGS, device="cpu",
                  layerwise=True, progress=lambda p: None)
    assert_same_statistics(tmp_path / "mem.duckdb", ref_ids, tmp_path / "lw.duckdb", ids)
    assert_same_trace(tmp_path / "mem.duckdb", ref_ids, tmp_path / "lw.duckdb", ids)
    runs = store.list_runs(tmp_path / "lw.duckdb")
    assert [json.loads(s)["layerwise"] for s in runs.settings] == [True, True]
    assert [json.loads(s)["world_size"] for s in runs.settings] == [1, 1]
    # one pass serves both domains: each run records that pass (all domains' tokens)
    assert [json.loads(s)["capture_phase"]["tokens"] for s in runs.settings] == [sum(runs.tokens)] * 2
    ref_runs = store.list_runs(tmp_path / "mem.duckdb")
    assert [json.loads(s)["layerwise"] for s in ref_runs.settings] == [False, False]
    assert not (tmp_path / "lw.duckdb.layerwise").exists()  # its state is removed after success


def test_every_layer_and_domain_shares_one_set_of_work_buffers(tmp_path, domains, monkeypatch):
    """One observer per layer and domain; made anew for each, their (T*k, H) and (T, E) buffers grew the heap
    layer by layer (bench/capture_scale.py memory), so the whole pass hands them one Scratch."""
    from moe_viz.capture import layerwise
    from moe_viz.capture.observe import RoutingObserver

    made = []

    class Recorded(RoutingObserver):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.scratch)

    monkeypatch.setattr(layerwise, "RoutingObserver", Recorded)
    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    capture(model_dir, domains, store_path=tmp_path / "lw.duckdb", settings=SETTINGS, device="cpu",
            layerwise=True, progress=lambda p: None)
    assert len(made) >= 2 * len(domains)  # two or more MoE layers, each run per domain
    assert all(scratch is made[0] for scratch in made)
    assert made[0]._buffers  # and the observers used it


def test_the_comparison_tells_a_different_model_apart(tmp_path, domains):
    """The equality check above is not vacuous: another seed's weights fail it."""
    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    other_dir = save_model(tmp_path / "other", "qwen2_moe", seed=1)
    ref_ids = reference(model_dir, domains, tmp_path / "mem.duckdb")
    ids = capture(other_dir, domains, store_path=tmp_path / "lw.duckdb", settings=SETTINGS, device="cpu",
                  layerwise=True, progress=lambda p: None)
    with pytest.raises(AssertionError):
        assert_same_statistics(tmp_path / "mem.duckdb", ref_ids, tmp_path / "lw.duckdb", ids)


def test_hidden_states_on_disk_give_the_same_statistics(tmp_path, domains):
    model_dir = save_model(tmp_path / "model", "deepseek_v3")
    ref_ids = reference(model_dir, domains, tmp_path / "mem.duckdb")
    ids = capture(model_dir, domains, store_path=tmp_path / "lw.duckdb", settings=SETTINGS, device="cpu",
                  layerwise=True, max_host_memory=0, progress=lambda p: None)
    assert_same_statistics(tmp_path / "mem.duckdb", ref_ids, tmp_path / "lw.duckdb", ids)


def test_resume_continues_from_the_last_completed_layer(tmp_path, domains):
    """Interrupted during layer 3 of 4 (as Ctrl-C would), --resume runs layers 3-4 only and equals a full run."""
    model_dir = save_model(tmp_path / "model", "jamba")
    ref_ids = reference(model_dir, domains, tmp_path / "mem.duckdb")
    path = tmp_path / "lw.duckdb"
    seen = []

    def interrupt_in_layer_3(p):
        seen.append(p.detail)
        if p.detail.startswith("layer 3/4"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture(model_dir, domains, store_path=path, settings=SETTINGS, device="cpu", layerwise=True,
                progress=interrupt_in_layer_3)
    failed = store.list_runs(path)
    assert failed.status.tolist() == ["failed"]  # the first domain's run; no rows kept
    assert store.expert_stats(path, failed.run_id.tolist()).empty
    # it names the model it was for: layers 3-4, never reached, were read just for the fingerprint
    assert failed.model_fingerprint.tolist() == store.list_runs(tmp_path / "mem.duckdb").model_fingerprint[:1].tolist()
    assert (tmp_path / "lw.duckdb.layerwise").is_dir()  # kept for --resume

    seen.clear()
    counts = []

    def record(p):
        seen.append(p.detail)
        counts.append((p.tokens_done, p.tokens_total))

    ids = capture(model_dir, domains, store_path=path, settings=SETTINGS, device="cpu", resume=True,
                  max_host_memory=0, progress=record)  # hidden states read from disk
    assert sorted(set(seen)) == ["layer 3/4, resumed at layer 3", "layer 4/4, resumed at layer 3"]
    tokens = (16 + 11 + 16 + 5 + 9) + (7 + 16 + 13)  # both domains (capture_compare.domains)
    assert counts[-1] == (tokens, tokens)  # the two layers left make the whole pass: the bar ends full
    assert_same_statistics(tmp_path / "mem.duckdb", ref_ids, path, ids)
    assert_same_trace(tmp_path / "mem.duckdb", ref_ids, path, ids)  # layers 1-2's trace came from the state
    assert store.list_runs(path).status.tolist() == ["complete", "complete"]  # the failed run was replaced
    assert not (tmp_path / "lw.duckdb.layerwise").exists()


def test_resume_without_an_interrupted_capture_says_so(tmp_path, domains):
    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    with pytest.raises(MoeVizError, match="no interrupted layer-wise capture"):
        capture(model_dir, domains, store_path=tmp_path / "lw.duckdb", settings=SETTINGS, device="cpu",
                resume=True, progress=lambda p: None)
    with pytest.raises(MoeVizError, match="--resume continues an interrupted layer-wise capture: it cannot be "
                                          "used without --layerwise"):
        capture(model_dir, domains, store_path=tmp_path / "lw.duckdb", settings=SETTINGS, device="cpu",
                resume=True, layerwise=False, progress=lambda p: None)


def _interrupted_in_layer_2(tmp_path, domains):
    """A qwen2_moe checkpoint and a layer-wise capture of `domains` into lw.duckdb, interrupted in layer 2."""
    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    path = tmp_path / "lw.duckdb"

    def interrupt_in_layer_2(p):
        if p.detail.startswith("layer 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture(model_dir, domains, store_path=path, settings=SETTINGS, device="cpu", layerwise=True,
                progress=interrupt_in_layer_2)
    return model_dir, path


def test_resume_only_continues_the_capture_of_the_same_tokens_and_batching(tmp_path, domains):
    """Interrupted in layer 2: --resume with another batch size, or other tokens of the same lengths, finds
    nothing to continue (its hidden states are of other batches); the same inputs continue it."""
    from dataclasses import replace

    from capture_compare import write_domain

    model_dir, path = _interrupted_in_layer_2(tmp_path, domains)
    other_tokens = [f"code={write_domain(tmp_path / 'other.jsonl', 7, (16, 11, 16, 5, 9))}", domains[1]]
    for changed, settings in ((domains, replace(SETTINGS, batch_size=3)), (other_tokens, SETTINGS)):
        with pytest.raises(MoeVizError, match="no interrupted layer-wise capture"):
            capture(model_dir, changed, store_path=path, settings=settings, device="cpu", resume=True,
                    progress=lambda p: None)
    seen = []
    capture(model_dir, domains, store_path=path, settings=SETTINGS, device="cpu", resume=True,
            progress=lambda p: seen.append(p.detail))
    assert set(seen) == {"layer 2/2, resumed at layer 2"}


def test_a_layer_missing_from_the_checkpoint_fails_the_run_with_no_rows(tmp_path, domains):
    from safetensors.torch import load_file, save_file

    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    shard = tmp_path / "model" / "model.safetensors"
    tensors = load_file(shard)
    save_file({k: v for k, v in tensors.items() if ".layers.1." not in k}, shard, metadata={"format": "pt"})
    path = tmp_path / "lw.duckdb"
    with pytest.raises(MoeVizError, match=r"lacks .* tensor\(s\) of model\.layers\.1"):
        capture(model_dir, domains, store_path=path, settings=SETTINGS, device="cpu", layerwise=True,
                progress=lambda p: None)
    runs = store.list_runs(path)
    assert runs.status.tolist() == ["failed"] and "model.layers.1" in runs.error.iloc[0]
    assert store.expert_stats(path, runs.run_id.tolist()).empty


def test_a_state_directory_not_made_by_moe_viz_is_left_alone(tmp_path, domains):
    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    path = tmp_path / "lw.duckdb"
    state = LayerwiseState(LayerwiseState.location(path, "k", 0, 1), "k")
    state.dir.mkdir(parents=True)
    (state.dir / "precious.txt").write_text("mine")
    with pytest.raises(MoeVizError, match="was not made by a moe_viz layer-wise capture"):
        state.open(resume=False)
    assert (state.dir / "precious.txt").read_text() == "mine"


def test_unrun_tensors_are_grouped_by_unit_with_tied_names_together():
    """Outside the text model ('lm.model'): one unit per numbered block or other module; a tensor tied to the
    text model's (the LM head) is not there at all; two names of one tensor are one entry, in the unit of the
    first; a persistent buffer counts, a non-persistent one does not (it is never in a checkpoint)."""
    import torch
    from torch import nn

    text = nn.Module()
    text.embed = nn.Embedding(4, 2)
    text.layers = nn.ModuleList([nn.Linear(2, 2)])
    tower = nn.Module()
    tower.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2, bias=False)])
    tower.register_buffer("scale", torch.ones(1))
    tower.register_buffer("cache", torch.ones(1), persistent=False)
    tower.out = nn.Linear(2, 2, bias=False)
    tower.out.weight = tower.blocks[1].weight  # tied within what the text forward never runs
    head = nn.Linear(2, 4, bias=False)
    head.weight = text.embed.weight  # tied to the text model
    model = nn.Module()
    model.lm = nn.Module()
    model.lm.model, model.lm.head, model.tower = text, head, tower
    assert unrun_tensors(model, "lm.model.layers") == {
        "tower.blocks.0": [["tower.blocks.0.weight"], ["tower.blocks.0.bias"]],
        "tower.blocks.1": [["tower.blocks.1.weight", "tower.out.weight"]],
        "tower": [["tower.scale"]],
    }
    assert unrun_tensors(model.lm.model, "layers") == {}  # layers at the top level: nothing is left out


@pytest.mark.parametrize("size,free,expected", [
    (10 * 2**30, 100 * 2**30, None),  # fits
    (90 * 2**30, 100 * 2**30, "would not fit"),  # over 80% of what is free
    (81 * 2**30, 100 * 2**30, "would not fit"),
    (79 * 2**30, 100 * 2**30, None),
])
def test_layerwise_is_chosen_when_the_checkpoint_would_not_fit(size, free, expected):
    reason = layerwise_reason(size, free, "available host memory")
    if expected is None:
        assert reason is None
    else:
        assert expected in reason and f"{size / 2**30:.1f} GiB" in reason


def test_a_small_model_is_captured_in_memory_by_default(tmp_path, domains):
    model_dir = save_model(tmp_path / "model", "qwen2_moe")
    capture(model_dir, domains, store_path=tmp_path / "s.duckdb", settings=SETTINGS, device="cpu",
            progress=lambda p: None)
    assert [json.loads(s)["layerwise"] for s in store.list_runs(tmp_path / "s.duckdb").settings] == [False, False]


def test_resume_under_another_number_of_ranks_is_refused(tmp_path, domains):
    """A capture interrupted with 1 process, resumed with 2 ranks: refused in one line (state kept)."""
    from test_distributed_capture import capture_args, torchrun

    model_dir, path = _interrupted_in_layer_2(tmp_path, domains)
    state = tmp_path / "lw.duckdb.layerwise"
    kept = sorted(p.relative_to(state) for p in state.rglob("*"))
    done = torchrun(capture_args(model_dir, domains, path, "--resume"))
    assert done.returncode != 0
    assert ("--resume: the interrupted capture ran on 1 rank(s) and this launch has 2; each rank's hidden states "
            "and partial sums are its own, so relaunch with 1 rank(s)") in done.stderr
    assert sorted(p.relative_to(state) for p in state.rglob("*")) == kept  # nothing of it touched
    # the same launch width resumes it
    ids = capture(model_dir, domains, store_path=path, settings=SETTINGS, device="cpu", resume=True,
                  progress=lambda p: None)
    assert store.list_runs(path).set_index("run_id").status[ids].tolist() == ["complete", "complete"]
