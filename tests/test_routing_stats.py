"""LayerAccumulator and token_shift against plain float64 loops (formulas: docs/METRICS.md).

The inputs are built to tell plausible bugs apart: several batches of different sizes (the
work buffers grow and shrink), padding in one batch only, k = 5 of E = 23, two routed experts
tied on the router score (top-1 must be the first slot), a -inf logit, very peaky logits
(entropy near 0 beside logits of magnitude ~100), unequal gates and norms.
"""

import math

import numpy as np
import pytest
import torch

from moe_viz.capture.routing_stats import LayerAccumulator, Scratch, token_shift

E, K = 23, 5


def _batches(score_fn: str):
    g = torch.Generator().manual_seed(7)
    batches = []
    for size, scale, padded in ((37, 1.0, False), (64, 60.0, True), (5, 3.0, False)):
        logits = torch.randn(size, E, generator=g) * scale
        index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(size)])
        if size == 37:
            logits[0, index[0, 1]] = logits[0, index[0, 3]]  # tie between slots 1 and 3
            logits[0, index[0, 1]] = logits[0].max() + 1.0  # ... at the top
            logits[0, index[0, 3]] = logits[0, index[0, 1]]
            logits[1, next(e for e in range(E) if e not in index[1])] = -math.inf  # an unrouted expert
        weights = torch.rand(size, K, generator=g)
        norms = torch.rand(size, K, generator=g) * 5
        shift = torch.rand(size, generator=g) * 1.5
        valid = None
        if padded:
            valid = (torch.rand(size, generator=g) > 0.3).float()
        batches.append((logits, index, weights, norms, shift, valid))
    return batches


def _reference(batches, score_fn):
    sums = {name: np.zeros(E) for name in ("gate_sum", "prob_sum", "top1_prob_sum", "ean_sum", "ean_sq_sum",
                                            "ean_max", "reap_sum", "contribution_sum")}
    counts = {"routed_tokens": np.zeros(E, dtype=np.int64), "top1_tokens": np.zeros(E, dtype=np.int64)}
    pairs = np.zeros((E, E), dtype=np.int64)
    entropy, tokens = 0.0, 0
    for logits, index, weights, norms, shift, valid in batches:
        for t in range(logits.shape[0]):
            if valid is not None and valid[t] == 0:
                continue
            tokens += 1
            row = [float(x) for x in logits[t]]
            if score_fn == "sigmoid":
                p = [1 / (1 + math.exp(-x)) if x > -700 else 0.0 for x in row]
            elif score_fn == "sqrtsoftplus":  # sqrt(ln(1 + e^x)); ln(1 + e^x) = x + ln(1 + e^-x) for large x
                p = [math.sqrt(x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))) for x in row]
            else:
                top = max(row)
                ex = [math.exp(x - top) for x in row]
                p = [x / sum(ex) for x in ex]
            total = sum(p)
            entropy += -sum(q / total * math.log(q / total) for q in p if q > 0)
            sums["prob_sum"] += p
            chosen = [int(e) for e in index[t]]
            # The tensor code compares float32 scores, so ties are judged on the float32 values.
            p32 = {"softmax": lambda z: z.softmax(-1), "sigmoid": torch.sigmoid,
                   "sqrtsoftplus": lambda z: torch.nn.functional.softplus(z).sqrt()}[score_fn](torch.tensor(row).float())
            p32 = [float(x) for x in p32]
            best_slot = max(range(K), key=lambda j: (p32[chosen[j]], -j))
            best = chosen[best_slot]
            counts["top1_tokens"][best] += 1
            sums["top1_prob_sum"][best] += p[best]
            for j, e in enumerate(chosen):
                g, n = float(weights[t, j]), float(norms[t, j])
                counts["routed_tokens"][e] += 1
                sums["gate_sum"][e] += g
                sums["ean_sum"][e] += n
                sums["ean_sq_sum"][e] += n * n
                sums["ean_max"][e] = max(sums["ean_max"][e], n)
                sums["reap_sum"][e] += g * n
                sums["contribution_sum"][e] += g * n * float(shift[t])
                for e2 in chosen:
                    pairs[e, e2] += 1
    return sums, counts, pairs, entropy / tokens, tokens


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_accumulator_matches_float64_loops(score_fn):
    batches = _batches(score_fn)
    acc = LayerAccumulator(3, "model.layers.3.mlp", E, score_fn, torch.device("cpu"))
    scratch = Scratch()  # one set of work buffers across batches of different sizes, as in a capture
    for batch in batches:
        acc.add(*batch, scratch=scratch)
    experts, layer_row, coact = acc.to_frames()
    sums, counts, pairs, entropy, tokens = _reference(batches, score_fn)

    assert layer_row["tokens"] == tokens == 37 + 5 + int(batches[1][5].sum())
    assert layer_row["top_k"] == K and layer_row["layer"] == 3
    for name, expected in counts.items():
        assert experts[name].dtype == np.int64
        np.testing.assert_array_equal(experts[name], expected, err_msg=name)
    for name, expected in sums.items():
        np.testing.assert_allclose(experts[name], expected, rtol=1e-6, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(layer_row["entropy_mean"], entropy, rtol=1e-6)
    expected_pairs = [(a, b, pairs[a, b]) for a in range(E) for b in range(a + 1, E) if pairs[a, b] > 0]
    assert list(zip(coact.expert_a, coact.expert_b, coact.tokens)) == expected_pairs
    assert (coact.layer == 3).all()


def test_top1_tie_goes_to_the_first_slot():
    logits = torch.zeros(1, 4)
    logits[0, 2] = logits[0, 1] = 5.0
    acc = LayerAccumulator(0, "m", 4, "softmax", torch.device("cpu"))
    acc.add(logits, torch.tensor([[2, 1]]), torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1), None)
    assert acc.to_frames()[0].top1_tokens.tolist() == [0, 0, 1, 0]


