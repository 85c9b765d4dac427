"""Check a local safetensors checkpoint before anything reads it, and fingerprint its files.

`check_checkpoint` validates every shard's header the way the safetensors
loader will (header length, JSON, dtype x shape = bytes, tensors contiguous and
inside the file) and that a sharded index names only shards that exist, so a
truncated, corrupt or incomplete checkpoint is one clear error instead of a
traceback from deep inside a load (or, worse, a load that random-initialises
what is missing).

`checkpoint_digest` is a cheap file-level fingerprint (names, sizes, headers,
a few sampled data blocks, config.json) recorded with each capture, so a
checkpoint truncated or replaced after capture is noticed before exporting.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

from moe_viz.errors import MoeVizError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors loader's own limit
# Bits per element of every safetensors dtype.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
SAMPLE_BLOCKS = 16  # data blocks hashed per shard by checkpoint_digest
SAMPLE_BYTES = 4096


def is_local(model_id: str | Path) -> bool:
    """True for a model given as a directory path (as opposed to a hub id)."""
    model_id = str(model_id)
    return Path(model_id).expanduser().exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") > 1


def _bad(path: Path, detail: str) -> MoeVizError:
    return MoeVizError(f"{path} is corrupt or truncated: {detail}; re-download or re-save the checkpoint")


def read_header(path: Path) -> tuple[dict, int, int]:
    """Validated (header, data start offset, file size) of one safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _bad(path, f"only {size} bytes, not even a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length == 0 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise _bad(path, f"its header claims {length} bytes in a {size}-byte file")
            raw = handle.read(length)
    except OSError as exc:
        raise MoeVizError(f"cannot read {path} ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "its header is not valid JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    data_size = size - 8 - length
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _bad(path, f"tensor {name} has a malformed header entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise _bad(path, f"tensor {name} has a malformed shape or data_offsets")
        if dtype not in DTYPE_BITS:
            raise _bad(path, f"tensor {name} has unknown dtype {dtype!r}")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise _bad(path, f"tensor {name} ({dtype} {shape}) needs {bits / 8:g} bytes but its data_offsets "
                             f"span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    end = max((e for _, e, _ in spans), default=0)
    if end > data_size:
        raise _bad(path, f"its tensors need {end} bytes of data but the file holds {data_size}")
    position = 0
    for start, stop, name in spans:
        if start != position:
            raise _bad(path, f"tensor {name} starts at byte {start}, expected {position} (overlap or gap)")
        position = stop
    if position != data_size:
        raise _bad(path, f"{data_size - position} bytes after the last tensor")
    return header, 8 + length, size


def _read_index(model_dir: Path) -> dict[str, str]:
    index_path = model_dir / INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoeVizError(f"{index_path} is not valid JSON: re-download or re-save the checkpoint") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise MoeVizError(f"{index_path} has no weight_map of tensor names to shard files")
    for shard in set(weight_map.values()):
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise MoeVizError(f"{index_path} names shard {shard!r} outside the model directory")
    return weight_map


def check_checkpoint(model_dir: str | Path) -> list[str]:
    """Validate a local checkpoint's safetensors files; returns its shard file names.

    Hub ids (not local paths) are not checked and give []. Raises MoeVizError
    (one line) on a missing directory or weights, a missing shard, a broken
    index, or any shard whose header does not describe the file exactly.
    """
    if not is_local(model_dir):
        return []
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise MoeVizError(f"model path {model_dir} does not exist or is not a directory")
    weight_map: dict[str, str] = {}
    if (model_dir / INDEX_FILE).is_file():
        weight_map = _read_index(model_dir)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise MoeVizError(
                f"{model_dir} is missing shard {missing[0]} named in {INDEX_FILE} "
                f"({len(missing)} of {len(shards)} shards missing): re-download or copy the complete checkpoint"
            )
    elif (model_dir / SINGLE_FILE).is_file():
        shards = [SINGLE_FILE]
    else:
        found = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if found:
            raise MoeVizError(f"{model_dir} has {found[0]} but neither {SINGLE_FILE} nor {INDEX_FILE}: "
                              "the index of a sharded checkpoint is missing")
        raise MoeVizError(f"{model_dir} has no .safetensors weights: moe_viz only loads safetensors checkpoints")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard in shards:
        header, _, _ = read_header(model_dir / shard)
        absent = [name for name in by_shard.get(shard, []) if name not in header]
        if absent:
            raise MoeVizError(f"{INDEX_FILE} of {model_dir} places {absent[0]} in {shard}, which does not hold it "
                              f"({len(absent)} such tensors): the shards do not match the index")
    return shards


def checkpoint_bytes(model_dir: str | Path) -> int:
    """Total size of the checkpoint's safetensors shards (validated first; 0 for a hub id)."""
    model_dir = Path(model_dir).expanduser()
    return sum((model_dir / name).stat().st_size for name in check_checkpoint(model_dir))


def checkpoint_digest(model_dir: str | Path) -> str:
    """A cheap fingerprint of the checkpoint's files (validated first).

    sha256 over config.json and the index (if any), and for every shard its
    name, size, header and SAMPLE_BLOCKS data blocks spread over the file.
    Reads O(shards) small blocks, not the weights.
    """
    model_dir = Path(model_dir).expanduser()
    shards = check_checkpoint(model_dir)
    digest = hashlib.sha256()
    for side in ("config.json", INDEX_FILE):
        if (model_dir / side).is_file():
            digest.update(f"{side}\0".encode())
            digest.update((model_dir / side).read_bytes())
    for shard in shards:
        path = model_dir / shard
        _, data_start, size = read_header(path)
        digest.update(f"{shard}\0{size}\0".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(data_start))
            span = size - data_start
            offsets = sorted({data_start + (span - SAMPLE_BYTES) * i // (SAMPLE_BLOCKS - 1)
                              for i in range(SAMPLE_BLOCKS)}) if span > SAMPLE_BYTES else [data_start]
            for offset in offsets:
                digest.update(os.pread(handle.fileno(), SAMPLE_BYTES, max(offset, data_start)))
    return digest.hexdigest()[:32]


def check_unchanged(model_dir: str | Path, expected_digest: str | None, model_id: str | None = None) -> None:
    """Refuse a local checkpoint whose files changed since capture (no-op without a recorded digest)."""
    if not expected_digest or not is_local(model_dir):
        return
    if "," in expected_digest:  # a plan over runs captured from different files
        raise MoeVizError(f"the runs of {model_id or model_dir} were captured from different checkpoint files "
                          "(checkpoint digests differ): re-capture every domain from one checkpoint")
    if checkpoint_digest(model_dir) != expected_digest:
        raise MoeVizError(
            f"{model_id or model_dir} changed since it was captured (checkpoint digest differs): "
            "re-capture it or point --model at the captured checkpoint"
        )


def load_config(model_id: str | Path, trust_remote_code: bool = False):
    """AutoConfig for a model directory or hub id, with one-line errors for broken or unreachable configs."""
    from transformers import AutoConfig

    model_id = str(model_id)
    if is_local(model_id):
        config_path = Path(model_id).expanduser() / "config.json"
        if not config_path.is_file():
            raise MoeVizError(f"{model_id} has no config.json: point --model at a Hugging Face model directory")
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
            raise MoeVizError(f"{config_path} is not valid JSON{where}: restore the model's config.json") from None
        if not isinstance(data, dict) or not data.get("model_type"):
            raise MoeVizError(f"{config_path} has no model_type: it is not a Hugging Face transformers config")
    try:
        return AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if not is_local(model_id) and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            hint = " (HF_HUB_OFFLINE is set, so a hub id must already be in the local cache)"
        raise MoeVizError(f"cannot load the config of {model_id}{hint}: {first}") from exc


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "merges.txt")
TOKENIZER_SAMPLE = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b  # 2 + 3 = 5"


def tokenizer_problem(tokenizer, model_id: str | Path, vocab_size: int) -> str | None:
    """Why `tokenizer` cannot turn text into this model's tokens, or None if it can.

    transformers 5 builds an empty 1-2 token tokenizer from the config when a
    checkpoint has no tokenizer files: it loads without error and turns text
    into nothing (or only special tokens), so test what it really does.
    """
    if tokenizer is None:
        problem = "no tokenizer could be loaded"
    else:
        try:
            size = len(tokenizer)
            ids = list(tokenizer(TOKENIZER_SAMPLE, add_special_tokens=False)["input_ids"])
        except Exception as exc:  # a tokenizer that cannot even encode: whatever it raises
            ids, size = None, None
            problem = f"tokenising sample text fails ({type(exc).__name__})"
        if ids is not None:
            specials = set(getattr(tokenizer, "all_special_ids", None) or [])
            if size <= 2 or len([i for i in ids if i not in specials]) < 4:
                problem = (f"its {size}-token vocabulary turns {len(TOKENIZER_SAMPLE)} characters of sample text "
                           f"into {len(ids)} token(s)")
            elif max(ids) >= vocab_size:
                problem = f"it produces token id {max(ids)}, outside the model's {vocab_size}-token vocabulary"
            else:
                return None
    model_dir = Path(str(model_id)).expanduser()
    if is_local(model_id) and model_dir.is_dir() and not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        problem = f"no tokenizer files in the directory; {problem}"
    return problem


def check_verify_inputs(export_dir: str | Path, source_dir: str | Path | None = None) -> None:
    """Before `moe-viz verify` loads anything: the export is a moe_viz export, and its source
    model (recorded in the manifest, or `source_dir`) exists, has a readable config, intact
    safetensors and, when the capture recorded a digest, the captured files."""
    from moe_viz.prune.export import PRUNE_MANIFEST

    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise MoeVizError(f"export {export_dir} does not exist or is not a directory")
    manifest_path = export_dir / PRUNE_MANIFEST
    if not manifest_path.is_file():
        raise MoeVizError(f"{export_dir} has no {PRUNE_MANIFEST}: it is not a moe_viz export")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        recorded = manifest.get("source_model")
        plan = manifest.get("plan") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise MoeVizError(f"{manifest_path} is not a valid moe_viz manifest: re-export with `moe-viz prune`") from None
    if source_dir is None:
        if not recorded or not Path(recorded).is_dir():
            raise MoeVizError(f"the source model recorded in {manifest_path.name} ({recorded}) no longer exists: "
                              "pass --model PATH with its current location")
        source = str(recorded)
    else:
        source = str(source_dir)
        if is_local(source) and not Path(source).expanduser().is_dir():
            raise MoeVizError(f"--model {source} does not exist or is not a directory")
    load_config(source)
    if is_local(source):
        check_checkpoint(source)
        check_unchanged(source, plan.get("checkpoint_digest") if isinstance(plan, dict) else None, source)
