"""Capture at scale: layer-wise memory and throughput, and data-parallel throughput, on CPU.

    python bench/capture_scale.py memory      --dir /tmp/scale   # peak RSS, 12 vs 48 layers (writes ~4.7 GB)
    python bench/capture_scale.py throughput  --dir /tmp/scale   # layer-wise vs in-memory, interleaved
    python bench/capture_scale.py ranks       --dir /tmp/scale   # torchrun 2 ranks x 1 thread vs 1 x 1
    ... --write   # replace the section capture-scale-MODE of docs/BENCHMARKS.md with the result

Checkpoints are random-init Qwen3-MoE written shard by shard straight to
safetensors (fused expert tensors, bf16), so building a several-GB checkpoint
never holds it in memory. Every measurement is one fresh process (`moe-viz
capture` or torchrun), 1 torch thread per process; a peak RSS is the
ru_maxrss of the process that ran the capture (it reports it on exit).
Variants are interleaved in each repetition; reports list every repetition,
the median and the min-max spread. Throughput is reported twice, honestly
labelled: whole-command wall time (interpreter start, imports, model load and
the store write included) and the *capture phase* every run records in its
settings (`capture_phase`: from the moment every rank is ready to the reduced
accumulators). Delete --dir afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchlib import machine, spread, table, write_section

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    # name: (layers, experts, top_k, hidden, expert width, vocab)
    "scale48": (48, 64, 4, 768, 256, 4096),
    "scale12": (12, 64, 4, 768, 256, 4096),
    "fits": (8, 32, 4, 512, 256, 4096),
}


def config_of(name: str):
    from transformers import Qwen3MoeConfig

    layers, experts, top_k, hidden, width, vocab = SHAPES[name]
    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=hidden // 8, intermediate_size=width * 2, moe_intermediate_size=width,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, max_position_embeddings=4096,
        tie_word_embeddings=False, dtype="bfloat16",
    )


def write_checkpoint(name: str, out: Path) -> Path:
    """One safetensors shard per decoder layer (+ one for the rest) with an index; never the whole model in memory."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = config_of(name)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    groups: dict[str, dict[str, tuple]] = {}
    for key, tensor in skeleton.state_dict().items():
        parts = key.split(".")
        shard = f"layer-{int(parts[2]):03d}" if key.startswith("model.layers.") else "outer"
        groups.setdefault(shard, {})[key] = tuple(tensor.shape)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard, tensors in groups.items():
        values = {}
        for key, shape in tensors.items():
            if key.endswith("norm.weight"):
                values[key] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                scale = 0.2 if key.endswith("gate.weight") else 0.02  # spread router logits
                values[key] = (torch.randn(shape, generator=generator) * scale).to(torch.bfloat16)
        file = f"{shard}.safetensors"
        save_file(values, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(values, file))
        del values
    config.save_pretrained(out)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def write_tokens(path: Path, tokens: int, seq_len: int, vocab: int) -> Path:
    generator = torch.Generator().manual_seed(1)
    with open(path, "w") as handle:
        for _ in range(tokens // seq_len):
            handle.write(json.dumps({"input_ids": torch.randint(0, vocab, (seq_len,), generator=generator).tolist()}) + "\n")
    return path


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def timed(command: list[str]) -> tuple[float, str]:
    """Wall seconds of a command run to completion (it must succeed), and its stderr."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return wall, done.stderr


def capture_phase(store: Path) -> dict:
    """The capture phase the (single) run in `store` recorded: seconds, tokens, tokens_per_s."""
    from moe_viz import store as stores

    runs = stores.list_runs(store)
    if len(runs) != 1 or runs.status.iloc[0] != "complete":
        raise SystemExit(f"{store}: expected one complete run, found {runs.status.tolist()}")
    return json.loads(runs.settings.iloc[0])["capture_phase"]


def phase_seconds(stderr: str) -> list[dict[str, float]]:
    """Per rank, the phases `moe-viz capture --timing` printed."""
    ranks = []
    for line in stderr.splitlines():
        if "moe-viz: timing rank " in line:  # a progress bar may precede it on the same line
            parts = line[line.index("moe-viz: timing rank "):].split(": ", 2)[2].split(", ")
            ranks.append({p.rsplit(" ", 2)[0]: float(p.rsplit(" ", 2)[1]) for p in parts})
    return ranks


BATCH_SIZE = 4  # sequences per forward; --batch-size changes it (a larger batch reuses each expert's weights more)


def capture_command(model: Path, tokens: Path, store: Path, *extra: str, seq_len: int = 256) -> list[str]:
    store.unlink(missing_ok=True)
    return [sys.executable, "-m", "moe_viz", "--threads", "1", "capture", "--model", str(model), "--domain",
            f"bench={tokens}", "--store", str(store), "--device", "cpu", "--seq-len", str(seq_len),
            "--batch-size", str(BATCH_SIZE), "--max-tokens", "1000000", "--trace-tokens", "0", "--timing", *extra]


def peak_rss(command: list[str]) -> float:
    """Peak RSS (MiB) of one fresh process: ru_maxrss of a wrapper that runs it in-process."""
    wrapper = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; "
               "code = 0\n"
               "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\n"
               "except SystemExit as e:\n    code = e.code or 0\n"
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", wrapper, *command[2:]], env=env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    line = [l for l in done.stderr.splitlines() if l.startswith("MAXRSS")][-1]
    return int(line.split()[1]) / 1024


def baseline_rss(model: Path) -> float:
    """Imports + skeleton + embeddings/norm on the host: what a layer-wise capture holds before any layer."""
    code = (f"import resource, torch; torch.set_num_threads(1)\n"
            f"from moe_viz.capture.layerwise import LayerwiseCapture\n"
            f"c = LayerwiseCapture({str(model)!r}, 'cpu', 'auto'); c.load_outer()\n"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024


def layer_bytes(name: str, dtype_bytes: int = 4) -> int:
    layers, experts, top_k, hidden, width, vocab = SHAPES[name]
    attention = hidden * hidden * 2 + hidden * (hidden // 2) * 2  # q, o + k, v (4 of 8 kv heads)
    return (experts * 3 * hidden * width + experts * hidden + attention + 4 * hidden) * dtype_bytes


def bench_memory(directory: Path, reps: int, tokens: int) -> str:
    token_file = write_tokens(directory / "tokens.jsonl", tokens, 256, SHAPES["scale12"][5])
    models = {name: write_checkpoint(name, directory / name) for name in ("scale12", "scale48")}
    sizes = {name: sum(p.stat().st_size for p in path.glob("*.safetensors")) for name, path in models.items()}
    notes = []
    for name, path in models.items():
        notes.append(f"{name}: checkpoint {sizes[name] / 2**30:.2f} GiB bf16; one decoder layer in fp32 "
                     f"{layer_bytes(name) / 2**20:.0f} MiB; imports + skeleton + embeddings baseline "
                     f"{baseline_rss(path):.0f} MiB")
        print(notes[-1], flush=True)
    hidden = tokens * SHAPES["scale12"][3] * 4
    notes.append(f"hidden-state buffer: {tokens} tokens x {SHAPES['scale12'][3]} x 4 B = {hidden / 2**20:.1f} MiB")
    results = {name: [] for name in models}
    for rep in range(reps):
        for name, path in models.items():
            rss = peak_rss(capture_command(path, token_file, directory / "m.duckdb", "--layerwise"))
            results[name].append(rss)
            print(f"  rep {rep}: {name} layer-wise peak RSS {rss:.0f} MiB", flush=True)
    in_memory = peak_rss(capture_command(models["scale12"], token_file, directory / "m.duckdb"))
    rows = [[f"{SHAPES[name][0]} layers x {SHAPES[name][1]} experts", f"{sizes[name] / 2**30:.2f} GiB",
             ", ".join(f"{v:.0f}" for v in values) + f" MiB (median {statistics.median(values):.0f})",
             f"{in_memory:.0f} MiB" if name == "scale12" else "-"] for name, values in results.items()]
    return "\n\n".join([
        f"Measured {machine(threads=1)}; {tokens} tokens, sequences of 256, batches of {BATCH_SIZE}; peak = ru_maxrss.",
        table(["checkpoint", "size (bf16)", f"layer-wise peak RSS ({reps} reps)", "in-memory peak RSS"], rows),
        "\n".join(f"- {n}" for n in notes)])


def bench_throughput(directory: Path, reps: int, tokens: int) -> str:
    model = write_checkpoint("fits", directory / "fits")
    token_file = write_tokens(directory / "tokens-fits.jsonl", tokens, 256, SHAPES["fits"][5])
    rows, whole, phase = [], [], []
    for rep in range(reps):
        order = ["in-memory", "layer-wise"] if rep % 2 == 0 else ["layer-wise", "in-memory"]
        got = {}
        for variant in order:
            store = directory / f"t-{variant}.duckdb"
            extra = ["--layerwise"] if variant == "layer-wise" else []
            wall, _ = timed(capture_command(model, token_file, store, *extra))
            got[variant] = (wall, capture_phase(store)["tokens_per_s"])
        whole.append(got["in-memory"][0] / got["layer-wise"][0])
        phase.append(got["layer-wise"][1] / got["in-memory"][1])
        rows.append([rep, f"{got['in-memory'][0]:.1f} s", f"{got['layer-wise'][0]:.1f} s", f"{whole[-1]:.2f}",
                     f"{got['in-memory'][1]:.0f}", f"{got['layer-wise'][1]:.0f}", f"{phase[-1]:.2f}"])
        print(f"  rep {rep}: {rows[-1]}", flush=True)
    return "\n\n".join([
        f"Measured {machine(threads=1)}; {tokens} tokens, batches of {BATCH_SIZE}; variants alternate which runs first.",
        table(["rep", "in-memory wall", "layer-wise wall", "whole-command ratio", "in-memory capture tok/s",
               "layer-wise capture tok/s", "capture-phase ratio"], rows),
        f"Layer-wise / in-memory throughput: capture phase **{spread(phase, '{:.2f}')}**; whole command "
        f"{spread(whole, '{:.2f}')} (target >= 0.8)."])


def bench_ranks(directory: Path, reps: int, tokens: int) -> str:
    """1 rank x 1 thread and 2 ranks x 1 thread, alternating which runs first; two throughput ratios."""
    model = write_checkpoint("fits", directory / "fits")
    token_file = write_tokens(directory / f"tokens-ranks-{tokens}.jsonl", tokens, 256, SHAPES["fits"][5])
    rows, whole, phase, timings = [], [], [], {"1 rank": [], "2 ranks": []}
    for rep in range(reps):
        order = ["1 rank", "2 ranks"] if rep % 2 == 0 else ["2 ranks", "1 rank"]
        got = {}
        for variant in order:
            store = directory / f"r-{variant[0]}.duckdb"
            command = capture_command(model, token_file, store)
            if variant == "2 ranks":
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", *command[2:]]
            wall, stderr = timed(command)
            got[variant] = (wall, capture_phase(store)["tokens_per_s"])
            timings[variant].append(phase_seconds(stderr))
        whole.append(got["1 rank"][0] / got["2 ranks"][0])
        phase.append(got["2 ranks"][1] / got["1 rank"][1])
        rows.append([rep, f"{got['1 rank'][0]:.1f} s", f"{got['2 ranks'][0]:.1f} s", f"{whole[-1]:.2f}",
                     f"{got['1 rank'][1]:.0f}", f"{got['2 ranks'][1]:.0f}", f"{phase[-1]:.2f}"])
        print(f"  rep {rep}: {rows[-1]}", flush=True)
    from moe_viz.capture.timing import ORDER

    seen = {n for runs in timings.values() for run in runs for rank in run for n in rank}
    names = [n for n in ORDER if n in seen] + sorted(seen - set(ORDER))
    phase_rows = []
    for variant, runs in timings.items():
        for rank in range(len(runs[0])):
            phase_rows.append([variant, rank] + [
                f"{statistics.median(r[rank][n] for r in runs):.2f}" if n in runs[0][rank] else "-" for n in names])
    cpu = {variant: statistics.median(sum(rank.get("forward CPU", 0.0) for rank in run) for run in runs)
           for variant, runs in timings.items()}
    cpu_line = (f"CPU seconds of the forward passes, all ranks together (median): 1 rank {cpu['1 rank']:.2f} s, "
                f"2 ranks {cpu['2 ranks']:.2f} s ({cpu['2 ranks'] / cpu['1 rank']:.2f}x). Splitting the work "
                f"over two processes {'adds' if cpu['2 ranks'] > 1.05 * cpu['1 rank'] else 'adds no'} CPU work of "
                f"its own: were both ranks on free cores at these per-token CPU costs, the capture-phase speed-up "
                f"would be about 2 x {cpu['1 rank'] / cpu['2 ranks']:.2f} = {2 * cpu['1 rank'] / cpu['2 ranks']:.2f} "
                "(CPU time counts memory stalls, so two ranks competing for memory bandwidth show up here too, "
                "but only while they run at the same time).")
    return "\n\n".join([
        f"Measured {machine(threads=1)}; {tokens} tokens (sequences of 256, batches of {BATCH_SIZE}, no token trace); "
        "`torchrun --standalone --nproc-per-node 2` vs a plain `moe-viz capture`, alternating which runs first.",
        table(["rep", "1 rank wall", "2 ranks wall", "whole-command speed-up", "1 rank capture tok/s",
               "2 ranks capture tok/s", "capture-phase speed-up"], rows),
        f"2 ranks / 1 rank throughput: capture phase (every rank ready -> reduced accumulators) "
        f"**{spread(phase, '{:.2f}')}**; whole command (interpreter start, imports, model load, store write and, "
        f"for 2 ranks, the torchrun launcher included) {spread(whole, '{:.2f}')}. Target >= 1.8 (capture phase).",
        cpu_line,
        "Where the time goes (`--timing`, seconds, median over the repetitions; start-up = interpreter start "
        "and imports before the capture begins; rank 0 alone writes the store):",
        table(["variant", "rank"] + [n if n != "peak RSS" else "peak RSS (MiB)" for n in names], phase_rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["memory", "throughput", "ranks"])
    parser.add_argument("--dir", required=True, help="where checkpoints and stores are written (delete afterwards)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sequences per forward (default 4)")
    parser.add_argument("--write", action="store_true", help="update the marked section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    globals()["BATCH_SIZE"] = args.batch_size
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()}; torch {torch.__version__}")
    if args.what == "memory":
        body = bench_memory(directory, args.reps, args.tokens or 2048)
    elif args.what == "throughput":
        body = bench_throughput(directory, args.reps, args.tokens or 8192)
    else:
        body = bench_ranks(directory, args.reps, args.tokens or 32768)
    print(body)
    if args.write:
        write_section(f"capture-scale-{args.what}", body)


if __name__ == "__main__":
    main()
