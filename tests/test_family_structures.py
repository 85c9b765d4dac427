"""Model structures beyond one MoE block per decoder layer: which blocks capture observes, which it
leaves alone, and what export refuses (Ernie-4.5-VL text/vision experts, Qwen3-Omni thinker/talker,
JetMoE's attention and MLP experts).

Tiny random models from tests/family_zoo.py; nothing is mocked."""

import pytest
import torch

from family_zoo import tiny_family_model
from moe_viz.capture.observe import TextNeverReaches
from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import find_moe_layers, other_modality_blocks, text_runner
from moe_viz.prune.export import check_exportable, text_scope

torch.set_num_threads(1)


def test_ernie_vl_observes_the_text_experts_and_never_the_vision_experts():
    model = tiny_family_model("ernie4_5_vl_moe")
    layers = find_moe_layers(model)
    assert [layer.name.rsplit(".", 1)[-1] for layer in layers] == ["text_moe"] * len(layers)
    assert [name.rsplit(".", 1)[-1] for name, _ in other_modality_blocks(model)] == ["vision_moe"] * len(layers)
    ids = torch.randint(3, 100, (1, 12))
    with TextNeverReaches(other_modality_blocks(model)), torch.no_grad():
        model(input_ids=ids)  # text only: the vision experts never run
        vision = torch.zeros_like(ids)
        vision[0, 4:8] = 1  # tokens of an image: the layer sends them to the vision experts
        with pytest.raises(MoeVizError, match="vision_moe ran during a text-only capture"):
            model(input_ids=ids, moe_mm_token_type_ids=vision)


def test_ernie_vl_export_refuses_because_vision_experts_share_the_count():
    model = tiny_family_model("ernie4_5_vl_moe")
    with pytest.raises(MoeVizError, match=r"vision_moe\..* same expert count \(config moe_num_experts\)"):
        check_exportable(model.config)


def test_qwen3_omni_runs_text_through_the_thinker_and_leaves_the_talker_alone():
    model = tiny_family_model("qwen3_omni_moe")
    assert text_runner(model) is model.thinker
    names = [layer.name for layer in find_moe_layers(model)]
    assert names and all(name.startswith("thinker.") for name in names)
    assert any(name.startswith("talker.") and hasattr(m, "experts") for name, m in model.named_modules())
    assert text_scope(model.config) == "thinker."
    check_exportable(model.config)  # the talker takes its count from its own config: nothing shared


