"""Run calibration domains through a MoE model and store routing statistics.

`capture` is the whole pipeline (what `moe-viz capture` calls): check every
source, load the model, then one stored run per domain. `capture_model` does
the same for a model already in memory.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from moe_viz import __version__, store
from moe_viz.checkpoint import check_checkpoint, checkpoint_digest, is_local, tokenizer_problem
from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import find_moe_layers, other_modality_blocks
from moe_viz.models.fingerprint import model_fingerprint
from moe_viz.models.loading import canonical_model_id, check_model_path, load_model, load_tokenizer, resolve_device
from moe_viz.capture import distributed
from moe_viz.capture.distributed import Ranks, Steps
from moe_viz.capture.observe import RoutingObserver, TextNeverReaches
from moe_viz.capture.routing_stats import LayerAccumulator
from moe_viz.capture.sources import Documents, pack_sequences, parse_domain, read_documents
from moe_viz.capture.timing import PEAK_RSS, Timings, capture_phase, format_timings, peak_rss_mib
from moe_viz.capture.trace import DEFAULT_TRACE_TOKENS, TokenTracer


@dataclass
class CaptureSettings:
    max_tokens: int = 200_000
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    trace_tokens: int = DEFAULT_TRACE_TOKENS  # per domain, token-level trace (capture/trace.py); 0: none

    def check(self) -> None:
        for name in ("max_tokens", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise MoeVizError(f"--{name.replace('_', '-')} must be a positive integer")
        TokenTracer(self.trace_tokens)  # refuses a negative count


@dataclass
class Progress:
    domain: str
    tokens_done: int
    tokens_total: int
    elapsed_s: float
    detail: str = ""  # e.g. the current layer of a layer-wise capture


ProgressCallback = Callable[[Progress], None]


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def batch_tokens(sequences: list[list[int]], batch_size: int) -> list[int]:
    """The real (non-padding) tokens of each batch `padded_batches` makes."""
    return [sum(len(s) for s in sequences[start : start + batch_size]) for start in range(0, len(sequences), batch_size)]


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


def tqdm_progress(file=None) -> ProgressCallback:
    """A progress bar per domain on `file` (stderr), with tokens/s and ETA.

    The bar starts at the domain's first report, which `capture_model` sends
    before the first forward (tokens_done = 0), and shows the average rate since
    then (smoothing=0): a bar started after the first batch would credit that
    batch's tokens to no time at all (tens of Mtok/s on a one-batch run).
    """
    from tqdm.auto import tqdm

    bars: dict[str, tqdm] = {}

    def report(p: Progress) -> None:
        bar = bars.get(p.domain)
        if bar is None:
            bar = bars[p.domain] = tqdm(
                total=p.tokens_total, desc=f"capture {p.domain}", unit="tok", unit_scale=True, smoothing=0,
                file=file if file is not None else sys.stderr,
            )
        if p.detail:
            bar.set_postfix_str(p.detail, refresh=False)
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


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def text_inputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Keyword arguments of a calibration forward. An encoder-decoder's decoder reads the same text,
    teacher-forced (shifted right by one behind its start token), so both stacks see every token.

    Routing never depends on the output logits, so a model that takes `logits_to_keep` projects
    only the last position onto the vocabulary: the LM head is ~19 % of the CPU bench model's
    forward (vocabulary 8,192, hidden 512; bench/capture_overhead.py --paired-capture), and its
    (tokens, vocabulary) logits are a calibration forward's largest activation on a
    large-vocabulary model (152k × 4 B per token for Qwen3 in float32).
    """
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if _takes_logits_to_keep(type(model)):
        inputs["logits_to_keep"] = 1
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None)
        start = getattr(config, "pad_token_id", None) if start is None else start  # T5 / Switch start with pad
        if start is None:
            raise MoeVizError(f"{type(model).__name__} has neither decoder_start_token_id nor pad_token_id in its config: "
                              "cannot feed its decoder")
        decoder = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)
        inputs.update(decoder_input_ids=decoder, decoder_attention_mask=mask)
    return inputs


@torch.no_grad()
def accumulate_routing(
    model: nn.Module,
    batches,
    on_batch: Callable[[int], None] | None = None,
    fast: bool = True,
    tracer: TokenTracer | None = None,
    steps: Steps | None = None,
) -> list[LayerAccumulator]:
    """Forward (input_ids (B,S), attention_mask (B,S)) CPU batches through `model`; one accumulator per MoE layer.

    Only host-side counts (from the CPU attention mask) are reported per batch,
    so the device is never synchronised inside the loop. A `tracer` also records
    the routing of its first tokens (`tracer.frames()` afterwards). `steps`
    (data-parallel): one failure check after each batch.
    """
    layers = find_moe_layers(model)
    device = _input_device(model)
    with RoutingObserver(layers, fast=fast, tracer=tracer) as observer, TextNeverReaches(other_modality_blocks(model)):
        for ids, mask in batches:
            observer.set_attention_mask(mask)
            if tracer is not None:
                tracer.begin_batch(ids, mask)
            model(**text_inputs(model, ids.to(device), mask.to(device)))
            if on_batch is not None:
                on_batch(int(mask.sum()))
            if steps is not None:
                steps.step()
    return observer.accumulators


