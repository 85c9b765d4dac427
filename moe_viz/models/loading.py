"""Load a model for capture: device and dtype choices, early checks of a checkpoint path, the
transformers class for a config, then the model (safetensors only) and its tokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import adopt_text_forward


def model_class_for(config):
    """The transformers class a checkpoint of this config loads as for text generation.

    A causal LM where transformers registers one for the config (and it is not a composite model's
    text-only class), else the image-text-to-text class (multimodal models: their text MoE is run
    text-only), else the multimodal-LM class (Qwen3-Omni: run through its text model, `text_runner`),
    else the seq2seq class (encoder-decoder MoE)."""
    from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM,
                              AutoModelForSeq2SeqLM)
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", "")
    composite = "text_config" in getattr(type(config), "sub_configs", {})
    order = [(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, AutoModelForCausalLM),
             (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, AutoModelForImageTextToText),
             (modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES, AutoModelForMultimodalLM),
             (modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, AutoModelForSeq2SeqLM)]
    if composite:
        order = order[1:2] + order[:1] + order[2:]
    for names, auto_class in order:
        if model_type in names:
            return auto_class
    from transformers import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING and not getattr(config, "auto_map", None):
        raise MoeVizError(f"moe_viz cannot load yet model type {model_type}: transformers registers no causal-LM, "
                          "image-text-to-text or seq2seq class for it")
    return AutoModelForCausalLM  # trust_remote_code models register themselves through auto_map


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
        model, info = model_class_for(config).from_pretrained(
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
    adopt_text_forward(model).eval()
    return model, load_tokenizer(model_id, trust_remote_code)


def load_tokenizer(model_id: str, trust_remote_code: bool = False):
    """The model's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):
        return None