def _rotary(x, positions, theta):
    """Rotary position embedding of (T, heads, d) rows, as JetMoE's modeling code applies it."""
    d = x.shape[-1]
    angles = positions[:, None].double() / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None].to(x.dtype), torch.cat([angles, angles], -1).sin()[:, None].to(x.dtype)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def _jetmoe_reference(model, sequences):
    """Per (block number, expert) routed tokens, gate sum and ||f_e(x)|| sum of JetMoE's two MoE blocks per
    decoder layer, computed from each block's recorded input with the formulas of its modeling code, padding
    excluded. Decoder layer i: block 2i is the attention experts (f_e(x_t) = the expert's output projection
    of its own query heads' attention over the shared keys/values, before gate and bias), block 2i+1 the
    MLP experts."""
    from moe_viz.capture.run import padded_batches

    config = model.config
    heads, d, theta = config.num_key_value_heads, config.kv_channels, config.rope_parameters["rope_theta"]
    inputs, handles = {}, []
    for index, layer in enumerate(model.model.layers):
        handles.append(layer.self_attention.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: inputs.__setitem__(2 * index, kwargs["hidden_states"]),
            with_kwargs=True))
        handles.append(layer.mlp.register_forward_pre_hook(
            lambda module, args, index=index: inputs.__setitem__(2 * index + 1, args[0])))
    sums = {}

    def add(number, e, gate, norm):
        row = sums.setdefault((number, e), [0, 0.0, 0.0])
        row[0] += 1
        row[1] += float(gate)
        row[2] += float(norm)

    with torch.no_grad():
        for ids, mask in padded_batches(sequences, 4):
            inputs.clear()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            for number, batch in inputs.items():
                layer = model.model.layers[number // 2]
                for x, real in zip(batch, mask.bool()):
                    x = x[real]  # right padding: the sequence's own tokens, positions 0..n-1
                    moe = layer.self_attention.experts if number % 2 == 0 else layer.mlp
                    top, experts = moe.router.layer(x).float().topk(moe.router.top_k, dim=1)
                    gates = torch.softmax(top, dim=1)
                    if number % 2 == 0:
                        positions = torch.arange(x.shape[0])
                        keys, values = layer.self_attention.kv_proj(x).chunk(2, dim=-1)
                        keys = _rotary(keys.view(-1, heads, d), positions, theta)
                        values = values.view(-1, heads, d)
                    for t in range(x.shape[0]):
                        for slot in range(experts.shape[1]):
                            e = int(experts[t, slot])
                            if number % 2 == 0:
                                query = _rotary((moe.input_linear.weight[e] @ x[t]).view(1, heads, d), positions[t:t + 1], theta)[0]
                                scores = torch.einsum("hd,shd->hs", query, keys[:t + 1]) * d ** -0.5
                                attended = torch.einsum("hs,shd->hd", torch.softmax(scores, dim=-1), values[:t + 1])
                                out = moe.output_linear.weight[e] @ attended.reshape(-1)
                            else:
                                a, b = (moe.input_linear.weight[e] @ x[t]).chunk(2)
                                out = moe.output_linear.weight[e] @ (moe.activation(a) * b)
                            add(number, e, gates[t, slot], torch.linalg.vector_norm(out))
    for handle in handles:
        handle.remove()
    return sums


def test_jetmoe_attention_and_mlp_experts_are_blocks_in_forward_order_with_exact_statistics():
    from family_zoo import SEQUENCES
    from moe_viz.capture.run import collect_routing_stats

    model = tiny_family_model("jetmoe")
    layers = find_moe_layers(model)
    names = {layer.layer: layer.name for layer in layers}
    # Attention runs before the MLP in each decoder layer (the MLP is registered first): 2i, 2i+1.
    assert names == {n: f"model.layers.{n // 2}.{'self_attention' if n % 2 == 0 else 'mlp'}"
                     for n in range(2 * len(model.model.layers))}
    assert [layer.layer for layer in layers] == sorted(names)
    assert layers[0].router is model.model.layers[0].self_attention.experts.router.layer
    experts, layer_rows, _ = collect_routing_stats(model, SEQUENCES, batch_size=4)
    assert dict(zip(layer_rows.layer, layer_rows.module)) == names
    reference = _jetmoe_reference(model, SEQUENCES)
    assert sum((experts.layer == n).sum() for n in (0, 2)) and (experts.routed_tokens > 0).sum() > 8
    for row in experts.itertuples():
        tokens, gates, norms = reference.get((row.layer, row.expert), (0, 0.0, 0.0))
        assert row.routed_tokens == tokens, (row.layer, row.expert)
        assert row.gate_sum == pytest.approx(gates, rel=1e-5, abs=1e-9), (row.layer, row.expert)
        assert row.ean_sum == pytest.approx(norms, rel=1e-5, abs=1e-9), (row.layer, row.expert)


@pytest.mark.parametrize("streaming", [False, True])
def test_jetmoe_prunes_attention_and_mlp_experts_each_with_its_own_plan(tmp_path, streaming):
    """Attention and MLP blocks of one decoder layer keep different experts (same count: one config key);
    the export slices each block's expert projections and router rows with its own list and verifies
    exact against the original with both routers' dropped experts masked."""
    import dataclasses

    from family_zoo import EVAL, capture_family
    from moe_viz.models.loading import load_model
    from moe_viz.prune.export import export_pruned
    from moe_viz.prune.plan import build_plan
    from moe_viz.prune.verify import verify_export

    row = capture_family("jetmoe", tmp_path)
    plan = build_plan(row["store"], str(row["model_dir"].resolve()), "reap", {"rand": 1.0},
                      config=row["model"].config, keep=4)
    kept = {n: ([0, 2, 5, 7] if n % 2 == 0 else [1, 2, 3, 6]) for n in plan.kept}  # attention / MLP
    plan = dataclasses.replace(plan, kept=kept)
    out = export_pruned(plan, row["model_dir"], tmp_path / "keep4", streaming=streaming)
    result = verify_export(out, EVAL, source_dir=row["model_dir"])
    assert result["verdict"] == "PASS", result["reason"]
    assert sorted(result["float64_blocks"]["layers"]) == [0, 1, 2, 3]
    original, pruned = row["model"], load_model(str(out), device="cpu", dtype="fp32")[0]
    for i, (before, after) in enumerate(zip(original.model.layers, pruned.model.layers)):
        for moe_before, moe_after, keep in ((before.self_attention.experts, after.self_attention.experts, kept[2 * i]),
                                            (before.mlp, after.mlp, kept[2 * i + 1])):
            for name in ("router.layer.weight", "input_linear.weight", "output_linear.weight"):
                assert torch.equal(moe_after.get_parameter(name), moe_before.get_parameter(name)[keep]), (i, name)
            assert torch.equal(moe_after.bias, moe_before.bias)


def test_switch_encoder_and_decoder_layers_are_numbered_apart_and_match_an_independent_computation(tmp_path):
    from family_zoo import SEQUENCES
    from moe_viz.capture.run import collect_routing_stats, padded_batches, text_inputs

    model = tiny_family_model("switch_transformers")
    layers = find_moe_layers(model)
    names = {layer.layer: layer.name for layer in layers}
    assert names == {0: "encoder.block.0.layer.1.mlp", 1: "encoder.block.1.layer.1.mlp",
                     2: "decoder.block.0.layer.2.mlp", 3: "decoder.block.1.layer.2.mlp"}
    experts, layer_rows, _ = collect_routing_stats(model, SEQUENCES, batch_size=4)
    assert dict(zip(layer_rows.layer, layer_rows.module)) == names

    # Independent: each sparse MLP's input, its router's argmax (top-1), the max softmax probability as the
    # gate, ||expert(x)||, over non-padding tokens (no token is over capacity at these lengths).
    blocks = {layer.layer: layer.block for layer in layers}
    inputs, handles = {}, []
    for number, block in blocks.items():
        handles.append(block.register_forward_pre_hook(lambda m, args, n=number: inputs.__setitem__(n, args[0])))
    reference = {}
    with torch.no_grad():
        for ids, mask in padded_batches(SEQUENCES, 4):
            feed = text_inputs(model, ids, mask)
            assert torch.equal(feed["decoder_input_ids"][:, 1:], ids[:, :-1])
            model(**feed)
            for number, x in inputs.items():
                block = blocks[number]
                x = x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()]
                probs = torch.softmax(block.router.classifier(x.float()), dim=-1)
                gate, chosen = probs.max(dim=-1)
                for t in range(x.shape[0]):
                    e = int(chosen[t])
                    row = reference.setdefault((number, e), [0, 0.0, 0.0])
                    row[0] += 1
                    row[1] += float(gate[t])
                    row[2] += float(torch.linalg.vector_norm(block.experts[f"expert_{e}"](x[t:t + 1])))
    for handle in handles:
        handle.remove()
    assert (experts.routed_tokens > 0).sum() > 8
    for row in experts.itertuples():
        tokens, gates, norms = reference.get((row.layer, row.expert), (0, 0.0, 0.0))
        assert row.routed_tokens == tokens, (row.layer, row.expert)
        assert row.gate_sum == pytest.approx(gates, rel=1e-5, abs=1e-9)
        assert row.ean_sum == pytest.approx(norms, rel=1e-5, abs=1e-9)


