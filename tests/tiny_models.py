"""Tiny random MoE models of every tested family, built from config objects (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    GraniteMoeConfig,
    Llama4TextConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    Qwen2MoeConfig,
    JambaConfig,
    Qwen3MoeConfig,
    Qwen3NextConfig,
)

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,  # spread router logits so routing is far from uniform
    tie_word_embeddings=False,
)


def family_config(family: str, **overrides):
    c = {**COMMON, **overrides}
    if family == "mixtral":
        return MixtralConfig(**c, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **c, intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=8, num_experts_per_tok=2,
        )
    if family in ("qwen3_moe", "qwen3_moe_nonorm"):
        return Qwen3MoeConfig(
            **c, intermediate_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=family == "qwen3_moe", head_dim=8,
        )
    if family == "olmoe":
        return OlmoeConfig(**c, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    if family == "deepseek_v3":
        c.update(num_hidden_layers=3, num_key_value_heads=4)
        return DeepseekV3Config(
            **c, intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if family == "gpt_oss":
        return GptOssConfig(**c, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8)
    if family == "granitemoe":
        return GraniteMoeConfig(**c, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if family == "phimoe":
        return PhimoeConfig(**c, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if family == "llama4_text":
        return Llama4TextConfig(
            **c, intermediate_size=16, intermediate_size_mlp=32, num_local_experts=8, num_experts_per_tok=1,
            head_dim=8, interleave_moe_layer_step=1,
        )
    if family == "qwen3_next":  # linear-attention (gated delta net) and full-attention layers
        c.update(num_hidden_layers=3)
        return Qwen3NextConfig(
            **c, intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=8,
            num_experts_per_tok=2, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=8, linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        )
    if family == "jamba":  # mamba and attention layers, MoE on every second layer (dense MLP between)
        c.update(num_hidden_layers=4)
        return JambaConfig(
            **c, intermediate_size=16, num_experts=8, num_experts_per_tok=2, attn_layer_period=2,
            attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=2,
            mamba_expand=2,
        )
    raise ValueError(family)


FAMILIES = [
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_nonorm", "olmoe", "deepseek_v3",
    "gpt_oss", "granitemoe", "phimoe", "llama4_text",
]
# Hybrid attention / linear-attention (or mamba) families, used where a test needs them.
HYBRID_FAMILIES = ["qwen3_next", "jamba"]


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **overrides)).eval()
    if family == "deepseek_v3":
        # A non-zero correction bias, so a test notices if selection ignores it.
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.1)
    if family == "gpt_oss":
        for module in model.modules():
            if type(module).__name__ == "GptOssTopKRouter":
                module.bias.data.normal_(0, 0.5)
    return model


SAMPLE_TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n"
    "The quick brown fox jumps over the lazy dog. Experts route tokens by domain.\n"
    "2 + 3 = 5; 7 * 6 = 42; solve x + 4 = 9 so x = 5.\n"
)


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained in milliseconds on SAMPLE_TEXT."""
    from moe_viz.demo.train import byte_bpe_tokenizer

    return byte_bpe_tokenizer([SAMPLE_TEXT] * 4, vocab_size)


def save_tiny_model(path, family: str = "qwen3_moe", seed: int = 0):
    """A tiny MoE with a tokenizer saved like a hub checkpoint; returns the path."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer),
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=None)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
