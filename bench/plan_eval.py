"""Cost of evaluating one more pruning plan vs a bare forward pass over the same tokens.

    python bench/plan_eval.py                    # the shipped demo model, CPU, 1 thread
    python bench/plan_eval.py --config 100m      # a random 126M Qwen3-MoE (bench/capture_overhead.py's)
    python bench/plan_eval.py --model DIR --device cuda

The unpruned model's log-probs are computed once per evaluation set; each plan then
costs one masked forward plus the per-token NLL/KL/top-1 sums. Timed in interleaved
repetitions on the same model and tokens; reports the medians and the median of the
per-repetition ratios to bare.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_viz.capture.run import padded_batches
from moe_viz.demo import shipped_model
from moe_viz.demo.corpora import documents
from moe_viz.prune.evaluate import evaluate_plan, reference_batches
from moe_viz.models.discovery import find_moe_layers
from moe_viz.capture.sources import token_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped demo model)")
    parser.add_argument("--config", default=None, help="a random model from bench/capture_overhead.py instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update the marked section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.config:
        from capture_overhead import build  # bench/ is on sys.path when run as a script

        path = f"random {args.config}"
        model, _ = build(args.config, args.device, torch.float32)
        vocab = model.get_input_embeddings().weight.shape[0]
        stream = torch.randint(0, vocab, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        path = args.model or shipped_model()
        model = AutoModelForCausalLM.from_pretrained(path).eval().to(args.device)
        stream = token_stream(documents("prose", "heldout"), AutoTokenizer.from_pretrained(path), args.tokens)
    sequences = [stream[i : i + args.seq_len] for i in range(0, len(stream), args.seq_len)]
    layers = find_moe_layers(model)
    rng = random.Random(0)
    dropped = {layer.layer: sorted(rng.sample(range(layer.num_experts), layer.num_experts // 2)) for layer in layers}

    def bare() -> None:
        with torch.no_grad():
            for ids, mask in padded_batches(sequences, args.batch_size):
                model(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), use_cache=False)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    started = time.perf_counter()
    references = {"prose": reference_batches(model, sequences, args.batch_size)}
    sync()
    reference_s = time.perf_counter() - started
    times: dict[str, list[float]] = {"bare": [], "plan": []}
    # Process CPU time on CPU (a shared machine disturbs it far less than wall time; nothing here waits), wall on a GPU.
    clock = time.perf_counter if args.device.startswith("cuda") else time.process_time
    for _ in range(args.reps):
        for name, run in (("bare", bare), ("plan", lambda: evaluate_plan(model, dropped, references))):
            started = clock()
            run()
            sync()
            times[name].append(clock() - started)
    ratios = [p / b for p, b in zip(times["plan"], times["bare"])]
    print(f"model {path}, {len(stream)} tokens, device {args.device}, threads {args.threads}")
    print(f"reference log-probs (once): {reference_s:.2f} s")
    print(f"bare forward: median {statistics.median(times['bare']):.3f} s")
    print(f"one plan:     median {statistics.median(times['plan']):.3f} s")
    print(f"plan / bare: median ratio {statistics.median(ratios):.3f} (per rep: {', '.join(f'{r:.3f}' for r in ratios)})")
    if args.write:
        from benchlib import machine, spread, table, write_section

        name = "random 126M Qwen3-MoE (`--config 100m`)" if args.config == "100m" else (
            f"random `{args.config}`" if args.config else "shipped demo model")
        row = [name, f"{len(stream):,}", spread(times["bare"], "{:.2f}"), spread(times["plan"], "{:.2f}"),
               spread(ratios, "{:.2f}")]
        measure = "wall seconds" if args.device.startswith("cuda") else "process CPU seconds"
        body = "\n".join([f"Half the experts of every layer dropped at random (seed 0); {args.reps} interleaved "
                          f"repetitions; {measure}, median (min–max, n); plan / bare = per-repetition ratios; "
                          f"device {args.device}.", "",
                          table(["model", "tokens", "bare forward (s)", "one plan (s)", "plan / bare"], [row]), "",
                          f"Machine: {machine(args.threads)}."])
        write_section(f"plan-eval-{args.config or 'demo'}", body)


if __name__ == "__main__":
    main()
