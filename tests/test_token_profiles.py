"""Expert profiles and token-route views equal computations done here from the raw trace rows.

A hand-made trace (where ranking by count and by gate mass differ, and lift with the expert's
share over T differs from a share over k·T) pins the formulas; a random trace stored in a real
store checks every view against plain Python loops; a captured tiny model checks that the
views run on a real capture's rows.
"""

from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from moe_viz import store
from moe_viz.analysis import token_profiles as tp
from moe_viz.capture.run import CaptureSettings, capture_model
from moe_viz.capture.sources import Documents
from moe_viz.capture.trace import gate_ranks
from tiny_models import tiny_model, tiny_tokenizer


def trace_frames(tokens, routes, pieces=None):
    """tokens: [(seq, pos, token_id)]; routes: {(seq, pos, layer): [(expert, gate), ...]} in slot order."""
    run_tokens = pd.DataFrame(tokens, columns=["seq", "pos", "token_id"])
    ids = dict(((s, p), t) for s, p, t in tokens)
    rows = []
    for (s, p, layer), slots in routes.items():
        ranks = gate_ranks(np.array([[g for _, g in slots]], dtype=np.float32))[0]
        rows += [(s, p, ids[s, p], layer, slot, e, g, int(r)) for slot, ((e, g), r) in enumerate(zip(slots, ranks))]
    token_routes = pd.DataFrame(rows, columns=["seq", "pos", "token_id", "layer", "slot", "expert", "gate", "gate_rank"])
    token_routes = token_routes.astype({"gate": np.float32})
    distinct = sorted({t for _, _, t in tokens})
    pieces = pieces or {t: f"<{t}>" for t in distinct}
    token_pieces = pd.DataFrame({"token_id": distinct, "piece": [pieces[t] for t in distinct]})
    return {"token_routes": token_routes, "run_tokens": run_tokens, "token_pieces": token_pieces}


def stored(tmp_path, frames, domain="d"):
    """The frames as a complete run's trace in a real store; returns its TraceSource."""
    db = tmp_path / "store.duckdb"  # one store: runs of different domains side by side
    run_id = store.begin_run(db, model_id="m", model_fingerprint="f", model_type="t", domain=domain, source="s",
                             settings={}, tool_version="0")
    empty = pd.DataFrame({"layer": pd.Series([], dtype=int)})
    store.complete_run(db, run_id, expert_stats=empty, layer_stats=empty, coactivation=empty, tokens=1, sequences=1,
                       trace=frames)
    return tp.TraceSource(db, run_id)


# A: 4 occurrences, B: 2, C: 1, D: 3 -> T = 10, 4 distinct ids. Expert 2 of layer 0 gets
# A once (gate .9), B twice (.1 each), C once (.3): by count B > A = C, by gate mass A > C > B.
HAND_TOKENS = [(0, p, t) for p, t in enumerate([10, 11, 10, 12, 13, 10, 11, 13, 10, 13])]
HAND_TO_2 = {0: 0.9, 1: 0.1, 6: 0.1, 3: 0.3}


def hand_routes():
    routes = {}
    for s, p, _ in HAND_TOKENS:
        if p in HAND_TO_2:
            routes[s, p, 0] = [(2, HAND_TO_2[p]), (0, 1 - HAND_TO_2[p])]
        else:
            routes[s, p, 0] = [(1, 0.6), (3, 0.4)]
        routes[s, p, 1] = [(p % 4, 0.7), ((p + 1) % 4, 0.3)]
    return routes


@pytest.fixture(params=["store", "frames"])
def hand_source(request, tmp_path):
    frames = trace_frames(HAND_TOKENS, hand_routes())
    return stored(tmp_path, frames) if request.param == "store" else tp.TraceSource(frames=frames)


