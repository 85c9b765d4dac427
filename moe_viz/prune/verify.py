"""Verify a pruned export against its source model, with one verdict: PASS or FAIL.

The reference is the *original* model with the dropped experts masked (router
logits and correction biases -inf, `masking.py`): pruning must change nothing
else. The checks, in order; the first that fails gives the verdict's reason:

1. **load** — the export loads with `AutoModelForCausalLM.from_pretrained` with
   no missing, unexpected or mismatched keys, and every MoE layer (and the
   config) holds the plan's kept count.
2. **unchanged weights** — every tensor outside the routed experts and routers
   equals the source's bit for bit.
3. **exact, float64, block by block** — the inputs each MoE block received in
   the masked original's forward pass are replayed through a float64 copy of
   the masked original block and of the pruned block (eager experts, one block
   pair in memory at a time). Both compute the same function, so they must
   agree to float64 rounding: max |Δ| ≤ 2^-40 · max(1, max |output|).
4. **end to end, checkpoint dtype** — the pruned model's logits vs the masked
   original's, both in the checkpoint's dtype. In float32/bf16 a softmax over
   fewer logits rounds differently, so these are not bit-identical; the
   tolerance is NOISE_FACTOR × the measured noise floor: max |Δ| between the
   masked original in that dtype and in float64 on the same tokens.

Quality vs the unpruned original is reported per domain but is not part of the
verdict: perplexity, KL(original ‖ pruned) per token, top-1 agreement and a
greedy generation check.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from moe_viz.atomic import write_text_atomic
from moe_viz.capture.run import padded_batches
from moe_viz.prune.evaluate import evaluation_sequences, predicted_positions
from moe_viz.prune.export import PRUNE_MANIFEST, TOP_K_KEY
from moe_viz.prune.masking import applied_plan, masked_layer, reduced_top_k
from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import EXPERT_COUNT_KEYS, MoeLayer, expert_modules, find_moe_layers
from moe_viz.models.routing import routing_tensors
from moe_viz.prune.plan import PrunePlan
from moe_viz.analysis.reconstruction import RecordBlockInputs

VERIFY_FILE = "moe_viz_verify.json"
PROMPT_TOKENS = 16
NEW_TOKENS = 24
FLOAT64_BOUND = 2.0**-40  # relative to the block output's scale; real bugs differ by O(1)
NOISE_FACTOR = 4.0  # both dtype results sit within the noise floor of the float64 value: 2x, plus margin
PASS, FAIL = "PASS", "FAIL"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage().splitlines()[0])


def load_checked(path: Path, dtype: torch.dtype):
    """Load a checkpoint; return (model or None, problems) where problems lists load issues."""
    from transformers import AutoConfig

    from moe_viz.models.discovery import adopt_text_forward
    from moe_viz.models.loading import model_class_for

    handler = _Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = model_class_for(AutoConfig.from_pretrained(path)).from_pretrained(
            path, dtype=dtype, use_safetensors=True, output_loading_info=True
        )
    except Exception as exc:  # a broken export can fail in many ways; each is a FAIL with its first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, [f"{type(exc).__name__}: {first[:300]}"]
    finally:
        logger.removeHandler(handler)
    problems = [f"{kind}: {sorted(map(str, keys))[:5]}" for kind, keys in info.items() if keys and kind != "error_msgs"]
    problems += [m for m in info.get("error_msgs", [])]
    problems += [m for m in handler.messages if "weight" in m.lower() or "key" in m.lower()]
    return adopt_text_forward(model).eval(), problems


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype config.json declares (float32 when it declares none)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return DTYPES.get(name, torch.float32)


# -- the checks ---------------------------------------------------------------

def check_structure(pruned, plan: PrunePlan) -> list[str]:
    """Problems with the pruned model's MoE layers and config against the plan."""
    problems = []
    try:
        layers = {layer.layer: layer for layer in find_moe_layers(pruned)}
    except MoeVizError as exc:
        return [str(exc)]
    if set(layers) != set(plan.kept):
        problems.append(f"MoE layers {sorted(layers)} differ from the plan's {sorted(plan.kept)}")
    for index, kept in sorted(plan.kept.items()):
        if index in layers and layers[index].num_experts != len(kept):
            problems.append(f"layer {index} has {layers[index].num_experts} experts, the plan keeps {len(kept)}")
    text_config = pruned.config.get_text_config()
    for key in EXPERT_COUNT_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value != plan.keep_per_layer:
            problems.append(f"config {key} = {value}, the plan keeps {plan.keep_per_layer}")
    if plan.top_k is not None and getattr(text_config, TOP_K_KEY, None) != plan.top_k:
        problems.append(f"config {TOP_K_KEY} = {getattr(text_config, TOP_K_KEY, None)}, the plan routes {plan.top_k}")
    return problems


