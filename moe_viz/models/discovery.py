"""Find the MoE blocks of a Hugging Face causal LM.

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

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from moe_viz.errors import MoeVizError
from moe_viz.models.score_fn import _score_fn_hint, probe_score_fn

# Every config key a family may use for the routed-expert count.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


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
