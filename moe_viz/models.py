"""Find the MoE blocks of a Hugging Face causal LM and load models for capture.

A *MoE layer* here is a sparse block with a router child (`gate` or `router`)
whose weight is (E, H) and an `experts` child holding the E experts. Blocks are
found by structure, not by family name, so any family built like the v5 fused
layout works. Families whose experts are not the standard fused module get an
*adapter* name that `capture` knows how to observe:

- ``fused``:  v5 `@use_experts_implementation` experts, called as
  ``experts(hidden (T,H), top_k_index (T,k), top_k_weights (T,k))``.
- ``llama4``: Llama4 text experts, which run densely on ``(E*T, H)`` inputs that
  the block has already multiplied by the gate.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Router families whose per-expert score is sigmoid(logit) rather than softmax.
# Any router carrying an `e_score_correction_bias` is also treated as sigmoid
# (DeepSeek-V3 style) unless its family is listed as softmax below.
SIGMOID_ROUTER_FAMILIES = {"deepseek_v3", "glm4_moe", "dots1", "minimax_m2", "llama4_text", "llama4"}
SOFTMAX_ROUTER_FAMILIES_WITH_BIAS = {"ernie4_5_moe"}

# Every config key a family may use for the routed-expert count.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


class MoeVizError(Exception):
    """A user-facing error: its message is one line that says what to do."""


@dataclass
class MoeLayer:
    """One sparse MoE block of a model."""

    layer: int  # decoder layer index (dense layers leave gaps)
    name: str  # module path of the block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    adapter: str  # "fused" | "llama4"
    score_fn: str  # "softmax" | "sigmoid": how router logits become per-expert scores
    logits_index: int  # position of the router logits in the router's output tuple


def _layer_index(name: str, fallback: int) -> int:
    found = re.findall(r"\.(\d+)(?:\.|$)", name)
    return int(found[-1]) if found else fallback


def _router_of(block: nn.Module, hidden_size: int | None) -> nn.Module | None:
    for child_name in ("gate", "router"):
        router = getattr(block, child_name, None)
        weight = getattr(router, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            if hidden_size is None or weight.shape[1] == hidden_size:
                return router
    return None


def _adapter_of(experts: nn.Module) -> str | None:
    # The v5 decorator adds these attributes to every fused experts instance.
    if hasattr(experts, "is_transposed") and hasattr(experts, "_is_expert_parallel"):
        return "fused"
    if type(experts).__name__ == "Llama4TextExperts":
        return "llama4"
    return None


def _score_fn(model_type: str, router: nn.Module) -> str:
    if model_type in SIGMOID_ROUTER_FAMILIES:
        return "sigmoid"
    if hasattr(router, "e_score_correction_bias") and model_type not in SOFTMAX_ROUTER_FAMILIES_WITH_BIAS:
        return "sigmoid"
    return "softmax"


def find_moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Return the model's sparse MoE blocks in forward order.

    Raises MoeVizError naming what was found if the model has none, or if it
    has expert-like modules this tool cannot observe.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    model_type = getattr(text_config, "model_type", "") or ""
    hidden_size = getattr(text_config, "hidden_size", None)
    layers: list[MoeLayer] = []
    unsupported: list[str] = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        router = _router_of(module, hidden_size)
        adapter = _adapter_of(experts)
        if router is None or adapter is None:
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        adapter_logits_index = 1 if adapter == "llama4" else 0
        layers.append(
            MoeLayer(
                layer=_layer_index(name, len(layers)),
                name=name,
                block=module,
                router=router,
                experts=experts,
                num_experts=int(router.weight.shape[0]),
                adapter=adapter,
                score_fn=_score_fn(model_type, router),
                logits_index=adapter_logits_index,
            )
        )
    if not layers:
        kind = type(model).__name__
        if unsupported:
            raise MoeVizError(
                f"{kind} has expert modules moe_viz cannot observe yet: {', '.join(unsupported[:3])}; "
                "supported are v5 fused experts and Llama4 text (see README)"
            )
        raise MoeVizError(f"{kind} ({model_type or 'unknown type'}) has no MoE layers: nothing to capture")
    return layers


def tensor_sample(tensor: torch.Tensor) -> bytes:
    """The head and tail (64 elements each) of a tensor as float32 bytes: what the fingerprint hashes."""
    flat = tensor.detach().reshape(-1)
    return torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float32).numpy().tobytes()


def fingerprint_from_samples(config, tensors: list[tuple[str, tuple, torch.dtype]], samples: dict[str, bytes]) -> str:
    """`model_fingerprint` from (name, shape, dtype) in state_dict order and each tensor's `tensor_sample`.

    Layer-wise capture never holds the whole model: it samples each tensor while
    it is loaded and gets the same fingerprint as an in-memory capture.
    """
    digest = hashlib.sha256()
    if config is not None:
        config_dict = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    for name, shape, dtype in tensors:
        digest.update(f"{name}:{shape}:{dtype}".encode())
        digest.update(samples[name])
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A short hash identifying the weights: config plus a sample of every tensor.

    Sampling the head and tail of each tensor keeps this cheap on huge models
    while still telling apart two checkpoints that share a config.
    """
    state = model.state_dict()
    return fingerprint_from_samples(
        getattr(model, "config", None),
        [(name, tuple(t.shape), t.dtype) for name, t in state.items()],
        {name: tensor_sample(t) for name, t in state.items()},
    )


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str) -> str:
    """Map ``auto|cpu|cuda|cuda:N`` to a concrete choice, with a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise MoeVizError(f"--device {device} asked for a GPU but torch sees none; use --device cpu or auto")
        return device
    raise MoeVizError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: str, device: str) -> torch.dtype | str:
    """``auto`` keeps the checkpoint's dtype on GPU and uses fp32 on CPU."""
    if dtype == "auto":
        return "auto" if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise MoeVizError(f"unknown dtype {dtype!r}: use auto, bf16, fp16 or fp32")
    return DTYPES[dtype]


