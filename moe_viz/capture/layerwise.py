"""Layer-by-layer streaming capture for models larger than memory.

Only one decoder layer's weights are ever materialised:

1. A *skeleton* of the model is built from its config with every parameter on
   the meta device (no memory); non-persistent buffers such as rotary
   ``inv_freq`` are real, as in a normal load.
2. The text model's tensors outside the decoder layers (embeddings, final
   norm, ...) are loaded from the safetensors shards with transformers' own key
   renaming and weight conversion (`convert_and_load_state_dict_in_model`), read
   lazily with ``safe_open`` slices, so the result is bit-identical to
   ``from_pretrained``. What the text forward never runs (an untied LM head,
   Qwen3-Omni's speech talker, vision and audio towers) is only sampled for the
   fingerprint: loaded to the host one unit (e.g. one talker layer) at a time
   and freed before the next.
3. For each batch the model's own forward runs once with every decoder layer
   replaced by a *recorder* that keeps the exact (args, kwargs) the layer would
   receive (per-layer-type attention masks of hybrid models, rotary
   embeddings, position ids, ...) and returns its input unchanged; none of
   those depend on the hidden states. Layer 0's input is the embedding output.
4. Layer i is loaded onto the target device, every batch of every domain runs
   through it with the routing observer attached to its MoE block(s), the
   outputs replace the batch's hidden states on the host, and the layer is
   freed. The LM head is never run.

After each completed layer the hidden states and the accumulators are
persisted in a state directory the capture owns (`LayerwiseState`), so
``--resume`` continues from the last completed layer; the directory is removed
after success.

Peak memory: one decoder layer (on the device; at the start, one unit of what
the text forward never runs, on the host) + hidden states of every
calibration token (host, or disk under ``max_host_memory``) + the recorded
masks/rotary tables + imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moe_viz.capture import distributed
from moe_viz.capture.distributed import Ranks, Steps, accumulator_tensors
from moe_viz.capture.observe import RoutingObserver
from moe_viz.capture.run import Progress
from moe_viz.capture.trace import TokenTracer
from moe_viz.capture.routing_stats import LayerAccumulator, Scratch
from moe_viz.checkpoint import checkpoint_bytes
from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import MoeLayer, find_moe_layers
from moe_viz.models.fingerprint import tensor_sample
from moe_viz.models.loading import resolve_dtype

STATE_MARKER = "moe_viz-layerwise-state"


# -- skeleton and checkpoint keys ------------------------------------------------

def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM with every parameter on the meta device; real non-persistent buffers."""
    from accelerate import init_empty_weights

    from moe_viz.models.discovery import adopt_text_forward
    from moe_viz.models.loading import model_class_for

    if getattr(config, "is_encoder_decoder", False):
        raise MoeVizError(f"{config.model_type} is an encoder-decoder model: layer-by-layer capture streams one stack "
                          "of decoder layers; capture it without --layerwise")
    with init_empty_weights(include_buffers=False):
        model = model_class_for(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # tied tensors are one object from here on, as after from_pretrained (`unrun_tensors`)
    return adopt_text_forward(model).eval()


def decoder_layers(model: nn.Module, moe_layers: list[MoeLayer]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers holding the MoE blocks, and its module path."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(
            re.match(rf"{re.escape(name)}\.\d+\.", moe.name + ".") for moe in moe_layers
        ):
            return name, module
    raise MoeVizError(f"{type(model).__name__}: cannot find the decoder layers holding its MoE blocks; "
                      "capture it without --layerwise")


def shard_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (validated: a truncated or missing shard is one clear error)."""
    from moe_viz.checkpoint import check_checkpoint

    return [model_dir / name for name in check_checkpoint(model_dir)]


@dataclass
class CheckpointKeys:
    """Checkpoint tensor names grouped by where they load: a decoder layer (its index), the rest of the
    text model (None), or a unit of what the text forward never runs (its module path, `_unit`)."""

    file_of: dict[str, Path]
    groups: dict[int | str | None, list[str]]
    conversions: list


def _unit(tensor_name: str) -> str:
    """The load unit of a tensor the text forward never runs: its module path, cut after the first
    numbered part ('talker.model.layers.3.mlp.gate.weight' -> 'talker.model.layers.3')."""
    parts = tensor_name.split(".")[:-1]
    numbered = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return ".".join(parts if numbered is None else parts[: numbered + 1])


def text_model_prefix(layers_prefix: str) -> str:
    """Module path of the model that holds the decoder layers ('thinker.model' for 'thinker.model.layers')."""
    return layers_prefix.rpartition(".")[0]


def unrun_tensors(model: nn.Module, layers_prefix: str) -> dict[str, list[list[str]]]:
    """What the text forward never runs (outside the text model, not tied to it), by load unit (`_unit`):
    per tensor, its names (more than one when tied), in state_dict order. Empty for layers at the top level."""
    text = text_model_prefix(layers_prefix)
    if not text:
        return {}
    state = model.state_dict(keep_vars=True)
    own = {id(t) for name, t in state.items() if name.startswith(text + ".")}
    names_of: dict[int, list[str]] = {}
    for name, tensor in state.items():
        if id(tensor) not in own:
            names_of.setdefault(id(tensor), []).append(name)
    units: dict[str, list[list[str]]] = {}
    for names in names_of.values():
        units.setdefault(_unit(names[0]), []).append(names)
    return units


def group_checkpoint_keys(model: nn.Module, model_dir: Path, layers_prefix: str,
                          unrun: dict[str, list[list[str]]]) -> CheckpointKeys:
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta_state = model.state_dict()
    pattern = re.compile(rf"^{re.escape(layers_prefix)}\.(\d+)\.")
    unit_of = {name: unit for unit, tensors in unrun.items() for names in tensors for name in names}
    file_of: dict[str, Path] = {}
    groups: dict[int | str | None, list[str]] = {}
    for path in shard_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
        for key in names:
            target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
            found = pattern.match(target)
            file_of[key] = path
            group = int(found.group(1)) if found else unit_of.get(target)
            groups.setdefault(group, []).append(key)
    return CheckpointKeys(file_of, groups, conversions)


def tensors_under(module: nn.Module, path: str) -> list[str]:
    """Full names of the parameters and persistent buffers of `module` (at module path `path`)."""
    prefix = f"{path}." if path else ""
    return [prefix + n for n in module.state_dict(keep_vars=True)]


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module), leaf)


def _free(module: nn.Module, name: str) -> None:
    """Replace the parameter `name` of `module` (not its children) by a meta one: its memory is released."""
    setattr(module, name, nn.Parameter(module._parameters[name].to("meta"), requires_grad=False))


def load_tensors(model: nn.Module, keys: CheckpointKeys, group: int | str | None, device: torch.device,
                 dtype: torch.dtype, what: str):
    """Load one group of checkpoint tensors into the skeleton, as from_pretrained would; returns
    transformers' loading report for `check_loaded` (`what`: whose tensors they are, for errors)."""
    from safetensors import safe_open
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    names = keys.groups.get(group, [])
    with ExitStack() as stack:
        handles = {}
        lazy = {}
        for key in names:
            path = keys.file_of[key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            lazy[key] = handles[path].get_slice(key)
        config = LoadStateDictConfig(device_map={"": device}, dtype=dtype, dtype_plan=model._get_dtype_plan(dtype),
                                     weight_mapping=keys.conversions)
        stack.enter_context(_quiet_transformers())
        try:
            info, _ = convert_and_load_state_dict_in_model(model, lazy, config)
        except Exception as exc:  # safetensors/IO errors surface here as various types
            where = f"of decoder layer {group}" if isinstance(group, int) else f"of {what}"
            raise MoeVizError(f"cannot read the tensors {where} from the checkpoint: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return info


def check_loaded(model: nn.Module, info, expected: list[str], what: str) -> None:
    """Every tensor named in `expected` (full names) is loaded, else one line names what the checkpoint lacks
    or could not convert (`info`: the report of `load_tensors`)."""
    mine = set(expected)
    missing = [n for n in expected if _tensor(model, n).device.type == "meta"]
    mismatched = [str(k[0]) for k in info.mismatched_keys if str(k[0]) in mine]
    errors = [str(k) for k in info.conversion_errors if str(k) in mine]
    if missing or mismatched or errors:
        bad = missing or mismatched or errors
        lacks = "lacks" if missing else "has wrongly shaped or unconvertible"
        raise MoeVizError(f"the checkpoint {lacks} {len(bad)} tensor(s) of {what} "
                          f"({', '.join(bad[:3])}): it is incomplete or for another architecture")


@contextmanager
def _quiet_transformers():
    """No 'Loading weights' bar per layer: the capture's own progress bar says where it is."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# -- recording each layer's inputs ------------------------------------------------

class _Recorder(nn.Module):
    """Stands in for a decoder layer: keeps the (args, kwargs) it is called with, returns its input."""

    def __init__(self, original: nn.Module, sink: list):
        super().__init__()
        self.__dict__["_original"] = original  # not a child: its (meta) weights stay out of this module
        self.__dict__["_sink"] = sink

    def __getattr__(self, name):  # the model's loop may read attributes of its layers (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self._sink.append((hidden, rest, kwargs))
        return hidden


def _map_tensors(value, fn, memo: dict):
    """Apply fn to every tensor in a nested args/kwargs value; one result per distinct tensor object."""
    if isinstance(value, torch.Tensor):
        key = id(value)
        if key not in memo:
            memo[key] = (value, fn(value))  # keep `value` alive so its id is not reused
        return memo[key][1]
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn, memo) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn, memo) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn, memo) for k, v in value.items()}
    return value


@dataclass
class RecordedBatch:
    """One batch: its attention mask (B, S), layer 0's input (B, S, H) and every layer's other inputs."""

    mask: torch.Tensor
    layer_inputs: list[tuple[tuple, dict]]  # per decoder layer: (args after hidden_states, kwargs), host tensors

    def inputs_on(self, layer: int, device: torch.device, memo: dict) -> tuple[tuple, dict]:
        args, kwargs = self.layer_inputs[layer]
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return _map_tensors(args, move, memo), _map_tensors(kwargs, move, memo)


@torch.no_grad()
def record_batch(base: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, mask: torch.Tensor,
                 device: torch.device) -> tuple[RecordedBatch, torch.Tensor]:
    """Run the model's own forward with recorders in place of its layers; returns (record, layer-0 input)."""
    sink: list = []
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, sink)
    try:
        base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if len(sink) != len(layers):
        raise MoeVizError(f"{type(base).__name__} called {len(sink)} of its {len(layers)} decoder layers; "
                          "capture it without --layerwise")
    memo: dict = {}
    to_host = lambda t: t.to("cpu")  # noqa: E731
    inputs = [(_map_tensors(rest, to_host, memo), _map_tensors(kwargs, to_host, memo)) for _, rest, kwargs in sink]
    return RecordedBatch(mask, inputs), sink[0][0].to("cpu")


# -- state persisted between layers (resume) ---------------------------------------

def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class LayerwiseState:
    """A directory owned by one layer-wise capture (one rank): hidden states and accumulators after each layer.

    Layout: ``state.json`` (key, next layer to run), ``h0/`` and ``h1/`` (hidden
    states after an even / odd number of layers, one file per domain and
    batch), ``acc-LAYER.pt`` (accumulators of finished MoE layers). Layer i
    reads ``h{i%2}`` and writes ``h{(i+1)%2}``, and ``state.json`` is replaced
    only after everything of layer i is on disk, so a crash at any moment
    leaves a consistent state for ``--resume``.
    """

    def __init__(self, directory: Path, key: str):
        self.dir = directory
        self.key = key

    @staticmethod
    def location(store_path: str | Path, key: str, rank: int, world_size: int) -> Path:
        store_path = Path(store_path)
        return store_path.with_name(store_path.name + ".layerwise") / f"rank-{rank}-of-{world_size}" / key

    def _manifest(self) -> dict | None:
        try:
            data = json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("key") == self.key else None

    def completed_layers(self) -> int:
        """How many decoder layers a previous attempt finished (0: nothing to resume)."""
        manifest = self._manifest()
        return int(manifest["next_layer"]) if manifest else 0

    def open(self, resume: bool) -> int:
        """Create (or, with `resume`, reuse) the directory; returns the first layer to run."""
        if self.dir.exists() and not (self.dir / STATE_MARKER).is_file():
            raise MoeVizError(f"{self.dir} exists but was not made by a moe_viz layer-wise capture: move it away")
        start = self.completed_layers() if resume else 0
        if resume and start == 0:
            self._refuse_another_world_size()
        if not resume and self.dir.exists():
            done = self.completed_layers()
            if done:
                print(f"moe-viz: starting over; an interrupted capture with the same inputs had finished {done} "
                      "layer(s) (--resume continues one instead)", file=sys.stderr)
            shutil.rmtree(self.dir)  # an earlier attempt of this very capture (marker checked above)
        try:
            for sub in ("", "h0", "h1"):
                (self.dir / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MoeVizError(f"cannot create the layer-wise state directory {self.dir} "
                              f"({exc.strerror or exc}): free that path or point --store elsewhere") from exc
        (self.dir / STATE_MARKER).write_text("created by moe-viz capture --layerwise; removed when it succeeds\n")
        return start

    def _refuse_another_world_size(self) -> None:
        """--resume under another number of ranks than the interrupted capture had: one line saying what to do."""
        mine = re.fullmatch(r"rank-(\d+)-of-(\d+)", self.dir.parent.name)
        found = sorted({int(m.group(2)) for path in self.dir.parent.parent.glob(f"rank-*-of-*/{self.key}")
                        if (m := re.fullmatch(r"rank-(\d+)-of-(\d+)", path.parent.name))
                        and (not mine or m.group(2) != mine.group(2))
                        and LayerwiseState(path, self.key).completed_layers()})
        if found and mine:
            raise MoeVizError(
                f"--resume: the interrupted capture ran on {found[0]} rank(s) and this launch has "
                f"{mine.group(2)}; each rank's hidden states and partial sums are its own, so relaunch with "
                f"{found[0]} rank(s) (torchrun --nproc-per-node ...) or run without --resume to start over")

    def hidden_path(self, after_layers: int, domain_index: int, batch: int) -> Path:
        return self.dir / f"h{after_layers % 2}" / f"d{domain_index}-b{batch}.pt"

    def save_hidden(self, after_layers: int, domain_index: int, batch: int, hidden: torch.Tensor) -> None:
        _save_atomic(hidden, self.hidden_path(after_layers, domain_index, batch))

    def load_hidden(self, after_layers: int, domain_index: int, batch: int) -> torch.Tensor:
        return torch.load(self.hidden_path(after_layers, domain_index, batch), weights_only=True)

    def finish_layer(self, layer: int, accumulators: dict[int, list[LayerAccumulator]],
                     samples: dict[str, bytes], trace: dict | None = None) -> None:
        """Persist layer `layer`'s accumulators (per domain), fingerprint samples and token trace, then mark it done."""
        from moe_viz.atomic import write_text_atomic

        _save_atomic({
            "tensors": {d: [accumulator_tensors(a) for a in accs] for d, accs in accumulators.items()},
            "top_k": {d: [a.top_k for a in accs] for d, accs in accumulators.items()},
            "score_fn": {d: [a.score_fn for a in accs] for d, accs in accumulators.items()},  # probed while loaded
            "samples": samples,
            "trace": trace or {},  # domain -> MoE layer -> TokenTracer.routes_of
        }, self.dir / f"layer-{layer}.pt")
        write_text_atomic(self.dir / "state.json", json.dumps({"key": self.key, "next_layer": layer + 1}))

    def load_layer(self, layer: int, accumulators: dict[int, list[LayerAccumulator]]) -> tuple[dict, dict]:
        """Restore a finished layer's accumulators in place; returns its fingerprint samples and token trace."""
        saved = torch.load(self.dir / f"layer-{layer}.pt", weights_only=True)
        for d, accs in accumulators.items():
            score_fns = saved.get("score_fn", {}).get(d, [acc.score_fn for acc in accs])
            for acc, tensors, top_k, score_fn in zip(accs, saved["tensors"][d], saved["top_k"][d], score_fns):
                mine = accumulator_tensors(acc)
                for name, value in tensors.items():
                    mine[name].copy_(value)
                acc.top_k, acc.score_fn = top_k, score_fn
        return saved["samples"], saved.get("trace", {})

    def remove(self) -> None:
        """Delete this capture's directory, and its parents if that leaves them empty."""
        shutil.rmtree(self.dir, ignore_errors=True)
        for parent in (self.dir.parent, self.dir.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break


# -- the pass ---------------------------------------------------------------------

@dataclass
class LayerwiseResult:
    accumulators: dict[int, list[LayerAccumulator]]  # per domain index, one per MoE layer in forward order
    fingerprint: str
    resumed_from: int = 0
    layers_run: list[int] = field(default_factory=list)
    seconds: float = 0.0  # the pass, from the moment every rank was ready


class LayerwiseCapture:
    """A checkpoint opened for streaming: skeleton, key groups, device and dtype."""

    def __init__(self, model_dir: str | Path, device: str, dtype: str, trust_remote_code: bool = False):
        from moe_viz.checkpoint import load_config

        self.model_dir = Path(model_dir).expanduser()
        self.config = load_config(self.model_dir, trust_remote_code=trust_remote_code)
        self.device = torch.device(device)
        resolved = resolve_dtype(dtype, device)
        if resolved == "auto":  # the checkpoint's own dtype, as from_pretrained(dtype="auto")
            resolved = getattr(self.config.get_text_config(), "dtype", None) or torch.float32
            resolved = getattr(torch, resolved) if isinstance(resolved, str) else resolved
        self.dtype = resolved
        self.model = build_skeleton(self.config, self.dtype, trust_remote_code)
        self.moe_layers = find_moe_layers(self.model)
        self.layers_prefix, self.layers = decoder_layers(self.model, self.moe_layers)
        self.unrun = unrun_tensors(self.model, self.layers_prefix)
        self.keys = group_checkpoint_keys(self.model, self.model_dir, self.layers_prefix, self.unrun)
        self.meta_state = [(n, tuple(t.shape), t.dtype) for n, t in self.model.state_dict().items()]
        self.samples: dict[str, bytes] = {}
        self._outer_loaded = False

    def _sample(self, names_from: nn.Module, prefix: str) -> None:
        for name, tensor in names_from.state_dict().items():
            full = f"{prefix}.{name}" if prefix else name
            if tensor.device.type != "meta":
                self.samples[full] = tensor_sample(tensor)

    def load_outer(self) -> None:
        """Embeddings, final norm and buffers; what the text forward never runs (LM head, a speech talker,
        vision and audio towers) is sampled for the fingerprint one unit at a time, on the host, and dropped."""
        if self._outer_loaded:
            return
        self._sample_unrun()
        text = text_model_prefix(self.layers_prefix)
        where = text or "the model"  # layers at the top level: all but them is this group
        info = load_tensors(self.model, self.keys, None, self.device, self.dtype, where)
        self.model.tie_weights()
        module = self.model.get_submodule(text)
        check_loaded(self.model, info, [n for n in tensors_under(module, text)
                                        if not n.startswith(self.layers_prefix + ".")], where)
        for module_name, module in self.model.named_modules():
            if module is self.layers or module_name.startswith(self.layers_prefix + "."):
                continue
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(self.device)
        self._sample(self.model, "")
        head = self.model.get_output_embeddings()
        if head is not None and head.weight is not self.model.get_input_embeddings().weight:
            _free(head, "weight")  # never run
        self._outer_loaded = True

    def _sample_unrun(self) -> None:
        """Load, sample and free each unit of `self.unrun` in turn, on the host: at most one of them (a
        talker layer, not the whole talker) is in memory at a time. A tied tensor is loaded under whichever
        of its names the checkpoint has, and its sample stands for all of them. Buffers stay: the skeleton
        starts with real ones (small), so a second call (`fingerprint_after_failure`) finds them as the
        first did, whether or not the checkpoint has them."""
        for unit, tensors in self.unrun.items():
            info = load_tensors(self.model, self.keys, unit, torch.device("cpu"), self.dtype, unit)
            loaded = [next((n for n in names if _tensor(self.model, n).device.type != "meta"), names[0])
                      for names in tensors]
            check_loaded(self.model, info, loaded, unit)
            for name, names in zip(loaded, tensors):
                sample = tensor_sample(_tensor(self.model, name))
                for alias in names:
                    self.samples[alias] = sample
                    module, _, leaf = alias.rpartition(".")
                    owner = self.model.get_submodule(module)
                    if leaf in owner._parameters:
                        _free(owner, leaf)

    def drop_outer(self) -> None:
        """Free the embeddings and final norm once every batch's layer inputs are recorded (needed no more)."""
        for module_name, module in self.model.named_modules():
            if module is self.layers or module_name.startswith(self.layers_prefix + "."):
                continue
            for name, _ in list(module.named_parameters(recurse=False)):
                _free(module, name)
        self._outer_loaded = False

    def load_layer(self, index: int) -> nn.Module:
        layer = self.layers[index]
        path = f"{self.layers_prefix}.{index}"
        info = load_tensors(self.model, self.keys, index, self.device, self.dtype, path)
        check_loaded(self.model, info, tensors_under(layer, path), path)
        layer.to(self.device)  # non-persistent buffers
        self._sample(layer, f"{self.layers_prefix}.{index}")
        return layer

    def free_layer(self, index: int) -> None:
        self.layers[index].to("meta")

    def fingerprint(self) -> str:
        from moe_viz.models.fingerprint import fingerprint_from_samples

        missing = [n for n, _, _ in self.meta_state if n not in self.samples]
        if missing:
            raise RuntimeError(f"fingerprint: {len(missing)} tensors were never loaded ({missing[0]}, ...)")
        return fingerprint_from_samples(self.config, self.meta_state, self.samples)

    def fingerprint_after_failure(self) -> str:
        """The fingerprint when the pass stopped early: what it never reached is loaded and sampled now.

        One decoder layer at a time, no compute (at most one more read of the
        checkpoint). "" when the checkpoint itself cannot be read (a missing or
        broken layer: there is no whole model to fingerprint) or when this is
        interrupted (a second Ctrl-C).
        """
        try:
            missing = {n for n, _, _ in self.meta_state if n not in self.samples}
            prefix = self.layers_prefix + "."
            if any(not n.startswith(prefix) for n in missing):
                self._outer_loaded = False
                self.load_outer()
                self.drop_outer()
            for index in range(len(self.layers)):
                if any(n.startswith(f"{prefix}{index}.") for n in missing):
                    self.load_layer(index)
                    self.free_layer(index)
            return self.fingerprint()
        except (Exception, KeyboardInterrupt):  # noqa: BLE001 - the run's own error is what gets reported
            return ""

    def moe_layers_in(self, index: int) -> list[MoeLayer]:
        prefix = f"{self.layers_prefix}.{index}."
        return [m for m in self.moe_layers if m.name.startswith(prefix)]


@torch.no_grad()
def run_layerwise(
    streamer: LayerwiseCapture,
    batches: list[list[tuple[int, torch.Tensor, torch.Tensor]]],
    state: LayerwiseState,
    resume: bool = False,
    max_host_memory: int | None = None,
    progress=None,
    steps: Steps | None = None,
    steps_per_phase: int = 0,
    tracers: dict | None = None,
) -> LayerwiseResult:
    """Stream every decoder layer once over all batches of all domains.

    Args:
        batches: per domain, the (batch number, input_ids (B,S), attention_mask (B,S)) this process runs.
        state: where hidden states and accumulators are persisted after each layer.
        max_host_memory: bytes of hidden states kept in host memory; beyond it they are read back from `state`.
        progress: called with run.Progress (domain "all domains", tokens as whole-model tokens, the layer as detail).
        steps: data-parallel failure checks: one after each batch of the recording phase and of every layer
            (`steps_per_phase` each: the most batches any rank runs), plus one before the pass starts.
        tracers: per domain index, a TokenTracer for the domain's token trace (as an in-memory capture makes).
    """
    tracers = tracers or {}
    steps = steps if steps is not None else Steps(Ranks())
    mine = sum(len(domain_batches) for domain_batches in batches)
    per_phase = max(mine, steps_per_phase)
    num_layers = len(streamer.layers)
    steps.plan(1 + per_phase * (1 + num_layers))  # before anything here can fail (see Steps)

    def pad() -> None:  # the checks of the batches this rank does not have
        for _ in range(per_phase - mine):
            steps.step()

    start = state.open(resume)
    streamer.load_outer()
    steps.sync()  # every rank is ready: the pass starts now
    if resume and not any(distributed.gather_objects(steps.ranks, start)):  # a rank without state starts at 0
        state.remove()  # created just now, empty
        raise MoeVizError("--resume: no interrupted layer-wise capture of this model with these domains and "
                          f"settings was found (looked in {state.dir}); run without --resume")
    started = time.monotonic()
    device = streamer.device
    base = streamer.model.base_model
    hidden_size = streamer.config.get_text_config().hidden_size
    element = torch.empty((), dtype=streamer.dtype).element_size()
    buffer_bytes = sum(int(m.numel()) for domain_batches in batches for _, _, m in domain_batches) * hidden_size * element
    keep_in_memory = max_host_memory is None or buffer_bytes <= max_host_memory
    records: list[list[RecordedBatch]] = []
    hidden: list[list[torch.Tensor | None]] = []
    for d, domain_batches in enumerate(batches):
        records.append([])
        hidden.append([])
        for number, ids, mask in domain_batches:
            if d in tracers:
                tracers[d].begin_batch(ids, mask)
            record, first = record_batch(base, streamer.layers, ids, mask, device)
            records[d].append(record)
            if start > 0:  # resume: the hidden states after `start` layers were saved by the earlier attempt
                first = state.load_hidden(start, d, number) if keep_in_memory else None
            elif not keep_in_memory:
                state.save_hidden(0, d, number, first)
                first = None
            hidden[d].append(first)
            steps.step()
    pad()
    streamer.drop_outer()  # on a GPU only the current layer (and batch) stays there from now on

    accumulators: dict[int, list[LayerAccumulator]] = {d: [] for d in range(len(batches))}
    tokens = sum(int(m.sum()) for domain_batches in batches for _, _, m in domain_batches)
    done = 0
    result = LayerwiseResult(accumulators, "", resumed_from=start)
    scratch = Scratch()  # the observers' work buffers, one set for the whole pass
    for index in range(num_layers):
        moe = streamer.moe_layers_in(index)
        if index < start:  # finished by an earlier attempt: its accumulators and fingerprint samples
            layer_accs = {d: [LayerAccumulator(m.layer, m.name, m.num_experts, m.score_fn, device) for m in moe]
                          for d in accumulators}
            samples, trace = state.load_layer(index, layer_accs)
            streamer.samples.update(samples)
            for d, tracer in tracers.items():
                for m in moe:
                    tracer.restore(m.layer, trace.get(d, {}).get(m.layer))
            for d in accumulators:
                accumulators[d].extend(layer_accs[d])
            for _ in range(per_phase):  # another rank may still have to run this layer
                steps.step()
            continue
        layer = streamer.load_layer(index)
        layer_accs = {}
        for d, domain_batches in enumerate(batches):
            with RoutingObserver(moe, tracer=tracers.get(d), scratch=scratch) as observer:
                for j, (number, _, mask) in enumerate(domain_batches):
                    if d in tracers:
                        tracers[d].use_batch(j)
                    h = hidden[d][j] if keep_in_memory else state.load_hidden(index, d, number)
                    args, kwargs = records[d][j].inputs_on(index, device, {})
                    observer.set_attention_mask(mask)
                    out = layer(h.to(device), *args, **kwargs)
                    out = (out[0] if isinstance(out, tuple) else out).to("cpu")
                    state.save_hidden(index + 1, d, number, out)
                    if keep_in_memory:
                        hidden[d][j] = out
                    done += int(mask.sum())
                    if progress is not None:
                        resumed = f", resumed at layer {start + 1}" if start else ""
                        progress(Progress("all domains", done // (num_layers - start), tokens,
                                          time.monotonic() - started, f"layer {index + 1}/{num_layers}{resumed}"))
                    steps.step()
            layer_accs[d] = observer.accumulators
            accumulators[d].extend(observer.accumulators)
        pad()
        prefix = f"{streamer.layers_prefix}.{index}."
        state.finish_layer(index, layer_accs, {n: b for n, b in streamer.samples.items() if n.startswith(prefix)},
                           {d: {m.layer: tracer.routes_of(m.layer) for m in moe} for d, tracer in tracers.items()})
        streamer.free_layer(index)
        _return_freed_memory()
        result.layers_run.append(index)
    result.fingerprint = streamer.fingerprint()
    result.seconds = time.monotonic() - started
    return result


def _return_freed_memory() -> None:
    """Give the heap pages freed by the last layer back to the OS (glibc; elsewhere a no-op).

    glibc raises its mmap threshold after large frees, so the per-batch hidden
    states (a few MB) land on the heap; with their interleaved lifetimes the
    heap then grew by ~2 MB per layer (measured: 855 MiB peak with 12 layers,
    1.1 GiB with 48). malloc_trim releases the free pages and keeps the peak
    independent of the number of layers.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def state_key(model_dir: Path, digest: str, packed: dict[str, list[list[int]]], settings: dict) -> str:
    """What identifies one capture for --resume: checkpoint, exact token sequences and settings."""
    digest_input = hashlib.sha256()
    digest_input.update(json.dumps([str(model_dir.resolve()), digest, settings], sort_keys=True, default=str).encode())
    for domain, sequences in packed.items():
        digest_input.update(domain.encode())
        for seq in sequences:
            digest_input.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
            digest_input.update(b"|")
    return digest_input.hexdigest()[:16]


def layerwise_reason(checkpoint_size: int, free: int, where: str) -> str | None:
    """Why a checkpoint of `checkpoint_size` bytes would not fit in `free` bytes of `where`, or None if it fits.

    80%: activations, the CUDA context / allocator slack and the host copy of
    the tokens need the rest.
    """
    if checkpoint_size > 0.8 * free:
        return (f"the checkpoint ({checkpoint_size / 2**30:.1f} GiB) would not fit in 80% of the {where} "
                f"({free / 2**30:.1f} GiB)")
    return None


def would_not_fit(model_dir: Path, device: str) -> str | None:
    """`layerwise_reason` for the checkpoint in `model_dir` on `device` (all GPUs for plain "cuda")."""
    import psutil

    if device.startswith("cuda"):
        gpus = range(torch.cuda.device_count()) if device == "cuda" else [torch.device(device).index or 0]
        return layerwise_reason(checkpoint_bytes(model_dir), sum(torch.cuda.mem_get_info(i)[0] for i in gpus),
                                "free GPU memory")
    return layerwise_reason(checkpoint_bytes(model_dir), psutil.virtual_memory().available, "available host memory")


def capture_layerwise(
    engine: LayerwiseCapture,
    tokenizer,
    model_id: str,
    documents: list,
    settings,
    *,
    store_path: str | Path,
    progress,
    extra_settings: dict,
    ranks,
    resume: bool = False,
    max_host_memory: int | None = None,
    timings=None,
) -> list[str]:
    """`capture_model` for a streamed checkpoint: one layer-wise pass over all domains, then one run per domain.

    Under a data-parallel launch the batches of all domains together are split
    over the ranks (equal token counts, distributed.assign).
    """
    from moe_viz.capture import run
    from moe_viz.capture.timing import Timings

    timings = timings if timings is not None else Timings()
    vocab_size = engine.model.get_input_embeddings().weight.shape[0]
    with timings.phase("pack tokens"):
        packed = run.pack_domains(documents, tokenizer, settings, vocab_size)
    pad_id = run.pad_id_of(tokenizer)
    every = [list(run.padded_batches(packed[docs.domain], settings.batch_size, pad_id)) for docs in documents]
    flat = [(d, number) for d, domain_batches in enumerate(every) for number in range(len(domain_batches))]
    flat_tokens = [int(every[d][number][1].sum()) for d, number in flat]
    owners = distributed.assign(flat_tokens, ranks.world_size)
    batches = [[(number, *every[d][number]) for (dd, number), owner in zip(flat, owners)
                if dd == d and owner == ranks.rank] for d in range(len(documents))]
    run_settings = {
        "max_tokens": settings.max_tokens,
        "seq_len": settings.seq_len,
        "seed": settings.seed,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "world_size": ranks.world_size,
        "layerwise": True,
        **extra_settings,
    }
    keyed = {"batch_size": settings.batch_size, "pad_id": pad_id, "dtype": run_settings["dtype"],
             "device": engine.device.type,  # the number of ranks is in the state's path (rank-R-of-N)
             "trace_tokens": settings.trace_tokens}
    tracers = {}
    if settings.trace_tokens and ranks.main:  # rank 0 traces the first N tokens of its own batches, as in memory
        tracers = {d: TokenTracer(settings.trace_tokens, [number * settings.batch_size for number, _, _ in mine])
                   for d, mine in enumerate(batches)}
    key = state_key(engine.model_dir, extra_settings.get("checkpoint_digest", ""), packed, keyed)
    state = LayerwiseState(LayerwiseState.location(store_path, key, ranks.rank, ranks.world_size), key)
    result, error = None, None
    try:
        with distributed.together(ranks, "running the layer-wise pass") as steps, \
                timings.phase("layer-wise pass", cpu=True):
            result = run_layerwise(engine, batches, state, resume=resume, max_host_memory=max_host_memory,
                                   progress=progress if ranks.main else None, steps=steps,
                                   steps_per_phase=ranks.most_batches(flat_tokens), tracers=tracers)
    except BaseException as exc:  # noqa: BLE001 - every rank records it below, then raises it
        error = exc
    fingerprint = result.fingerprint if result is not None else ""
    if error is not None and ranks.main:  # the failed runs name the model too (and a re-capture replaces them)
        fingerprint = engine.fingerprint_after_failure()
    names = [docs.domain for docs in documents]

    def collect(domain: str, sequences, on_batch, steps) -> list[LayerAccumulator]:
        if error is not None:
            raise error
        return result.accumulators[names.index(domain)]

    run_ids = run.store_domain_runs(
        store_path=store_path, ranks=ranks, domains=documents, packed=packed, model_id=model_id,
        fingerprint=fingerprint, model_type=engine.config.model_type,
        run_settings=run_settings, collect=collect, progress=None, timings=timings,
        traces=lambda domain: tracers.pop(names.index(domain)).frames(tokenizer) if tracers else None,
        shared_pass=(result.seconds if result is not None else 0.0, sum(flat_tokens)),
    )
    state.remove()  # every rank stored (or handed over) its share: nothing left to resume
    return run_ids
