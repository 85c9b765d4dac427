"""Capture overhead vs a bare forward pass, measured side by side.

    python bench/capture_overhead.py --paired-capture --tokens 2048 8192 32768 --capture-rounds 30 12 6 [--write]
    python bench/capture_overhead.py --fixed [--write]          # a short capture's cost beyond the forwards
    python bench/capture_overhead.py --paired [--write]         # observer per forward, paired, with a 95% CI
    python bench/capture_overhead.py --config 100m [--write]    # observer variants on one forward
    python bench/capture_overhead.py --config large --device cuda

The sweep's models are random-init Qwen3-MoE (hidden 512, 4 layers, top-8, expert width 128,
vocabulary 8,192) with 16 ... 512 experts. "Bare" is the forwards a capture runs with nothing
attached (`text_inputs`: only the last position goes through the LM head, since routing never
needs the logits); "plain" projects every position, as `model(input_ids, attention_mask)` does.

--paired-capture (the sweep over experts and tokens): per token count, rounds of `capture_model`
end to end (begin_run, observer construction, the observed forwards with the default token trace,
to_frames, the DuckDB write), the same forwards bare and the plain forwards, interleaved in each of their
six orders in turn; the median of the per-round ratios with a bootstrap 95% interval.
Rounds cancel the machine's drift that repetitions of 16-70 s carry (several per cent here).

--fixed: the sweep's models at one forward per run (2,048 tokens), the cost beyond the
forwards taken apart: the steps `capture_model` takes, called one by one in its order
(begin_run, the observed forward with the default token trace, to_frames, the trace's
frames, complete_run), and begin_run + complete_run of the same rows without a trace.

--paired: the sweep's models, one observer kept across forwards (as in a capture), observed
forwards of the same 2,048 tokens against bare ones and against ones with the observer's experts
kernels but no statistics (which isolates what the statistics cost: on the CPU the observer's
experts forward reuses its buffers, faster than transformers' own), interleaved in rounds of
three; the median of the rounds' ratios with a bootstrap 95% interval. --paired and --config run
the forward a capture runs, too.

--config: one forward of a fixed config, variants bare / capture (observer) /
recompute (observer forced onto the path for non-default experts implementations) /
dense ("every expert on every token" norms, the way REAP's reference code measures them).

Reports medians and the median (min-max) of per-repetition ratios to bare.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from benchlib import machine, ratios, spread, table, write_section
from moe_viz import store
from moe_viz.capture.observe import RoutingObserver, grouped_experts_forward, slot_outputs
from moe_viz.capture.routing_stats import Scratch
from moe_viz.capture.run import (CaptureSettings, accumulate_routing, accumulator_frames, capture_model,
                                 padded_batches, text_inputs)
from moe_viz.capture.sources import Documents
from moe_viz.capture.timing import Timings
from moe_viz.capture.trace import DEFAULT_TRACE_TOKENS, TokenTracer
from moe_viz.models.discovery import find_moe_layers

CONFIGS = {
    # name: (hidden, layers, experts, top_k, expert width, vocab, batch, seq)
    "tiny": (64, 2, 8, 2, 32, 512, 4, 128),
    "100m": (512, 6, 32, 4, 384, 8192, 4, 512),
    "512e": (512, 4, 512, 8, 128, 8192, 4, 512),  # the sweep's 512-expert model: accumulation at its heaviest
    "large": (2048, 8, 64, 8, 768, 32000, 8, 1024),
}
DEFAULT_EXPERTS = [16, 128, 512]
DEFAULT_TOKENS = [2048, 8192, 32768]
SWEEP_SHAPE = dict(hidden=512, layers=4, top_k=8, width=128, vocab=8192, batch=4, seq=512)


def build_model(hidden, layers, experts, top_k, width, vocab, seq, device="cpu", dtype=torch.float32):
    config = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=hidden // 8, intermediate_size=width * 2, moe_intermediate_size=width,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, max_position_embeddings=seq,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def sweep_model(experts: int):
    """The sweep's random-init model (SWEEP_SHAPE) with `experts` experts."""
    shape = SWEEP_SHAPE
    return build_model(shape["hidden"], shape["layers"], experts, shape["top_k"], shape["width"], shape["vocab"],
                       shape["seq"])