def canonical_model_id(model_id: str) -> str:
    """Local directories are recorded by absolute path, hub ids as given."""
    path = Path(model_id).expanduser()
    return str(path.resolve()) if path.is_dir() else model_id


def check_model_path(model_id: str) -> None:
    """Fail early, before any loading, on a local path that cannot be a model."""
    from moe_viz.checkpoint import is_local

    path = Path(model_id)
    if not is_local(model_id):
        return  # a hub id: checked when loading
    if not path.is_dir():
        raise MoeVizError(f"model path {model_id} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise MoeVizError(f"{model_id} has no config.json: point --model at a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise MoeVizError(f"{model_id} has no .safetensors weights: moe_viz only loads safetensors checkpoints")


def _loading_problems(info: dict) -> str:
    """transformers' load report (missing / unexpected / mismatched keys, errors) as one short phrase."""
    parts = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        keys = sorted(str(k[0] if isinstance(k, (tuple, list)) else k).splitlines()[0] for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            label = {"missing_keys": "missing", "unexpected_keys": "unexpected", "mismatched_keys": "mismatched shape",
                     "error_msgs": "load errors"}[kind]
            parts.append(f"{label} ({len(keys)}): {shown}")
    return "; ".join(parts)


def load_model(
    model_id: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
    max_memory: dict | None = None,
) -> tuple[nn.Module, object | None]:
    """Load a causal LM (safetensors only) and its tokenizer if it has one.

    ``device="auto"`` on a CUDA machine uses accelerate's ``device_map="auto"``
    so models larger than one GPU spread over all GPUs (and CPU memory).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from moe_viz.checkpoint import check_checkpoint, load_config

    check_model_path(model_id)
    check_checkpoint(model_id)  # truncated / corrupt shards, a shard missing from the index
    config = load_config(model_id, trust_remote_code=trust_remote_code)
    concrete = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, concrete)
    device_map = "auto" if (device == "auto" and concrete == "cuda") else concrete
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would repeat, at length, the one-line error below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_id,
            config=config,
            dtype=torch_dtype,
            device_map=device_map,
            max_memory=max_memory if device_map == "auto" else None,  # e.g. one data-parallel rank's GPUs
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below as an error instead of a RuntimeError
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoeVizError(f"could not load model {model_id}: {first_line}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = _loading_problems(info)
    if problems:
        raise MoeVizError(
            f"{model_id} does not hold the weights its config declares ({problems}): the checkpoint is incomplete "
            "or for another architecture; moe_viz never random-initialises missing weights"
        )
    model.eval()
    return model, load_tokenizer(model_id, trust_remote_code)


def load_tokenizer(model_id: str, trust_remote_code: bool = False):
    """The model's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):
        return None
