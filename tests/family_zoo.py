"""Every model type with a sparse MoE block that the installed transformers ships, as a tiny random model.

Discovery is programmatic, so a new transformers release adds its families here by itself:
a model *directory* of `transformers.models` is MoE when one of its modeling files assigns
`self.experts = ...`; each model type registered from that directory with a generative
auto class (causal LM, image-text-to-text, multimodal LM, seq2seq LM) is one family.

Tiny configs are made *generically*: every size-like key of the default config (and of its
sub-configs) is overridden by name (hidden sizes, layer counts, heads, vocab, expert counts,
top-k, ...); per-layer lists are cut to the tiny layer count. Family-specific overrides are
few and each says why (`FAMILY_OVERRIDES`).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto import modeling_auto

from moe_viz.models.loading import model_class_for
from moe_viz.models.routing import SELECTION_BIAS_NAMES

LAYERS = 2
VOCAB = 128
EXPERTS = 8
TOP_K = 2

# Generative auto classes, most specific to a *text* LM first.
AUTO_MAPPINGS = (
    ("causal_lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("image_text_to_text", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("multimodal_lm", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES"),
    ("seq2seq_lm", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
)

# Key name -> tiny value. Applied at every level of the config (text/vision/audio sub-configs too).
SIZES = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32,
    "intermediate_size": 32, "ffn_hidden_size": 32, "ffn_dim": 32, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
    "d_ff": 32, "intermediate_size_mlp": 32, "dense_intermediate_size": 32,
    "moe_intermediate_size": 16, "expert_ffn_hidden_size": 16, "expert_intermediate_size": 16,
    "shared_expert_intermediate_size": 16, "moe_shared_expert_intermediate_size": 16,
    "num_hidden_layers": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS, "n_layer": LAYERS, "encoder_layers": LAYERS,
    "decoder_layers": LAYERS, "num_decoder_layers": LAYERS, "depth": 1,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8, "d_kv": 8,
    "vocab_size": VOCAB, "max_position_embeddings": 256, "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16,
    "q_lora_rank": 16, "kv_lora_rank": 16, "o_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "qk_head_dim": 16,
    "num_local_experts": EXPERTS, "num_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": TOP_K, "moe_topk": TOP_K, "moe_k": TOP_K, "top_k": TOP_K, "num_selected_experts": TOP_K,
    "top_k_experts": TOP_K, "num_experts_per_token": TOP_K, "n_shared_experts": 1, "num_shared_experts": 1,
    "n_group": 2, "num_expert_group": 2, "topk_group": 1, "first_k_dense_replace": 0, "num_dense_layers": 1,
    "zero_expert_num": 2, "encoder_sparse_step": 1, "decoder_sparse_step": 1, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "sliding_window": 16,
}
# Any other int key named like a width (`adapter_out_dim`, `text_hidden_size`, ...) above this is set to
# the tiny hidden size: multimodal configs check that their projectors' widths match the text model's.
WIDTH_KEY = re.compile(r"(size|dim)$")
WIDTH_LIMIT = 64
# Keys that may be None by default (derived later, or "no experts") and must be set for a tiny MoE.
SET_WHEN_NONE = {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
                 "moe_topk", "moe_k", "head_dim", "top_k_experts", "moe_intermediate_size", "n_shared_experts"}
# Set to the tiny value even when the default is smaller (HunYuan defaults to 1 expert).
EXACT_KEYS = {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "first_k_dense_replace"}
TOKEN_ID = re.compile(r"(_token_id|_token_index|_id)$")


def _site_models() -> str:
    return os.path.dirname(transformers.models.__file__)


@lru_cache(maxsize=1)
def moe_directories() -> frozenset[str]:
    """`transformers.models` sub-packages one of whose modeling files builds `self.experts`."""
    found = set()
    root = _site_models()
    for name in os.listdir(root):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for file in os.listdir(folder):
            if file.startswith("modeling_") and file.endswith(".py"):
                with open(os.path.join(folder, file), encoding="utf-8") as handle:
                    if re.search(r"self\.experts\s*=", handle.read()):
                        found.add(name)
                        break
    return frozenset(found)


def auto_kind(model_type: str) -> tuple[str, str] | None:
    """(kind, class name) of the first generative auto class registered for a model type.

    Only tells which model types generate text; moe_viz.models.loading.model_class_for picks the class."""
    for kind, mapping in AUTO_MAPPINGS:
        names = getattr(modeling_auto, mapping, {})
        if model_type in names:
            return kind, names[model_type]
    return None


@lru_cache(maxsize=1)
def discover_families() -> tuple[str, ...]:
    """Every model type from a MoE directory that has a generative auto class, sorted."""
    families = []
    for model_type in CONFIG_MAPPING:
        directory = CONFIG_MAPPING[model_type].__module__.split(".")[2]
        if directory in moe_directories() and auto_kind(model_type) is not None:
            families.append(model_type)
    return tuple(sorted(families))


def _cut(value, old_layers: int | None):
    """A per-layer list or pattern string cut to LAYERS entries: the first and the last ones,
    so hybrid patterns keep both kinds (dense first / MoE later, sliding first / full last)."""
    if old_layers and isinstance(value, list) and len(value) == old_layers and old_layers > LAYERS:
        return value[:1] + value[len(value) - (LAYERS - 1):]
    return value


def shrink(config_dict: dict) -> dict:
    """A tiny version of a config dict (recursively into sub-config dicts)."""
    old_layers = next((config_dict[k] for k in ("num_hidden_layers", "num_layers", "decoder_layers")
                       if isinstance(config_dict.get(k), int)), None)
    out = {}
    token_ids = 0
    for key, value in config_dict.items():
        if key.startswith("enable_moe") and isinstance(value, bool):
            out[key] = True  # families whose MoE block is optional (Gemma-4) default it off
        elif key == "mlp_only_layers" and isinstance(value, list):
            out[key] = [i for i in value if i < LAYERS - 1]  # dense layers by index: the last one stays MoE
        elif key == "per_layer_config" and isinstance(value, dict):  # heterogeneous layers: keep those that exist
            out[key] = {k: shrink(v) for k, v in value.items() if int(k) < LAYERS}
        elif isinstance(value, dict) and all(isinstance(k, str) for k in value) and key not in (
                "rope_parameters", "rope_scaling", "label2id"):
            out[key] = shrink(value)
        elif key in SIZES and isinstance(value, list) and all(isinstance(v, int) for v in value):
            out[key] = [min(v, SIZES[key]) for v in value]  # per-modality sizes (Ernie-4.5-VL: text, vision)
        elif key in SIZES and (value is None and key in SET_WHEN_NONE or isinstance(value, int)
                               and not isinstance(value, bool)):
            exact = value is None or key in EXACT_KEYS
            out[key] = SIZES[key] if exact else min(value, SIZES[key])
        elif key.endswith("heads") and "mamba" not in key and isinstance(value, int) and value > 4:
            out[key] = 2  # linear-attention / indexer heads: their reference kernels are slow at full count
        elif key.endswith("head_dim") and isinstance(value, int) and value > 8:
            out[key] = 8
        elif key == "initializer_range" and isinstance(value, float):
            out[key] = 0.2  # large enough weights that each block visibly changes its tokens (token shift)
        elif TOKEN_ID.search(key) and isinstance(value, int) and value >= VOCAB:
            token_ids += 1  # distinct special-token ids inside the tiny vocab
            out[key] = VOCAB - token_ids
        elif (WIDTH_KEY.search(key) and isinstance(value, int) and not isinstance(value, bool) and value > WIDTH_LIMIT
              and not any(word in key for word in ("position", "vocab", "max", "window"))):
            out[key] = SIZES["hidden_size"]
        else:
            out[key] = _cut(value, old_layers)
    return out


def tiny_config(model_type: str):
    config_class = CONFIG_MAPPING[model_type]
    small = shrink(config_class().to_dict())
    small = _merge(small, FAMILY_OVERRIDES.get(model_type, {}))
    return config_class.from_dict(small)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) and key != "per_layer_config" else value
    return out


# Only what the generic shrinking cannot know; each says why.
FAMILY_OVERRIDES: dict[str, dict] = {
    # DbrxConfig() defaults cannot build a model (no rope_theta in the attention sub-config).
    "dbrx": {"n_heads": 4, "attn_config": {"rope_theta": 10000.0, "kv_n_heads": 4, "clip_qkv": 8.0}},
    # mlp_layer_types defaults to None and is not derived.
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse"]}},
    # layer_types defaults to None and is not derived (Lfm2-MoE mixes conv and attention layers).
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # 3-D rotary sections default to the full-size head: give sections that fit a tiny head.
    "glm4v_moe": {"text_config": {"head_dim": 16, "rope_parameters": {"mrope_section": [2, 1, 1]}}},
    "ernie4_5_vl_moe": {"text_config": {"rope_parameters": {"mrope_section": [1, 1, 2]}}},
    # MLA with partial rotary: the rotary part (head_dim x factor) must equal qk_rope_head_dim.
    "mistral4": {"head_dim": 16},
    # a list of layer indices (not per-layer flags): derived again from the tiny layer count.
    "mistral_large4": {"text_config": {"kv_source_layers": None}},
    # its sliding-attention layers need a window; the default is None.
    "step3p7": {"text_config": {"sliding_window": 16}},
    # the sparse-attention indexer's sizes default to None and are not derived.
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
                       "indexer_compress_ratio": 4},
    # the thinker's config class does not declare this id, which its model reads.
    "qwen3_omni_moe_thinker": {"vision_start_token_id": VOCAB - 20},
    # the speech "talker" (a MoE of its own, left whole) is built: two keys its default config lacks.
    "qwen3_omni_moe": {"talker_config": {"spatial_merge_size": 2, "text_config": {"shared_expert_intermediate_size": 16}},
                       "thinker_config": {"vision_start_token_id": VOCAB - 20}},
}


FAMILY_OVERRIDES["qwen4_exp"] = {"text_config": FAMILY_OVERRIDES["qwen4_exp_text"]}


def tiny_family_model(model_type: str, seed: int = 0):
    """A tiny random model of the class moe_viz loads this model type with."""
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    model = model_class_for(config).from_config(config).eval()
    repair = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point() and tensor.numel() and not (
                    torch.isfinite(tensor).all() and tensor.abs().max() < 1e4):
                # left uninitialised by the library (Qwen3-Omni's talker experts: torch.empty garbage, NaN at times)
                tensor.copy_(torch.randn(tensor.shape, generator=repair) * 0.02)
            if name.rsplit(".", 1)[-1] in SELECTION_BIAS_NAMES:
                # Non-zero selection biases (they start at 0), so a check notices one left unsliced or unmasked.
                tensor.normal_(0, 0.1)
            elif re.search(r"(gate|router)(\.\w+)?\.weight$", name) and tensor.dim() == 2:
                # Spread router logits so routing is far from uniform and experts differ in use.
                tensor.normal_(0, 0.5)
    return model


# -- the end-to-end check ------------------------------------------------------------

KEEPS = (6, 4)  # two keep counts of 8: one other than half; both valid for 2 groups of >= 2
SEQUENCES = [torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (24, 17, 24, 9)]
EVAL = {"rand": [torch.randint(3, 100, (20,), generator=torch.Generator().manual_seed(99 + i)).tolist()
                 for i in range(2)]}


STATISTICS_COLUMNS = ("routed_tokens", "top1_tokens", "gate_sum", "ean_sum", "ean_sq_sum", "ean_max", "reap_sum",
                      "contribution_sum")  # those that do not depend on the router's score function


def standard_block(layer) -> bool:
    """A block the independent computation of test_capture_exact can follow: v5 fused experts and a
    router (the block's own child) that returns (logits, top-k weights, top-k index)."""
    if layer.adapter != "fused" or layer.router_parent not in (None, layer.router):
        return False
    hidden = layer.router.weight.shape[1]
    try:
        with torch.no_grad():
            out = layer.router(torch.zeros(3, hidden, dtype=layer.router.weight.dtype))
    except TypeError:  # a router called with more than the hidden states (HY-V3, MiniMax-M2, DeepSeek-V4 hash)
        return False
    return isinstance(out, tuple) and len(out) == 3 and out[0].shape == (3, layer.num_experts)


# Families whose non-standard blocks' statistics tests/test_family_structures.py checks against an
# independent computation of their own (the README's table says "own test").
OWN_STATISTICS_TEST = {"jetmoe", "switch_transformers"}


def check_statistics(model, layers, model_type: str = "") -> str:
    """Captured statistics vs test_capture_exact's independent computation, where the block is standard.

    Returns "exact", "own test" (OWN_STATISTICS_TEST) or "not standard" (then only the end-to-end export
    checks apply); raises AssertionError on any difference."""
    import numpy as np

    from moe_viz.capture.run import collect_routing_stats
    from test_capture_exact import reference_stats

    if not all(standard_block(layer) for layer in layers):
        return "own test" if model_type in OWN_STATISTICS_TEST else "not standard"
    experts, layer_rows, _ = collect_routing_stats(model, SEQUENCES, batch_size=4)
    reference, reference_layers, _ = reference_stats(model, "", SEQUENCES)
    assert (experts.routed_tokens > 0).sum() > 4, "routing should reach several experts"
    for column in STATISTICS_COLUMNS:
        np.testing.assert_allclose(experts[column], reference[column], rtol=1e-5, atol=1e-9, err_msg=column)
    np.testing.assert_array_equal(layer_rows.tokens, reference_layers.tokens)
    return "exact"


def capture_family(model_type: str, workdir) -> dict:
    """Save a tiny model and capture it; check the statistics where the block is standard. Returns a
    result row (with the model, its directory and the store); raises MoeVizError (one line) where
    moe_viz refuses to capture the family."""
    from pathlib import Path

    from moe_viz.capture.run import CaptureSettings, capture_model
    from moe_viz.capture.sources import Documents
    from moe_viz.models.discovery import find_moe_layers
    from moe_viz.models.loading import load_model

    workdir = Path(workdir)
    model_dir = workdir / model_type
    tiny_family_model(model_type).save_pretrained(model_dir)
    model, _ = load_model(str(model_dir), device="cpu", dtype="fp32")
    layers = find_moe_layers(model)
    store_path = workdir / "store.duckdb"
    capture_model(model, None, str(model_dir.resolve()), [Documents("rand", "inline", token_ids=SEQUENCES)],
                  CaptureSettings(seq_len=32, batch_size=4), store_path=store_path)
    return {"model_type": model_type, "class": type(model).__name__, "moe_layers": len(layers),
            "experts": layers[0].num_experts, "exports": [], "statistics": check_statistics(model, layers, model_type),
            "model": model, "model_dir": model_dir, "store": store_path}


def check_family(model_type: str, workdir) -> dict:
    """Save a tiny model, capture it, prune it at two keep counts (in memory, then streaming) and
    verify each export against the masked original. Returns a result row; raises MoeVizError
    (one line) where moe_viz refuses the family (to capture it, or, for CAPTURE_ONLY, to prune it)."""
    from pathlib import Path

    from moe_viz.prune.export import export_pruned
    from moe_viz.prune.plan import build_plan
    from moe_viz.prune.verify import verify_export

    workdir = Path(workdir)
    row = capture_family(model_type, workdir)
    model, model_dir, store_path = row.pop("model"), row.pop("model_dir"), row.pop("store")
    for keep, streaming in zip(KEEPS, (False, True)):
        plan = build_plan(store_path, str(model_dir.resolve()), "reap", {"rand": 1.0}, config=model.config,
                          keep=keep)
        out = export_pruned(plan, model_dir, workdir / f"{model_type}-keep{keep}", streaming=streaming)
        result = verify_export(out, EVAL, source_dir=model_dir)
        row["exports"].append({"keep": keep, "path": "streaming" if streaming else "in-memory",
                               "verdict": result["verdict"], "reason": result["reason"]})
    return row


# -- what is not supported yet, and why (the README's family table says the same) ---------------

# Families the test does not build: a tiny model of them cannot be made on a test machine.
NOT_BUILT: dict[str, str] = {}  # inkling_mm_model was here (">20 GB"): it now builds, saves and loads in < 6 GB

# Families moe_viz captures (statistics checked as for the others) but refuses to prune, with a one-line
# MoeVizError; the value is (a phrase of that message, the reason the README gives).
CAPTURE_ONLY = {
    "ernie4_5_vl_moe": ("capture only", "text experts captured (text never reaches the vision experts); not pruned: "
                        "text and vision experts share one expert count (`moe_num_experts`), so a checkpoint "
                        "pruned for text would only load with vision experts dropped blindly"),
    "switch_transformers": ("supported for capture only", "encoder-decoder: encoder and decoder MoE layers captured "
                            "as separate layers (statistics checked by tests/test_family_structures.py); pruning "
                            "encoder-decoder models is not supported yet"),
}

# Families moe_viz refuses with a one-line MoeVizError; the value is a phrase of that message.
UNSUPPORTED = {
    "deepseek_v4": ("hash routing", "hash-routed first layers pick experts from a token-id table "
                    "(`gate.tid2eid`): masking logits cannot remove an expert there"),
    "diffusion_gemma": ("cannot observe yet", "block diffusion: its MoE layers run on more tokens than the text "
                        "(the denoised canvas), so they are not comparable token by token"),
    "nllb-moe": ("does not follow its router", "transformers 5.23 only ever runs expert_0 and expert_1 (its experts "
                 "forward reads the 0/1 dispatch mask as expert ids, a library bug): capture checks the rows each "
                 "expert ran against its router's dispatch and refuses, as the statistics would be meaningless"),
}
