"""Criteria against hand computations on a small synthetic statistics table, and pruning plans."""

import math

import pandas as pd
import pytest
from transformers import DeepseekV3Config

from moe_viz.analysis import criteria
from moe_viz import store
from moe_viz.errors import MoeVizError
from moe_viz.prune.plan import PrunePlan, RouterConstraints, build_plan, parse_domain_weights, preview, size_summary

# One layer, 4 experts; expert 3 is never routed. Tokens: 10, top-k 2.
STATS = pd.DataFrame({
    "layer": [0, 0, 0, 0],
    "expert": [0, 1, 2, 3],
    "routed_tokens": [8, 8, 4, 0],
    "top1_tokens": [6, 2, 2, 0],
    "top1_prob_sum": [3.0, 1.2, 1.6, 0.0],
    "gate_sum": [4.0, 3.0, 3.0, 0.0],
    "prob_sum": [4.0, 3.0, 2.0, 1.0],
    "ean_sum": [16.0, 40.0, 12.0, 0.0],
    "ean_sq_sum": [40.0, 250.0, 40.0, 0.0],
    "ean_max": [3.0, 9.0, 4.0, 0.0],
    "reap_sum": [8.0, 12.0, 10.0, 0.0],
    "contribution_sum": [1.0, 0.5, 2.0, 0.0],
    "recon_error": [0.02, 0.3, 0.1, 0.0],  # measured (moe-viz importance): never-routed experts change nothing
})