def test_prob_sum_keeps_float64_accuracy_over_many_tokens():
    # Column sums of 200,000 float32 scores: a naive running float32 sum would be off by ~1e-3.
    logits = torch.zeros(200_000, 3)
    logits[:, 0] = 1.0
    acc = LayerAccumulator(0, "m", 3, "softmax", torch.device("cpu"))
    index = torch.zeros(200_000, 1, dtype=torch.long)
    acc.add(logits, index, torch.ones(200_000, 1), torch.ones(200_000, 1), torch.zeros(200_000), None)
    p0 = math.e / (math.e + 2)
    np.testing.assert_allclose(acc.to_frames()[0].prob_sum[0], 200_000 * p0, rtol=2e-7)


def test_token_shift_matches_float64_cosine():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 512, generator=g)
    r = torch.randn(6, 512, generator=g)
    r[0] *= 1e-4  # tiny update: 1 - cos ~ 5e-9, below float32's resolution of cos itself
    r[1] = -2 * h[1]  # g = -h: cos = -1, shift 2
    r[2] = -h[2]  # g = 0: cos taken as 0, shift 1
    h[3] = 0.0  # h = 0: shift 1
    r[4] = 3 * h[4]  # parallel: shift 0
    got = token_shift(h[None], r[None])
    expected = []
    for t in range(6):
        hd = h[t].double()
        gd = hd + r[t].double()
        denominator = hd.norm() * gd.norm()
        cos = 0.0 if denominator == 0 else float(hd @ gd / denominator)
        expected.append(max(0.0, 1.0 - cos))
    assert got.dtype == torch.float64
    # Float32 dots bound the absolute error near 1e-7 ...
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)
    # ... but a tiny update keeps its relative accuracy (1 - cos computed directly would not).
    assert got[0].item() == pytest.approx(expected[0], rel=1e-3)
    assert got[1] == pytest.approx(2.0) and got[2] == 1.0 and got[3] == 1.0


