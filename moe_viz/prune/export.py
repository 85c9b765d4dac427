"""Export a pruned checkpoint that `AutoModelForCausalLM.from_pretrained` loads.

Two paths produce identical tensors:
- in memory: load the model, slice the expert dimension of the fused expert
  tensors, router rows and router/correction biases, `save_pretrained`;
- streaming: rewrite the safetensors shards without loading the model. Every
  edit is a slice of dim 0 of a row-major tensor (or a rename of a per-expert
  tensor), i.e. a list of byte ranges, so shards are copied range by range in
  16 MB chunks inside the kernel (`copy_file_range`, with fallbacks:
  `copy_ranges`); memory stays flat whatever the checkpoint size.

Both build in a temporary sibling directory that is renamed into place only
when complete, so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import unicodedata
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Iterable, Iterator

try:
    import fcntl
except ImportError:  # Windows: stale partial dirs are then left alone (no way to tell a live export)
    fcntl = None

import torch

from moe_viz import __version__
from moe_viz.atomic import fsync_dir, fsync_file, fsync_tree, write_text_atomic
from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import EXPERT_COUNT_KEYS, expert_modules, find_moe_layers, kept_rows
from moe_viz.models.loading import model_class_for
from moe_viz.models.routing import SELECTION_BIAS_NAMES, expert_axis, routing_tensors
from moe_viz.prune.copy_ranges import copy_range
from moe_viz.prune.plan import PrunePlan

PRUNE_MANIFEST = "moe_viz_prune.json"
TOP_K_KEY = "num_experts_per_tok"  # every supported family's config key for experts per token
INDEX_FILE = "model.safetensors.index.json"
# On-disk names vary by family (`mlp.experts.3.w1.weight`, `block_sparse_moe.input_linear.weight`,
# `mlp.router.layer.weight`, ...). Within a MoE layer, a tensor belongs to the routed experts or
# router when one of its path components is one of these, or it is a selection bias (which some
# families keep on the block itself: `mlp.e_score_correction_bias`, `feed_forward.expert_bias`),
# and none of its components names a shared expert.
MOE_COMPONENTS = {"experts", "gate", "router", "input_linear", "output_linear", "moe"}
LAYER = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<rest>.+)$")


# -- atomic output directory -------------------------------------------------
#
# moe_viz only ever deletes or replaces what it can prove it made:
# - `out` itself, with --force, only when it is a real directory holding PRUNE_MANIFEST (a previous
#   export) and is neither a protected path (source model, store) nor an ancestor of one;
# - `.NAME.partial-XXXXXXXX` siblings holding PARTIAL_MARKER that no live export holds a lock on;
# - `.NAME.old-XXXXXXXX` siblings holding PRUNE_MANIFEST (a replaced export whose removal was cut short).
# Ownership proofs are deleted last, so a removal cut short is finished by the next export.

PARTIAL_MARKER = ".moe_viz_partial"  # written into every temp dir at creation, removed before publishing
STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-[0-9a-f]{8}$")
MAX_EXPORT_NAME = 100


def is_moe_viz_export(path: Path) -> bool:
    """A real directory (not a symlink) holding a readable moe_viz prune manifest."""
    path = Path(path)
    manifest = path / PRUNE_MANIFEST
    if path.is_symlink() or not path.is_dir() or manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        return isinstance(json.loads(manifest.read_text()), dict)
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def _protected_inside(real: Path, protect: list[Path]) -> Path | None:
    """The first protected (resolved) path that `real` is or contains."""
    return next((p for p in protect if real == p or real in p.parents), None)


def _check_replaceable(out: Path, real: Path, force: bool, protect: list[Path]) -> None:
    if out.is_symlink():
        raise MoeVizError(f"--out {out} is a symbolic link: refusing to write through it; choose another --out")
    guarded = _protected_inside(real, protect)
    if guarded is not None:
        relation = "is" if real == guarded else "contains"
        raise MoeVizError(f"--out {out} {relation} {guarded}, which an export must never replace; choose another --out")
    if not out.exists():
        return
    if not force:
        raise MoeVizError(f"{out} already exists: choose another --out or pass --force to replace it")
    if not out.is_dir():
        raise MoeVizError(f"--out {out} is a file, not a moe_viz export: refusing to replace it; choose another --out")
    if not is_moe_viz_export(out):
        raise MoeVizError(f"--out {out} is not a moe_viz export (no {PRUNE_MANIFEST}): "
                          "refusing to replace it; choose another --out")


def _remove_owned(directory: Path, proof: str) -> None:
    """Delete a directory moe_viz made, its ownership proof last (see above)."""
    for child in directory.iterdir():
        if child.name == proof:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (directory / proof).unlink(missing_ok=True)
    directory.rmdir()


def _lock(fd: int, wait: bool) -> bool:
    """Exclusive advisory lock on an open file, released by the kernel when the process dies."""
    if fcntl is None:
        return wait  # nothing to lock with: our own new marker counts as held, a stale one as live
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def _clean_stale(parent: Path, protect: list[Path]) -> None:
    """Remove temp dirs that killed exports left in `parent`, only those proven to be moe_viz's."""
    try:
        candidates = [p for p in parent.iterdir() if STALE.match(p.name) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return
    for stale in sorted(candidates):
        try:
            if _protected_inside(stale.resolve(), protect) is not None:
                continue
            if STALE.match(stale.name)["kind"] == "old":
                if is_moe_viz_export(stale):
                    _remove_owned(stale, PRUNE_MANIFEST)
                continue
            marker = stale / PARTIAL_MARKER
            if fcntl is None or marker.is_symlink() or not marker.is_file():
                continue  # not provably ours (or no way to tell whether an export still writes it)
            fd = os.open(marker, os.O_RDONLY)
            try:
                if _lock(fd, wait=False):  # no live export holds it
                    _remove_owned(stale, PARTIAL_MARKER)
            finally:
                os.close(fd)
        except OSError:
            continue  # best effort: another export may be cleaning the same directory


@contextmanager
def atomic_directory(out: Path, force: bool, protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; publish it as `out` only if the block succeeds.

    With `force`, an existing `out` is replaced only if it is a previous moe_viz
    export; `out` may never be, nor contain, any path in `protect`. Every file
    is fsynced before the rename that publishes it. Temp dirs left by killed
    exports into the same parent are removed first.
    """
    out = Path(out)
    protected = [Path(p).resolve() for p in protect]
    real = out.resolve()
    _check_replaceable(out, real, force, protected)
    parent, name = real.parent, real.name
    tmp = parent / f".{name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(parent, protected)
        tmp.mkdir()
        marker_fd = os.open(tmp / PARTIAL_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise MoeVizError(f"cannot write to {parent} ({exc.strerror}): choose a writable --out directory") from exc
    try:
        _lock(marker_fd, wait=True)
        os.write(marker_fd, f"moe_viz export in progress (pid {os.getpid()})\n".encode())
        yield tmp
        # Re-check: `out` may have changed while the export ran.
        _check_replaceable(out, real, force, protected)
        os.unlink(tmp / PARTIAL_MARKER)
        fsync_tree(tmp)
        if real.exists():
            old = parent / f".{name}.old-{uuid.uuid4().hex[:8]}"
            real.rename(old)
            try:
                tmp.rename(real)
            except BaseException:
                old.rename(real)
                raise
            fsync_dir(parent)
            _remove_owned(old, PRUNE_MANIFEST)
        else:
            tmp.rename(real)
        fsync_dir(parent)
    finally:
        os.close(marker_fd)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_name_path(exports_dir: str | Path, name: str) -> Path:
    """`exports_dir / name` when `name` is one plain folder name; otherwise a one-line MoeVizError."""
    problem = None
    if not name or not name.strip():
        problem = "is empty"
    elif len(name) > MAX_EXPORT_NAME:
        problem = f"is longer than {MAX_EXPORT_NAME} characters"
    elif Path(name).is_absolute() or PureWindowsPath(name).anchor:
        problem = "is an absolute path"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif name.startswith("."):
        problem = "starts with '.'"
    elif any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in name):
        problem = "contains control characters"
    if problem:
        shown = name if len(name) <= 40 else name[:40] + "…"
        raise MoeVizError(f"export name {shown!r} {problem}: use one plain folder name, e.g. my-model-keep4")
    return Path(exports_dir) / name


# -- config and side files ---------------------------------------------------

def _count_keys(config_dict: dict, model_type: str) -> set[str]:
    """Every expert-count key the family knows: those present plus its aliases."""
    keys = {k for k in EXPERT_COUNT_KEYS if k in config_dict}
    try:
        from transformers import CONFIG_MAPPING

        for alias, target in getattr(CONFIG_MAPPING[model_type], "attribute_map", {}).items():
            if alias in EXPERT_COUNT_KEYS and target in EXPERT_COUNT_KEYS:
                keys.update({alias, target})
    except KeyError:
        pass
    return keys


def _text_config_dict(config: dict, text_model_type: str) -> dict:
    """The part of a config.json dict that holds the text model's settings: `text_config`, else the
    one nested dict of the text model's model_type (Qwen3-Omni: `thinker_config.text_config`, not the
    talker's), else the whole dict."""
    if "text_config" in config:
        return config["text_config"]
    found, stack = [], [config]
    while stack:
        node = stack.pop()
        found += [node] if node is not config and node.get("model_type") == text_model_type else []
        stack += [v for v in node.values() if isinstance(v, dict)]
    return found[0] if len(found) == 1 else config


OTHER_MODALITIES = ("vision", "audio", "speech", "talker", "image", "video")


def write_config(source_dir: Path, out_dir: Path, kept_count: int, top_k: int | None = None) -> None:
    """Copy config.json with every expert-count key (and alias) set to the kept count, and the
    experts-per-token key to `top_k` when the plan lowers it."""
    from moe_viz.checkpoint import load_config

    config = json.loads((source_dir / "config.json").read_text())
    target = _text_config_dict(config, load_config(source_dir).get_text_config().model_type)
    for key in _count_keys(target, target.get("model_type", config.get("model_type", ""))):
        target[key] = kept_count
    for name, nested in target.items():  # the MoE's own sub-config (DBRX `ffn_config.moe_num_experts`)
        if isinstance(nested, dict) and not any(word in name for word in OTHER_MODALITIES):
            for key in EXPERT_COUNT_KEYS:
                if isinstance(nested.get(key), int):
                    nested[key] = kept_count
    if top_k is not None:
        if TOP_K_KEY not in target:
            raise MoeVizError(f"{source_dir / 'config.json'} has no {TOP_K_KEY}: cannot lower this family's top-k")
        target[TOP_K_KEY] = top_k
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(source_dir: Path, out_dir: Path) -> None:
    """Tokenizer, generation config, chat template, ...: everything but weights and config."""
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and not path.name.endswith(".safetensors") and path.name not in (
            "config.json", INDEX_FILE, PRUNE_MANIFEST, "moe_viz_verify.json"
        ) and not (out_dir / path.name).exists():
            shutil.copy2(path, out_dir / path.name)


def write_manifest(out_dir: Path, plan: PrunePlan, source_dir: Path, method: str) -> None:
    manifest = {
        "source_model": str(source_dir),
        "model_fingerprint": plan.model_fingerprint,
        "criterion": plan.criterion,
        "sparsity": plan.sparsity,
        "domains": plan.domains,
        "run_ids": plan.run_ids,
        "kept": {str(k): v for k, v in plan.kept.items()},
        "num_experts": {str(k): v for k, v in plan.num_experts.items()},
        "method": method,
        "tool_version": __version__,
        "plan": json.loads(plan.to_json()),
    }
    write_text_atomic(out_dir / PRUNE_MANIFEST, json.dumps(manifest, indent=2) + "\n")


# -- in-memory path ----------------------------------------------------------

def per_expert_tensors(layer) -> list[tuple[torch.nn.Module, str, int]]:
    """(module, attribute, size of dim 0) of every experts tensor with one slice per expert on dim 0: E rows,
    the router's E + extra rows (LongCat's gate_up_proj also holds its identity experts), or E blocks of
    F rows (DBRX's 2-D (E*F, H) experts); `MoeLayer.row_index` says which rows a plan keeps.

    Raises MoeVizError for any other layout."""
    E = layer.num_experts
    found = []
    for experts in expert_modules(layer):  # JetMoE: input_linear and output_linear
        for name, tensor in list(experts.named_parameters()) + list(experts.named_buffers()):
            if tensor.dim() <= 1 and E not in tensor.shape:
                continue  # shared by all experts (a norm weight, a scalar)
            if layer.row_index(int(tensor.shape[0]), list(range(E))) is None:
                raise MoeVizError(f"{layer.name}.experts.{name} has shape {tuple(tensor.shape)}, not {E} experts on "
                                  "dim 0: this layout is not supported; nothing was written")
            owner, _, attribute = name.rpartition(".")
            found.append((experts.get_submodule(owner), attribute, int(tensor.shape[0])))
    return found


@dataclass
class LayerLayout:
    """What the streaming path needs to know of a MoE layer beyond the plan, from the model built on meta."""

    prefix: str  # the decoder layer's tensor-name prefix, e.g. "transformer.blocks.1." (DBRX)
    router_rows: int  # E plus the router's extra choices (LongCat's identity experts, ...)
    block: bool = False  # prefix is the block's own path: its decoder layer holds several blocks (JetMoE)


def check_exportable(config) -> dict[int, LayerLayout]:
    """Refuse, before anything is written, a model whose MoE layout export cannot slice.

    Builds the model on the meta device (no memory) and runs the checks the in-memory path runs,
    so the streaming path refuses the same models. Returns each MoE layer's `LayerLayout`, which the
    streaming path needs to find layers not named `layers.N` and to slice router tensors; {} if it
    cannot build the model."""
    try:
        with torch.device("meta"):
            model = model_class_for(config).from_config(config)
    except (ValueError, TypeError, OSError, AttributeError):  # e.g. remote code: the in-memory path still checks
        return {}
    if getattr(config, "is_encoder_decoder", False):
        raise MoeVizError(f"cannot prune {type(model).__name__} yet: encoder-decoder models are supported for capture "
                          "only; nothing was written")
    layers = find_moe_layers(model)
    layouts = {}
    decoder_layers = [LAYER.search(layer.name + ".") for layer in layers]
    several = len({found["layer"] for found in decoder_layers if found}) < len(layers)  # numbered by block
    for layer in layers:
        routing_tensors(layer)
        per_expert_tensors(layer)
        at = re.search(rf"^(.*\.{layer.layer}\.)", layer.name + ".")  # through the layer index (last such)
        layouts[layer.layer] = (LayerLayout(layer.name + ".", layer.router_rows, block=True) if several
                                else LayerLayout(at[1] if at else "", layer.router_rows))
    check_count_shared(config, model, layers)
    return layouts


def check_count_shared(config, model: torch.nn.Module, layers) -> None:
    """Refuse a model in which something besides the observed MoE blocks takes its size from the same
    expert-count key (Ernie-4.5-VL's vision experts, JetMoE's attention experts): a checkpoint pruned to
    fewer experts would only load with that pruned too, without statistics for it.

    Found by building the model on the meta device again with the count doubled and comparing shapes."""
    import copy

    text_config = copy.deepcopy(config)
    target = text_config.get_text_config()
    keys = [key for key in EXPERT_COUNT_KEYS if isinstance(getattr(target, key, None), int)]
    if not keys:
        return
    for key in keys:
        setattr(target, key, 2 * getattr(target, key))
    try:
        with torch.device("meta"):
            doubled = dict(model_class_for(text_config).from_config(text_config).named_parameters())
    except Exception:  # noqa: BLE001 - a config that cannot be doubled: the export's verification still checks
        return
    pruned = tuple(f"{layer.name}." for layer in layers)
    for name, tensor in model.named_parameters():
        other = doubled.get(name)
        if other is not None and other.shape != tensor.shape and not name.startswith(pruned):
            raise MoeVizError(f"cannot prune: {name} is not an observed MoE block but its size follows the same "
                              f"expert count (config {getattr(target, 'attribute_map', {}).get(keys[0], keys[0])}), so a pruned checkpoint would only load with it pruned "
                              "too: this model is supported for capture only; nothing was written")


@torch.no_grad()
def prune_model_in_place(model: torch.nn.Module, kept: dict[int, list[int]]) -> None:
    """Slice every MoE layer of a loaded model down to its kept experts (renumbered 0..E'-1)."""
    layers = find_moe_layers(model)
    counts = {len(kept[layer.layer]) for layer in layers}
    if len(counts) != 1:
        raise MoeVizError("every MoE layer must keep the same number of experts to export (one count per config)")
    per_layer = {layer.layer: routing_tensors(layer) for layer in layers}  # refuses unknown layouts first
    for layer in layers:
        per_expert_tensors(layer)
    for layer in layers:
        keep = kept[layer.layer]
        E = layer.num_experts
        expert_tensors = [(module, name, 0, size) for module, name, size in per_expert_tensors(layer)]
        holders = expert_modules(layer)  # before slicing: found by their weight's expert count
        routing = [(t.module, t.attribute, t.axis, t.size) for t in per_layer[layer.layer]]
        for module, name, axis, size in expert_tensors + routing:
            tensor = getattr(module, name)
            index = torch.tensor(layer.row_index(size, keep), dtype=torch.long, device=tensor.device)
            sliced = tensor.data.index_select(axis, index).contiguous()
            if name in module._parameters:
                module._parameters[name] = torch.nn.Parameter(sliced, requires_grad=False)
            else:
                module._buffers[name] = sliced
        for module in (layer.block, layer.experts, layer.router, layer.router_parent, *holders):
            for attr in EXPERT_COUNT_KEYS:
                if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == E:
                    setattr(module, attr, len(keep))
    kept_count = counts.pop()
    text_config = model.config.get_text_config()
    for key in EXPERT_COUNT_KEYS:
        if isinstance(getattr(text_config, key, None), int):
            setattr(text_config, key, kept_count)


def export_in_memory(model: torch.nn.Module, plan: PrunePlan, source_dir: Path, tmp: Path) -> None:
    prune_model_in_place(model, plan.kept)
    model.save_pretrained(tmp)
    write_config(source_dir, tmp, plan.keep_per_layer, plan.top_k)


# -- streaming path ----------------------------------------------------------

@dataclass
class _OutTensor:
    name: str
    dtype: str
    shape: list[int]
    ranges: list[tuple[int, int]]  # (absolute source offset, length)

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.ranges)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, absolute offset where tensor data starts)."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return header, 8 + size


