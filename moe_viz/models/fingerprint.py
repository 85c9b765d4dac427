"""A short hash that identifies a model's weights: its config plus a sample of every tensor.

Computed the same from a model in memory and from tensors streamed one at a time (layer-wise capture),
so a run records which weights it saw either way.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


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
