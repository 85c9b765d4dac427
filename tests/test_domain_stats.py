import itertools
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from moe_viz.analysis.domain_stats import domain_shares, mutual_information, random_jaccard, specific_experts, topk_jaccard


def _stats(counts: dict[str, list[int]], layer=0):
    rows = [{"domain": d, "layer": layer, "expert": e, "routed_tokens": n} for d, c in counts.items() for e, n in enumerate(c)]
    return pd.DataFrame(rows)


def test_mutual_information_by_hand():
    stats = _stats({"a": [3, 1, 0], "b": [1, 1, 2]})
    pa, pb = np.array([0.75, 0.25, 0.0]), np.array([0.25, 0.25, 0.5])
    pe = (pa + pb) / 2
    expected = 0.5 * sum(p * math.log(p / q) for p, q in zip(pa, pe) if p > 0) + 0.5 * sum(
        p * math.log(p / q) for p, q in zip(pb, pe) if p > 0)
    assert mutual_information(stats)[0] == pytest.approx(expected)


def test_identical_domains_have_zero_information():
    assert mutual_information(_stats({"a": [2, 2, 4], "b": [1, 1, 2]}))[0] == pytest.approx(0.0)


def test_specific_experts_use_lift_over_other_domains():
    stats = _stats({"a": [5, 5, 0, 0], "b": [5, 0, 5, 0], "c": [5, 0, 0, 5]})
    assert specific_experts(stats, "a", 1) == {0: [1]}
    assert specific_experts(stats, "b", 2) == {0: [0, 2]}  # lift ties at 0 break to the lower index


def test_topk_jaccard():
    scores = pd.DataFrame({"domain": ["a"] * 4 + ["b"] * 4, "layer": 0, "expert": [0, 1, 2, 3] * 2,
                           "score": [4, 3, 2, 1, 1, 4, 3, 2]})
    row = topk_jaccard(scores, 2).iloc[0]
    assert (row.domain_a, row.domain_b) == ("a", "b") and row.jaccard == pytest.approx(1 / 3)  # {0,1} vs {1,2}


@pytest.mark.parametrize("E, k", [(8, 2), (8, 4), (16, 3), (6, 5)])
def test_random_jaccard_matches_enumeration(E, k):
    subsets = list(itertools.combinations(range(E), k))
    first = set(subsets[0])  # by symmetry one fixed set suffices
    exact = sum(len(first & set(s)) / len(first | set(s)) for s in subsets) / len(subsets)
    assert random_jaccard(E, k) == pytest.approx(exact)


# -- unequal domain totals, several layers, asymmetric routing ----------------------------------------------
#
# Every expectation below is computed here from the joint count table N[d][layer][e] with plain Python
# (math.log, Fractions for the orderings), following docs/METRICS.md "Domain statistics". The domains'
# token totals differ by two orders of magnitude and the layers are not 0..L-1, so normalising by the
# wrong total (grand total, per-expert total, token-weighted p(d)), averaging over the wrong axis, or
# attributing a layer's value to its neighbour gives a different number.

COUNTS = {  # domain -> layer -> routed tokens per expert (E = 5); expert 4 is never routed by "math" in layer 3
    "code": {1: [40, 3, 9, 0, 28], 3: [20, 22, 18, 21, 19]},
    "math": {1: [1, 6, 2, 5, 0], 3: [7, 2, 3, 2, 0]},
    "prose": {1: [300, 250, 90, 600, 160], 3: [90, 110, 100, 95, 105]},
}


def _table(counts=COUNTS, shuffle_seed=0):
    rows = [{"domain": d, "layer": layer, "expert": e, "routed_tokens": n}
            for d, layers in counts.items() for layer, c in layers.items() for e, n in enumerate(c)]
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)  # order must not matter