def check_unchanged_weights(original, pruned) -> list[str]:
    """Tensors outside the routed experts, routers and other per-expert routing tensors (selection
    biases on the block) must equal the source's bit for bit; those are checked by the float64 replay."""
    pruned_tensors = dict(pruned.state_dict())
    layers = find_moe_layers(original)
    routed = [f"{layer.name}.{_submodule_name(layer.block, m)}." for layer in layers
              for m in (*expert_modules(layer), layer.router)]
    routing = {f"{layer.name}.{t.path}" for layer in layers for t in routing_tensors(layer)}
    changed = []
    for name, tensor in original.state_dict().items():
        if name.startswith(tuple(routed)) or name in routing:
            continue
        other = pruned_tensors.get(name)
        if other is None or other.shape != tensor.shape or not torch.equal(other, tensor):
            changed.append(name)
    return [f"{len(changed)} tensor(s) outside the pruned experts differ from the source: {changed[:3]}"] if changed else []


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _submodule_name(block: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in block.named_modules() if m is module)


def _float64_copy(layer: MoeLayer) -> MoeLayer:
    """A float64 copy of one MoE block with eager experts (grouped_mm refuses float64)."""
    block = copy.deepcopy(layer.block).double()
    experts = block.get_submodule(_submodule_name(layer.block, layer.experts))
    if hasattr(experts, "config") and hasattr(experts.config, "_experts_implementation"):
        experts.config._experts_implementation = "eager"  # the copy's own config: the model is untouched
    router = block.get_submodule(_submodule_name(layer.block, layer.router))
    parent = layer.router_parent and block.get_submodule(_submodule_name(layer.block, layer.router_parent))
    return MoeLayer(**{**vars(layer), "block": block, "router": router, "experts": experts, "router_parent": parent})


_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