def test_nllb_moe_runs_only_two_experts_and_capture_refuses():
    """The library bug the refusal is about, shown directly: whatever the router picks, only expert_0
    and expert_1 run (transformers 5.23); capture's own check refuses with one line."""
    from family_zoo import SEQUENCES
    from moe_viz.capture.run import collect_routing_stats, padded_batches, text_inputs

    model = tiny_family_model("nllb-moe")
    ran, picked = set(), set()
    experts = model.model.encoder.layers[0].ffn.experts
    for name, module in experts.items():
        if name.startswith("expert_"):
            module.register_forward_hook(lambda m, a, o, name=name: ran.add(name))
    model.model.encoder.layers[0].ffn.router.register_forward_hook(
        lambda m, a, o: picked.update(o[2].argmax(-1).reshape(-1).tolist()))
    ids, mask = next(padded_batches(SEQUENCES, 4))
    with torch.no_grad():
        model(**text_inputs(model, ids, mask))
    assert len(picked) > 2 and ran == {"expert_0", "expert_1"}
    with pytest.raises(MoeVizError, match="does not follow its router") as refused:
        collect_routing_stats(model, SEQUENCES, batch_size=4)
    assert "\n" not in str(refused.value)


def _capture(model_dir, tmp_path, layerwise: bool, name: str):
    import json

    from family_zoo import SEQUENCES
    from moe_viz import store
    from moe_viz.capture.run import CaptureSettings, capture

    source = tmp_path / "ids.jsonl"
    source.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in SEQUENCES))
    path = tmp_path / f"{name}.duckdb"
    run_ids = capture(str(model_dir), [f"rand={source}"], store_path=path, device="cpu", dtype="fp32",
                      settings=CaptureSettings(seq_len=32, batch_size=4, trace_tokens=0), layerwise=layerwise,
                      progress=lambda p: None)
    return store.expert_stats(path, run_ids).sort_values(["layer", "expert"]).reset_index(drop=True)