def test_hand_made_profile(hand_source):
    tokens, summary = tp.expert_tokens(hand_source, 0, 2)
    assert summary == {"traced_tokens": 10, "routed": 4, "expert_share": 0.4, "distinct_tokens": 3,
                       "domain_distinct": 4, "coverage": 0.75}
    by_count = tp.top_by_count(tokens)
    assert by_count.token_id.tolist() == [11, 10, 12]  # A and C tie on count: A has more gate mass
    assert tp.top_by_gate_mass(tokens).token_id.tolist() == [10, 12, 11]
    rows = tokens.set_index("token_id")
    # lift = (n_ve / c_v) / (n_e / T): B (2/2)/0.4, A (1/4)/0.4, C (1/1)/0.4
    np.testing.assert_allclose(rows.loc[[11, 10, 12], "lift"], [2.5, 0.625, 2.5], rtol=1e-12)
    np.testing.assert_allclose(rows.loc[[11, 10, 12], "gate_mass"], [0.2, 0.9, 0.3], rtol=1e-6)
    assert rows.loc[[11, 10, 12], "occurrences"].tolist() == [2, 4, 1]
    assert rows.loc[10, "piece"] == "<10>"
    contexts = tp.example_contexts(hand_source, 0, 2, limit=2, width=2)
    assert contexts.pos.tolist() == [0, 3]  # largest gates first
    assert contexts.iloc[1][["before", "piece", "after"]].tolist() == ["<11><10>", "<12>", "<13><10>"]
    only_b = tp.example_contexts(hand_source, 0, 2, token_id=11)
    assert only_b.pos.tolist() == [1, 6]  # equal gates: sequence order


def random_trace(seed, seqs=3, length=20, layers=(1, 3), experts=6, k=2, vocab=7):
    rng = np.random.default_rng(seed)
    tokens = [(s, p, int(rng.integers(vocab))) for s in range(seqs) for p in range(length)]
    routes = {}
    for s, p, _ in tokens:
        for layer in layers:
            chosen = rng.choice(experts, size=k, replace=False)
            gates = rng.dirichlet(np.ones(k)) * (2.5 if layer == 3 else 1.0)  # unequal totals per layer
            gates = np.round(gates, 3)
            if p % 7 == 0:
                gates[:] = gates[0]  # equal gates: the top-1 is the first slot
            routes[s, p, layer] = [(int(e), float(g)) for e, g in zip(chosen, gates)]
    return tokens, routes


def test_views_equal_python_loops(tmp_path):
    tokens, routes = random_trace(5)
    source = stored(tmp_path, trace_frames(tokens, routes))
    tok = {(s, p): t for s, p, t in tokens}
    occurrences = defaultdict(int)
    for t in tok.values():
        occurrences[t] += 1
    T = len(tokens)
    for layer in (1, 3):
        for expert in range(6):
            got, summary = tp.expert_tokens(source, layer, expert)
            count, mass = defaultdict(int), defaultdict(float)
            for (s, p, l), slots in routes.items():
                for e, g in slots:
                    if l == layer and e == expert:
                        count[tok[s, p]] += 1
                        mass[tok[s, p]] += float(np.float32(g))  # gates are stored as REAL, summed in double
            n_e = sum(count.values())
            assert summary["routed"] == n_e and summary["coverage"] == len(count) / len(occurrences)
            g = got.set_index("token_id")
            assert sorted(g.index) == sorted(count)
            for v in count:
                assert g.loc[v, "count"] == count[v]
                assert g.loc[v, "gate_mass"] == pytest.approx(mass[v], rel=1e-9)
                assert g.loc[v, "lift"] == pytest.approx((count[v] / occurrences[v]) / (n_e / T), rel=1e-12)
    # context dependence: distinct top-1 experts (largest gate, first slot on ties) per id with c(v) >= 2
    cd = tp.context_dependence(source).set_index("layer")
    for layer in (1, 3):
        top1, routed = defaultdict(set), defaultdict(set)
        for (s, p, l), slots in routes.items():
            if l == layer:
                best = max(range(len(slots)), key=lambda i: (np.float32(slots[i][1]), -i))
                top1[tok[s, p]].add(slots[best][0])
                routed[tok[s, p]].update(e for e, _ in slots)
        ids = [v for v in occurrences if occurrences[v] >= 2]
        assert cd.loc[layer, "token_ids"] == len(ids)
        assert cd.loc[layer, "mean_distinct_top1"] == pytest.approx(np.mean([len(top1[v]) for v in ids]))
        assert cd.loc[layer, "same_top1_share"] == pytest.approx(np.mean([len(top1[v]) == 1 for v in ids]))
        listed = tp.context_dependent_tokens(source, layer, top=100).set_index("token_id")
        assert {v: len(top1[v]) for v in ids} == listed.distinct_top1.to_dict()
    # gate mass a plan removes: layer 1 drops experts 0, 4; layer 3 drops 5 (keeps other than half)
    kept, num = {1: [1, 2, 3, 5], 3: [0, 1, 2, 3, 4]}, {1: 6, 3: 6}
    hurt = {}  # share of the token's gate mass over all layers on dropped experts (layer 3's gates sum to 2.5)
    for (s, p) in tok:
        slots = [(layer, e, float(np.float32(g))) for layer in (1, 3) for e, g in routes[s, p, layer]]
        hurt[s, p] = sum(g for layer, e, g in slots if e not in kept[layer]) / sum(g for _, _, g in slots)
    occ, by_id = tp.tokens_hurt(source, kept, num, top=200)
    assert len(occ) == T
    for s, p, h in zip(occ.seq, occ.pos, occ.hurt):
        assert h == pytest.approx(hurt[s, p], rel=1e-6)
    assert occ.hurt.is_monotonic_decreasing
    for v, m in zip(by_id.token_id, by_id.mean_hurt):
        assert m == pytest.approx(np.mean([hurt[k] for k in tok if tok[k] == v]), rel=1e-6)
    window = tp.token_window(source, 1, 4, 5)
    assert sorted(set(window.pos)) == [4, 5, 6, 7, 8] and set(window.seq) == {1}
    removed = tp.gate_removed(window, kept, num).set_index(["pos", "layer"])
    for p in range(4, 9):
        for layer in (1, 3):
            slots = routes[1, p, layer]
            expected = sum(np.float32(g) for e, g in slots if e not in kept[layer])
            assert removed.loc[(p, layer), "removed"] == pytest.approx(expected, rel=1e-6)