def accumulator_frames(accumulators: list[LayerAccumulator]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(expert, layer, co-activation) frames of a run's accumulators."""
    experts, layer_rows, coacts = [], [], []
    for acc in accumulators:
        e, l, c = acc.to_frames()
        experts.append(e)
        layer_rows.append(l)
        coacts.append(c)
    return pd.concat(experts, ignore_index=True), pd.DataFrame(layer_rows), pd.concat(coacts, ignore_index=True)


def collect_routing_stats(
    model: nn.Module,
    sequences: list[list[int]],
    batch_size: int,
    pad_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
    fast: bool = True,
    tracer: TokenTracer | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Forward `sequences` through `model` and return (expert, layer, co-activation) frames."""
    return accumulator_frames(
        accumulate_routing(model, padded_batches(sequences, batch_size, pad_id), on_batch, fast, tracer))


def pad_id_of(tokenizer) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return 0 if pad_id is None else pad_id


def pack_domains(domains: list[Documents], tokenizer, settings: CaptureSettings, vocab_size: int) -> dict[str, list[list[int]]]:
    """Each domain's packed token sequences (deterministic: every rank packs the same)."""
    return {
        docs.domain: pack_sequences(docs, tokenizer, settings.seq_len, settings.max_tokens, settings.seed, vocab_size)
        for docs in domains
    }


# collect(domain, sequences, on_batch, steps) -> this process's accumulators for the domain
Collector = Callable[[str, list[list[int]], Callable[[int], None], Steps], list[LayerAccumulator]]


def store_domain_runs(
    *,
    store_path: str | Path,
    ranks: Ranks,
    domains: list[Documents],
    packed: dict[str, list[list[int]]],
    model_id: str,
    fingerprint: str,
    model_type: str,
    run_settings: dict,
    collect: Collector,
    progress: ProgressCallback | None,
    traces: Callable[[str], dict[str, pd.DataFrame] | None] | None = None,
    planned_steps: Callable[[str, list[list[int]]], int] = lambda domain, sequences: 0,
    timings: Timings | None = None,
    shared_pass: tuple[float, int] | None = None,
) -> list[str]:
    """One stored run per domain: begin it (rank 0), collect, combine the ranks' accumulators, complete it.

    Every rank calls this with the same arguments. A failure on any rank fails
    the run on every rank (see distributed.together; `planned_steps`: how many
    per-batch failure checks `collect` makes on the busiest rank); rank 0 marks
    it failed and no rows are kept. Returns the run ids (on rank 0; [] on the others).

    Each run records its capture phase in `settings` (timing.capture_phase):
    from the moment every rank is ready to the reduced accumulators, so model
    loading and the store write are not in it. `shared_pass`: (seconds, tokens)
    of a pass made for all domains at once (layer-wise) that `collect` only hands over.
    """
    timings = timings if timings is not None else Timings()
    run_ids = []
    for docs in domains:
        sequences = packed[docs.domain]
        total = sum(len(s) for s in sequences)
        started = time.monotonic()
        done = 0
        run_id = None

        def on_batch(tokens: int) -> None:
            nonlocal done
            done += tokens
            if progress is not None:
                progress(Progress(docs.domain, done, total, time.monotonic() - started))

        try:
            with distributed.together(ranks, f"capturing domain {docs.domain}") as steps:
                steps.plan(1 + planned_steps(docs.domain, sequences))  # before anything here can fail
                if ranks.main:
                    run_id = store.begin_run(
                        store_path, model_id=model_id, model_fingerprint=fingerprint, model_type=model_type,
                        domain=docs.domain, source=docs.source, settings=run_settings, tool_version=__version__,
                    )
                with _heartbeat(store_path, run_id) if run_id else nullcontext():
                    with timings.phase("wait for ranks"):
                        steps.sync()  # every rank is ready: the capture phase starts now
                    clock, waited, cpu = time.perf_counter(), steps.waited, time.process_time()
                    if progress is not None:  # start the clock before the first forward, not after it
                        progress(Progress(docs.domain, 0, total, 0.0))
                    accumulators = collect(docs.domain, sequences, on_batch, steps)
                    timings.add("forward", time.perf_counter() - clock - (steps.waited - waited))
                    timings.add("forward CPU", time.process_time() - cpu)  # all threads: what the work costs
                    if progress is not None and done < total:  # this rank's share is done: so are the others
                        progress(Progress(docs.domain, total, total, time.monotonic() - started))
            timings.add("failure checks", steps.waited - waited)
            with timings.phase("all-reduce"):
                distributed.reduce_accumulators(ranks, accumulators)
            seconds = time.perf_counter() - clock
            if shared_pass is None:
                phase = capture_phase(total, seconds, "this domain: first batch to reduced accumulators, all ranks")
            else:
                pass_seconds, pass_tokens = shared_pass
                phase = capture_phase(pass_tokens, pass_seconds + seconds,
                                      "one layer-wise pass over every domain of the capture, tokens of all of them")
            with distributed.together(ranks, f"storing domain {docs.domain}"):
                if ranks.main:
                    with timings.phase("frames"):
                        expert_df, layer_df, coact_df = accumulator_frames(accumulators)
                        trace = traces(docs.domain) if traces is not None else None  # domain -> trace frames
                    with timings.phase("store"):
                        store.complete_run(
                            store_path,
                            run_id,
                            expert_stats=expert_df,
                            layer_stats=layer_df,
                            coactivation=coact_df,
                            tokens=total,
                            sequences=len(sequences),
                            trace=trace,
                            settings_update=phase,
                        )
        except store.RunSavedToFile:
            raise  # its statistics are in a file to import; the run reads `interrupted` until then
        except BaseException as exc:
            if run_id is not None:
                try:
                    store.fail_run(store_path, run_id, f"{type(exc).__name__}: {exc}")
                except MoeVizError:
                    pass  # store locked: the run reads `interrupted` once this process ends; keep the real error
            raise
        if run_id is not None:
            run_ids.append(run_id)
    return run_ids


def capture_model(
    model: nn.Module,
    tokenizer,
    model_id: str,
    domains: list[Documents],
    settings: CaptureSettings,
    store_path: str | Path | None = None,
    progress: ProgressCallback | None = None,
    extra_settings: dict | None = None,
    ranks: Ranks | None = None,
    timings: Timings | None = None,
) -> list[str]:
    """Capture already-read domains with a loaded model; returns one run id per domain (store: default_store()).

    With `ranks` of a data-parallel launch, each rank runs its share of the
    batches (equal token counts, see distributed.assign) and rank 0 stores the
    combined statistics.
    """
    store_path = store.default_store() if store_path is None else store_path
    settings.check()
    ranks = ranks or Ranks()
    timings = timings if timings is not None else Timings()
    find_moe_layers(model)  # fail before touching the store
    with timings.phase("pack tokens"):
        packed = pack_domains(domains, tokenizer, settings, model.get_input_embeddings().weight.shape[0])
    pad_id = pad_id_of(tokenizer)
    run_settings = {
        "max_tokens": settings.max_tokens,
        "seq_len": settings.seq_len,
        "seed": settings.seed,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "world_size": ranks.world_size,
        "layerwise": False,
        **(extra_settings or {}),
    }

    tracers: dict[str, TokenTracer] = {}

    def collect(domain: str, sequences: list[list[int]], on_batch, steps: Steps) -> list[LayerAccumulator]:
        tokens = batch_tokens(sequences, settings.batch_size)
        mine = ranks.batches(tokens)
        wanted = set(mine)
        share = sum(tokens[i] for i in mine) / max(1, sum(tokens))  # progress: this rank's share stands for all
        report = on_batch if share in (0, 1) else (lambda n: on_batch(int(n / share)))
        batches = [b for n, b in enumerate(padded_batches(sequences, settings.batch_size, pad_id)) if n in wanted]
        tracer = None
        if settings.trace_tokens and ranks.main:  # rank 0 traces the first N tokens of its own batches
            tracer = tracers[domain] = TokenTracer(settings.trace_tokens, [i * settings.batch_size for i in mine])
        return accumulate_routing(model, batches, report, tracer=tracer, steps=steps)

    return store_domain_runs(
        store_path=store_path, ranks=ranks, domains=domains, packed=packed, model_id=model_id,
        fingerprint=model_fingerprint(model), model_type=getattr(model.config, "model_type", ""),
        run_settings=run_settings, collect=collect, progress=progress,
        traces=lambda domain: tracers.pop(domain).frames(tokenizer) if domain in tracers else None,
        planned_steps=lambda domain, sequences: ranks.most_batches(batch_tokens(sequences, settings.batch_size)),
        timings=timings,
    )


def _choose_layerwise(model_id: str, device: str, layerwise: bool | None, ranks: Ranks) -> bool:
    """--layerwise forces streaming; by default it is chosen (with a message) when the checkpoint would not fit."""
    if layerwise is False:
        return False
    if not is_local(model_id):
        if layerwise:
            raise MoeVizError(f"--layerwise reads the safetensors shards of a local directory; {model_id} is a hub id: "
                              "download it first (huggingface-cli download) and pass the directory")
        return False
    if layerwise:
        return True
    from moe_viz.capture.layerwise import would_not_fit

    reason = would_not_fit(Path(model_id).expanduser(), device)
    if reason and ranks.main:
        print(f"moe-viz: capturing layer by layer: {reason} (--layerwise forces this mode)", file=sys.stderr)
    return reason is not None


def capture(
    model_id: str,
    domains: list[str],
    *,
    store_path: str | Path | None = None,
    settings: CaptureSettings | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: ProgressCallback | None = None,
    layerwise: bool | None = None,
    resume: bool = False,
    max_host_memory: int | None = None,
    timing: bool = False,
) -> list[str]:
    """Capture `NAME=SOURCE` domains from a model path or hub id into the store.

    Every source is read and checked before the model is loaded, and the model
    is checked for MoE layers before the store is touched, so bad input never
    leaves anything behind.

    `layerwise`: True streams one decoder layer at a time from the shards, None
    (default) does so only when the checkpoint would not fit on the device.
    `resume` continues an interrupted layer-wise capture. Under torchrun /
    accelerate launch (RANK, WORLD_SIZE set) the batches are split over ranks.
    `timing`: rank 0 prints where every rank's time went (timing.format_timings).
    """
    timings = Timings.of_this_process()
    store_path = store.default_store() if store_path is None else store_path
    ranks = distributed.from_env()
    if resume and layerwise is False:
        raise MoeVizError("--resume continues an interrupted layer-wise capture: it cannot be used without --layerwise")
    layerwise = True if resume else layerwise
    concrete = resolve_device(ranks.device(device))
    with distributed.process_group(ranks, concrete):
        with distributed.together(ranks, "checking the inputs and loading the model"):
            with timings.phase("check inputs"):
                if ranks.main:
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
                streaming = _choose_layerwise(model_id, concrete, layerwise, ranks)
            with timings.phase("load model"):
                if streaming:
                    from moe_viz.capture.layerwise import LayerwiseCapture

                    check_model_path(model_id)
                    check_checkpoint(model_id)
                    engine = LayerwiseCapture(model_id, concrete, dtype, trust_remote_code)
                    tokenizer = load_tokenizer(model_id, trust_remote_code)
                    embeddings = engine.model.get_input_embeddings().weight
                    where = str(engine.device)
                else:
                    spread = ranks.max_memory(device)  # device_map="auto" over this rank's GPUs
                    model, tokenizer = load_model(model_id, device="auto" if spread else ranks.device(device),
                                                  dtype=dtype, trust_remote_code=trust_remote_code, max_memory=spread)
                    embeddings = model.get_input_embeddings().weight
                    where = str(_input_device(model))
            with timings.phase("check inputs"):
                text_domains = [docs.domain for docs in documents if not docs.pretokenised]
                if text_domains:
                    problem = tokenizer_problem(tokenizer, model_id, embeddings.shape[0])
                    if problem:
                        raise MoeVizError(
                            f"domain {text_domains[0]} is text but {model_id} has no usable tokenizer ({problem}): "
                            "add tokenizer files or give pre-tokenised .jsonl with input_ids"
                        )
                extra = {"device": where}
                if is_local(model_id):  # prune compares it before exporting: the files must be the ones captured
                    extra["checkpoint_digest"] = checkpoint_digest(model_id)
        progress = progress if progress is not None else tqdm_progress()
        if streaming:
            from moe_viz.capture.layerwise import capture_layerwise

            run_ids = capture_layerwise(
                engine, tokenizer, canonical_model_id(model_id), documents, settings, store_path=store_path,
                progress=progress, extra_settings=extra, ranks=ranks, resume=resume, max_host_memory=max_host_memory,
                timings=timings,
            )
        else:
            run_ids = capture_model(
                model,
                tokenizer,
                canonical_model_id(model_id),
                documents,
                settings,
                store_path=store_path,
                progress=progress if ranks.main else None,
                extra_settings=extra,
                ranks=ranks,
                timings=timings,
            )
        if timing:
            per_rank = distributed.gather_objects(ranks, {**timings.seconds, PEAK_RSS: peak_rss_mib()})
            if ranks.main:
                print(format_timings(per_rank), file=sys.stderr)
        return run_ids
