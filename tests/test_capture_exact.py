"""Captured statistics equal an independent computation, for every tested family.

The reference below takes each MoE block's input from a plain forward hook,
asks the block's own router for the routing, runs each routed expert
explicitly on its token from the raw weight tensors, and sums in float64 with
Python loops. It shares no code with moe_viz's capture path.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from moe_viz.capture.run import collect_routing_stats
from moe_viz.models.discovery import find_moe_layers
from tiny_models import FAMILIES, VOCAB, tiny_model

SIGMOID_FAMILIES = {"deepseek_v3", "llama4_text"}


def _sequences(seed=1, lengths=(16, 11, 16, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _run_expert(experts, e, x, gate=None):
    """One expert on one token vector x (H,), from the stored weight tensors.

    v5 fused layout: (E, 2I, H) / (E, H, I), or transposed (E, H, 2I) / (E, I, H); optional biases,
    an up-only projection (`has_gate` false) and a post-expert norm. The family's gating
    nonlinearity (SwiGLU, GPT-OSS's clamped interleaved gate, ...) is its own `_apply_gate`.
    """
    name = type(experts).__name__
    if name == "Llama4TextExperts":  # gate multiplies the input; weights are (E, H, 2I), (E, I, H)
        gate_up = (x * gate) @ experts.gate_up_proj[e]
        g, u = gate_up.chunk(2, dim=-1)
        return (u * experts.act_fn(g)) @ experts.down_proj[e]

    def matmul(vector, weights):
        return vector @ weights[e] if experts.is_transposed else weights[e] @ vector

    has_gate, has_bias = getattr(experts, "has_gate", True), getattr(experts, "has_bias", False)
    hidden = matmul(x, experts.gate_up_proj if has_gate else experts.up_proj)
    if has_bias:
        hidden = hidden + (experts.gate_up_proj_bias if has_gate else experts.up_proj_bias)[e]
    hidden = experts._apply_gate(hidden) if has_gate else experts.act_fn(hidden)
    out = matmul(hidden, experts.down_proj)
    if has_bias:
        out = out + experts.down_proj_bias[e]
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out


def reference_stats(model, family, sequences, pad_id=0):
    layers = find_moe_layers(model)
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    seen = {}
    handles = [
        layer.block.register_forward_hook(
            lambda mod, args, out, name=layer.name: seen.__setitem__(name, (args[0], out[0] if isinstance(out, tuple) else out))
        )
        for layer in layers
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()

    valid = mask.reshape(-1).bool().tolist()
    expert_rows, layer_rows, coact = [], [], {}
    for layer in layers:
        block_in, block_out = seen[layer.name]
        H = block_in.shape[-1]
        h = block_in.reshape(-1, H)
        r = block_out.reshape(-1, H)
        E = layer.num_experts
        with torch.no_grad():
            out = layer.router(h)
            if family == "llama4_text":
                scores, logits = out
                idx = torch.topk(logits, layer.router.top_k, dim=1).indices
                w = scores.gather(1, idx)
            else:
                logits, w, idx = out
        logits = logits.double()
        p_all = torch.sigmoid(logits) if family in SIGMOID_FAMILIES else torch.softmax(logits, dim=-1)
        sums = {k: np.zeros(E) for k in ["routed_tokens", "top1_tokens", "top1_prob_sum", "gate_sum", "prob_sum",
                                         "ean_sum", "ean_sq_sum", "ean_max", "reap_sum", "contribution_sum"]}
        pairs = np.zeros((E, E))
        entropy, tokens = 0.0, 0
        for t in range(h.shape[0]):
            if not valid[t]:
                continue
            tokens += 1
            p = p_all[t].numpy()
            sums["prob_sum"] += p
            q = p / p.sum()
            entropy += -sum(x * math.log(x) for x in q if x > 0)
            hf, rf = h[t].double(), r[t].double()
            s_t = max(0.0, 1.0 - F.cosine_similarity(hf, hf + rf, dim=0).item())
            chosen = idx[t].tolist()
            best = max(chosen, key=lambda e: (p[e], -chosen.index(e)))
            sums["top1_tokens"][best] += 1
            sums["top1_prob_sum"][best] += p[best]
            for j, e in enumerate(chosen):
                g = w[t, j].double().item()
                with torch.no_grad():
                    y = _run_expert(layer.experts, e, h[t], gate=w[t, j])
                n = torch.linalg.vector_norm(y.double()).item()
                sums["routed_tokens"][e] += 1
                sums["gate_sum"][e] += g
                sums["ean_sum"][e] += n
                sums["ean_sq_sum"][e] += n * n
                sums["ean_max"][e] = max(sums["ean_max"][e], n)
                sums["reap_sum"][e] += g * n
                sums["contribution_sum"][e] += g * n * s_t
                for e2 in chosen:
                    pairs[e, e2] += 1
        frame = pd.DataFrame(sums)
        frame.insert(0, "expert", range(E))
        frame.insert(0, "layer", layer.layer)
        expert_rows.append(frame)
        layer_rows.append({"layer": layer.layer, "tokens": tokens, "top_k": idx.shape[1], "entropy_mean": entropy / tokens})
        coact[layer.layer] = pairs
    return pd.concat(expert_rows, ignore_index=True), pd.DataFrame(layer_rows), coact


def _coact_matrix(frame, layer, E):
    m = np.zeros((E, E))
    sub = frame[frame.layer == layer]
    m[sub.expert_a, sub.expert_b] = sub.tokens
    return m + m.T


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_match_independent_computation(family):
    model = tiny_model(family)
    sequences = _sequences()
    experts, layers, coact = collect_routing_stats(model, sequences, batch_size=4)
    ref_experts, ref_layers, ref_coact = reference_stats(model, family, sequences)

    assert (experts.routed_tokens > 0).sum() > 4, "routing should reach several experts"
    for column in ref_experts.columns:
        np.testing.assert_allclose(experts[column], ref_experts[column], rtol=1e-5, atol=1e-9, err_msg=column)
    np.testing.assert_array_equal(layers.tokens, ref_layers.tokens)
    np.testing.assert_array_equal(layers.top_k, ref_layers.top_k)
    np.testing.assert_allclose(layers.entropy_mean, ref_layers.entropy_mean, rtol=1e-5)
    for layer, pairs in ref_coact.items():
        E = pairs.shape[0]
        off_diagonal = pairs * (1 - np.eye(E))
        np.testing.assert_array_equal(_coact_matrix(coact, layer, E), off_diagonal)
        np.testing.assert_array_equal(np.diag(pairs), experts[experts.layer == layer].routed_tokens)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "recompute"])
def test_capture_does_not_change_logits(family, fast):
    from moe_viz.capture.observe import RoutingObserver

    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids).logits
        with RoutingObserver(find_moe_layers(model), fast=fast):
            observed = model(ids).logits
        after = model(ids).logits
    assert torch.equal(plain, observed)
    assert torch.equal(plain, after), "hooks must be removed on exit"


@pytest.mark.parametrize("family,dtype", [(f, torch.float32) for f in FAMILIES]
                         + [(f, torch.bfloat16) for f in ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss")])
def test_reused_buffers_keep_every_forward_exact(family, dtype):
    """One observer across forwards of different lengths (its (T*k, H) buffers grow, then serve a shorter
    forward from their first rows) and across layers (which share them): every forward's logits and its
    per-slot norms ||f_e(x_t)|| are those of a plain forward and of a new observer, bit for bit."""
    from moe_viz.capture.observe import RoutingObserver

    model = tiny_model(family).to(dtype)
    layers = find_moe_layers(model)
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, VOCAB, shape, generator=generator) for shape in [(2, 12), (1, 5), (3, 9)]]
    with torch.no_grad():
        fresh = []  # (logits, per-layer norms) of each forward alone, under an observer of its own
        for ids in batches:
            with RoutingObserver(layers) as alone:
                norms = _record_norms(alone)
                fresh.append((model(ids).logits, norms))
            assert torch.equal(fresh[-1][0], model(ids).logits)  # and those of a plain forward
        with RoutingObserver(layers) as observer:
            norms = _record_norms(observer)
            for ids, (logits, alone_norms) in zip(batches, fresh):
                norms.clear()
                assert torch.equal(model(ids).logits, logits)
                assert len(norms) == len(layers)
                for got, want in zip(norms, alone_norms):
                    assert torch.equal(got, want)


@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float32], ids=["bf16 gates", "fp32 gates"])
def test_grouped_experts_forward_with_reused_buffers_is_the_experts_own_forward(weights_dtype):
    """bf16 experts, gate weights in bf16 (weighted in place) or float32 (the product is float32, as in
    transformers, so it cannot be written into the bf16 rows), one scratch across calls of different sizes."""
    from moe_viz.capture.observe import grouped_experts_forward
    from moe_viz.capture.routing_stats import Scratch

    experts = find_moe_layers(tiny_model("qwen3_moe").to(torch.bfloat16))[0].experts
    generator = torch.Generator().manual_seed(6)
    scratch = Scratch()
    for tokens in (24, 7):
        hidden = torch.randn(tokens, experts.gate_up_proj.shape[-1], generator=generator).to(torch.bfloat16)
        index = torch.stack([torch.randperm(experts.num_experts, generator=generator)[:2] for _ in range(tokens)])
        weights = torch.rand(tokens, 2, generator=generator).to(weights_dtype)
        with torch.no_grad():
            want = experts(hidden, index, weights)
            got = grouped_experts_forward(experts, hidden, index, weights, scratch)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_accumulators_keep_no_work_buffers_after_their_observer():
    """Layer-wise capture makes one observer per layer and domain and keeps every one's accumulators to the
    end of the run: were the work buffers ((T*k, H) and (T, E), tens of MiB each) reachable from them, its
    memory would grow by that much per layer."""
    import gc
    import weakref

    from moe_viz.capture.observe import RoutingObserver

    model = tiny_model("qwen3_moe")
    with torch.no_grad(), RoutingObserver(find_moe_layers(model)) as observer:
        model(torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7)))
    buffers = weakref.ref(observer.scratch)
    assert observer.scratch._buffers  # the forward used them
    accumulators = observer.accumulators
    del observer
    gc.collect()
    assert buffers() is None
    assert all(int(acc.tokens) == 24 for acc in accumulators)


def _record_norms(observer) -> list[torch.Tensor]:
    """A list that receives a copy of the (T, k) expert-output norms each layer adds, in layer order."""
    seen = []
    for tap in observer.taps:
        def add(*args, _add=tap.acc.add, **kwargs):
            seen.append(args[3].clone())
            return _add(*args, **kwargs)
        tap.acc.add = add
    return seen


def test_capture_projects_only_the_last_position_onto_the_vocabulary():
    """Routing never depends on the logits, so a model that takes `logits_to_keep` runs its LM head on one
    position per sequence during capture, and the statistics equal those of forwards with every logit."""
    from moe_viz.capture.observe import RoutingObserver
    from moe_viz.capture.run import accumulator_frames, padded_batches

    model = tiny_model("qwen3_moe")
    sequences = _sequences()
    seen = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    captured = collect_routing_stats(model, sequences, batch_size=3)
    assert seen == [(3, 1, model.config.hidden_size), (1, 1, model.config.hidden_size)]
    seen.clear()
    with torch.no_grad(), RoutingObserver(find_moe_layers(model)) as observer:
        for ids, mask in padded_batches(sequences, 3):
            observer.set_attention_mask(mask)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    handle.remove()
    assert seen == [(3, 16, model.config.hidden_size), (1, 5, model.config.hidden_size)]
    for got, expected in zip(captured, accumulator_frames(observer.accumulators)):
        pd.testing.assert_frame_equal(got, expected)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_padding_is_excluded(family):
    model = tiny_model(family)
    sequences = _sequences(lengths=(16, 7, 3))
    padded, padded_layers, _ = collect_routing_stats(model, sequences, batch_size=3)
    alone = [collect_routing_stats(model, [s], batch_size=1)[0] for s in sequences]
    summed = alone[0].copy()
    for frame in alone[1:]:
        for column in summed.columns[2:]:
            if column == "ean_max":
                summed[column] = np.maximum(summed[column], frame[column])
            else:
                summed[column] = summed[column] + frame[column]
    for column in summed.columns[2:]:
        np.testing.assert_allclose(padded[column], summed[column], rtol=1e-5, atol=1e-9, err_msg=column)
    assert (padded_layers.tokens == 16 + 7 + 3).all()


def test_eager_experts_use_recompute_path_and_match():
    model = tiny_model("mixtral")
    sequences = _sequences()
    fast, _, _ = collect_routing_stats(model, sequences, batch_size=4)
    model.set_experts_implementation("eager")
    eager, _, _ = collect_routing_stats(model, sequences, batch_size=4)
    pd.testing.assert_frame_equal(fast[["layer", "expert", "routed_tokens", "top1_tokens"]],
                                  eager[["layer", "expert", "routed_tokens", "top1_tokens"]])
    np.testing.assert_allclose(fast.reap_sum, eager.reap_sum, rtol=1e-5)


def test_phimoe_reports_the_top_k_it_really_uses():
    model = tiny_model("phimoe")
    model.config.num_experts_per_tok = 3  # sparsemixer ignores this and always routes 2
    _, layers, _ = collect_routing_stats(model, _sequences(), batch_size=4)
    assert (layers.top_k == 2).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_capture_does_not_change_bf16_logits(family):
    from moe_viz.capture.observe import RoutingObserver

    model = tiny_model(family).to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(ids).logits
        with RoutingObserver(find_moe_layers(model)):
            observed = model(ids).logits
    assert torch.equal(plain, observed)