HAND = {
    "frequency": [8, 8, 4, 0],
    "soft_count": [4.0, 3.0, 2.0, 1.0],
    "gate_mass": [4.0, 3.0, 3.0, 0.0],
    "ean_mean": [2.0, 5.0, 3.0, 0.0],
    "ean_sum": [16.0, 40.0, 12.0, 0.0],
    "weighted_ean": [8.0, 12.0, 10.0, 0.0],
    "reap": [1.0, 1.5, 2.5, 0.0],
    "nllb": [0.6 * math.exp(0.5), 0.2 * math.exp(0.6), 0.2 * math.exp(0.8), 0.0],
    "easy_ep": [1.0, 0.5, 2.0, 0.0],
    "reconstruction": [0.02, 0.3, 0.1, 0.0],
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_criterion_matches_hand_computation(name):
    scores = criteria.score(STATS, name)
    assert scores.score.tolist() == pytest.approx(HAND[name])


@pytest.mark.parametrize("name", sorted(criteria.CRITERIA))
def test_never_routed_expert_ranks_last_under_every_criterion(name):
    ranked = criteria.rank(criteria.score(STATS, name))
    assert ranked.set_index("expert").loc[3, "rank"] == 3  # soft count gives it 1.0, random anything


def test_ties_break_by_expert_index():
    ranked = criteria.rank(criteria.score(STATS, "frequency"))
    assert ranked.set_index("expert")["rank"].tolist() == [0, 1, 2, 3]


def test_random_is_seeded_and_independent_of_row_order():
    a = criteria.score(STATS, "random", seed=1)
    b = criteria.score(STATS.iloc[::-1], "random", seed=1)
    c = criteria.score(STATS, "random", seed=2)
    assert a.score.tolist() == b.score.tolist() != c.score.tolist()


def test_unknown_criterion():
    with pytest.raises(MoeVizError, match="unknown criterion 'magic'"):
        criteria.score(STATS, "magic")


def test_mix_normalises_each_domain_per_layer_before_weighting():
    a = criteria.score(STATS, "frequency")  # shares 0.4 0.4 0.2 0
    b = a.assign(score=[0.0, 0.0, 100.0, 0.0])  # shares 0 0 1 0
    mixed = criteria.mixed_scores({"a": a, "b": b}, {"a": 1.0, "b": 0.5})
    assert mixed.score.tolist() == pytest.approx([0.4, 0.4, 0.2 + 0.5, 0.0])


# -- plans on a synthetic store -------------------------------------------------

E = 8


def _write_run(path, domain, seed, layers=(1, 2), num_experts=E, top_k=2, model_id="m"):
    rows = []
    for layer in layers:
        for e in range(num_experts):
            routed = (e * 7 + seed * 3 + layer) % 11  # deterministic, uneven
            rows.append({"layer": layer, "expert": e, "routed_tokens": routed, "top1_tokens": routed // 2,
                         "top1_prob_sum": routed * 0.3, "gate_sum": routed * 0.4, "prob_sum": routed * 0.5 + 0.1,
                         "ean_sum": routed * (1 + e % 3), "ean_sq_sum": routed * 4.0, "ean_max": 3.0,
                         "reap_sum": routed * 0.4 * (1 + e % 3), "contribution_sum": routed * 0.1})
    experts = pd.DataFrame(rows)
    layer_df = pd.DataFrame([{"layer": l, "module": f"model.layers.{l}.mlp", "tokens": 100, "num_experts": num_experts,
                              "top_k": top_k, "router_score": "softmax", "entropy_mean": 1.0} for l in layers])
    coact = pd.DataFrame({"layer": pd.Series(dtype="int32"), "expert_a": pd.Series(dtype="int32"),
                          "expert_b": pd.Series(dtype="int32"), "tokens": pd.Series(dtype="int64")})
    run_id = store.begin_run(path, model_id=model_id, model_fingerprint="fp", model_type="t", domain=domain,
                             source=f"builtin:{domain}", settings={"seed": seed}, tool_version="test")
    store.complete_run(path, run_id, expert_stats=experts, layer_stats=layer_df, coactivation=coact, tokens=100, sequences=1)
    return run_id


@pytest.fixture
def synthetic_store(store_path):
    ids = {d: _write_run(store_path, d, seed) for d, seed in [("code", 1), ("math", 2)]}
    return store_path, ids


def test_uniform_plan_keeps_top_ranked_per_layer(synthetic_store):
    path, ids = synthetic_store
    plan = build_plan(path, "m", "reap", {"code": 1.0}, sparsity=0.5)
    stats = store.expert_stats(path, [ids["code"]])
    for layer in (1, 2):
        ranked = criteria.rank(criteria.score(stats[stats.layer == layer], "reap"))
        expected = sorted(ranked.sort_values("rank").expert.head(4).tolist())
        assert plan.kept[layer] == expected
    assert plan.keep_per_layer == 4 and plan.exportable and plan.sparsity == 0.5
    assert plan.run_ids == {"code": ids["code"]}


def test_plan_json_round_trip(synthetic_store):
    path, _ = synthetic_store
    plan = build_plan(path, "m", "frequency", {"code": 1.0, "math": 0.5}, keep=6, protected={1: [0]})
    again = PrunePlan.from_json(plan.to_json())
    assert again == plan and again.dropped == plan.dropped and 0 in again.kept[1]


def test_protected_experts_are_kept(synthetic_store):
    path, _ = synthetic_store
    plain = build_plan(path, "m", "frequency", {"code": 1.0}, keep=2)
    victim = plain.dropped[1][0]
    protected = build_plan(path, "m", "frequency", {"code": 1.0}, keep=2, protected={1: [victim]})
    assert victim in protected.kept[1] and len(protected.kept[1]) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, "must be in"),
    ({"sparsity": -0.1}, "must be in"),
    ({"sparsity": 0.9}, r"fewer than top-k 2\); nearest valid sparsities: 0.75 \(keep 2\)"),
    ({"keep": 1}, "fewer than top-k 2"),
])
def test_impossible_requests_name_the_nearest_valid_sparsity(synthetic_store, kwargs, message):
    path, _ = synthetic_store
    with pytest.raises(MoeVizError, match=message):
        build_plan(path, "m", "reap", {"code": 1.0}, **kwargs)


def test_domain_without_complete_run(synthetic_store):
    path, _ = synthetic_store
    with pytest.raises(MoeVizError, match="no complete run for domain 'prose'.*captured domains: code, math"):
        build_plan(path, "m", "reap", {"prose": 1.0}, sparsity=0.5)


