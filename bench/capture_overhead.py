"""Capture overhead vs a bare forward pass, measured side by side.

    python bench/capture_overhead.py --config 100m            # CPU, 1 thread
    python bench/capture_overhead.py --config large --device cuda

Variants, timed in interleaved repetitions on the same model and tokens:
- bare:       the model's forward, nothing attached
- capture:    moe_viz's observer (fast path with the default grouped_mm experts)
- recompute:  moe_viz's observer forced onto the recompute path
- dense:      an "every expert on every token" observer, the way REAP's reference
              code measures activation norms (norms of all E experts per token)
Reports the median time of each and the median of per-repetition ratios to bare.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from moe_viz.models import find_moe_layers
from moe_viz.capture.observe import RoutingObserver, slot_outputs

CONFIGS = {
    # name: (hidden, layers, experts, top_k, expert width, vocab, batch, seq)
    "tiny": (64, 2, 8, 2, 32, 512, 4, 128),
    "100m": (512, 6, 32, 4, 384, 8192, 4, 512),
    "large": (2048, 8, 64, 8, 768, 32000, 8, 1024),
}


def build(name: str, device: str, dtype: torch.dtype):
    hidden, layers, experts, top_k, width, vocab, batch, seq = CONFIGS[name]
    config = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=hidden // 8, intermediate_size=width * 2, moe_intermediate_size=width,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, max_position_embeddings=seq,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    return model, ids


class DenseObserver:
    """Computes ||f_e(x)|| for every expert on every token (E x the expert compute)."""

    def __init__(self, model):
        self.layers = find_moe_layers(model)
        self.handles = []

    def hook(self, module, args, output):
        hidden = args[0]
        every = torch.arange(module.num_experts, device=hidden.device).expand(hidden.shape[0], -1)
        rows = slot_outputs(module, hidden, every, hidden.dtype)
        torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32).sum(0)

    def __enter__(self):
        self.handles = [layer.experts.register_forward_hook(self.hook) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def timed(model, ids, context=None) -> float:
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        if context is None:
            model(ids, use_cache=False)
        else:
            with context:
                model(ids, use_cache=False)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="100m")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on 2-core VMs)")
    parser.add_argument("--skip-dense", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, ids = build(args.config, args.device, dtype)
    layers = find_moe_layers(model)
    params = sum(p.numel() for p in model.parameters())
    variants = {
        "bare": lambda: None,
        "capture": lambda: RoutingObserver(layers, fast=True),
        "recompute": lambda: RoutingObserver(layers, fast=False),
    }
    if not args.skip_dense:
        variants["dense"] = lambda: DenseObserver(model)
    for make in variants.values():  # warm-up
        timed(model, ids, make())
    times = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, make in variants.items():
            times[name].append(timed(model, ids, make()))
    device_name = torch.cuda.get_device_name(ids.device) if ids.is_cuda else f"CPU, {args.threads} thread(s)"
    print(f"config={args.config} params={params / 1e6:.1f}M tokens={ids.numel()} dtype={args.dtype} "
          f"device={device_name} reps={args.reps}")
    print(f"{'variant':<10} {'median s':>9} {'ratio to bare (median of pairs)':>32}")
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, times["bare"])]
        print(f"{name:<10} {statistics.median(values):9.4f} {statistics.median(ratios):32.3f}")


if __name__ == "__main__":
    main()