def test_qwen3_omni_layerwise_capture_equals_the_in_memory_one(tmp_path):
    from moe_viz import store

    tiny_family_model("qwen3_omni_moe").save_pretrained(tmp_path / "model")
    memory = _capture(tmp_path / "model", tmp_path, False, "memory")
    streamed = _capture(tmp_path / "model", tmp_path, True, "layerwise")
    assert memory.routed_tokens.sum() > 0
    for column in ("routed_tokens", "gate_sum", "ean_sum"):
        assert memory[column].tolist() == pytest.approx(streamed[column].tolist(), rel=1e-6, abs=1e-9), column
    # the talker, code2wav and towers were sampled unit by unit: the same model as the whole load
    fingerprints = [store.list_runs(tmp_path / f"{name}.duckdb").model_fingerprint.tolist() for name in ("memory", "layerwise")]
    assert fingerprints[0] == fingerprints[1] and len(fingerprints[0]) == 1


def test_qwen3_omni_layerwise_loads_what_the_thinker_never_runs_one_unit_at_a_time(tmp_path, monkeypatch):
    """The talker, code2wav and the thinker's LM head are read only to be sampled for the fingerprint: one
    unit (a numbered layer or block) at a time, on the host, freed before the next; after load_outer only
    the thinker's text model holds real tensors."""
    from moe_viz.capture import layerwise

    tiny_family_model("qwen3_omni_moe").save_pretrained(tmp_path / "model")
    streamer = layerwise.LayerwiseCapture(tmp_path / "model", "cpu", "fp32")
    outside = [n for n in streamer.model.state_dict() if not n.startswith("thinker.model.")]
    real_outside = lambda: [n for n, t in streamer.model.state_dict(keep_vars=True).items()  # noqa: E731
                            if n in outside and t.device.type != "meta"]
    loads, load_tensors = [], layerwise.load_tensors

    def recording(model, keys, group, device, dtype, what):
        loads.append((group, device.type, real_outside()))
        return load_tensors(model, keys, group, device, dtype, what)

    monkeypatch.setattr(layerwise, "load_tensors", recording)
    streamer.load_outer()
    units = [group for group, _, _ in loads if isinstance(group, str)]
    assert {"talker.model.layers.0", "talker.code_predictor.model.layers.1", "code2wav.decoder.0",
            "thinker.lm_head"} <= set(units)
    assert [(device, resident) for group, device, resident in loads if isinstance(group, str)] == [("cpu", [])] * len(units)
    assert loads[-1][0] is None and loads[-1][2] == []  # the text model's own tensors come last, alone
    assert real_outside() == []
    assert set(outside) <= set(streamer.samples)