def test_extra_router_rows_count_only_routed_experts_and_entropy_covers_every_row():
    # LongCat-like layer: E = 4 routed experts, W = 6 router rows (rows 4, 5 are identity choices), k = 2.
    # Token 2 sends both slots elsewhere (no top-1, no pair); token 0's identity row outscores its expert.
    E4, W, T = 4, 6, 6
    logits = torch.tensor([[0.5, -1.0, 0.0, 0.2, 3.0, -2.0],
                           [1.0, 0.3, 2.0, -0.5, 0.0, 2.5],
                           [-1.0, 0.0, 0.5, 0.0, 1.5, 1.2],
                           [0.0, 1.7, -0.3, 1.9, -1.0, 0.4],
                           [2.2, 0.1, 0.0, 1.0, 0.6, -0.7],
                           [0.3, 0.3, 1.4, -2.0, 0.9, 0.0]])
    index = torch.tensor([[0, 4], [5, 2], [4, 5], [1, 3], [3, 0], [2, 4]])
    real = index < E4
    weights = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.35, 0.65]])
    norms = torch.tensor([[1.0, 9.0], [9.0, 2.0], [9.0, 9.0], [3.0, 4.0], [5.0, 6.0], [7.0, 9.0]])
    shift = torch.tensor([0.5, 1.0, 0.25, 2.0, 0.75, 1.5])
    acc = LayerAccumulator(1, "m", E4, "softmax", torch.device("cpu"))
    acc.add(logits, index, weights, norms, shift, None, real)
    experts, layer_row, coact = acc.to_frames()

    p = torch.softmax(logits.double(), dim=-1)  # over all W rows
    routed, gate_sum, ean_sum, contribution = np.zeros(E4, np.int64), np.zeros(E4), np.zeros(E4), np.zeros(E4)
    top1, top1_prob, entropy = np.zeros(E4, np.int64), np.zeros(E4), 0.0
    for t in range(T):
        entropy -= sum(float(q) * math.log(float(q)) for q in p[t])
        slots = [j for j in range(2) if int(index[t, j]) < E4]
        for j in slots:
            e = int(index[t, j])
            routed[e] += 1
            gate_sum[e] += float(weights[t, j])
            ean_sum[e] += float(norms[t, j])
            contribution[e] += float(weights[t, j]) * float(norms[t, j]) * float(shift[t])
        if slots:
            best = int(index[t, max(slots, key=lambda j: float(p[t, index[t, j]]))])
            top1[best] += 1
            top1_prob[best] += float(p[t, best])
    assert routed.tolist() == [2, 1, 2, 2] and top1.tolist() == [2, 0, 2, 1]
    np.testing.assert_array_equal(experts.routed_tokens, routed)
    np.testing.assert_array_equal(experts.top1_tokens, top1)
    np.testing.assert_allclose(experts.top1_prob_sum, top1_prob, rtol=1e-6)
    np.testing.assert_allclose(experts.gate_sum, gate_sum, rtol=1e-6)
    np.testing.assert_allclose(experts.ean_sum, ean_sum, rtol=1e-6)
    np.testing.assert_allclose(experts.contribution_sum, contribution, rtol=1e-6)
    np.testing.assert_allclose(experts.prob_sum, p[:, :E4].sum(0).numpy(), rtol=1e-6)  # expert columns only
    assert layer_row["tokens"] == T and layer_row["top_k"] == 2
    np.testing.assert_allclose(layer_row["entropy_mean"], entropy / T, rtol=1e-6)  # H over all W rows
    assert list(zip(coact.expert_a, coact.expert_b, coact.tokens)) == [(0, 3, 1), (1, 3, 1)]


def test_token_shift_of_a_parallel_update_is_exactly_zero():
    # h one-hot, r = c·h: the float32 dots are single products, r·r = fl(c²). For these c, fl(c²) < c², so
    # cos(h, h + r) comes out a few 1e-10 above 1 and s_t = max(0, 1 - cos) must be exactly 0, not negative.
    scales = [0.3, 0.7, 1.1, -0.3]
    h = torch.zeros(len(scales), 16)
    h[:, 5] = 1.0
    r = torch.tensor(scales)[:, None] * h
    got = token_shift(h, r)
    assert got.tolist() == [0.0] * len(scales)