def test_group_limited_router_keeps_equal_counts_per_group(synthetic_store):
    path, _ = synthetic_store
    config = DeepseekV3Config(n_routed_experts=E, num_experts_per_tok=2, n_group=2, topk_group=1)
    assert RouterConstraints.from_config(config, 2).valid_keeps(E) == [4, 6, 8]
    plan = build_plan(path, "m", "easy_ep", {"code": 1.0}, config=config, keep=4)
    # code's routed tokens (easy_ep ∝ them): layer 1 [4, 0, 7, 3 | 10, 6, 2, 9], layer 2 [5, 1, 8, 4 | 0, 7, 3, 10];
    # the best 2 of each group of 4. Unconstrained, layer 1 would keep [2, 4, 5, 7].
    assert plan.kept == {1: [0, 2, 4, 7], 2: [0, 2, 5, 7]}
    with pytest.raises(MoeVizError, match=r"not 2 equal groups.*nearest valid sparsities: 0.5 \(keep 4\), 0.25 \(keep 6\)"):
        build_plan(path, "m", "reap", {"code": 1.0}, config=config, keep=5)


def test_global_scope_reports_per_layer_counts(synthetic_store):
    path, _ = synthetic_store
    plan = build_plan(path, "m", "frequency", {"code": 1.0}, sparsity=0.4375, scope="global")
    # keep 16 - 7 = 9. Each layer's top-2 first: layer 1 {4, 7}, layer 2 {7, 2}. Then per-layer shares across
    # layers (layer 1 sums to 41, layer 2 to 38): 7/38 (2:5), 7/41 (1:2), 6/41 (1:5), 5/38 (2:0), 4/38 (2:3),
    # and 4/41 (1:0) is the first left out. Raw counts would take 1:0 (4, lower layer) before 2:3 (4).
    assert plan.kept == {1: [2, 4, 5, 7], 2: [0, 2, 3, 5, 7]}
    assert plan.sparsity == 7 / 16 and not plan.exportable and plan.keep_per_layer is None
    assert build_plan(path, "m", "frequency", {"code": 1.0}, sparsity=0.75, scope="global").kept == {1: [4, 7], 2: [2, 7]}


def test_preview_matches_hand_computation(synthetic_store):
    path, _ = synthetic_store
    plan = build_plan(path, "m", "frequency", {"code": 1.0}, keep=4)
    assert plan.dropped == {1: [0, 1, 3, 6], 2: [1, 3, 4, 6]}  # code's four least routed per layer
    table = preview(plan, path).set_index(["domain", "layer"])
    assert sorted(table.index) == [("code", 1), ("code", 2), ("math", 1), ("math", 2)]
    for domain, seed in [("code", 1), ("math", 2)]:
        for layer in (1, 2):
            routed = [(e * 7 + seed * 3 + layer) % 11 for e in range(E)]  # as _write_run writes them
            reap = [r * 0.4 * (1 + e % 3) for e, r in enumerate(routed)]
            lost = plan.dropped[layer]
            assert table.loc[(domain, layer), "routed_share_lost"] == pytest.approx(
                sum(routed[e] for e in lost) / sum(routed), rel=1e-12)
            assert table.loc[(domain, layer), "reap_share_lost"] == pytest.approx(
                sum(reap[e] for e in lost) / sum(reap), rel=1e-12)


def test_size_summary_counts_expert_and_router_parameters(synthetic_store):
    from transformers import Qwen3MoeConfig

    path, _ = synthetic_store
    plan = build_plan(path, "m", "frequency", {"code": 1.0}, keep=6)
    config = Qwen3MoeConfig(vocab_size=100, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=8, moe_intermediate_size=4, num_experts=E,
                            num_experts_per_tok=2, intermediate_size=8)
    size = size_summary(plan, config)
    # plan drops 2 experts in each of layers 1 and 2: each expert 3*16*4 weights + one router row of 16
    assert size["params_before"] - size["params_after"] == 2 * 2 * (3 * 16 * 4 + 16)
    assert size["bytes_before"] == 4 * size["params_before"]


def test_domain_weight_parsing():
    assert parse_domain_weights(["code", "math:0.5"]) == {"code": 1.0, "math": 0.5}
    for bad in (["code:x"], ["code:-1"], ["code", "code"], []):
        with pytest.raises(MoeVizError):
            parse_domain_weights(bad)


# -- rounding, floors and constraints the tests above cannot tell apart ---------------------------------------
#
# The synthetic store's code run routes, per layer (see _write_run, seed 1):
#   layer 1: [4, 0, 7, 3, 10, 6, 2, 9]  (sum 41)     layer 2: [5, 1, 8, 4, 0, 7, 3, 10]  (sum 38)
# so under `frequency` the per-layer orders are 1: 4 7 2 5 0 3 6 1 and 2: 7 2 5 0 3 6 1 4.

