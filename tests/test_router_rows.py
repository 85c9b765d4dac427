"""Routers that score more rows than routed experts, DBRX's 2-D experts, and the router's score function.

- LongCat-Flash scores E experts + identity "zero" experts (index >= E: the token passes through,
  scaled); Zaya scores E + 1 (a skip choice, handed to the experts as index 0 with weight 0); Inkling
  scores E + shared-expert rows (always on, not a choice). Statistics count only routed experts, checked
  here against the router's own outputs (and, for Zaya, the routing recomputed from its logits); the
  exports keep every extra row and are exact (tests/test_all_families.py).
- DBRX keeps its experts as (E*F, H) tensors: export slices blocks of F rows per expert.
- The score function (softmax / sigmoid) is found by probing the real router, not from the family name.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from family_zoo import EVAL, KEEPS, SEQUENCES, check_family, tiny_family_model
from moe_viz.capture.run import collect_routing_stats
from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import find_moe_layers, kept_rows
from moe_viz.models.score_fn import classify_score_fn
from moe_viz.prune.masking import masked_layer
from moe_viz.prune.verify import verify_export

EXTRA_ROWS = {"longcat_flash": 2, "zaya": 1, "inkling_text": 1}


def _padded(sequences):
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _router_slots(model, family):
    """Per MoE layer: (layer, logits, weights, index, real) of the real tokens, as each router container returned
    them (float64 logits and weights); `real` (T, k) marks the slots that went to a routed expert."""
    layers = find_moe_layers(model)
    seen = {}
    handles = [layer.router_parent.register_forward_hook(
        lambda module, args, out, name=layer.name: seen.__setitem__(name, out)) for layer in layers]
    ids, mask = _padded(SEQUENCES)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for handle in handles:
        handle.remove()
    valid = mask.reshape(-1).bool()
    for layer in layers:
        E = layer.num_experts
        out = seen[layer.name]
        logits, weights, index = out[0].reshape(valid.numel(), -1), out[1].reshape(valid.numel(), -1), out[2].reshape(valid.numel(), -1)
        logits, weights, index = logits[valid].double(), weights[valid].double(), index[valid]
        if family == "zaya":  # recompute the skip choice the router hides (index E -> index 0, weight 0)
            biased = torch.softmax(logits, dim=-1) + layer.router_parent.balancing_biases.double()
            chosen = torch.topk(biased, index.shape[1], dim=-1).indices
            real = chosen != E
            assert torch.equal(index[real], chosen[real])
        else:
            real = index < E
        yield layer, logits, weights, index, real


def _reference(model, family):
    """Per layer: (E) routed_tokens, gate_sum, top1_tokens, prob_sum and the number of non-expert slots,
    from what each router container returned (Python loops, no moe_viz capture code)."""
    result = {}
    for layer, logits, weights, index, real in _router_slots(model, family):
        E = layer.num_experts
        scores = torch.sigmoid(logits) if family == "inkling_text" else torch.softmax(logits, dim=-1)
        counts, gates, top1, nulls = np.zeros(E), np.zeros(E), np.zeros(E), 0
        for t in range(index.shape[0]):
            best = None
            for j in range(index.shape[1]):
                e = int(index[t, j])
                if not real[t, j]:
                    nulls += 1
                    continue
                counts[e] += 1
                gates[e] += float(weights[t, j])
                if best is None or scores[t, e] > scores[t, best]:
                    best = e
            if best is not None:
                top1[best] += 1
        result[layer.layer] = (counts, gates, top1, scores[:, :E].sum(0).numpy(), nulls)
    return result


@pytest.mark.parametrize("family", sorted(EXTRA_ROWS))
def test_statistics_count_only_routed_experts(family):
    torch.set_num_threads(1)
    model = tiny_family_model(family)
    if family == "zaya":  # make the skip choice likely, so the test sees it taken
        for layer in find_moe_layers(model):
            layer.router_parent.balancing_biases.data[-1] = 0.3
    layers = find_moe_layers(model)
    assert {layer.router_rows - layer.num_experts for layer in layers} == {EXTRA_ROWS[family]}
    experts, layer_rows, _ = collect_routing_stats(model, SEQUENCES, batch_size=4)
    reference = _reference(model, family)
    nulls = 0
    for index, (counts, gates, top1, prob_sum, null_slots) in reference.items():
        rows = experts[experts.layer == index].sort_values("expert")
        np.testing.assert_array_equal(rows.routed_tokens, counts)
        np.testing.assert_allclose(rows.gate_sum, gates, rtol=1e-5, atol=1e-9)
        np.testing.assert_array_equal(rows.top1_tokens, top1)
        np.testing.assert_allclose(rows.prob_sum, prob_sum, rtol=1e-5)
        tokens = int(layer_rows[layer_rows.layer == index].tokens.iloc[0])
        k = int(layer_rows[layer_rows.layer == index].top_k.iloc[0])
        assert rows.routed_tokens.sum() == tokens * k - null_slots
        nulls += null_slots
    if family != "inkling_text":  # shared experts are not a choice: no slot goes elsewhere
        assert nulls > 0, "the test data must route some slots to a non-expert choice"


def test_masking_refuses_a_row_that_is_not_a_routed_expert():
    model = tiny_family_model("longcat_flash")
    layer = find_moe_layers(model)[-1]
    with pytest.raises(MoeVizError, match="routed experts 0..7"):
        with masked_layer(layer, [8]):  # LongCat's first identity expert
            pass


def test_kept_rows():
    # E experts, extra router rows kept after the kept experts, E blocks of F rows
    assert kept_rows(8, 8, 10, [1, 5]) == [1, 5]
    assert kept_rows(10, 8, 10, [1, 5]) == [1, 5, 8, 9]
    assert kept_rows(32, 8, 8, [1, 5]) == [4, 5, 6, 7, 20, 21, 22, 23]
    assert kept_rows(12, 8, 8, [1]) is None  # not a multiple of E: no expert dim


def _export_then_edit(tmp_path, family, edit):
    """A correct streaming export of `family` at keep 4, edited by `edit(tensors, plan)`; its verdict."""
    from moe_viz.prune.export import PRUNE_MANIFEST

    check = check_family(family, tmp_path)
    assert all(e["verdict"] == "PASS" for e in check["exports"])
    export = tmp_path / f"{family}-keep{KEEPS[1]}"
    plan = json.loads((export / PRUNE_MANIFEST).read_text())["plan"]
    shard = export / "model.safetensors"
    tensors = load_file(shard)
    edit(tensors, {int(k): v for k, v in plan["kept"].items()}, tmp_path / family)
    save_file(tensors, shard, metadata={"format": "pt"})
    return verify_export(export, EVAL, source_dir=tmp_path / family)


def test_dbrx_export_with_a_wrong_row_block_fails(tmp_path):
    def wrong_block(tensors, kept, source):
        original = load_file(source / "model.safetensors")
        name = "transformer.blocks.1.ffn.experts.mlp.w1"
        block = original[name].shape[0] // 8
        dropped = next(e for e in range(8) if e not in kept[1])
        rows = [r for e in [dropped] + kept[1][1:] for r in range(e * block, (e + 1) * block)]
        tensors[name] = original[name][rows].contiguous()

    result = _export_then_edit(tmp_path, "dbrx", wrong_block)
    assert result["verdict"] == "FAIL" and "differ from the masked original in float64" in result["reason"]


def test_longcat_export_that_drops_an_identity_expert_row_fails(tmp_path):
    def swap_extra_row(tensors, kept, source):
        original = load_file(source / "model.safetensors")
        name = "model.layers.1.mlp.router.classifier.weight"
        dropped = next(e for e in range(8) if e not in kept[1])
        tensors[name] = original[name][kept[1] + [dropped, 9]].contiguous()  # row 8 (identity) replaced

    result = _export_then_edit(tmp_path, "longcat_flash", swap_extra_row)
    assert result["verdict"] == "FAIL" and "differ from the masked original in float64" in result["reason"]


# -- the router's score function --------------------------------------------------------------

# From each family's modeling code: how its router turns logits into scores.
EXPECTED_SCORE = {"mixtral": "softmax", "gpt_oss": "softmax", "longcat_flash": "softmax", "zaya": "softmax",
                  "ernie4_5_moe": "softmax", "deepseek_v3": "sigmoid", "flint": "sigmoid", "inkling_text": "sigmoid",
                  "lfm2_moe": "sigmoid", "afmoe": "sigmoid", "hy_v3": "sigmoid", "llama4_text": "sigmoid",
                  "deepseek_v4": "sqrtsoftplus"}
SCORE = {"softmax": lambda z: torch.softmax(z, dim=-1), "sigmoid": torch.sigmoid,
         "sqrtsoftplus": lambda z: F.softplus(z).sqrt()}


@pytest.mark.parametrize("family", sorted(EXPECTED_SCORE))
def test_score_function_is_found_by_structure(family):
    """Flint, LFM2-MoE, AFMoE and HY-V3 were labelled softmax by the old family-name list; AFMoE and HY-V3
    routers need more than hidden states, so the first captured batch decides. prob_sum is checked against
    the expected function, which the wrong one fails."""
    torch.set_num_threads(1)
    model = tiny_family_model(family)
    experts, layer_rows, _ = collect_routing_stats(model, SEQUENCES[:2], batch_size=2)
    assert set(layer_rows.router_score) == {EXPECTED_SCORE[family]}
    layers = find_moe_layers(model)
    logits, returned = {}, {}

    def keep(layer, into, position):
        def hook(module, args, out):
            into.setdefault(layer.layer, out[position] if isinstance(out, tuple) else out)
        return hook

    # the logits: what the router's linear returns, else (LongCat, which never calls it) the router's first output
    handles = [layer.router.register_forward_hook(keep(layer, logits, layer.logits_index)) for layer in layers]
    handles += [layer.router_parent.register_forward_hook(keep(layer, returned, 0)) for layer in layers]
    ids, mask = _padded(SEQUENCES[:2])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for handle in handles:
        handle.remove()
    for layer in layers:
        rows = logits.get(layer.layer, returned[layer.layer]).reshape(mask.numel(), -1)[mask.reshape(-1).bool()].double()
        got = experts[experts.layer == layer.layer].sort_values("expert").prob_sum.to_numpy()
        for name, score in SCORE.items():
            expected = score(rows)[:, :layer.num_experts].sum(0).numpy()
            if name == EXPECTED_SCORE[family]:
                np.testing.assert_allclose(got, expected, rtol=1e-5)
            else:  # every other function gives other sums
                assert not np.allclose(got, expected, rtol=1e-3), name


def _routed(logits, k, score, renormalise, scale=1.0):
    p = SCORE[score](logits)
    weights, index = torch.topk(p, k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * scale, index


@pytest.mark.parametrize("score", sorted(SCORE))
@pytest.mark.parametrize("renormalise", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_classify_score_function(score, renormalise, dtype):
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 2
    weights, index = _routed(logits, 2, score, renormalise, scale=2.5)
    assert classify_score_fn(logits, weights.to(dtype), index) == score


def test_classify_top_k_then_softmax_and_undecidable_cases():
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) * 2
    top, index = torch.topk(logits, 2, dim=-1)
    assert classify_score_fn(logits, torch.softmax(top, dim=-1), index) == "softmax"  # GPT-OSS
    # top-1 renormalised: every weight is 1, both functions fit every token and no offset is shared: no answer
    assert classify_score_fn(logits, torch.ones(64, 1), index[:, :1]) is None
    # top-1 unnormalised sigmoid: the offset is the same across tokens only for sigmoid
    weights, one = _routed(logits, 1, "sigmoid", False)
    assert classify_score_fn(logits, weights, one) == "sigmoid"
    # top-1 unnormalised sqrt-softplus (DeepSeek-V4): softmax and sigmoid fit no token's offset across tokens
    weights, one = _routed(logits, 1, "sqrtsoftplus", False)
    assert classify_score_fn(logits, weights, one) == "sqrtsoftplus"
    # a score none of the three is (PhiMoE-like: top-2 logits themselves as weights): no answer
    top, index = torch.topk(logits, 2, dim=-1)
    assert classify_score_fn(logits, top.abs() + 0.1, index) is None


def _slot_experts(model, family):
    """Per layer: (T, k) expert of every slot of the real tokens, -1 for a slot routed to a non-expert choice."""
    return {layer.layer: torch.where(real, index, -1).numpy() for layer, _, _, index, real in _router_slots(model, family)}


@pytest.mark.parametrize("family", ["longcat_flash", "zaya"])
def test_token_trace_marks_slots_routed_elsewhere_as_expert_minus_one(family):
    from moe_viz.capture.trace import TokenTracer

    model = tiny_family_model(family)
    if family == "zaya":
        for layer in find_moe_layers(model):
            layer.router_parent.balancing_biases.data[-1] = 0.3
    tokens = sum(map(len, SEQUENCES))
    tracer = TokenTracer(tokens)
    collect_routing_stats(model, SEQUENCES, batch_size=4, tracer=tracer)
    routes = tracer.frames()["token_routes"]
    expected = _slot_experts(model, family)
    assert any((slots == -1).any() for slots in expected.values()), "the test data must route a slot elsewhere"
    assert sorted(set(routes.layer)) == sorted(expected)
    for layer, slots in expected.items():
        got = routes[routes.layer == layer].sort_values(["seq", "pos", "slot"]).expert.to_numpy()
        np.testing.assert_array_equal(got.reshape(tokens, -1), slots, err_msg=f"layer {layer}")


# What the probe through the real router finds on its own (before any capture batch could settle it):
# Zaya's router needs (1, T, H) hidden states, Gemma-4's returns probabilities before its linear's logits,
# Llama4's returns (scores scattered at its top-k, logits); DBRX's returns only logits (no top-k): None.
PROBED = {"zaya": "softmax", "gemma4_text": "softmax", "llama4_text": "sigmoid", "deepseek_v3": "sigmoid",
          "longcat_flash": "softmax", "dbrx": None}


@pytest.mark.parametrize("family", sorted(PROBED))
def test_probe_through_the_router_alone(family):
    from moe_viz.models.score_fn import probe_score_fn

    torch.set_num_threads(1)
    layers = find_moe_layers(tiny_family_model(family))
    assert [probe_score_fn(layer) for layer in layers] == [PROBED[family]] * len(layers)


def test_classify_cannot_tell_from_one_top1_token():
    # one token, top-1, weight 1: every function fits with one offset (per token and across): no answer
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    assert classify_score_fn(logits, torch.ones(1, 1), logits.argmax(-1, keepdim=True)) is None


@pytest.mark.parametrize("family", ["zaya", "deepseek_v3", "lfm2_moe"])
def test_masked_experts_are_never_routed_even_with_the_largest_selection_bias(family):
    """Masking sets a dropped expert's selection bias (Zaya `balancing_biases`, DeepSeek-V3
    `e_score_correction_bias`, LFM2-MoE `expert_bias`) to -inf as well as its logit: with a bias far above
    every other, the expert is picked by the unmasked router and never by the masked one."""
    from moe_viz.models.routing import routing_tensors

    torch.set_num_threads(1)
    model = tiny_family_model(family)
    layer = find_moe_layers(model)[-1]
    bias = next(r for r in routing_tensors(layer) if r.is_selection_bias)
    with torch.no_grad():
        bias.tensor.index_fill_(bias.axis, torch.tensor([3]), 5.0)
    picked = []
    block_in = layer.experts.register_forward_pre_hook(lambda m, args, kwargs: picked.append(
        (args[1] if len(args) > 1 else kwargs["top_k_index"]).reshape(-1)), with_kwargs=True)
    ids, mask = _padded(SEQUENCES[:2])
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            assert (picked[-1] == 3).any(), "unmasked, the biased expert is picked"
            picked.clear()
            with masked_layer(layer, [3]):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        block_in.remove()
    assert not (picked[-1] == 3).any()
    assert bias.tensor.reshape(-1)[3] == 5.0  # restored afterwards


def test_expert_axis_only_of_known_layouts():
    from moe_viz.models.routing import expert_axis

    assert expert_axis((8, 32), 8) == 0
    assert expert_axis((1, 8), 8) == 1 and expert_axis((1, 1, 8), 8) == 2  # Ernie's moe_statics (1, E)
    assert expert_axis((4, 8), 8) is None  # E last behind a dim that is not 1: not a known layout
    assert expert_axis((), 8) is None and expert_axis((32,), 8) is None