class Float64Everywhere(TorchFunctionMode):
    """Keep a float64 computation in float64 even where model code casts down.

    Some routers compute their logits or softmax in float32 on purpose
    (`hidden.type(torch.float32)`, `softmax(..., dtype=torch.float)`); left alone, the
    replay of such a block would round like float32. Inside this mode every cast or
    factory call to a lower float precision yields float64 instead.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("dtype") in _LOW_PRECISION:
            kwargs["dtype"] = torch.float64
        if func in (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16):
            func, args = torch.Tensor.double, args[:1]
        elif func in (torch.Tensor.to, torch.Tensor.type):
            args = tuple(torch.float64 if a in _LOW_PRECISION else a for a in args)
        return func(*args, **kwargs)


def _to_float64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    return value


@torch.no_grad()
def check_blocks_float64(original, pruned, dropped: dict[int, list[int]], inputs: dict[int, list[tuple]],
                         top_k: int | None = None) -> dict:
    """Replay each block's recorded inputs through float64 copies of the masked original and pruned blocks.

    Returns {"max_abs_delta", "bound", "failed_layers", "layers": {layer: {max_abs_delta, bound}}}.
    """
    pruned_by_index = {layer.layer: layer for layer in find_moe_layers(pruned)}
    per_layer, failed = {}, []
    for layer in find_moe_layers(original):
        with reduced_top_k(original, top_k):  # the copy keeps the lowered top-k of a top-k plan
            reference_block = _float64_copy(layer)
        pruned_block = _float64_copy(pruned_by_index[layer.layer])
        delta, scale = 0.0, 1.0
        for args, kwargs in inputs[layer.layer]:
            args = tuple(_to_float64(a) for a in args)
            kwargs = {k: _to_float64(v) for k, v in kwargs.items()}
            with Float64Everywhere(), masked_layer(reference_block, dropped.get(layer.layer, [])):
                reference = _first_tensor(reference_block.block(*args, **kwargs))
            with Float64Everywhere():
                new = _first_tensor(pruned_block.block(*args, **kwargs))
            difference = (new - reference).abs().max().item() if new.shape == reference.shape else math.inf
            delta = max(delta, difference) if not math.isnan(difference) else math.nan
            scale = max(scale, reference.abs().max().item())
        bound = FLOAT64_BOUND * scale
        per_layer[layer.layer] = {"max_abs_delta": delta, "bound": bound}
        if not delta <= bound:  # NaN fails too
            failed.append(layer.layer)
        del reference_block, pruned_block
    deltas = [v["max_abs_delta"] for v in per_layer.values()]
    return {
        "max_abs_delta": math.nan if any(map(math.isnan, deltas)) else max(deltas, default=0.0),
        "bound": max((v["bound"] for v in per_layer.values()), default=FLOAT64_BOUND),
        "failed_layers": failed,
        "layers": per_layer,
    }


# -- quality vs the unpruned original ---------------------------------------------

def _distinct2(tokens: list[int]) -> float:
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 0.0


@torch.no_grad()
def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([prompt], device=device)
    out = []
    for _ in range(steps):  # plain loop: no generation config can change the decoding
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out


def quality(original_logits: torch.Tensor, pruned_logits: torch.Tensor, ids: torch.Tensor,
            mask: torch.Tensor) -> dict:
    """Next-token quality of pruned vs original logits (B, T, V) on `ids` (B, T) where `mask` is 1.

    ppl = exp(mean NLL of the next token); kl_mean = mean over predicted positions of
    KL(original ‖ pruned) = Σ_v p_orig(v) (log p_orig(v) - log p_pruned(v)); top1_agreement =
    share of positions where both argmaxes agree.
    """
    valid = mask.bool()
    pred_valid = predicted_positions(mask)
    targets = ids[:, 1:][pred_valid]
    log_o = F.log_softmax(original_logits[:, :-1][pred_valid].double(), dim=-1)
    log_p = F.log_softmax(pruned_logits[:, :-1][pred_valid].double(), dim=-1)
    return {
        "tokens": int(valid.sum()),
        "predicted_tokens": int(pred_valid.sum()),
        "ppl_original": math.exp(F.nll_loss(log_o, targets).item()),
        "ppl_pruned": math.exp(F.nll_loss(log_p, targets).item()),
        "kl_mean": (log_o.exp() * (log_o - log_p)).sum(-1).mean().item(),
        "top1_agreement": (log_o.argmax(-1) == log_p.argmax(-1)).double().mean().item(),
    }


def _generation(original, pruned, sequences: list[list[int]]) -> list[dict]:
    out = []
    for seq in sequences[:2]:
        prompt = seq[:PROMPT_TOKENS]
        a, b = _greedy(original, prompt, NEW_TOKENS), _greedy(pruned, prompt, NEW_TOKENS)
        diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        out.append({"first_divergence": diverge, "distinct2_original": _distinct2(a), "distinct2_pruned": _distinct2(b)})
    return out


# -- the verdict ---------------------------------------------------------------------

def _fail(result: dict, reason: str) -> dict:
    result.update(verdict=FAIL, reason=reason)
    return result


def _read_manifest(export_dir: Path) -> dict:
    path = export_dir / PRUNE_MANIFEST
    if not path.is_file():
        raise MoeVizError(f"{export_dir} has no {PRUNE_MANIFEST}: it is not a moe_viz export")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoeVizError(f"{path} is not valid JSON: re-export with `moe-viz prune`") from exc


def _forward(model, ids, mask):
    device = model.get_input_embeddings().weight.device
    return model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.cpu()


def _max_valid_delta(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return (a.double() - b.double()).abs()[mask.bool()].max().item()


@torch.no_grad()
def verify_export(export_dir: str | Path, eval_sequences: dict[str, list[list[int]]],
                  source_dir: str | Path | None = None, dtype: torch.dtype | None = None) -> dict:
    """Run every check, save `moe_viz_verify.json` in the export and return the result.

    The result's "verdict" is PASS or FAIL and "reason" says why in one line; `dtype`
    defaults to the checkpoint's. Raises MoeVizError for bad input (not an export, the
    source model missing or unloadable, no evaluation text) — that is no verdict.
    """
    export_dir = Path(export_dir)
    manifest = _read_manifest(export_dir)
    plan = PrunePlan.from_json(json.dumps(manifest["plan"]))
    source_dir = Path(source_dir or manifest["source_model"])
    if not (source_dir / "config.json").is_file():
        raise MoeVizError(f"the source model {source_dir} no longer exists (or has no config.json): "
                          "pass the original checkpoint with --model PATH")
    eval_sequences = {name: seqs for name, seqs in eval_sequences.items() if seqs}
    if not eval_sequences:
        raise MoeVizError("no evaluation text to verify on")
    dtype = dtype or checkpoint_dtype(source_dir)
    original, source_problems = load_checked(source_dir, dtype)
    if original is None or source_problems:
        raise MoeVizError(f"the source model {source_dir} does not load cleanly: {'; '.join(source_problems)[:300]}")
    result = {"export": str(export_dir), "source_model": str(source_dir), "dtype": str(dtype).removeprefix("torch."),
              "verdict": None, "reason": "", "load_problems": [], "structure_problems": [],
              "float64_blocks": None, "end_to_end": None, "domains": {}}

    pruned, result["load_problems"] = load_checked(export_dir, dtype)
    if pruned is None or result["load_problems"]:
        return _save(export_dir, _fail(result, "the export does not load cleanly: " + "; ".join(result["load_problems"])))
    result["structure_problems"] = check_structure(pruned, plan) or check_unchanged_weights(original, pruned)
    if result["structure_problems"]:
        return _save(export_dir, _fail(result, "; ".join(result["structure_problems"])))

    original_layers = find_moe_layers(original)
    batches, inputs = {}, {layer.layer: [] for layer in original_layers}
    masked_logits, pruned_logits = {}, {}
    for name, sequences in eval_sequences.items():
        ids, mask = next(padded_batches(sequences, len(sequences)))
        batches[name] = (ids, mask)
        original_logits = _forward(original, ids, mask)
        with RecordBlockInputs(original_layers) as recorder, applied_plan(original, plan.dropped, plan.top_k):
            masked_logits[name] = _forward(original, ids, mask)
        for index, recorded in recorder.inputs.items():
            inputs[index].extend(recorded)
        pruned_logits[name] = _forward(pruned, ids, mask)
        result["domains"][name] = {**quality(original_logits, pruned_logits[name], ids, mask),
                                   "generation": _generation(original, pruned, sequences)}
        del original_logits

    blocks = check_blocks_float64(original, pruned, plan.dropped, inputs, plan.top_k)
    result["float64_blocks"] = blocks
    del inputs
    if blocks["failed_layers"]:
        worst = max(blocks["failed_layers"], key=lambda i: blocks["layers"][i]["max_abs_delta"])
        return _save(export_dir, _fail(result, (
            f"MoE layer(s) {blocks['failed_layers']} differ from the masked original in float64 "
            f"(layer {worst}: max |Δ| {blocks['layers'][worst]['max_abs_delta']:.3g} > bound "
            f"{blocks['layers'][worst]['bound']:.3g}): wrong experts, router rows or biases were kept")))

    result["end_to_end"] = end_to_end = _end_to_end(original, plan, batches, masked_logits, pruned_logits, dtype)
    if not end_to_end["max_abs_delta"] <= end_to_end["tolerance"]:
        return _save(export_dir, _fail(result, (
            f"end to end in {result['dtype']}: max |logit Δ| vs masked original {end_to_end['max_abs_delta']:.3g} "
            f"exceeds the tolerance {end_to_end['tolerance']:.3g} ({NOISE_FACTOR:g}× the measured noise floor "
            f"{end_to_end['noise_floor']:.3g})")))
    result.update(verdict=PASS, reason=(
        f"all {len(original_layers)} MoE blocks equal the masked original in float64 "
        f"(max |Δ| {blocks['max_abs_delta']:.3g} ≤ {blocks['bound']:.3g}); end to end in {result['dtype']} "
        f"max |logit Δ| {end_to_end['max_abs_delta']:.3g} ≤ {end_to_end['tolerance']:.3g} "
        f"({NOISE_FACTOR:g}× the {result['dtype']}-vs-float64 noise floor {end_to_end['noise_floor']:.3g})"))
    return _save(export_dir, result)


def _end_to_end(original, plan: PrunePlan, batches: dict, masked_logits: dict, pruned_logits: dict,
                dtype: torch.dtype) -> dict:
    """Pruned vs masked original in the checkpoint dtype, against the noise floor of that dtype.

    The noise floor is max |masked original (dtype) - masked original (float64)|; the original
    model is converted to float64 in place for it (it is not used afterwards).
    """
    delta = max(_max_valid_delta(pruned_logits[n], masked_logits[n], batches[n][1]) for n in batches)
    scale = max(masked_logits[n].abs().max().item() for n in batches)
    floor = 0.0
    if dtype != torch.float64:
        original.double()
        if hasattr(original.config, "_experts_implementation"):
            original.set_experts_implementation("eager")
        for name, (ids, mask) in batches.items():
            with Float64Everywhere(), applied_plan(original, plan.dropped, plan.top_k):
                exact = _forward(original, ids, mask)
            floor = max(floor, _max_valid_delta(masked_logits[name], exact, mask))
    tolerance = max(NOISE_FACTOR * floor, FLOAT64_BOUND * max(1.0, scale))
    return {"max_abs_delta": delta, "noise_floor": floor, "logit_scale": scale, "tolerance": tolerance}


def _save(export_dir: Path, result: dict) -> dict:
    write_text_atomic(export_dir / VERIFY_FILE, json.dumps(result, indent=2, allow_nan=True) + "\n")
    return result


def format_report(result: dict) -> str:
    """The verdict line first, then per-domain quality."""
    lines = [f"verification {result['verdict']}: {result['reason']}"]
    if result["domains"]:
        lines.append(f"{'domain':<14}{'tokens':>8}{'ppl orig':>10}{'ppl pruned':>12}{'KL':>9}{'top1 agree':>12}"
                     f"{'diverges at':>13}")
    for name, d in result["domains"].items():
        steps = [g["first_divergence"] for g in d["generation"]]
        diverge = ",".join("-" if s is None else str(s) for s in steps)
        lines.append(
            f"{name:<14}{d['tokens']:>8}{d['ppl_original']:>10.3f}{d['ppl_pruned']:>12.3f}{d['kl_mean']:>9.4f}"
            f"{d['top1_agreement']:>12.3f}{diverge:>13}"
        )
    return "\n".join(lines)


def verify_from_store(export_dir: str | Path, store_path, source_dir: str | Path | None = None) -> tuple[dict, list[str]]:
    """Verify an export on evaluation text of its plan's domains (found through the store).

    Returns (result, notes): notes say which domains had no held-out split or could not be used.
    """
    from transformers import AutoConfig, AutoTokenizer

    plan = PrunePlan.from_json(json.dumps(_read_manifest(Path(export_dir))["plan"]))
    try:
        tokenizer = AutoTokenizer.from_pretrained(export_dir)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    vocab_size = AutoConfig.from_pretrained(export_dir).get_text_config().vocab_size
    sequences, notes = evaluation_sequences(store_path, plan, tokenizer, vocab_size)
    if not any(sequences.values()):
        raise MoeVizError("no evaluation text to verify on: " + ("; ".join(notes) or "the plan names no domains"))
    return verify_export(export_dir, sequences, source_dir=source_dir), notes