CODE_ORDER = {1: [4, 7, 2, 5, 0, 3, 6, 1], 2: [7, 2, 5, 0, 3, 6, 1, 4]}


@pytest.mark.parametrize("sparsity, keep", [(0.2, 6), (0.3, 6), (0.35, 5), (0.6, 3), (0.7, 2)])
def test_uniform_sparsity_rounds_the_removed_count_to_nearest(synthetic_store, sparsity, keep):
    """K = E - round(s·E) (docs/METRICS.md): 0.2·8 = 1.6 removes 2 (not 1, floor); 0.3·8 = 2.4 removes 2 (not 3, ceil)."""
    path, _ = synthetic_store
    assert round(sparsity * E) == E - keep  # the expectation is the documented formula
    plan = build_plan(path, "m", "frequency", {"code": 1.0}, sparsity=sparsity)
    assert plan.kept == {layer: sorted(order[:keep]) for layer, order in CODE_ORDER.items()}
    assert plan.sparsity == (E - keep) / E


def test_global_sparsity_rounds_the_removed_total_to_nearest(synthetic_store):
    """Σ E = 16, s = 0.6: 9.6 removes 10, keeping 6 (floor would keep 7). Top-2 per layer first
    (1: {4, 7}, 2: {7, 2}), then shares 7/38 (2:5), 7/41 (1:2); 6/41 (1:5) is the first left out."""
    path, _ = synthetic_store
    plan = build_plan(path, "m", "frequency", {"code": 1.0}, sparsity=0.6, scope="global")
    assert plan.kept == {1: [2, 4, 7], 2: [2, 5, 7]}
    assert plan.sparsity == 10 / 16


def test_global_keep_is_per_layer_times_layers(synthetic_store):
    """--keep 3 with scope global keeps 3 · 2 layers = 6 experts in all (the same six as sparsity 0.6 above)."""
    path, _ = synthetic_store
    plan = build_plan(path, "m", "frequency", {"code": 1.0}, keep=3, scope="global")
    assert plan.kept == {1: [2, 4, 7], 2: [2, 5, 7]}


def test_global_plan_never_keeps_fewer_than_top_k_per_layer(synthetic_store):
    """s = 0.9 asks for 16 - round(14.4) = 2 experts in all; every layer still keeps its top-2 (4 in all)."""
    path, _ = synthetic_store
    plan = build_plan(path, "m", "frequency", {"code": 1.0}, sparsity=0.9, scope="global")
    assert plan.kept == {1: [4, 7], 2: [2, 7]}
    assert plan.sparsity == 12 / 16


def _write_stats(path, domain, layers: dict[int, dict[str, list]], top_k=1, seed=0):
    """A complete run with explicit expert_stats columns per layer (missing columns are 0)."""
    columns = ["routed_tokens", "top1_tokens", "top1_prob_sum", "gate_sum", "prob_sum", "ean_sum", "ean_sq_sum",
               "ean_max", "reap_sum", "contribution_sum"]
    rows = []
    for layer, values in layers.items():
        n = len(values["routed_tokens"])
        for e in range(n):
            rows.append({"layer": layer, "expert": e, **{c: values.get(c, [0] * n)[e] for c in columns}})
    experts = pd.DataFrame(rows).astype({"routed_tokens": "int64", "top1_tokens": "int64"})
    experts = experts.astype({c: float for c in columns if c not in ("routed_tokens", "top1_tokens")})
    layer_df = pd.DataFrame([{"layer": l, "module": f"model.layers.{l}.mlp", "tokens": 100,
                              "num_experts": len(v["routed_tokens"]), "top_k": top_k, "router_score": "softmax",
                              "entropy_mean": 1.0} for l, v in layers.items()])
    coact = pd.DataFrame({"layer": pd.Series(dtype="int32"), "expert_a": pd.Series(dtype="int32"),
                          "expert_b": pd.Series(dtype="int32"), "tokens": pd.Series(dtype="int64")})
    run_id = store.begin_run(path, model_id="m", model_fingerprint="fp", model_type="t", domain=domain,
                             source=f"builtin:{domain}", settings={"seed": seed}, tool_version="test")
    store.complete_run(path, run_id, expert_stats=experts, layer_stats=layer_df, coactivation=coact, tokens=100,
                       sequences=1)
    return run_id