def _mi_by_hand(counts, layer):
    domains = sorted(counts)
    cond = {d: [n / sum(counts[d][layer]) for n in counts[d][layer]] for d in domains}  # p(e | d)
    num_experts = len(cond[domains[0]])
    p_d = 1 / len(domains)
    p_e = [sum(cond[d][e] for d in domains) * p_d for e in range(num_experts)]
    total = 0.0
    for d in domains:
        for e in range(num_experts):
            joint = p_d * cond[d][e]  # p(d, e)
            if joint > 0:
                total += joint * math.log(joint / (p_d * p_e[e]))
    return total


def test_mutual_information_with_unequal_domain_totals_matches_the_joint_table():
    totals = {d: {layer: sum(c) for layer, c in layers.items()} for d, layers in COUNTS.items()}
    assert totals["prose"][1] > 50 * totals["math"][1]  # the case the equal-totals test could not see
    mi = mutual_information(_table())
    assert mi.index.tolist() == [1, 3]
    for layer in (1, 3):
        assert mi[layer] == pytest.approx(_mi_by_hand(COUNTS, layer), rel=1e-12, abs=1e-15)
    assert abs(mi[1] - mi[3]) > 0.05  # a layer swap would show


def test_mutual_information_weights_domains_equally_not_by_tokens():
    """Scaling one domain's counts changes nothing; the token-weighted variant (p(d) ∝ tokens) would move."""
    scaled = {d: {layer: [n * (37 if d == "math" else 1) for n in c] for layer, c in layers.items()}
              for d, layers in COUNTS.items()}
    before, after = mutual_information(_table()), mutual_information(_table(scaled, shuffle_seed=1))
    np.testing.assert_allclose(after.to_numpy(), before.to_numpy(), rtol=1e-12)
    # the token-weighted mutual information really differs here, so the check above has teeth
    joint = np.array([[COUNTS[d][1] for d in sorted(COUNTS)]], dtype=float)[0]
    p = joint / joint.sum()
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    weighted = float(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / outer), 0.0)))
    assert abs(weighted - before[1]) > 0.01


def test_mutual_information_of_disjoint_domains_is_log_of_domain_count():
    """Each domain routes to its own experts, with very different totals: I = ln |D| exactly (nats)."""
    counts = {"a": {0: [5, 0, 0, 0]}, "b": {0: [0, 900, 100, 0]}, "c": {0: [0, 0, 0, 3]}}
    assert mutual_information(_table(counts))[0] == pytest.approx(math.log(3), rel=1e-12)


def _shares_by_hand(counts):
    return {(d, layer): [Fraction(n, sum(c)) for n in c] for d, layers in counts.items() for layer, c in layers.items()}


def test_domain_shares_normalise_within_each_domain_and_layer():
    shares = domain_shares(_table()).set_index(["domain", "layer", "expert"]).share
    for (d, layer), expected in _shares_by_hand(COUNTS).items():
        for e, value in enumerate(expected):
            assert shares[(d, layer, e)] == pytest.approx(float(value), rel=1e-15, abs=0)


def _specific_by_hand(counts, domain, count):
    shares = _shares_by_hand(counts)
    out = {}
    for layer in sorted(next(iter(counts.values()))):
        others = [d for d in counts if d != domain]
        lift = [shares[(domain, layer)][e] - sum(shares[(o, layer)][e] for o in others) / len(others)
                for e in range(len(shares[(domain, layer)]))]
        out[layer] = sorted(sorted(range(len(lift)), key=lambda e: (-lift[e], e))[:count])
    return out


@pytest.mark.parametrize("domain", sorted(COUNTS))
@pytest.mark.parametrize("count", [1, 2, 3])
def test_specific_experts_use_shares_with_unequal_totals(domain, count):
    expected = _specific_by_hand(COUNTS, domain, count)
    assert specific_experts(_table(), domain, count) == expected


def test_specific_experts_differ_from_a_raw_count_ranking():
    """With these totals the share-based choice is not what raw counts would give (so the test above can fail)."""
    raw = {layer: sorted(sorted(range(5), key=lambda e: (-COUNTS["code"][layer][e] + sum(
        COUNTS[o][layer][e] for o in ("math", "prose")) / 2, e))[:2]) for layer in (1, 3)}
    assert _specific_by_hand(COUNTS, "code", 2) != raw