def sweep_sequences(tokens: int) -> list[list[int]]:
    """`tokens` random token ids as sequences of SWEEP_SHAPE's length, the same for a given count."""
    shape = SWEEP_SHAPE
    return torch.randint(0, shape["vocab"], (tokens // shape["seq"], shape["seq"]),
                         generator=torch.Generator().manual_seed(tokens)).tolist()


@torch.no_grad()
def bare_forwards(model, sequences: list[list[int]], every_logit: bool = False) -> None:
    """The forwards a capture runs over `sequences`, nothing attached: sweep batches, padding masked,
    `text_inputs` (the LM head on the last position only). `every_logit`: plain forwards that project
    every position onto the vocabulary, as `model(input_ids, attention_mask)` does."""
    for ids, mask in padded_batches(sequences, SWEEP_SHAPE["batch"]):
        inputs = text_inputs(model, ids, mask)
        if every_logit:
            inputs.pop("logits_to_keep", None)  # a model without it projects every position anyway
        model(**inputs)


def experts_suffix(experts: list[int]) -> str:
    """Section-name suffix: none for the default expert counts, "-16e" etc. for others (a re-check of one count)."""
    return "" if experts == DEFAULT_EXPERTS else "-" + "-".join(f"{e}e" for e in experts)


def tokens_suffix(tokens: list[int]) -> str:
    """Section-name suffix: none for the default token counts, "-128k" etc. for others (a count that is not
    a multiple of 1,024 as it is: "-1000")."""
    return "" if tokens == DEFAULT_TOKENS else "-" + "-".join(f"{t // 1024}k" if t % 1024 == 0 else str(t)
                                                             for t in tokens)


def paired_capture_section(experts: list[int], tokens: list[int]) -> str:
    """The docs/BENCHMARKS.md section `--paired-capture --write` replaces for these expert and token counts."""
    return "capture-paired-end-to-end" + experts_suffix(experts) + tokens_suffix(tokens)


def build(name: str, device: str, dtype: torch.dtype):
    """(model, input ids of one forward) for a named config (also used by bench/plan_eval.py)."""
    hidden, layers, experts, top_k, width, vocab, batch, seq = CONFIGS[name]
    model = build_model(hidden, layers, experts, top_k, width, vocab, seq, device, dtype)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(0))
    return model, ids