def test_global_plan_drops_never_routed_experts_before_routed_ones_of_other_layers(store_path):
    """soft_count gives never-routed experts probability mass. Layer 1's expert 3 (never routed) has share
    1.5/10 = 0.15, more than layer 1's expert 2 (0.1) and layer 2's expert 2 (0.09), but never-routed experts
    come last in the global ranking too."""
    _write_stats(store_path, "code", {
        1: {"routed_tokens": [5, 3, 2, 0], "prob_sum": [5.0, 2.5, 1.0, 1.5]},
        2: {"routed_tokens": [5, 4, 1, 1], "prob_sum": [50.0, 40.0, 9.0, 1.0]},
    })
    # keep 8 - 3 = 5: top-1 of each layer (1:0, 2:0), then routed by share: 2:1 (0.4), 1:1 (0.25), 1:2 (0.1)
    plan = build_plan(store_path, "m", "soft_count", {"code": 1.0}, sparsity=0.375, scope="global")
    assert plan.kept == {1: [0, 1, 2], 2: [0, 1]}


def test_protecting_as_many_experts_as_are_kept(synthetic_store):
    """Two protected experts with keep 2 is possible: the layer keeps exactly them (its two least routed)."""
    path, _ = synthetic_store
    plan = build_plan(path, "m", "frequency", {"code": 1.0}, keep=2, protected={1: [1, 6]})
    assert plan.kept == {1: [1, 6], 2: [2, 7]}
    with pytest.raises(MoeVizError, match="3 protected experts in one layer/group but only 2 are kept there"):
        build_plan(path, "m", "frequency", {"code": 1.0}, keep=2, protected={1: [1, 3, 6]})


@pytest.mark.parametrize("constraints, num_experts, expected", [
    # 16 experts in 4 groups: K a multiple of 4, K/4 >= 2 per group, topk_group·K/4 >= top-k
    (RouterConstraints(top_k=2, n_group=4, topk_group=2), 16, [8, 12, 16]),  # K = 4: 1 per group is too few
    (RouterConstraints(top_k=6, n_group=4, topk_group=2), 16, [12, 16]),  # K = 8: 2 groups of 2 reach only 4 < 6
    (RouterConstraints(top_k=3), 5, [3, 4, 5]),
])
def test_valid_keeps_of_group_limited_routers(constraints, num_experts, expected):
    assert constraints.valid_keeps(num_experts) == expected


def test_impossible_keep_names_the_nearest_valid_counts_on_both_sides():
    """Valid keeps of 8 experts in 2 groups are 4, 6, 8: keep 7 lies between 6 and 8 (not 4 and 8)."""
    from moe_viz.prune.plan import check_keep

    with pytest.raises(MoeVizError, match=r"nearest valid sparsities: 0.25 \(keep 6\), 0 \(keep 8\);"):
        check_keep(7, 8, RouterConstraints(top_k=2, n_group=2, topk_group=1))


def test_plans_and_previews_use_the_newest_complete_run_of_a_domain(synthetic_store):
    """A second code run (other settings, so both are kept) with other statistics: the plan takes it, not the older one."""
    path, ids = synthetic_store
    newer = _write_run(path, "code", seed=4)  # routed (e*7 + 12 + layer) % 11
    assert store.list_runs(path).run_id.iloc[0] == newer
    plan = build_plan(path, "m", "frequency", {"code": 1.0}, keep=2)
    assert plan.run_ids == {"code": newer}
    for layer in (1, 2):
        routed = [(e * 7 + 4 * 3 + layer) % 11 for e in range(E)]
        assert plan.kept[layer] == sorted(sorted(range(E), key=lambda e: (-routed[e], e))[:2])
    table = preview(plan, path, ["code"]).set_index("layer")
    for layer in (1, 2):
        routed = [(e * 7 + 4 * 3 + layer) % 11 for e in range(E)]
        assert table.loc[layer, "routed_share_lost"] == pytest.approx(
            sum(routed[e] for e in plan.dropped[layer]) / sum(routed), rel=1e-12)


