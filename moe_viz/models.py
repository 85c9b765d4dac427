"""Find the MoE blocks of a Hugging Face causal LM and load models for capture.

A *MoE layer* here is a sparse block with a router child (`gate` or `router`)
whose weight is (E, H) and an `experts` child holding the E experts. Blocks are
found by structure, not by family name, so any family built like the v5 fused
layout works. Families whose experts are not the standard fused module get an
*adapter* name that `capture` knows how to observe:

- ``fused``:  v5 `@use_experts_implementation` experts, called as
  ``experts(hidden (T,H), top_k_index (T,k), top_k_weights (T,k))``.
- ``called``: experts that are not decorated but take the same arguments (Step-3.x, ...);
  observed by calling their own forward once more per routed slot.
- ``llama4``: Llama4 text experts, which run densely on ``(E*T, H)`` inputs that
  the block has already multiplied by the gate.
- ``sorted``: JetMoE: parallel-expert projections run on token rows sorted by expert (its MLP, and its
  mixture of attention heads, observed as a block of its own: the attention module, whose `experts`
  child holds the router and the query/output projections of each expert).
- ``dispatch``: a ``ModuleDict`` of ``expert_i`` modules called with a dispatch mask
  (Switch-Transformers, NLLB-MoE; encoder-decoder: capture only).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

# Last resort for the router's score function, used only where the probe through the real router
# (`probe_score_fn`) cannot tell (a router that returns no top-k, a score that is neither softmax nor
# sigmoid) and the config names none (`scoring_func`): families whose modeling code scores with a sigmoid.
SIGMOID_ROUTER_FAMILIES = {"deepseek_v3", "glm4_moe", "dots1", "minimax_m2", "llama4_text", "llama4"}
SCORE_FNS = ("softmax", "sigmoid", "sqrtsoftplus")  # sqrtsoftplus: sqrt(softplus(z)) (DeepSeek-V4)

# Every config key a family may use for the routed-expert count.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


class MoeVizError(Exception):
    """A user-facing error: its message is one line that says what to do."""


@dataclass
class MoeLayer:
    """One sparse MoE block of a model."""

    layer: int  # decoder layer index (dense layers leave gaps; encoder-decoder: encoder layers first, _layer_index;
    #             several blocks in one decoder layer: all blocks numbered 0.. in forward order, _number_in_forward_order)
    name: str  # module path of the block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    adapter: str  # "fused" | "called" | "llama4" | "sorted" | "dispatch"
    score_fn_hint: str  # config / family-name guess, used only where the probe cannot tell (see `score_fn`)
    logits_index: int  # position of the router logits in the router's output tuple
    router_parent: nn.Module | None = None  # the block's `gate`/`router` child when `router` is a linear inside it
    # Rows the router scores: the E routed experts first, then choices that are not routed experts
    # (LongCat-Flash identity "zero" experts, Zaya's skip choice, Inkling's shared experts).
    router_rows: int = 0
    probed_score_fn: str | None = None  # what `probe_score_fn` found (None: not probed yet, or it could not tell)
    probed: bool = False

    def __post_init__(self) -> None:
        self.router_rows = self.router_rows or self.num_experts

    @property
    def extra_rows(self) -> int:
        """Router rows after the E routed experts (0 for most families)."""
        return self.router_rows - self.num_experts

    @property
    def score_fn(self) -> str:
        """"softmax" | "sigmoid": how this router turns logits into per-expert scores, found by running the
        real router once (`probe_score_fn`) as soon as its weights are loaded; else `score_fn_hint`."""
        if not self.probed and self.router.weight.device.type != "meta":
            self.probed_score_fn, self.probed = probe_score_fn(self), True
        return self.probed_score_fn or self.score_fn_hint

    def row_index(self, size: int, kept: list[int]) -> list[int] | None:
        """The rows of a tensor dim of `size` that pruning to the `kept` experts keeps, in order, or None
        when `size` is not an expert dim: E (one row per expert), the router's rows (kept experts, then
        every extra row, unchanged), or E*F (blocks of F rows per expert, DBRX's 2-D fused experts)."""
        return kept_rows(size, self.num_experts, self.router_rows, kept)


def _layer_index(name: str, fallback: int, stacks: list[tuple[str, int]] = ()) -> int:
    """The block's layer number: its index in the outermost layer list (`ModuleList`) holding it, offset by
    the lengths of the layer lists before it, so an encoder-decoder's `encoder.block.1` and `decoder.block.1`
    get different numbers (encoder layers first); for one stack of layers, the decoder layer index."""
    offset = 0
    for path, length in stacks:
        found = re.match(re.escape(path) + r"\.(\d+)(?:\.|$)", name)
        if found:
            return offset + int(found[1])
        offset += length
    found = re.findall(r"\.(\d+)(?:\.|$)", name)
    return int(found[-1]) if found else fallback


def _layer_stacks(model: nn.Module, block_names: list[str]) -> list[tuple[str, int]]:
    """(path, length) of the outermost ModuleLists holding the given blocks, in module order."""
    lists = [(n, len(m)) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
    stacks = []
    for block in block_names:
        outer = next(((n, k) for n, k in lists if block.startswith(n + ".")), None)
        if outer is not None and outer not in stacks:
            stacks.append(outer)
    return stacks


# A block whose own name says it is another modality's (Ernie-4.5-VL's `vision_moe` beside `text_moe`
# in each decoder layer) runs only on that modality's tokens: text never reaches it.
OTHER_MODALITY = re.compile(r"(?:^|_)(?:vision|visual|image|video|audio|speech)(?:_|$)")


def other_modality_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the expert blocks inside the text model that belong to another modality."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(getattr(module, "experts", None), nn.Module) and OTHER_MODALITY.search(name.rsplit(".", 1)[-1])]


def _forward_position(model: nn.Module, name: str) -> int:
    """Where the block's child of its decoder layer is first called in that layer's forward source
    (JetMoE registers `mlp` before `self_attention` but runs attention first); large if unknown."""
    found = re.match(r"^(?P<layer>.*\.\d+)\.(?P<child>[^.]+)", name)
    if not found:
        return 1 << 30
    try:
        source = inspect.getsource(type(model.get_submodule(found["layer"])).forward)
    except (OSError, TypeError, AttributeError):
        return 1 << 30
    position = source.find(f"self.{found['child']}")
    return position if position >= 0 else 1 << 30


def _number_in_forward_order(model: nn.Module, layers: list["MoeLayer"]) -> list["MoeLayer"]:
    """Blocks in forward order; when a decoder layer holds several (JetMoE: attention experts, then MLP
    experts), every block gets its own number 0..n-1 in that order (`layer_stats.module` names each).
    One block per decoder layer: numbers and order unchanged."""
    if len({layer.layer for layer in layers}) == len(layers):
        return layers
    order = sorted(range(len(layers)), key=lambda i: (layers[i].layer, _forward_position(model, layers[i].name), i))
    ordered = [layers[i] for i in order]
    for number, layer in enumerate(ordered):
        layer.layer = number
    return ordered


def _sorted_moe(module: nn.Module) -> nn.Module | None:
    """The module holding a router and parallel-expert projections (JetMoE's MLP, its attention's
    `experts`), for the module itself or its `experts` child; None otherwise."""
    for holder in (module, getattr(module, "experts", None)):
        if (isinstance(holder, nn.Module) and isinstance(getattr(holder, "router", None), nn.Module)
                and any(_is_parallel_experts(child) for child in holder.children())):
            return holder
    return None


def expert_modules(layer: "MoeLayer") -> list[nn.Module]:
    """Every module holding per-expert tensors of a block: its experts module, and for parallel-expert
    blocks (JetMoE) every projection beside it (`input_linear` as well as the observed `output_linear`)."""
    if layer.adapter != "sorted":
        return [layer.experts]
    holder = _sorted_moe(layer.block)
    return [child for child in holder.children() if _is_parallel_experts(child)]


def _router_of(block: nn.Module, hidden_size: int | None, num_experts: int | None) -> tuple[nn.Module, nn.Module] | None:
    """(router container, module whose output is the router logits) of a block, or None.

    The container is the block's `gate` / `router` child. Its logits come from the container itself
    when it has a 2-D (rows, H) weight, else from the linear layer inside it with one row per expert
    (AFMoE `router.gate`, HunYuan `gate.wg`, Gemma-4 `router.proj`); failing that, its last linear
    layer (whose row count then tells what it scores).
    """
    holder = _sorted_moe(block) or block  # JetMoE's attention: the router sits in its `experts` child
    for child_name in ("gate", "router"):
        container = getattr(holder, child_name, None)
        if not isinstance(container, nn.Module):
            continue
        weight = getattr(container, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            if hidden_size is None or weight.shape[1] == hidden_size:
                return container, container
            continue
        linears = [m for m in container.modules() if isinstance(m, nn.Linear)]
        matching = [m for m in linears if m.out_features == num_experts
                    and (hidden_size is None or m.in_features == hidden_size)]
        if len(matching) == 1:
            return container, matching[0]
        if linears and not matching:
            return container, linears[-1]
    return None


def _experts_count(experts: nn.Module) -> int | None:
    """Routed experts held by an experts module (its own attribute, else dim 0 of its fused weights)."""
    count = getattr(experts, "num_experts", None)
    if isinstance(count, int):
        return count
    fused = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
    # The smallest leading dim: LongCat's gate_up_proj also has rows for its identity "zero" experts.
    return min(int(p.shape[0]) for p in fused) if fused else None


def text_runner(model: nn.Module) -> nn.Module:
    """The module that runs a text forward: the model itself, or, for a composite model whose class
    has no forward of its own (Qwen3-Omni: a thinker beside a speech talker), the child model that
    holds the text config (`config.get_text_config()`: the thinker)."""
    if type(model).forward is not nn.Module.forward:
        return model
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    for child in model.children():
        child_config = getattr(child, "config", None)
        if (type(child).forward is not nn.Module.forward and child_config is not None
                and hasattr(child_config, "get_text_config") and child_config.get_text_config() is text_config):
            return child
    return model


def adopt_text_forward(model: nn.Module) -> nn.Module:
    """Give a loaded composite model without a forward its text model's forward and input embeddings
    (on this instance only), so every caller runs text through it as through a causal LM."""
    runner = text_runner(model)
    if runner is not model:
        model.forward = runner.forward
        model.get_input_embeddings = runner.get_input_embeddings
    return model


def _text_model_prefix(model: nn.Module) -> str:
    """Module-path prefix of a composite (multimodal) model's language model; "" for a text-only model."""
    config = getattr(model, "config", None)
    get_decoder = getattr(model, "get_decoder", None)
    if "text_config" not in getattr(type(config), "sub_configs", {}) or get_decoder is None:
        return ""
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError):
        return ""
    name = next((n for n, m in model.named_modules() if m is decoder), "")
    return name + "." if name else ""


def _adapter_of(experts: nn.Module) -> str | None:
    # The v5 decorator adds these attributes to every fused experts instance.
    if hasattr(experts, "is_transposed") and hasattr(experts, "_is_expert_parallel"):
        return "fused"
    if type(experts).__name__ == "Llama4TextExperts":
        return "llama4"
    # Undecorated experts called like the fused ones: observed by calling their own forward again.
    if "top_k_index" in inspect.signature(type(experts).forward).parameters and _experts_count(experts):
        return "called"
    if _is_parallel_experts(experts):
        return "sorted"
    if dispatch_experts(experts):
        return "dispatch"
    return None


def dispatch_experts(experts: nn.Module) -> list[nn.Module]:
    """The expert modules, in expert order, of a `ModuleDict` of `expert_0` … `expert_{E-1}` called with a
    (T, [k,] E) dispatch mask (Switch-Transformers, NLLB-MoE); [] for any other experts module."""
    if not isinstance(experts, nn.ModuleDict):
        return []
    numbered = {int(key.split("_")[1]): module for key, module in experts.items() if re.fullmatch(r"expert_\d+", key)}
    return [numbered[i] for i in range(len(numbered))] if sorted(numbered) == list(range(len(numbered))) else []


def _is_parallel_experts(module: nn.Module) -> bool:
    """Experts run on token rows sorted by expert, `forward(inputs, expert_size)`, one (E, out, in) weight
    (JetMoE's `input_linear` / `output_linear`)."""
    weight = getattr(module, "weight", None)
    count = getattr(module, "num_experts", None)
    return (isinstance(count, int) and isinstance(weight, torch.Tensor) and weight.dim() == 3
            and weight.shape[0] == count and "expert_size" in inspect.signature(type(module).forward).parameters)


def _experts_child(module: nn.Module) -> nn.Module | None:
    """A block's experts: its `experts` child, or, for a block with a router whose experts are
    parallel-expert projections, on the block or in its `experts` child (JetMoE's MLP and attention:
    `input_linear`, `output_linear`), the last of those, whose output rows are the unweighted expert
    outputs."""
    holder = _sorted_moe(module)
    if holder is not None:
        return [child for child in holder.children() if _is_parallel_experts(child)][-1]
    experts = getattr(module, "experts", None)
    return experts if isinstance(experts, nn.Module) else None


def kept_rows(size: int, num_experts: int, router_rows: int, kept: list[int]) -> list[int] | None:
    """`MoeLayer.row_index` for a layer of `num_experts` routed experts whose router scores `router_rows`."""
    if size == num_experts:
        return list(kept)
    if size == router_rows:  # the extra rows follow the E expert rows, as in every family that has them
        return list(kept) + list(range(num_experts, size))
    if size <= num_experts or size % num_experts:
        return None
    block = size // num_experts  # E contiguous blocks of F rows
    return [e * block + r for e in kept for r in range(block)]


def _score_fn_hint(model_type: str, config) -> str:
    """The documented last resort: the config's `scoring_func`, else the family-name list, else softmax."""
    named = getattr(config, "scoring_func", None)
    if named in SCORE_FNS:
        return named
    return "sigmoid" if model_type in SIGMOID_ROUTER_FAMILIES else "softmax"


PROBE_TOKENS = 32
PROBE_TOLERANCE = 1e-3  # in log space; routers compute in float32 (~1e-6), a wrong function is off by O(1)


@torch.no_grad()
def probe_score_fn(layer: "MoeLayer") -> str | None:
    """Which score function the real router applies: one of SCORE_FNS, or None when it cannot tell.

    Runs the router container once on random hidden states and compares the top-k weights it returns
    with softmax, sigmoid and sqrt(softplus) of its logits at the chosen experts. Renormalisation over
    the k, a scaling factor, or normalising together with shared experts multiply one token's weights by one number, so
    for the right function log(weight) - log(score) is the same for every slot of a token; for the wrong
    one it is not (any two differ by a per-expert term). Slots with weight 0 (a skip choice)
    are ignored. When several functions fit every token (top-1, or weights all equal after renormalising),
    the one whose offset is also the same across tokens wins; if still several or none fit (PhiMoE's
    sparsemixer, a router that returns no top-k), None.
    """
    container = layer.router_parent or layer.router
    own = getattr(container, "weight", None)
    linear = next((m for m in container.modules() if isinstance(m, nn.Linear)), None)
    width = own.shape[1] if isinstance(own, torch.Tensor) and own.dim() == 2 else getattr(linear, "in_features", None)
    if width is None:
        return None
    weight = layer.router.weight
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(PROBE_TOKENS, width, generator=generator).to(weight.device, weight.dtype)
    seen = []
    handle = layer.router.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        out = None
        for shaped in (hidden, hidden[None]):  # the flattened tokens a block passes, else (1, T, H) (Zaya)
            try:
                out = container(shaped)
                break
            except Exception:  # noqa: BLE001 - a router needing more than hidden states: the hint decides
                seen.clear()
    finally:
        handle.remove()
    if out is None:
        return None
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    # The logits are what the router's linear returned (Gemma-4's router returns probabilities first);
    # a router that uses its linear's weight without calling it (LongCat-Flash) returns them first.
    logits = seen[0] if seen else outputs[0]
    logits = logits[layer.logits_index] if isinstance(logits, (tuple, list)) else logits
    found = _routing_outputs(outputs, logits, layer)
    if found is None:
        return None
    return classify_score_fn(*found)


def classify_score_fn(logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> str | None:
    """`probe_score_fn`'s test on (T, W) logits and the (T, k) weights and index the model used with them.

    The tolerance follows the weights' precision (bfloat16 weights are rounded to ~4e-3)."""
    tolerance = max(PROBE_TOLERANCE, 4 * torch.finfo(weights.dtype).eps)
    logits, weights = logits.double(), weights.double()
    real = weights > 0
    rows = real.any(dim=1)
    if not bool(rows.any()):
        return None
    log_w = torch.where(real, weights.clamp_min(1e-300).log(), torch.zeros_like(weights))
    per_token, across = [], []
    candidates = (("softmax", torch.log_softmax(logits, dim=-1)), ("sigmoid", F.logsigmoid(logits)),
                  ("sqrtsoftplus", 0.5 * F.softplus(logits).log()))
    for name, log_score in candidates:
        offset = log_w - log_score.gather(1, index.clamp(0, logits.shape[-1] - 1))
        high = torch.where(real, offset, torch.full_like(offset, -math.inf)).amax(dim=1)[rows]
        low = torch.where(real, offset, torch.full_like(offset, math.inf)).amin(dim=1)[rows]
        if bool(((high - low) < tolerance).all()):
            per_token.append(name)
            if float(high.max() - low.min()) < tolerance:
                across.append(name)
    if len(per_token) == 1:
        return per_token[0]
    return across[0] if len(per_token) > 1 and len(across) == 1 else None


def _routing_outputs(outputs, logits, layer: "MoeLayer"):
    """(logits (T, W), top-k weights (T, k), top-k index (T, k)) from a router's outputs, or None."""
    tensors = [t for t in outputs if isinstance(t, torch.Tensor)]
    if not isinstance(logits, torch.Tensor) or logits.numel() != PROBE_TOKENS * logits.shape[-1]:
        return None
    logits = logits.reshape(PROBE_TOKENS, -1)
    index = next((t for t in tensors if not t.is_floating_point() and t.numel() % PROBE_TOKENS == 0), None)
    if index is None:
        if layer.adapter != "llama4":
            return None  # a router that returns only logits (DBRX): the block picks the experts
        # Llama4's router returns (scores scattered at its top-k, logits): the chosen experts are the top-k.
        index = torch.topk(logits, layer.router_parent.top_k, dim=1).indices
        return logits, outputs[0].reshape(PROBE_TOKENS, -1).gather(1, index), index
    index = index.reshape(PROBE_TOKENS, -1)
    weights = next((t for t in tensors if t.is_floating_point() and t.numel() == index.numel()), None)
    return None if weights is None else (logits, weights.reshape(PROBE_TOKENS, -1), index)


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
    runner = text_runner(model)
    runner_name = next((n for n, m in model.named_modules() if m is runner), "")
    text_prefix = (runner_name + "." if runner_name else "") + _text_model_prefix(runner)
    skipped = {name for name, _ in other_modality_blocks(model)}  # capture checks that text never runs them
    # A module that is another's `experts` is not a block itself (JetMoE's attention experts have a router of
    # their own inside and are never called: the block is the attention module that calls them).
    inner = {id(m.experts) for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module)}
    candidates = [(name, module) for name, module in model.named_modules()
                  if _experts_child(module) is not None and (name + ".").startswith(text_prefix)
                  and name not in skipped and id(module) not in inner]  # a vision/audio tower's MoE: left alone
    stacks = _layer_stacks(model, [name for name, _ in candidates])
    for name, module in candidates:
        experts = _experts_child(module)
        count = _experts_count(experts)
        found = _router_of(module, hidden_size, count)
        adapter = _adapter_of(experts)
        if found is None or adapter is None:
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        container, router = found
        rows = int(router.weight.shape[0])
        count = count or rows
        if rows < count:
            raise MoeVizError(f"{type(model).__name__}: moe_viz cannot observe yet {name}, whose router scores "
                              f"{rows} choices for {count} routed experts")
        index = _layer_index(name, len(layers), stacks)
        adapter_logits_index = 1 if adapter == "llama4" else 0
        layers.append(
            MoeLayer(
                layer=index,
                name=name,
                block=module,
                router=router,
                experts=experts,
                num_experts=count,
                adapter=adapter,
                score_fn_hint=_score_fn_hint(model_type, text_config),
                logits_index=adapter_logits_index,
                router_parent=container,
                router_rows=rows,
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
    return _number_in_forward_order(model, layers)


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


# Per-expert routing tensors outside the router's weight that steer *selection* only (added to scores
# before top-k); masking an expert sets its entry to -inf. Names as transformers 5 spells them.
SELECTION_BIAS_NAMES = ("e_score_correction_bias", "expert_bias", "balancing_biases")


@dataclass
class RoutingTensor:
    """A parameter or buffer of a MoE block, outside its experts, with one entry per routed expert."""

    path: str  # relative to the block, e.g. "gate.weight", "e_score_correction_bias"
    module: nn.Module
    attribute: str
    axis: int  # the expert axis
    size: int  # its length: E, or the router's rows (E + extra choices)

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attribute)

    @property
    def is_selection_bias(self) -> bool:
        return self.attribute in SELECTION_BIAS_NAMES


def expert_axis(shape: tuple[int, ...], num_experts: int) -> int | None:
    """The expert axis of a routing tensor: dim 0 of (E, ...) and the last dim of (1, ..., 1, E)."""
    if shape and shape[0] == num_experts:
        return 0
    if shape and shape[-1] == num_experts and all(d == 1 for d in shape[:-1]):
        return len(shape) - 1
    return None


def routing_tensors(layer: MoeLayer) -> list[RoutingTensor]:
    """Every parameter and buffer with an expert dimension on the block itself or in its router
    (container): router rows and biases wherever they sit (on the router, on the block, in a
    `moe_statics` child shaped (1, E), Gemma-4's `router.per_expert_scale`). Other children of the
    block (experts, shared experts, attention when the block is a decoder layer) are not routing.

    Raises MoeVizError naming a tensor that has E on an axis this tool does not know how to slice,
    or an integer expert table, so nothing is exported wrongly.
    """
    parent = layer.router_parent or layer.router
    router_prefix = next(name for name, m in layer.block.named_modules() if m is parent)
    scopes = [("", layer.block, False)] + [
        (f"{router_prefix}.{name}" if name else router_prefix, module, True) for name, module in parent.named_modules()]
    found = []
    for module_name, module, _ in scopes:
        for attribute, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            path = f"{module_name}.{attribute}" if module_name else attribute
            if tensor is not None and not tensor.is_floating_point() and tensor.dim() > 0:
                # e.g. DeepSeek-V4's hash layers route by a token-id -> expert-id table (`gate.tid2eid`):
                # masking logits cannot remove an expert there and renumbering would break the table.
                raise MoeVizError(f"{layer.name}.{path} is an integer table of expert ids (hash routing): "
                                  "pruning experts chosen by a table is not supported")
            sizes = [n for n in (layer.router_rows, layer.num_experts) if tensor is not None and n in tensor.shape]
            if tensor is None or tensor.dim() == 0 or not sizes:
                continue
            axis = next((a for a in (expert_axis(tuple(tensor.shape), n) for n in sizes) if a is not None), None)
            if axis is None:
                raise MoeVizError(f"{layer.name}.{path} has shape {tuple(tensor.shape)} with {sizes[0]} "
                                  "experts on an axis moe_viz does not know how to prune: this layout is not supported")
            found.append(RoutingTensor(path, module, attribute, axis, int(tensor.shape[axis])))
    return found


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