def test_domain_differences_equal_total_variation(tmp_path):
    a_tokens, a_routes = random_trace(1)
    b_tokens, b_routes = random_trace(2, vocab=4)
    a = stored(tmp_path, trace_frames(a_tokens, a_routes), "a")
    b = stored(tmp_path, trace_frames(b_tokens, b_routes), "b")
    got = tp.domain_differences(a, b, 3)
    assert got.tv.is_monotonic_decreasing

    def dist(tokens, routes, expert):
        tok = {(s, p): t for s, p, t in tokens}
        counts = defaultdict(int)
        for (s, p, l), slots in routes.items():
            if l == 3:
                for e, _ in slots:
                    if e == expert:
                        counts[tok[s, p]] += 1
        n = sum(counts.values())
        return {v: c / n for v, c in counts.items()}

    for expert, tv in zip(got.expert, got.tv):
        pa, pb = dist(a_tokens, a_routes, expert), dist(b_tokens, b_routes, expert)
        expected = 0.5 * sum(abs(pa.get(v, 0) - pb.get(v, 0)) for v in set(pa) | set(pb))
        assert tv == pytest.approx(expected, rel=1e-12)


def test_views_run_on_a_real_capture(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    db = tmp_path / "store.duckdb"
    docs = Documents(domain="code", source="inline", texts=["def add(a, b):\n    return a + b\n" * 20])
    settings = CaptureSettings(max_tokens=200, seq_len=32, batch_size=4, trace_tokens=64)
    [run_id] = capture_model(model, tokenizer, "tiny", [docs], settings, store_path=db)
    source = tp.TraceSource(db, run_id)
    raw = source.query("SELECT * FROM token_routes WHERE run_id = $run")
    for expert in range(8):
        tokens, summary = tp.expert_tokens(source, 1, expert)
        here = raw[(raw.layer == 1) & (raw.expert == expert)]
        assert summary["routed"] == len(here) and sorted(tokens.token_id) == sorted(here.token_id.unique())
    assert tp.trace_sequences(source).tokens.tolist() == [32, 32]
    window = tp.token_window(source, 0, 0, 10)
    assert len(window) == 10 * 2 * 2 and (window.groupby(["pos", "layer"]).gate_rank.min() == 0).all()


# Ties everywhere a view breaks them (gates exact in float32). Layer 0, experts 0-2, k = 2. Occurrences:
# 30 twice, 31 once, 32 and 33 three times. Expert 0 gets 31 (.5, seq 0), 32 twice (.25 each) and 30 (.5,
# seq 1): every id carries gate mass .5 there, 30 and 31 also tie on count.
TIE_TOKENS = [(0, p, t) for p, t in enumerate([31, 32, 33, 32, 33])] + [(1, p, t) for p, t in enumerate([32, 30, 33, 30])]
TIE_ROUTES = {
    (0, 0, 0): [(0, 0.5), (1, 0.5)], (0, 1, 0): [(0, 0.25), (1, 0.75)], (0, 2, 0): [(1, 0.5), (2, 0.5)],
    (0, 3, 0): [(0, 0.25), (2, 0.75)], (0, 4, 0): [(1, 0.5), (2, 0.5)], (1, 0, 0): [(1, 0.75), (2, 0.25)],
    (1, 1, 0): [(0, 0.5), (2, 0.5)], (1, 2, 0): [(2, 0.5), (1, 0.5)], (1, 3, 0): [(1, 0.5), (2, 0.5)],
}


@pytest.fixture(params=["store", "frames"])
def tie_source(request, tmp_path):
    frames = trace_frames(TIE_TOKENS, TIE_ROUTES)
    return stored(tmp_path, frames) if request.param == "store" else tp.TraceSource(frames=frames)


def test_views_break_ties_as_documented(tie_source):
    tokens, summary = tp.expert_tokens(tie_source, 0, 0)
    assert summary["routed"] == 4 and summary["traced_tokens"] == 9
    rows = tokens.set_index("token_id")
    assert rows.loc[[30, 31, 32], "count"].tolist() == [1, 1, 2]
    assert rows.loc[[30, 31, 32], "occurrences"].tolist() == [2, 1, 3]
    assert rows.loc[[30, 31, 32], "mean_gate"].tolist() == [0.5, 0.5, 0.25]  # gate mass / count on the expert
    assert rows.loc[[30, 31, 32], "share_here"].tolist() == [0.5, 1.0, 2 / 3]
    assert tp.top_by_count(tokens).token_id.tolist() == [32, 30, 31]  # 30, 31: equal count and mass
    assert tp.top_by_gate_mass(tokens).token_id.tolist() == [32, 30, 31]  # equal mass: more occurrences first
    # equal gates .5 at (0, 0) and (1, 1): sequence order
    assert tp.example_contexts(tie_source, 0, 0, limit=2)[["seq", "pos"]].values.tolist() == [[0, 0], [1, 1]]
    # top-1 = largest gate, first slot on ties: 32 -> {1, 2, 1}, 33 -> {1, 1, 2}, 30 -> {0, 1}
    listed = tp.context_dependent_tokens(tie_source, 0)
    assert listed.token_id.tolist() == [32, 33, 30]  # all 2 distinct top-1: more occurrences, then smaller id
    assert listed.occurrences.tolist() == [3, 3, 2] and listed.distinct_top1.tolist() == [2, 2, 2]
    assert listed.distinct_routed.tolist() == [3, 2, 3]
    # a plan that drops expert 2: hurt = gate on expert 2 (every token's gates sum to 1)
    kept, num = {0: [0, 1]}, {0: 3}
    occ, by_id = tp.tokens_hurt(tie_source, kept, num, top=20)
    assert occ[["seq", "pos"]].values.tolist() == [[0, 3], [0, 2], [0, 4], [1, 1], [1, 2], [1, 3], [1, 0], [0, 0], [0, 1]]
    assert occ.hurt.tolist() == [0.75, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.0, 0.0]
    assert by_id.token_id.tolist() == [33, 30, 32, 31]  # 33 and 30 both .5: more occurrences first
    assert by_id.occurrences.tolist() == [3, 2, 3, 1]
    assert by_id.mean_hurt.tolist() == pytest.approx([0.5, 0.5, 1 / 3, 0.0], rel=1e-12)
    removed = tp.gate_removed(tp.token_window(tie_source, 0, 0, 5), kept, num)
    assert removed.pos.tolist() == [0, 1, 2, 3, 4]
    assert removed.removed.tolist() == [0.0, 0.0, 0.5, 0.75, 0.5]
    assert removed.total.tolist() == [1.0] * 5
    assert removed.removed_fraction.tolist() == [0.0, 0.0, 0.5, 0.75, 0.5]


def test_domain_differences_lists_each_side_with_ties_by_id(tmp_path):
    # B is A's first sequence: expert 0 has 30 x1, 31 x1, 32 x2 in A (4 routed) and 31 x1, 32 x2 in B (3).
    a = stored(tmp_path, trace_frames(TIE_TOKENS, TIE_ROUTES), "a")
    b_routes = {key: slots for key, slots in TIE_ROUTES.items() if key[0] == 0}
    b = stored(tmp_path, trace_frames(TIE_TOKENS[:5], b_routes), "b")
    got = tp.domain_differences(a, b, 0).set_index("expert")
    assert got.index.tolist() == [2, 0, 1]  # TV 2/7, 1/4, 5/28
    np.testing.assert_allclose(got.tv, [2 / 7, 1 / 4, 5 / 28], rtol=1e-12)
    assert got.routed_a.tolist() == [7, 4, 7] and got.routed_b.tolist() == [3, 3, 4]
    assert got.loc[0, "top_a"] == "“<32>”×2 · “<30>”×1 · “<31>”×1"
    assert got.loc[0, "top_b"] == "“<32>”×2 · “<31>”×1"
    assert got.loc[2, "top_a"] == "“<33>”×3 · “<30>”×2 · “<32>”×2"