SCORES = {  # domain -> layer -> score per expert (E = 7), with ties inside and across the k boundary
    "code": {2: [0.5, 0.9, 0.9, 0.1, 0.5, 0.5, 0.0], 5: [3.0, 1.0, 2.0, 2.0, 2.0, 0.0, 7.0]},
    "math": {2: [0.2, 0.2, 0.2, 0.2, 0.8, 0.1, 0.8], 5: [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]},
    "prose": {2: [9.0, 1.0, 0.9, 0.9, 0.9, 8.0, 0.0], 5: [0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 6.0]},
}


def _topk_by_hand(scores, domain, layer, k):
    values = scores[domain][layer]
    return set(sorted(range(len(values)), key=lambda e: (-values[e], e))[:k])  # ties to the lower index


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6])
def test_topk_jaccard_with_ties_and_several_layers_matches_sets_by_hand(k):
    rows = [{"domain": d, "layer": layer, "expert": e, "score": s}
            for d, layers in SCORES.items() for layer, values in layers.items() for e, s in enumerate(values)]
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=k).reset_index(drop=True)
    table = topk_jaccard(frame, k)
    expected = []
    for layer in (2, 5):
        for a, b in itertools.combinations(sorted(SCORES), 2):
            A, B = _topk_by_hand(SCORES, a, layer, k), _topk_by_hand(SCORES, b, layer, k)
            expected.append((layer, a, b, len(A & B) / len(A | B)))
    got = list(table[["layer", "domain_a", "domain_b", "jaccard"]].itertuples(index=False, name=None))
    assert [g[:3] for g in got] == [x[:3] for x in expected]
    for g, x in zip(got, expected):
        assert g[3] == pytest.approx(x[3], rel=1e-15), (k, g, x)


def test_topk_jaccard_ties_go_to_the_lower_expert_index():
    # math layer 5 is all ties: its top-2 is {0, 1}; code's is {6, 0} -> J = 1/3; prose's {6, 1} -> J = 1/3
    rows = [{"domain": d, "layer": 5, "expert": e, "score": s}
            for d in SCORES for e, s in enumerate(SCORES[d][5])]
    table = topk_jaccard(pd.DataFrame(rows), 2).set_index(["domain_a", "domain_b"]).jaccard
    assert table[("code", "math")] == pytest.approx(1 / 3) and table[("math", "prose")] == pytest.approx(1 / 3)
    assert table[("code", "prose")] == pytest.approx(1 / 3)  # {6, 0} vs {6, 1}


def test_specific_experts_ties_below_the_top_go_to_the_lower_index():
    # b's lift: [0, -0.25, 0.5, -0.25]; the third pick is a tie between experts 1 and 3 at -0.25
    stats = _stats({"a": [5, 5, 0, 0], "b": [5, 0, 5, 0], "c": [5, 0, 0, 5]})
    assert specific_experts(stats, "b", 3) == {0: [0, 1, 2]}


def test_topk_jaccard_ignores_experts_a_layer_does_not_have():
    """Layer 0 has 3 experts, layer 1 has 5; negative scores (log-scale) in layer 0 must not lose to the
    experts layer 0 lacks. Layer 0 top-2: a {2, 1}, b {0, 1} -> 1/3. Layer 1 top-2: a {3, 4}, b {4, 0} -> 1/3."""
    rows = [("a", 0, [-3.0, -2.0, -1.0]), ("b", 0, [-0.5, -0.7, -2.0]),
            ("a", 1, [1.0, 0.5, 2.0, 5.0, 4.0]), ("b", 1, [3.0, 0.5, 2.0, 1.0, 6.0])]
    frame = pd.DataFrame([{"domain": d, "layer": layer, "expert": e, "score": s}
                          for d, layer, values in rows for e, s in enumerate(values)])
    table = topk_jaccard(frame, 2)
    assert table.layer.tolist() == [0, 1]
    assert table.jaccard.tolist() == pytest.approx([1 / 3, 1 / 3], rel=1e-15)
