"""Every number the dashboard derives from the store, against independent DuckDB SQL on that store.

The store is written here from a simulated router (token by token, the definitions of
docs/METRICS.md), so every column is consistent but no two statistics are proportional:
criteria that differ only in a normaliser (ean_mean vs ean_sum, reap vs weighted_ean,
soft_count vs frequency) give different rankings. The domains have very different token
totals, the MoE layers are 1, 3 and 4 (not 0..L-1), and each layer of a run has its own
token count (real captures have one count per run; differing here makes a join on the
wrong layer visible). Some experts are never routed but keep router probability mass.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from moe_viz.analysis import tables, criteria
from moe_viz import store
from moe_viz.prune.plan import build_plan, preview
from sql_reference import METRIC_SQL, metric_matrix, metric_table, mixed_ranks, ranks, share_lost, spearman, sql
from sql_reference import partners as sql_partners, router_health as sql_router_health

ROOT = Path(__file__).resolve().parent.parent
MODEL = "synthetic-moe"
LAYERS = (1, 3, 4)
E, K = 7, 3  # k = 3: an expert's partner tokens add up to 2·N_e, not N_e
TOKENS = {"code": 230, "math": 23, "prose": 1100}  # per run; layer l gets TOKENS + 7·l
DEAD = {"code": 5, "math": 0, "prose": 3}  # forced never-routed in layer 3 (the simulation leaves a few more)
# expert output norms per (domain, layer) span 100x, so normalising a domain over all layers instead of per layer
# changes how domains weigh against each other in a mix
NORM_SCALE = {"code": {1: 1.0, 3: 1.0, 4: 1.0}, "math": {1: 1.0, 3: 0.1, 4: 10.0}, "prose": {1: 10.0, 3: 1.0, 4: 0.1}}


def _simulate(domain: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    experts, layers, pairs = [], [], []
    for layer in LAYERS:
        T = TOKENS[domain] + 7 * layer
        bias = rng.normal(0.0, 1.2, E)
        z = bias + rng.normal(0.0, 1.0, (T, E))
        if layer == 3:
            z[:, DEAD[domain]] -= 40.0  # never in the top-k, yet softmax > 0
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        chosen = np.argsort(-p, axis=1, kind="stable")[:, :K]  # S_t, top1 first
        picked = np.take_along_axis(p, chosen, axis=1)
        gate = picked / picked.sum(axis=1, keepdims=True)  # renormalised top-k softmax
        scale = rng.uniform(0.5, 4.0, E) * NORM_SCALE[domain][layer]
        norm = scale[chosen] * rng.lognormal(0.0, 0.4, (T, K))  # ‖f_e(x_t)‖
        shift = rng.uniform(0.0, 0.3, T)  # 1 − cos(h, h + r)
        rows = []
        for e in range(E):
            hit = chosen == e
            top1 = chosen[:, 0] == e
            n = norm[hit]
            rows.append({"layer": layer, "expert": e, "routed_tokens": int(hit.sum()), "top1_tokens": int(top1.sum()),
                         "top1_prob_sum": float(p[top1, e].sum()), "gate_sum": float(gate[hit].sum()),
                         "prob_sum": float(p[:, e].sum()), "ean_sum": float(n.sum()), "ean_sq_sum": float((n ** 2).sum()),
                         "ean_max": float(n.max(initial=0.0)), "reap_sum": float((gate[hit] * n).sum()),
                         "contribution_sum": float((gate * norm * shift[:, None])[hit].sum()),
                         # a measured causal score (moe-viz importance), distinct from every routing statistic
                         "recon_error": float((gate[hit] * n ** 2).sum() / T)})
        experts += rows
        entropy = float(-(p * np.log(p)).sum(axis=1).mean())
        layers.append({"layer": layer, "module": f"model.layers.{layer}.mlp", "tokens": T, "num_experts": E,
                       "top_k": K, "router_score": "softmax", "entropy_mean": entropy})
        both = np.sort(chosen, axis=1)
        together = np.concatenate([both[:, [i, j]] for i, j in itertools.combinations(range(K), 2)])
        for (a, b), count in zip(*np.unique(together, axis=0, return_counts=True)):
            pairs.append({"layer": layer, "expert_a": int(a), "expert_b": int(b), "tokens": int(count)})
    coact = pd.DataFrame(pairs).astype({"layer": "int32", "expert_a": "int32", "expert_b": "int32", "tokens": "int64"})
    return pd.DataFrame(experts), pd.DataFrame(layers), coact


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("analysis_sql") / "store.duckdb"
    ids = {}
    for seed, domain in enumerate(TOKENS):
        experts, layers, coact = _simulate(domain, seed)
        run_id = store.begin_run(path, model_id=MODEL, model_fingerprint="fp", model_type="qwen3_moe", domain=domain,
                                 source=f"builtin:{domain}", settings={"seed": seed}, tool_version="test")
        store.complete_run(path, run_id, expert_stats=experts, layer_stats=layers, coactivation=coact,
                           tokens=TOKENS[domain], sequences=1)
        ids[domain] = run_id
    return path, ids


def test_the_store_has_what_the_other_tests_rely_on(synthetic):
    path, ids = synthetic
    per_layer = sql(path, """SELECT r.domain, l.layer, l.tokens, sum(s.routed_tokens) AS routed, sum(s.top1_tokens) AS top1,
                                    count(*) FILTER (WHERE s.routed_tokens = 0) AS dead
                             FROM layer_stats l JOIN expert_stats s USING (run_id, layer) JOIN runs r USING (run_id)
                             GROUP BY ALL ORDER BY ALL""")
    assert (per_layer.routed == K * per_layer.tokens).all() and (per_layer.top1 == per_layer.tokens).all()
    assert per_layer[per_layer.layer == 3].dead.tolist() == [1, 1, 1] and per_layer.dead.sum() < 9
    assert sorted(per_layer.layer.unique()) == list(LAYERS)
    assert per_layer.groupby("domain").tokens.sum().max() > 20 * per_layer.groupby("domain").tokens.sum().min()
    # no two metrics coincide on this store, so a criterion computed by a neighbour's formula shows
    values = {m: metric_table(path, m, ids.values()).value.to_numpy() for m in METRIC_SQL}
    for a, b in itertools.combinations(values, 2):
        assert not np.allclose(values[a], values[b], rtol=1e-6), (a, b)
    # and the variants that differ by a normaliser rank experts differently somewhere
    for a, b in [("ean_mean", "ean_sum"), ("reap", "weighted_ean"), ("soft_count", "frequency"),
                 ("reap", "ean_mean"), ("gate_mass", "frequency"), ("easy_ep", "weighted_ean"), ("nllb", "frequency")]:
        ra = pd.concat([ranks(metric_table(path, a, [i]))["rank"] for i in ids.values()])
        rb = pd.concat([ranks(metric_table(path, b, [i]))["rank"] for i in ids.values()])
        assert (ra != rb).any(), (a, b)


def test_every_heatmap_metric_has_an_sql_expectation():
    assert set(METRIC_SQL) == set(tables.METRICS)
    assert set(tables.METRICS) == ({"frequency_share", "top1_share", "soft_count_mean", "gate_mass_mean", "ean_max"}
                                     | set(criteria.CRITERIA) - {"random"})


@pytest.mark.parametrize("metric", sorted(tables.METRICS))
def test_metric_values_match_sql_for_every_domain_and_layer(synthetic, metric):
    """What the heatmap page plots: metric_values on only the columns metric_columns names, as the page queries them."""
    path, ids = synthetic
    run_ids = list(ids.values())
    stats = store.expert_stats(path, run_ids, tables.metric_columns(metric))
    values = tables.metric_values(stats, store.layer_stats(path, run_ids), metric)
    expected = metric_table(path, metric, run_ids)
    got = values.assign(domain=values.domain.astype(str)).merge(
        expected, on=["domain", "layer", "expert"], how="outer", suffixes=("", "_sql"), indicator=True)
    assert (got._merge == "both").all() and len(got) == len(TOKENS) * len(LAYERS) * E
    np.testing.assert_allclose(got.value.to_numpy(float), got.value_sql.to_numpy(float), rtol=1e-12, atol=1e-15)
    for domain, run_id in ids.items():  # the per-domain matrix the page draws
        matrix = tables.metric_matrix(values, domain)
        reference = metric_matrix(path, metric, run_id)
        assert matrix.index.tolist() == list(LAYERS) and matrix.columns.tolist() == list(range(E))
        np.testing.assert_allclose(matrix.to_numpy(float), reference.to_numpy(float), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(set(criteria.CRITERIA) - {"random"}))
def test_criterion_scores_and_ranks_of_several_runs_match_sql(synthetic, name):
    """criteria.score/rank on a frame holding all runs (nllb's total is per run and layer, not per layer)."""
    path, ids = synthetic
    stats = store.expert_stats(path, list(ids.values()))
    ranked = criteria.rank(criteria.score(stats, name))
    expected = metric_table(path, name, ids.values())
    for domain, run_id in ids.items():
        mine = ranked[ranked.run_id == run_id].reset_index(drop=True)
        reference = ranks(expected[expected.run_id == run_id])
        assert mine[["layer", "expert"]].values.tolist() == reference[["layer", "expert"]].values.tolist()
        np.testing.assert_allclose(mine.score.to_numpy(), reference.value.to_numpy(), rtol=1e-12, atol=1e-15)
        assert mine.routed.tolist() == reference.routed.tolist()
        assert mine["rank"].tolist() == reference["rank"].tolist(), (name, domain)


@pytest.mark.parametrize("name", sorted(set(criteria.CRITERIA) - {"random"}))
def test_uniform_plan_on_a_mix_of_unequal_domains_matches_sql(synthetic, name):
    path, ids = synthetic
    weights = {"math": 1.0, "prose": 0.3}  # 23-token math against 1100-token prose: shares, not raw sums, are mixed
    reference = mixed_ranks(path, name, ids, weights)
    stats = store.expert_stats(path, [ids["math"], ids["prose"]])
    per_domain = {d: criteria.score(stats[stats.domain == d], name).drop(columns=["domain", "run_id"]) for d in weights}
    mixed = criteria.mixed_scores(per_domain, weights).sort_values(["layer", "expert"]).reset_index(drop=True)
    assert mixed[["layer", "expert"]].values.tolist() == reference[["layer", "expert"]].values.tolist()
    np.testing.assert_allclose(mixed.score.to_numpy(float), reference.value.to_numpy(float), rtol=1e-12, atol=1e-15)
    assert mixed.routed.tolist() == reference.routed.tolist()  # routed if any domain routed it
    for keep in (3, 6):
        plan = build_plan(path, MODEL, name, weights, keep=keep)
        expected = {layer: sorted(g[g["rank"] < keep].expert.tolist()) for layer, g in reference.groupby("layer")}
        assert plan.kept == expected, keep


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
@pytest.mark.parametrize("name, weights", [
    ("frequency", {"code": 0.5, "math": 1.0}), ("weighted_ean", {"code": 0.5, "math": 1.0}),
    ("reap", {"code": 0.5, "math": 1.0}), ("nllb", {"code": 0.5, "math": 1.0}), ("easy_ep", {"code": 0.5, "math": 1.0}),
    ("ean_sum", {"prose": 1.0}), ("reap", {"math": 1.0}),  # one domain: raw scores, normalised per layer only here
])
def test_global_plan_matches_sql(synthetic, name, weights, sparsity):
    """docs/METRICS.md plans, global: scores normalised per layer, one ranking across layers, top-k per layer kept."""
    path, ids = synthetic
    plan = build_plan(path, MODEL, name, weights, sparsity=sparsity, scope="global")
    reference = mixed_ranks(path, name, ids, weights)  # one domain: its raw scores
    reference["share"] = reference.value / reference.groupby("layer").value.transform("sum")
    reference["must"] = reference["rank"] < K
    order = sorted(reference.itertuples(index=False), key=lambda r: (not r.must, not r.routed, -r.share, r.layer, r.expert))
    total = E * len(LAYERS)
    chosen = order[:max(total - round(sparsity * total), int(reference.must.sum()))]
    expected = {layer: sorted(r.expert for r in chosen if r.layer == layer) for layer in LAYERS}
    assert plan.kept == expected
    assert sum(map(len, expected.values())) == total - round(sparsity * total) > K * len(LAYERS)


def test_mixing_raw_scores_would_choose_differently(synthetic):
    """The mix test above can fail: mixing raw sums (prose dominates) keeps other experts for some criterion."""
    path, ids = synthetic
    differs = []
    for name in sorted(set(criteria.CRITERIA) - {"random"}):
        table = metric_table(path, name, [ids["math"], ids["prose"]])
        table["value"] = table.value * table.domain.map({"math": 1.0, "prose": 0.3})
        raw = ranks(table.groupby(["layer", "expert"], as_index=False).agg(value=("value", "sum"), routed=("routed", "any")))
        mixed = mixed_ranks(path, name, ids, {"math": 1.0, "prose": 0.3})
        differs.append(((raw["rank"] < 3) != (mixed["rank"] < 3)).any())
    assert sum(differs) >= 3, differs


def test_preview_matches_sql_for_every_domain_and_layer(synthetic):
    path, ids = synthetic
    plan = build_plan(path, MODEL, "reap", {"code": 1.0}, keep=4)
    table = preview(plan, path).set_index(["domain", "layer"])
    expected = share_lost(path, ids.values(), plan.dropped)
    assert len(table) == len(expected) == len(TOKENS) * len(LAYERS)
    for row in expected.itertuples():
        assert table.loc[(row.domain, row.layer), "routed_share_lost"] == pytest.approx(row.routed_share_lost, rel=1e-12)
        assert table.loc[(row.domain, row.layer), "reap_share_lost"] == pytest.approx(row.reap_share_lost, rel=1e-12)


def test_router_health_matches_sql(synthetic):
    path, ids = synthetic
    run_ids = list(ids.values())
    health = tables.router_health(store.expert_stats(path, run_ids, ["routed_tokens"]), store.layer_stats(path, run_ids))
    expected = sql_router_health(path)
    merged = health.assign(domain=health.domain.astype(str)).merge(expected, on=["domain", "layer"])
    assert len(merged) == len(expected) == len(health) == len(TOKENS) * len(LAYERS)
    np.testing.assert_allclose(merged.load_imbalance, merged.imbalance, rtol=1e-12)
    np.testing.assert_allclose(merged.entropy_normalised.to_numpy(float), merged.entropy.to_numpy(float), rtol=1e-12)
    assert (merged.never_routed == merged.never).all()


def test_criteria_agreement_matches_independent_ranks(synthetic):
    path, ids = synthetic
    names = ["frequency", "soft_count", "ean_mean", "reap", "nllb"]
    k = 2
    table = tables.criteria_agreement(store.expert_stats(path, [ids["prose"]]), names, k)
    ranked = {n: ranks(metric_table(path, n, [ids["prose"]])) for n in names}
    assert len(table) == len(LAYERS) * math.comb(len(names), 2)
    for row in table.itertuples():
        a = ranked[row.criterion_a][ranked[row.criterion_a].layer == row.layer]["rank"].to_numpy()
        b = ranked[row.criterion_b][ranked[row.criterion_b].layer == row.layer]["rank"].to_numpy()
        assert row.spearman == pytest.approx(spearman(a, b), abs=1e-12)
        assert row.topk_overlap == pytest.approx(len(set(np.flatnonzero(a < k)) & set(np.flatnonzero(b < k))) / k)


def test_expert_profile_and_partners_match_sql(synthetic):
    path, ids = synthetic
    layer, expert = 4, 2
    stats = store.expert_stats(path, list(ids.values()), layer=layer)
    profile = tables.expert_profile(stats, store.layer_stats(path, list(ids.values())), layer, expert).set_index("domain")
    share = metric_table(path, "frequency_share", ids.values())
    for domain in TOKENS:
        row = share[(share.domain == domain) & (share.layer == layer) & (share.expert == expert)]
        assert profile.loc[domain, "frequency_share"] == pytest.approx(float(row.value.iloc[0]), rel=1e-12)
        for name in sorted(set(criteria.CRITERIA) - {"random"}):
            reference = ranks(metric_table(path, name, [ids[domain]]))
            mine = reference[(reference.layer == layer) & (reference.expert == expert)]
            assert profile.loc[domain, f"rank:{name}"] == int(mine["rank"].iloc[0]), (domain, name)
            assert profile.loc[domain, f"score:{name}"] == pytest.approx(float(mine.value.iloc[0]), rel=1e-12)
    routed = int(profile.loc["math", "routed_tokens"])
    partners = tables.coactivation_partners(store.coactivation(path, ids["math"], layer), routed, expert)
    expected = sql_partners(path, ids["math"], layer, expert)
    assert partners.partner.tolist() == expected.partner.tolist() and partners.tokens.tolist() == expected.tokens.tolist()
    np.testing.assert_allclose(partners.p_given_expert, expected.p, rtol=1e-12)


# -- the Heatmaps page itself ---------------------------------------------------------------------------------


def test_heatmap_page_plots_sql_values_in_every_view(synthetic, monkeypatch):
    from test_ui import SIX_DIGITS, _grid, _heatmap

    path, ids = synthetic
    monkeypatch.setattr("sys.argv", ["app.py", "--store", str(path)])
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert list(at.selectbox(key="hm_metric").options) == [
        f"{m} — {tables.METRICS[m]}" for m in tables.METRICS]  # every metric offered ...
    at.selectbox(key="hm_domain").set_value("math").run()
    for metric in tables.METRICS:  # ... plotted as SQL computes it, on the domain with the fewest tokens
        at.selectbox(key="hm_metric").set_value(metric).run()
        _, frame = _heatmap(at)
        expected = metric_matrix(path, metric, ids["math"]).to_numpy()
        np.testing.assert_allclose(_grid(frame, "colour"), expected, **SIX_DIGITS, err_msg=metric)
        np.testing.assert_allclose(_grid(frame, "value"), expected, **SIX_DIGITS, err_msg=metric)
        assert sorted(frame.layer.unique()) == list(LAYERS) and sorted(frame.expert.unique()) == list(range(E))

    at.selectbox(key="hm_metric").set_value("easy_ep").run()
    at.selectbox(key="hm_layer").set_value(3).run()  # the picked cell's value: the never-routed expert of math
    at.selectbox(key="hm_expert").set_value(DEAD["math"]).run()
    assert at.metric[0].value == f"{metric_matrix(path, 'easy_ep', ids['math']).loc[3, DEAD['math']]:.6g}"
    at.selectbox(key="hm_layer").set_value(4).run()
    at.selectbox(key="hm_expert").set_value(1).run()
    assert at.metric[0].value == f"{metric_matrix(path, 'easy_ep', ids['math']).loc[4, 1]:.6g}"

    at.radio(key="hm_scale").set_value("log").run()
    for metric in ("frequency_share", "reap", "nllb"):  # zeros (never routed) get the floor m/10
        at.selectbox(key="hm_metric").set_value(metric).run()
        _, frame = _heatmap(at)
        values = metric_matrix(path, metric, ids["math"]).to_numpy()
        assert (values == 0).any()
        floor = values[values > 0].min() / 10
        np.testing.assert_allclose(_grid(frame, "colour"), np.log10(np.maximum(values, floor)), **SIX_DIGITS,
                                   err_msg=metric)
        np.testing.assert_allclose(_grid(frame, "value"), values, **SIX_DIGITS)

    at.radio(key="hm_mode").set_value("Difference A − B").run()
    units = {"frequency_share": "fraction of the layer's k·T slots", "soft_count_mean": "router probability per token",
             "nllb": "top-1 share·e^(mean top-1 probability)", "ean_mean": "‖f_e(x)‖, mean over routed tokens"}
    for a, b in [("math", "prose"), ("prose", "code")]:
        at.selectbox(key="hm_domain").set_value(a).run()
        at.selectbox(key="hm_domain_b").set_value(b).run()
        for metric in ("frequency_share", "soft_count_mean", "nllb", "ean_mean"):
            at.selectbox(key="hm_metric").set_value(metric).run()
            spec, frame = _heatmap(at)
            side_a, side_b = metric_matrix(path, metric, ids[a]).to_numpy(), metric_matrix(path, metric, ids[b]).to_numpy()
            expected = side_a - side_b
            np.testing.assert_allclose(_grid(frame, "colour"), expected, **SIX_DIGITS, err_msg=(metric, a, b))
            # A, B and A − B for every cell, all three in the hover
            np.testing.assert_allclose(_grid(frame, "a"), side_a, **SIX_DIGITS)
            np.testing.assert_allclose(_grid(frame, "b"), side_b, **SIX_DIGITS)
            np.testing.assert_allclose(_grid(frame, "value"), expected, **SIX_DIGITS)
            _, data = _heatmap(at, raw=True)  # the hover (the datum) names A, B and A − B
            assert list(data.columns) == ["layer", "expert", f"A {a}", f"B {b}", "A minus B", "unit"]
            assert set(data.unit) == {units[metric]}
            scale = spec["encoding"]["color"]["scale"]
            limit = np.abs(expected).max()
            assert scale["domainMid"] == 0 and scale["domain"] == pytest.approx([-limit, limit], rel=1e-12)
            assert spec["encoding"]["color"]["title"] == [f"{metric}, A − B", f"({units[metric]})"]


def test_coactivation_partners_ties_go_to_the_lower_partner():
    """Expert 2 (routed 8 times) shares 3 tokens with each of 0, 4 and 5 and 1 with 1: ties in tokens to the lower id."""
    pairs = pd.DataFrame({"expert_a": [2, 0, 1, 2, 1, 3], "expert_b": [5, 2, 2, 4, 3, 4], "tokens": [3, 3, 1, 3, 9, 2]})
    out = tables.coactivation_partners(pairs, 8, 2)
    assert out.partner.tolist() == [0, 4, 5, 1]
    assert out.tokens.tolist() == [3, 3, 3, 1]
    assert out.p_given_expert.tolist() == [3 / 8, 3 / 8, 3 / 8, 1 / 8]