def test_lowered_top_k_allows_keeping_fewer_experts(synthetic_store):
    """With --top-k 1 a layer may keep a single expert (below the model's top-k 2)."""
    path, _ = synthetic_store
    plan = build_plan(path, "m", "frequency", {"code": 1.0}, keep=1, top_k=1)
    assert plan.kept == {1: [4], 2: [7]} and plan.top_k == 1
    with pytest.raises(MoeVizError, match="fewer than top-k 2"):
        build_plan(path, "m", "frequency", {"code": 1.0}, keep=1)


def test_router_constraints_take_the_larger_of_observed_and_configured_top_k():
    config = DeepseekV3Config(n_routed_experts=E, num_experts_per_tok=2, n_group=2, topk_group=1)
    assert RouterConstraints.from_config(config, 3).top_k == 3
    assert RouterConstraints.from_config(config, 1).top_k == 2


def test_random_criterion_follows_the_documented_seeding():
    """docs/METRICS.md: U(0,1) from numpy.random.default_rng([seed, layer·1000003 + expert])."""
    import numpy as np

    stats = pd.DataFrame({"layer": [2, 2, 5, 5], "expert": [0, 1, 0, 1], "routed_tokens": [3, 1, 4, 1]})
    got = criteria.score(stats, "random", seed=7).set_index(["layer", "expert"]).score
    for layer, expert in got.index:
        assert got[(layer, expert)] == np.random.default_rng([7, layer * 1000003 + expert]).random()
    assert got[(2, 0)] != got[(5, 0)]  # the same expert index in another layer gets its own draw


def test_a_single_domain_mix_keeps_raw_scores():
    """docs/METRICS.md: a single domain uses raw scores (no per-layer normalisation, no weight)."""
    scores = criteria.score(STATS, "gate_mass")
    mixed = criteria.mixed_scores({"a": scores}, {"a": 0.5})
    assert mixed.score.tolist() == [4.0, 3.0, 3.0, 0.0]


def test_global_ties_in_share_go_to_the_lower_layer_then_the_lower_expert(store_path):
    """Both layers have shares 0.5, 0.2, 0.2, 0.1 (from different raw totals). Keeping 3 of 8: each layer's
    top-1, then the four-way tie at 0.2 goes to layer 1 (lower layer), expert 1 (lower index)."""
    _write_stats(store_path, "code", {1: {"routed_tokens": [5, 2, 2, 1]}, 2: {"routed_tokens": [10, 4, 4, 2]}})
    plan = build_plan(store_path, "m", "frequency", {"code": 1.0}, sparsity=0.625, scope="global")
    assert plan.kept == {1: [0, 1], 2: [0]}


def test_global_plan_over_layers_with_different_expert_counts(store_path):
    """4 + 6 experts, s = 0.5: 5 kept in all. Shares: layer 1 .4 .3 .2 .1; layer 2 .3 .25 .2 .15 .05 .05.
    Top-1 of each, then 1:1 (.3), 2:1 (.25), and the tie at .2 to layer 1. Sparsity is over all 10 experts."""
    _write_stats(store_path, "code", {1: {"routed_tokens": [4, 3, 2, 1]}, 2: {"routed_tokens": [6, 5, 4, 3, 1, 1]}})
    plan = build_plan(store_path, "m", "frequency", {"code": 1.0}, sparsity=0.5, scope="global")
    assert plan.num_experts == {1: 4, 2: 6}
    assert plan.kept == {1: [0, 1, 2], 2: [0, 1]}
    assert plan.dropped == {1: [3], 2: [2, 3, 4, 5]}
    assert plan.sparsity == 0.5
    with pytest.raises(MoeVizError, match="different expert counts: use --scope global"):
        build_plan(store_path, "m", "frequency", {"code": 1.0}, sparsity=0.5)


def test_sparsity_on_a_half_rounds_to_even(synthetic_store):
    """s·E = 2.5 (s = 0.3125 of 8) removes 2, as docs/METRICS.md says (Python's round); 0.4375·8 = 3.5 removes 4."""
    path, _ = synthetic_store
    assert build_plan(path, "m", "frequency", {"code": 1.0}, sparsity=0.3125).kept == {
        layer: sorted(order[:6]) for layer, order in CODE_ORDER.items()}
    assert build_plan(path, "m", "frequency", {"code": 1.0}, sparsity=0.4375).kept == {
        layer: sorted(order[:4]) for layer, order in CODE_ORDER.items()}