def _row_ranges(start: int, end: int, rows: int, keep: list[int]) -> list[tuple[int, int]]:
    """Byte ranges of rows `keep` (in order) of a row-major tensor of `rows` rows; adjacent rows merge."""
    row_bytes = (end - start) // rows
    ranges: list[tuple[int, int]] = []
    for e in keep:
        offset = start + e * row_bytes
        if ranges and ranges[-1][0] + ranges[-1][1] == offset:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + row_bytes)
        else:
            ranges.append((offset, row_bytes))
    return ranges


def _locate(name: str, layouts: dict[int, LayerLayout]) -> tuple[int | None, str]:
    """(MoE decoder layer, rest of the name) of a tensor: by the layer prefixes of the model built on meta,
    else by `layers.N` in its name; (None, "") outside any decoder layer, or, when blocks are numbered
    apart (`LayerLayout.block`), outside any block."""
    for layer, layout in layouts.items():
        if layout.prefix and name.startswith(layout.prefix):
            return layer, name[len(layout.prefix):]
    if any(layout.block for layout in layouts.values()):
        return None, ""
    located = LAYER.search(name)
    return (int(located["layer"]), located["rest"]) if located else (None, "")


def plan_shard(header: dict, data_start: int, plan: PrunePlan, scope: str = "",
               layouts: dict[int, LayerLayout] | None = None) -> list[_OutTensor]:
    """Decide, tensor by tensor, what the pruned shard holds. Only tensors whose name starts with
    `scope` (`text_scope`) can be pruned: another model's MoE layers beside it are kept whole.
    `layouts`: `check_exportable`'s (layers named otherwise than `layers.N`, router rows beyond E);
    without them, `layers.N` and E rows."""
    out = []
    entries = sorted((k, v) for k, v in header.items() if k != "__metadata__")
    entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
    for name, info in entries:
        start, end = (data_start + o for o in info["data_offsets"])
        shape = list(info["shape"])
        whole = _OutTensor(name, info["dtype"], shape, [(start, end - start)] if end > start else [])
        layer, rest = _locate(name, layouts or {})
        components = rest.split(".")[:-1]
        selection_bias = layer is not None and name.rsplit(".", 1)[-1] in SELECTION_BIAS_NAMES
        if layer not in plan.kept or not name.startswith(scope) or any("shared" in c for c in components) or not (
                MOE_COMPONENTS & set(components) or selection_bias):
            out.append(whole)
            continue
        keep, E = plan.kept[layer], plan.num_experts[layer]
        rows = (layouts or {})[layer].router_rows if layer in (layouts or {}) else E
        per_expert = PER_EXPERT.match(name)
        if per_expert:
            expert = int(per_expert["expert"])
            if expert in keep or E <= expert < rows:  # an extra choice (identity expert) stays, after the kept
                new = keep.index(expert) if expert in keep else len(keep) + expert - E
                whole.name = f"{per_expert['prefix']}.{new}.{per_expert['rest']}"
                out.append(whole)
            continue
        if E not in shape and rows not in shape and len(shape) <= 1:
            out.append(whole)  # shared by all experts (a norm weight, a scalar): kept as is
            continue
        axis = next((a for a in (expert_axis(tuple(shape), n) for n in (rows, E)) if a is not None), None)
        if axis is None and E not in shape and rows not in shape and "experts" not in components and (
                {"gate", "router"} & set(components)):
            out.append(whole)  # a router's own hidden layers (Zaya's router MLP): not per expert, as in memory
            continue
        size = shape[axis or 0]
        rows_kept = kept_rows(size, E, rows, keep)
        if rows_kept is None:
            raise MoeVizError(f"{name} has shape {shape}, not {E} experts on dim 0 (or the last dim of a (1, E) "
                              "tensor): this layout is not supported; nothing was written")
        # (1, ..., 1, E) is E contiguous elements and (E*F, ...) E blocks of F rows: byte ranges of rows.
        axis = axis or 0
        new_shape = shape[:axis] + [len(rows_kept)] + shape[axis + 1:]
        out.append(_OutTensor(name, info["dtype"], new_shape, _row_ranges(start, end, size, rows_kept)))
    return out


