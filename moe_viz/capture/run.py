"""Run calibration domains through a MoE model and store routing statistics.

`capture` is the whole pipeline (what `moe-viz capture` calls): check every
source, load the model, then one stored run per domain. `capture_model` does
the same for a model already in memory.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from moe_viz import __version__, store
from moe_viz.checkpoint import checkpoint_digest, is_local, tokenizer_problem
from moe_viz.models import MoeVizError, canonical_model_id, find_moe_layers, load_model, model_fingerprint
from moe_viz.capture.observe import RoutingObserver
from moe_viz.capture.sources import Documents, pack_sequences, parse_domain, read_documents


@dataclass
class CaptureSettings:
    max_tokens: int = 200_000
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0

    def check(self) -> None:
        for name in ("max_tokens", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise MoeVizError(f"--{name.replace('_', '-')} must be a positive integer")


@dataclass
class Progress:
    domain: str
    tokens_done: int
    tokens_total: int
    elapsed_s: float


ProgressCallback = Callable[[Progress], None]


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def padded_batches(sequences: list[list[int]], batch_size: int, pad_id: int = 0):
    """Right-padded (input_ids, attention_mask) CPU tensors of up to `batch_size` sequences."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        yield ids, mask


def tqdm_progress() -> ProgressCallback:
    """A progress bar per domain on stderr, with tokens/s and ETA."""
    from tqdm.auto import tqdm

    bars: dict[str, tqdm] = {}

    def report(p: Progress) -> None:
        bar = bars.get(p.domain)
        if bar is None:
            bar = bars[p.domain] = tqdm(
                total=p.tokens_total, desc=f"capture {p.domain}", unit="tok", unit_scale=True, file=sys.stderr
            )
        bar.update(p.tokens_done - bar.n)
        if p.tokens_done >= p.tokens_total:
            bar.close()

    return report


@contextmanager
def _heartbeat(store_path: str | Path, run_id: str):
    """Refresh the run's heartbeat every store.HEARTBEAT_INTERVAL_S from a daemon thread while the body runs.

    Each beat is one short write; a beat that cannot get the lock is skipped. The
    thread is stopped (and joined) before the run's final commit, so the two never
    write the same row at once.
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(store.HEARTBEAT_INTERVAL_S):
            try:
                store.heartbeat(store_path, run_id)
            except Exception:  # a missed beat only matters after HEARTBEAT_STALE_S of them
                pass

    thread = threading.Thread(target=beat, name=f"moe_viz-heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@torch.no_grad()
def collect_routing_stats(
    model: nn.Module,
    sequences: list[list[int]],
    batch_size: int,
    pad_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
    fast: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Forward `sequences` through `model` and return (expert, layer, co-activation) frames.

    Only host-side counts (from the CPU attention mask) are reported per batch,
    so the device is never synchronised inside the loop.
    """
    layers = find_moe_layers(model)
    device = _input_device(model)
    with RoutingObserver(layers, fast=fast) as observer:
        for ids, mask in padded_batches(sequences, batch_size, pad_id):
            observer.set_attention_mask(mask)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            if on_batch is not None:
                on_batch(int(mask.sum()))
    experts, layer_rows, coacts = [], [], []
    for acc in observer.accumulators:
        e, l, c = acc.to_frames()
        experts.append(e)
        layer_rows.append(l)
        coacts.append(c)
    return pd.concat(experts, ignore_index=True), pd.DataFrame(layer_rows), pd.concat(coacts, ignore_index=True)


def capture_model(
    model: nn.Module,
    tokenizer,
    model_id: str,
    domains: list[Documents],
    settings: CaptureSettings,
    store_path: str | Path = store.DEFAULT_STORE,
    progress: ProgressCallback | None = None,
    extra_settings: dict | None = None,
) -> list[str]:
    """Capture already-read domains with a loaded model; returns one run id per domain."""
    settings.check()
    find_moe_layers(model)  # fail before touching the store
    vocab_size = model.get_input_embeddings().weight.shape[0]
    packed = {
        docs.domain: pack_sequences(docs, tokenizer, settings.seq_len, settings.max_tokens, settings.seed, vocab_size)
        for docs in domains
    }
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = 0 if pad_id is None else pad_id
    fingerprint = model_fingerprint(model)
    model_type = getattr(model.config, "model_type", "")
    run_settings = {
        "max_tokens": settings.max_tokens,
        "seq_len": settings.seq_len,
        "seed": settings.seed,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **(extra_settings or {}),
    }
    run_ids = []
    for docs in domains:
        sequences = packed[docs.domain]
        total = sum(len(s) for s in sequences)
        run_id = store.begin_run(
            store_path,
            model_id=model_id,
            model_fingerprint=fingerprint,
            model_type=model_type,
            domain=docs.domain,
            source=docs.source,
            settings=run_settings,
            tool_version=__version__,
        )
        started = time.monotonic()
        done = 0

        def on_batch(tokens: int) -> None:
            nonlocal done
            done += tokens
            if progress is not None:
                progress(Progress(docs.domain, done, total, time.monotonic() - started))

        try:
            with _heartbeat(store_path, run_id):
                expert_df, layer_df, coact_df = collect_routing_stats(model, sequences, settings.batch_size, pad_id, on_batch)
            store.complete_run(
                store_path,
                run_id,
                expert_stats=expert_df,
                layer_stats=layer_df,
                coactivation=coact_df,
                tokens=total,
                sequences=len(sequences),
            )
        except store.RunSavedToFile:
            raise  # its statistics are in a file to import; the run reads `interrupted` until then
        except BaseException as exc:
            try:
                store.fail_run(store_path, run_id, f"{type(exc).__name__}: {exc}")
            except MoeVizError:
                pass  # store locked: the run reads `interrupted` once this process ends; keep the real error
            raise
        run_ids.append(run_id)
    return run_ids


def capture(
    model_id: str,
    domains: list[str],
    *,
    store_path: str | Path = store.DEFAULT_STORE,
    settings: CaptureSettings | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: ProgressCallback | None = None,
) -> list[str]:
    """Capture `NAME=SOURCE` domains from a model path or hub id into the store.

    Every source is read and checked before the model is loaded, and the model
    is checked for MoE layers before the store is touched, so bad input never
    leaves anything behind.
    """
    store.check_store_path(store_path, write=True)
    settings = settings or CaptureSettings()
    settings.check()
    if not domains:
        raise MoeVizError("give at least one --domain NAME=SOURCE")
    parsed = [parse_domain(arg) for arg in domains]
    names = [name for name, _ in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MoeVizError(f"domain names must be unique; repeated: {', '.join(duplicates)}")
    documents = [read_documents(name, source) for name, source in parsed]
    model, tokenizer = load_model(model_id, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    text_domains = [docs.domain for docs in documents if not docs.pretokenised]
    if text_domains:
        problem = tokenizer_problem(tokenizer, model_id, model.get_input_embeddings().weight.shape[0])
        if problem:
            raise MoeVizError(
                f"domain {text_domains[0]} is text but {model_id} has no usable tokenizer ({problem}): "
                "add tokenizer files or give pre-tokenised .jsonl with input_ids"
            )
    extra = {"device": str(_input_device(model))}
    if is_local(model_id):  # prune compares it before exporting: the files must be the ones captured
        extra["checkpoint_digest"] = checkpoint_digest(model_id)
    return capture_model(
        model,
        tokenizer,
        canonical_model_id(model_id),
        documents,
        settings,
        store_path=store_path,
        progress=progress if progress is not None else tqdm_progress(),
        extra_settings=extra,
    )
