import itertools
import math

import numpy as np
import pandas as pd
import pytest

from moe_viz.domain_stats import mutual_information, random_jaccard, specific_experts, topk_jaccard


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
