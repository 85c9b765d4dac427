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