class DenseObserver:
    """Computes ||f_e(x)|| for every expert on every token (E x the expert compute)."""

    def __init__(self, model):
        self.layers = find_moe_layers(model)
        self.handles = []

    def hook(self, module, args, output):
        hidden = args[0]
        every = torch.arange(module.num_experts, device=hidden.device).expand(hidden.shape[0], -1)
        rows = slot_outputs(module, hidden, every, hidden.dtype)
        torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32).sum(0)

    def __enter__(self):
        self.handles = [layer.experts.register_forward_hook(self.hook) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def clock(device: str):
    """Process CPU time on CPU (robust on a shared machine; the hooks never wait), wall time on a GPU."""
    return time.perf_counter if device.startswith("cuda") else time.process_time


def timed_forward(model, ids, context=None) -> float:
    """Seconds of one forward as a capture runs it (`text_inputs`), inside `context` if given."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    now = clock(str(ids.device))
    inputs = text_inputs(model, ids, torch.ones_like(ids))
    sync()
    start = now()
    with torch.no_grad(), context if context is not None else nullcontext():
        model(**inputs)
    sync()
    return now() - start


def config_mode(args) -> None:
    hidden, layers, experts, top_k, width, vocab, batch, seq = CONFIGS[args.config]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, ids = build(args.config, args.device, dtype)
    moe_layers = find_moe_layers(model)
    params = sum(p.numel() for p in model.parameters())
    variants = {
        "bare": lambda: None,
        "capture": lambda: RoutingObserver(moe_layers, fast=True),
        "recompute": lambda: RoutingObserver(moe_layers, fast=False),
    }
    if not args.skip_dense:
        variants["dense"] = lambda: DenseObserver(model)
    for make in variants.values():  # warm-up
        timed_forward(model, ids, make())
    times = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, make in variants.items():
            times[name].append(timed_forward(model, ids, make()))
    device = torch.cuda.get_device_name(ids.device) if ids.is_cuda else f"CPU, {args.threads} thread(s)"
    header = (f"`{args.config}`: hidden {hidden}, {layers} layers, {experts} experts top-{top_k}, width {width}, "
              f"{params / 1e6:.1f}M params, {ids.numel()} tokens per forward as a capture runs it (LM head on the "
              f"last position only), {args.dtype}, {device}; {args.reps} interleaved repetitions after one warm-up")
    rows = [[name, spread(values, "{:.3f}"), spread(ratios(values, times["bare"]), "{:.2f}") if name != "bare" else ""]
            for name, values in times.items()]
    body = "\n".join([header + ".", "", table(["variant", "seconds (CPU time on CPU): median (min–max)", "ratio to bare"], rows), "",
                      f"Machine: {machine(args.threads)}."])
    print(body)
    if args.write:
        write_section(f"capture-config-{args.config}", body)


def fixed_mode(args) -> None:
    """CPU seconds per run beyond the forwards, step by step, at one forward per run."""
    shape = SWEEP_SHAPE
    tokens = shape["batch"] * shape["seq"]
    steps = ["begin_run", "accumulator_frames", "trace frames", "complete_run", "begin + complete, no trace",
             "complete_run, new run"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="moe_viz_capture_fixed_") as work:
        for experts in args.experts:
            model = sweep_model(experts)
            sequences = sweep_sequences(tokens)
            docs = Documents(domain="bench", source=f"random:{tokens}", token_ids=sequences)
            settings = CaptureSettings(max_tokens=tokens, seq_len=shape["seq"], batch_size=shape["batch"])
            paths = {name: Path(work) / f"e{experts}-{name}.duckdb" for name in ("capture", "steps", "no-trace", "new")}

            new_domains = itertools.count(1)

            def begin(path: Path, domain: str = "bench") -> str:
                return store.begin_run(path, model_id="bench", model_fingerprint="bench", model_type="qwen3_moe",
                                       domain=domain, source="random", settings={}, tool_version="bench")

            def complete(path: Path, run_id: str, frames: tuple, trace: dict | None) -> None:
                expert_df, layer_df, coact_df = frames
                store.complete_run(path, run_id, expert_stats=expert_df, layer_stats=layer_df, coactivation=coact_df,
                                   tokens=tokens, sequences=len(sequences), trace=trace)

            def bare() -> dict[str, float]:
                start = time.process_time()
                bare_forwards(model, sequences)
                return {"bare": time.process_time() - start}

            def end_to_end() -> dict[str, float]:
                start = time.process_time()
                capture_model(model, None, "bench", [docs], settings, store_path=paths["capture"])
                return {"capture": time.process_time() - start}

            def step_by_step() -> dict[str, float]:
                seconds, now = {}, time.process_time()

                def lap(name: str) -> None:
                    nonlocal now
                    seconds[name], now = time.process_time() - now, time.process_time()

                run_id = begin(paths["steps"])
                lap("begin_run")
                tracer = TokenTracer(DEFAULT_TRACE_TOKENS)
                accumulators = accumulate_routing(model, padded_batches(sequences, shape["batch"]), tracer=tracer)
                lap("forward, observed")
                frames = accumulator_frames(accumulators)
                lap("accumulator_frames")
                trace = tracer.frames()
                lap("trace frames")
                complete(paths["steps"], run_id, frames, trace)
                lap("complete_run")
                complete(paths["no-trace"], begin(paths["no-trace"]), frames, None)
                lap("begin + complete, no trace")
                run_id = begin(paths["new"], domain=f"bench-{next(new_domains)}")  # replaces nothing: the store grows
                now = time.process_time()
                complete(paths["new"], run_id, frames, trace)
                lap("complete_run, new run")
                return seconds

            variants = [bare, end_to_end, step_by_step]
            for variant in variants:  # warm-up: creates the stores
                variant()
            times: dict[str, list[float]] = {}
            for rep in range(args.reps):
                for variant in variants if rep % 2 == 0 else variants[::-1]:
                    for name, value in variant().items():
                        times.setdefault(name, []).append(value)
            beyond = [c - b for c, b in zip(times["capture"], times["bare"])]
            rows.append([experts, f"{statistics.median(times['bare']):.2f}", spread(beyond, "{:.3f}"),
                         spread([o - b for o, b in zip(times["forward, observed"], times["bare"])], "{:.3f}"),
                         *(spread(times[name], "{:.3f}") for name in steps)])
            print(rows[-1], flush=True)
            del model
    header = (f"The sweep's models (hidden {shape['hidden']}, {shape['layers']} MoE layers, top-{shape['top_k']}, fp32) "
              f"at one forward of {tokens} tokens per run, default token trace ({DEFAULT_TRACE_TOKENS} tokens: every "
              f"token here, {tokens * shape['layers'] * shape['top_k']:,} `token_routes` rows); {args.reps} interleaved "
              "repetitions, process CPU seconds, median (min–max). Steps are `capture_model`'s, called one by one in "
              "its order into a store that already holds the previous repetition's run (replaced: same settings); "
              "\"begin + complete, no trace\" writes the same statistics without a trace, into a store of its own; "
              "\"complete_run, new run\" writes them with the trace as a run of its own (another domain each time) "
              "into a store that keeps every earlier one")
    body = "\n".join([header + ".", "", table(
        ["experts", "bare forward (s)", "capture − bare", "observed forward − bare", *steps], rows), "",
        f"Machine: {machine(args.threads)}."])
    print(body)
    if args.write:
        write_section("capture-fixed", body)


def interleaved_times(variants: list, rounds: int) -> list[tuple[float, ...]]:
    """Seconds of each of `variants` (callables returning seconds), round after round; round i runs them in
    the i-th of all their orders, cycling, so over a multiple of n! rounds each goes first, and right after
    each other, equally often (a run can leave the next one a warmer or colder heap)."""
    orders = list(itertools.permutations(range(len(variants))))
    out = []
    for i in range(rounds):
        seconds = {j: variants[j]() for j in orders[i % len(orders)]}
        out.append(tuple(seconds[j] for j in range(len(variants))))
    return out


def median_interval(values: list[float], rng: random.Random) -> str:
    """95% interval of the median by bootstrap (2,000 resamples)."""
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(2000))
    return f"{medians[49]:.3f}–{medians[1949]:.3f}"


class ObserverKernels:
    """Context manager: each MoE layer's experts run the observer's grouped forward (its CPU buffers
    reused, `observe.grouped_experts_forward`) with no statistics taken: the forward an observed one
    differs from only by the statistics."""

    def __init__(self, model):
        self.experts = [layer.experts for layer in find_moe_layers(model)]
        self.scratch = Scratch()

    def __enter__(self):
        for experts in self.experts:
            experts.forward = functools.partial(grouped_experts_forward, experts, scratch=self.scratch)
        return self

    def __exit__(self, *exc):
        for experts in self.experts:
            del experts.forward


def paired_mode(args) -> None:
    """Observed forwards / bare ones and / ones with the observer's experts kernels, interleaved in rounds
    of three, one observer kept across the forwards."""
    shape = SWEEP_SHAPE
    rng = random.Random(0)
    rows = []
    for experts in args.experts:
        model = sweep_model(experts)
        ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0))
        observer = RoutingObserver(find_moe_layers(model))
        kernels = ObserverKernels(model)
        variants = [lambda: timed_forward(model, ids, observer), lambda: timed_forward(model, ids, None),
                    lambda: timed_forward(model, ids, kernels)]
        for variant in variants:  # warm-up: the work buffers exist from here on
            variant()
        times = interleaved_times(variants, args.pairs)
        to_bare = [observed / bare for observed, bare, _ in times]
        to_kernels = [observed / same for observed, _, same in times]
        rows.append([experts, f"{statistics.median(to_bare):.3f}", median_interval(to_bare, rng),
                     f"{min(to_bare):.3f}–{max(to_bare):.3f}", f"{statistics.median(to_kernels):.3f}",
                     median_interval(to_kernels, rng), f"{min(to_kernels):.3f}–{max(to_kernels):.3f}", len(times)])
        print(rows[-1], flush=True)
        del model, observer, kernels
    header = (f"The sweep's models (hidden {shape['hidden']}, {shape['layers']} MoE layers, top-{shape['top_k']}, "
              f"fp32), one forward of {shape['batch'] * shape['seq']} tokens as a capture runs it (LM head on the last "
              "position only); observed forwards (one observer accumulating across all of them, as in a capture), "
              "bare forwards (transformers' grouped_mm experts) and forwards with the observer's experts kernels but "
              "no statistics (`grouped_experts_forward`: the same values, its CPU buffers reused), interleaved in "
              "rounds of three, round i in the i-th of their six orders; process CPU time; 95% interval of the "
              "median ratio by bootstrap (2,000 resamples)")
    columns = ["experts", "observed / bare, median", "95% interval", "min–max",
               "observed / same kernels, median", "95% interval, same kernels", "min–max, same kernels", "rounds"]
    body = "\n".join([header + ".", "", table(columns, rows), "", f"Machine: {machine(args.threads)}."])
    print(body)
    if args.write:
        write_section("capture-paired", body)


def paired_capture_mode(args) -> None:
    """`capture_model` end to end / the same forwards bare, and / plain forwards, interleaved, per token count."""
    shape = SWEEP_SHAPE
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moe_viz_capture_paired_") as work:
        for experts in args.experts:
            model = sweep_model(experts)
            store_path = Path(work) / f"e{experts}.duckdb"
            for tokens, rounds in zip(args.tokens, args.capture_rounds):
                sequences = sweep_sequences(tokens)
                docs = Documents(domain="bench", source=f"random:{tokens}", token_ids=sequences)
                settings = CaptureSettings(max_tokens=tokens, seq_len=shape["seq"], batch_size=shape["batch"])

                def timed(run) -> float:
                    start = time.process_time()
                    run()
                    return time.process_time() - start

                variants = [
                    lambda: timed(lambda: capture_model(model, None, "bench", [docs], settings, store_path=store_path)),
                    lambda: timed(lambda: bare_forwards(model, sequences)),
                ]
                if not args.without_plain:
                    variants.append(lambda: timed(lambda: bare_forwards(model, sequences, every_logit=True)))
                for variant in variants:  # warm-up; from here on each capture replaces the last (same settings)
                    variant()
                times = interleaved_times(variants, rounds)
                overhead = [t[0] / t[1] for t in times]
                plain = ["—", "—"]
                if not args.without_plain:
                    against_plain = [t[0] / t[2] for t in times]
                    plain = [f"{statistics.median(against_plain):.3f}", median_interval(against_plain, rng)]
                rows.append([experts, f"{tokens:,}", f"{statistics.median(t[1] for t in times):.2f}",
                             f"{statistics.median(overhead):.3f}", median_interval(overhead, rng),
                             f"{min(overhead):.3f}–{max(overhead):.3f}", *plain, len(times)])
                print(rows[-1], flush=True)
            del model
    header = (f"The sweep's models (hidden {shape['hidden']}, {shape['layers']} MoE layers, top-{shape['top_k']}, "
              f"expert width {shape['width']}, vocab {shape['vocab']}, fp32, {shape['batch'] * shape['seq']} tokens "
              "per forward); `capture_model` end to end (begin_run, observer construction, the observed forwards "
              "with the default token trace, to_frames, the DuckDB write of the run, replacing the previous round's "
              "run) against the same forwards bare (`text_inputs`: the LM head on the last position only, as in a "
              "capture)" + ("" if args.without_plain else " and against plain forwards that project every position "
                            "onto the vocabulary") + ", over the same tokens; "
              + ("the two in adjacent runs, which goes first alternating" if args.without_plain
                 else "the three interleaved, round i in the i-th of their six orders")
              + ", after one warm-up round; process CPU time; 95% interval of the median ratio by bootstrap (2,000 resamples)")
    body = "\n".join([header + ".", "", table(["experts", "tokens", "bare, same forwards (s)", "capture / bare, median",
                                                 "95% interval", "min–max", "capture / plain, median",
                                                 "95% interval, plain", "rounds"], rows), "",
                      f"Machine: {machine(args.threads)}."])
    print(body)
    if args.write:
        write_section(paired_capture_section(args.experts, args.tokens), body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixed", action="store_true", help="a one-forward capture's cost beyond the forwards")
    parser.add_argument("--paired", action="store_true", help="observer per forward, paired forwards, 95%% interval")
    parser.add_argument("--pairs", type=int, default=36,
                        help="--paired: rounds of three forwards per model (multiples of 6 balance the orders)")
    parser.add_argument("--paired-capture", action="store_true",
                        help="capture end to end / bare / plain forwards, interleaved, 95%% interval, per --tokens")
    parser.add_argument("--capture-rounds", type=int, nargs="+", default=[30, 12, 6],
                        help="--paired-capture: rounds per token count, in --tokens order (multiples of 6 balance "
                             "the orders; of 2 with --without-plain)")
    parser.add_argument("--without-plain", action="store_true",
                        help="--paired-capture: leave out the plain forwards (a third of the time at large --tokens)")
    parser.add_argument("--experts", type=int, nargs="+", default=DEFAULT_EXPERTS)
    parser.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="100m")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on 2-core VMs)")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--write", action="store_true", help="update the marked section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.fixed:
        fixed_mode(args)
    elif args.paired:
        paired_mode(args)
    elif args.paired_capture:
        if len(args.capture_rounds) != len(args.tokens):
            parser.error("--capture-rounds needs one count per --tokens value")
        paired_capture_mode(args)
    else:
        config_mode(args)


if __name__ == "__main__":
    main()