def test_qwen3_omni_layerwise_names_a_talker_tensor_the_checkpoint_lacks(tmp_path):
    from safetensors.torch import load_file, save_file

    from moe_viz import store

    tiny_family_model("qwen3_omni_moe").save_pretrained(tmp_path / "model")
    (shard,) = (tmp_path / "model").glob("*.safetensors")
    tensors = load_file(shard)
    (dropped,) = [k for k in tensors if k.startswith("talker.model.layers.1.") and k.endswith("input_layernorm.weight")]
    save_file({k: v for k, v in tensors.items() if k != dropped}, shard, metadata={"format": "pt"})
    with pytest.raises(MoeVizError) as refused:
        _capture(tmp_path / "model", tmp_path, True, "layerwise")
    assert str(refused.value) == (f"the checkpoint lacks 1 tensor(s) of talker.model.layers.1 ({dropped}): "
                                  "it is incomplete or for another architecture")
    assert store.list_runs(tmp_path / "layerwise.duckdb").status.tolist() == ["failed"]


def test_encoder_decoder_layerwise_capture_is_refused_in_one_line(tmp_path):
    tiny_family_model("switch_transformers").save_pretrained(tmp_path / "model")
    with pytest.raises(MoeVizError, match="encoder-decoder model: layer-by-layer capture") as refused:
        _capture(tmp_path / "model", tmp_path, True, "layerwise")
    assert "\n" not in str(refused.value)


def test_dashboard_names_encoder_and_decoder_layers_apart(tmp_path, monkeypatch):
    """Layer pickers label a Switch capture's layers with their module, so encoder.block.1 and
    decoder.block.1 are told apart; a single-stack model keeps plain numbers."""
    from pathlib import Path

    import pandas as pd
    from streamlit.testing.v1 import AppTest

    from moe_viz.analysis.tables import layer_labels

    assert layer_labels(pd.DataFrame({"layer": [1, 3], "module": ["model.layers.1.mlp", "model.layers.3.mlp"]})) == {
        1: "1", 3: "3"}
    assert layer_labels(pd.DataFrame({"layer": [0, 1], "module": ["model.layers.0.self_attention",
                                                                  "model.layers.0.mlp"]})) == {
        0: "0 · model.layers.0.self_attention", 1: "1 · model.layers.0.mlp"}  # JetMoE: two blocks per layer
    tiny_family_model("switch_transformers").save_pretrained(tmp_path / "model")
    _capture(tmp_path / "model", tmp_path, False, "store")
    root = Path(__file__).resolve().parent.parent
    monkeypatch.setattr("sys.argv", ["app.py", "--store", str(tmp_path / "store.duckdb")])
    at = AppTest.from_file(str(root / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("moe_viz/ui/pages/expert.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert list(at.selectbox(key="ex_layer").options) == [
        "0 · encoder.block.0.layer.1.mlp", "1 · encoder.block.1.layer.1.mlp",
        "2 · decoder.block.0.layer.2.mlp", "3 · decoder.block.1.layer.2.mlp"]


def test_jetmoe_layerwise_capture_equals_the_in_memory_one(tmp_path):
    tiny_family_model("jetmoe").save_pretrained(tmp_path / "model")
    memory = _capture(tmp_path / "model", tmp_path, False, "memory")
    streamed = _capture(tmp_path / "model", tmp_path, True, "layerwise")
    assert sorted(set(memory.layer)) == [0, 1, 2, 3] and memory.routed_tokens.sum() > 0
    for column in ("layer", "expert", "routed_tokens", "gate_sum", "ean_sum"):
        assert memory[column].tolist() == pytest.approx(streamed[column].tolist(), rel=1e-6, abs=1e-9), column


def test_text_runner_picks_the_child_holding_the_text_config_not_the_first_child_with_a_forward():
    """Qwen3-Omni's talker and code2wav also have a forward and a config of their own: with the thinker
    registered last, the text still runs through the thinker (the child whose config is the text config)."""
    model = tiny_family_model("qwen3_omni_moe")
    model._modules["thinker"] = model._modules.pop("thinker")  # registered last
    assert list(model._modules)[0] == "talker"
    assert text_runner(model) is model.thinker
    names = [layer.name for layer in find_moe_layers(model)]
    assert names == [f"thinker.model.language_model.layers.{i}.mlp" for i in range(len(names))] and names
