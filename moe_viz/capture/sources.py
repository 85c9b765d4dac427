"""Calibration sources: parse `NAME=SOURCE`, read and check them, pack token sequences.

A SOURCE is one of:
- a `.txt` file (one document),
- a `.jsonl` file: one JSON object per line with `text` (a string) or
  `input_ids` (pre-tokenised: used exactly as given, one sequence per line,
  truncated to seq_len, no tokens added),
- a directory: every UTF-8 text file in it, recursively, one document each,
- `hf:DATASET[:CONFIG[:SPLIT[:FIELD]]]`: a Hugging Face dataset (needs network
  and the `datasets` package; split defaults to `train`, field to `text`),
- `builtin:NAME[:SPLIT]`: a domain moe_viz builds offline (see docs/DEMO.md);
  SPLIT is `train` (default, for calibration) or `heldout` (for evaluation).

Everything is read and checked by `read_documents` before any model loads.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from moe_viz.errors import MoeVizError

DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")



@dataclass
class Documents:
    """What a source yields: text documents, or pre-tokenised sequences."""

    domain: str
    source: str
    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)

    @property
    def pretokenised(self) -> bool:
        return bool(self.token_ids)


def parse_domain(arg: str) -> tuple[str, str]:
    """Split `NAME=SOURCE`, checking the name."""
    name, sep, source = arg.partition("=")
    if not sep or not source:
        raise MoeVizError(f"--domain {arg!r} must look like NAME=SOURCE, e.g. code=./calib/code.jsonl")
    if not DOMAIN_NAME.match(name):
        raise MoeVizError(f"domain name {name!r} may only use letters, digits, '_', '.', '-' (at most 64)")
    return name, source


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MoeVizError(f"{path} is not UTF-8 text") from exc


def _read_jsonl(path: Path, docs: Documents) -> None:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MoeVizError(f"{path} line {number} is not UTF-8 text (byte {exc.start + 1}): "
                                  "a .jsonl source must be UTF-8 JSON, one object per line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoeVizError(f"{path} line {number} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise MoeVizError(f"{path} line {number} must be a JSON object with 'text' or 'input_ids'")
            if isinstance(record.get("text"), str):
                if docs.token_ids:
                    raise MoeVizError(f"{path} line {number} has 'text' but earlier lines have 'input_ids': use one kind")
                docs.texts.append(record["text"])
            elif isinstance(record.get("input_ids"), list):
                ids = record["input_ids"]
                if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                    raise MoeVizError(f"{path} line {number}: 'input_ids' must be a non-empty list of token ids (ints ≥ 0)")
                if docs.texts:
                    raise MoeVizError(f"{path} line {number} has 'input_ids' but earlier lines have 'text': use one kind")
                docs.token_ids.append(ids)
            else:
                raise MoeVizError(f"{path} line {number} has neither a 'text' string nor an 'input_ids' list")


def _read_directory(path: Path, docs: Documents) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            docs.texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue  # binary files in a corpus folder are skipped, not fatal


def _read_hf(spec: str, docs: Documents) -> None:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 4:
        raise MoeVizError(f"{spec!r} must look like hf:DATASET[:CONFIG[:SPLIT[:FIELD]]]")
    dataset, config, split, text_field = (parts + [None, None, None])[:4]
    try:
        import datasets
    except ImportError as exc:
        raise MoeVizError("hf: sources need the `datasets` package: pip install datasets") from exc
    try:
        rows = datasets.load_dataset(dataset, config or None, split=split or "train", streaming=True)
        for row in rows:
            value = row.get(text_field or "text")
            if not isinstance(value, str):
                raise MoeVizError(f"{spec}: rows have no text field {text_field or 'text'!r}; name it as the 4th part")
            docs.texts.append(value)
            if len(docs.texts) >= 100_000:
                break
    except MoeVizError:
        raise
    except Exception as exc:  # datasets raises many types for "not found / offline"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoeVizError(f"cannot load {spec} (offline or unknown dataset?): {first[:200]}") from exc


def read_documents(domain: str, source: str) -> Documents:
    """Read and validate one source fully; raises MoeVizError with one line on bad input."""
    docs = Documents(domain=domain, source=source)
    if source.startswith("hf:"):
        _read_hf(source, docs)
    elif source.startswith("builtin:"):
        from moe_viz.demo import corpora

        name, _, split = source[len("builtin:"):].partition(":")
        try:
            docs.texts.extend(corpora.documents(name, split or "train"))
        except ValueError as exc:
            raise MoeVizError(f"domain {domain}: {exc}") from exc
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise MoeVizError(f"domain {domain}: {source} does not exist")
        path = path.resolve()
        docs.source = str(path)  # stored absolute: verification may run from another directory
        if path.is_dir():
            _read_directory(path, docs)
        elif path.suffix == ".jsonl":
            _read_jsonl(path, docs)
        else:
            docs.texts.append(_read_text_file(path))
    docs.texts = [t for t in docs.texts if t.strip()]
    if not docs.texts and not docs.token_ids:
        raise MoeVizError(f"domain {domain}: {source} has no text")
    return docs


def pack_sequences(docs: Documents, tokenizer, seq_len: int, max_tokens: int, seed: int, vocab_size: int) -> list[list[int]]:
    """Token sequences of at most seq_len, at most max_tokens in total, deterministic in seed.

    Text documents are shuffled with `seed`, tokenised without special tokens,
    joined with the tokenizer's EOS (when it has one) and cut into seq_len
    chunks. Pre-tokenised sequences keep their order and are only truncated.
    """
    if seq_len < 1 or max_tokens < 1:
        raise MoeVizError("--seq-len and --max-tokens must be positive")
    sequences: list[list[int]] = []
    total = 0
    if docs.pretokenised:
        for ids in docs.token_ids:
            ids = ids[:seq_len][: max_tokens - total]
            too_big = max(ids) >= vocab_size
            if too_big:
                raise MoeVizError(f"domain {docs.domain}: token id {max(ids)} is outside the model's vocabulary ({vocab_size})")
            sequences.append(ids)
            total += len(ids)
            if total >= max_tokens:
                break
        return sequences
    if tokenizer is None:
        raise MoeVizError(f"domain {docs.domain} is text but the model has no tokenizer: give pre-tokenised jsonl (input_ids)")
    order = list(range(len(docs.texts)))
    random.Random(seed).shuffle(order)
    stream = token_stream([docs.texts[i] for i in order], tokenizer, max_tokens)
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


def token_stream(texts: list[str], tokenizer, max_tokens: int | None = None) -> list[int]:
    """Texts tokenised without special tokens, each followed by EOS when the tokenizer has one.

    Tokenising stops once `max_tokens` are collected, and the stream is cut there. Whole documents longer
    than the model's maximum length are expected (the stream is chunked into sequences later), so the
    tokenizer's "Token indices sequence length is longer than..." warning is turned off for this call only.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    return stream if max_tokens is None else stream[:max_tokens]


def evaluation_source(source: str) -> str:
    """The held-out counterpart of a calibration source (built-in domains have one; others reuse it)."""
    if source.startswith("builtin:"):
        return "builtin:" + source[len("builtin:"):].partition(":")[0] + ":heldout"
    return source