def write_shard(source: Path, dest: Path, tensors: list[_OutTensor], metadata: dict | None) -> int:
    """Write a safetensors file from byte ranges of `source`; returns its data size."""
    header: dict = {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(source, "rb") as src, open(dest, "wb") as dst:
        dst.write(struct.pack("<Q", len(encoded)))
        dst.write(encoded)
        dst.flush()
        for t in tensors:
            for start, length in t.ranges:
                copy_range(src.fileno(), dst.fileno(), start, length)
    return offset


def checkpoint_shards(source_dir: Path) -> list[str]:
    index = source_dir / INDEX_FILE
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    shards = sorted(p.name for p in source_dir.glob("*.safetensors"))
    if not shards:
        raise MoeVizError(f"{source_dir} has no .safetensors weights")
    return shards


def text_scope(config) -> str:
    """The tensor-name prefix of the text model that capture observed and export prunes: "" for most
    models; its child's name for a composite model run through a child (Qwen3-Omni's `thinker.`,
    whose speech talker has MoE layers of its own with the same layer numbers)."""
    from moe_viz.models.discovery import text_runner

    try:
        with torch.device("meta"):
            model = model_class_for(config).from_config(config)
    except (ValueError, TypeError, OSError, AttributeError):
        return ""
    runner = text_runner(model)
    return next((f"{name}." for name, child in model.named_children() if child is runner), "")


def export_streaming(plan: PrunePlan, source_dir: Path, tmp: Path, progress=None,
                     layouts: dict[int, LayerLayout] | None = None) -> None:
    """Write the pruned shards into `tmp`. Each finished shard is fsynced by a background thread while
    the next one is copied, so the disk's writeback overlaps the copying instead of following it
    (serial fsyncs were 0.58 s of a 1.33 s warm-cache export, bench/export.py). `layouts`: see `plan_shard`."""
    from moe_viz.checkpoint import load_config

    scope = text_scope(load_config(source_dir))
    shards = checkpoint_shards(source_dir)
    weight_map: dict[str, str] = {}
    total = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-viz-fsync") as flusher:
        flushed = []
        for number, shard in enumerate(shards, start=1):
            header, data_start = read_safetensors_header(source_dir / shard)
            tensors = plan_shard(header, data_start, plan, scope, layouts)
            total += write_shard(source_dir / shard, tmp / shard, tensors, header.get("__metadata__"))
            flushed.append(flusher.submit(fsync_file, tmp / shard))
            weight_map.update({t.name: shard for t in tensors})
            if progress is not None:
                progress(number, len(shards))
        for done in flushed:
            done.result()  # an fsync error fails the export
    if (source_dir / INDEX_FILE).exists():
        index = json.loads((source_dir / INDEX_FILE).read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.setdefault("metadata", {})["total_size"] = total
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    write_config(source_dir, tmp, plan.keep_per_layer, plan.top_k)


# -- entry point -------------------------------------------------------------

def should_stream(source_dir: Path) -> bool:
    """Stream when loading the checkpoint would take more than half the free memory."""
    import psutil

    from moe_viz.checkpoint import checkpoint_bytes

    return checkpoint_bytes(source_dir) > psutil.virtual_memory().available // 2


def export_pruned(
    plan: PrunePlan,
    source_dir: str | Path,
    out: str | Path,
    streaming: bool | None = None,
    force: bool = False,
    progress=None,
    *,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write the pruned checkpoint to `out` (atomically) and return its path.

    `streaming=None` picks the streaming path when the model would not fit
    comfortably in memory. `force` replaces `out` only if it is a previous
    moe_viz export; `out` may never be, contain or lie inside the source model,
    nor be or contain any path in `protect` (pass the store).
    """
    source_dir, out = Path(source_dir), Path(out)
    if not plan.exportable:
        raise MoeVizError("this plan keeps different numbers of experts per layer; only uniform plans export")
    if not (source_dir / "config.json").is_file():
        raise MoeVizError(f"{source_dir} is not a model directory (no config.json)")
    from moe_viz.checkpoint import check_checkpoint, check_unchanged, load_config

    load_config(source_dir)  # a broken config.json: one line, before anything is written
    check_checkpoint(source_dir)  # corrupt or truncated shards, a shard missing from the index
    check_unchanged(source_dir, plan.checkpoint_digest, plan.model_id)  # the files the statistics came from
    if source_dir.resolve() in out.resolve().parents:
        raise MoeVizError(f"--out {out} is inside the source model directory {source_dir.resolve()}: "
                          "choose an --out outside it")
    layouts = check_exportable(load_config(source_dir))
    streaming = should_stream(source_dir) if streaming is None else streaming
    with atomic_directory(out, force, protect=[source_dir, *protect]) as tmp:
        if streaming:
            export_streaming(plan, source_dir, tmp, progress, layouts)
        else:
            from moe_viz.checkpoint import load_config

            model = model_class_for(load_config(source_dir)).from_pretrained(
                source_dir, dtype="auto", use_safetensors=True)
            export_in_memory(model, plan, source_dir, tmp)
            del model
        copy_side_files(source_dir, tmp)
        write_manifest(tmp, plan, source_dir, "streaming" if streaming else "in-memory")
    return out
