"""Capture at scale: layer-wise memory and throughput, and data-parallel throughput, on CPU.

    python bench/capture_scale.py memory      --dir /tmp/scale   # peak RSS, 12 vs 48 layers (writes ~4.7 GB)
    python bench/capture_scale.py throughput  --dir /tmp/scale   # layer-wise vs in-memory, interleaved
    python bench/capture_scale.py ranks       --dir /tmp/scale   # torchrun 2 ranks x 1 thread vs 1 x 1

Checkpoints are random-init Qwen3-MoE written shard by shard straight to
safetensors (fused expert tensors, bf16), so building a several-GB checkpoint
never holds it in memory. Every measurement is one fresh process (`moe-viz
capture` or torchrun), 1 torch thread per process; a peak RSS is the
ru_maxrss of the process that ran the capture (it reports it on exit).
Variants are interleaved in each repetition; reports list every repetition,
the median and the min-max spread. Delete --dir afterwards.
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


def timed(command: list[str]) -> float:
    """Wall seconds of a command run to completion (it must succeed)."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return wall


def capture_command(model: Path, tokens: Path, store: Path, *extra: str, seq_len: int = 256) -> list[str]:
    store.unlink(missing_ok=True)
    return [sys.executable, "-m", "moe_viz", "--threads", "1", "capture", "--model", str(model), "--domain",
            f"bench={tokens}", "--store", str(store), "--device", "cpu", "--seq-len", str(seq_len),
            "--batch-size", "4", "--max-tokens", "1000000", *extra]


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


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.3g} (min {min(values):.3g}, max {max(values):.3g}; n={len(values)})"


def bench_memory(directory: Path, reps: int, tokens: int) -> None:
    token_file = write_tokens(directory / "tokens.jsonl", tokens, 256, SHAPES["scale12"][5])
    models = {name: write_checkpoint(name, directory / name) for name in ("scale12", "scale48")}
    sizes = {name: sum(p.stat().st_size for p in path.glob("*.safetensors")) for name, path in models.items()}
    for name, path in models.items():
        print(f"{name}: checkpoint {sizes[name] / 2**30:.2f} GiB bf16; one decoder layer in fp32 "
              f"{layer_bytes(name) / 2**20:.0f} MiB; import+skeleton baseline {baseline_rss(path):.0f} MiB")
    hidden = tokens * SHAPES["scale12"][3] * 4
    print(f"hidden-state buffer: {tokens} tokens x {SHAPES['scale12'][3]} x 4 B = {hidden / 2**20:.1f} MiB")
    results = {name: [] for name in models}
    for rep in range(reps):
        for name, path in models.items():
            rss = peak_rss(capture_command(path, token_file, directory / "m.duckdb", "--layerwise"))
            results[name].append(rss)
            print(f"  rep {rep}: {name} layer-wise peak RSS {rss:.0f} MiB", flush=True)
    for name, values in results.items():
        print(f"{name}: layer-wise peak RSS MiB {summary(values)}")
    in_memory = peak_rss(capture_command(models["scale12"], token_file, directory / "m.duckdb"))
    print(f"scale12 in-memory (fp32 on CPU) peak RSS {in_memory:.0f} MiB, for contrast")


def bench_throughput(directory: Path, reps: int, tokens: int) -> None:
    model = write_checkpoint("fits", directory / "fits")
    token_file = write_tokens(directory / "tokens-fits.jsonl", tokens, 256, SHAPES["fits"][5])
    times = {"in-memory": [], "layer-wise": []}
    ratios = []
    for rep in range(reps):
        mem = timed(capture_command(model, token_file, directory / "t.duckdb"))
        lw = timed(capture_command(model, token_file, directory / "t.duckdb", "--layerwise"))
        times["in-memory"].append(mem)
        times["layer-wise"].append(lw)
        ratios.append(mem / lw)
        print(f"  rep {rep}: in-memory {mem:.1f} s, layer-wise {lw:.1f} s, throughput ratio {mem / lw:.2f}", flush=True)
    for name, values in times.items():
        print(f"{name} wall s (whole command, {tokens} tokens): {summary(values)}")
    print(f"layer-wise / in-memory throughput: {summary(ratios)}")


def bench_ranks(directory: Path, reps: int, tokens: int) -> None:
    """Whole-command wall time (imports and loading included, so a fixed cost dilutes the speed-up)."""
    model = write_checkpoint("fits", directory / "fits")
    token_file = write_tokens(directory / "tokens-ranks.jsonl", tokens, 256, SHAPES["fits"][5])
    one, two, ratios = [], [], []
    for rep in range(reps):
        single = timed(capture_command(model, token_file, directory / "r1.duckdb"))
        command = capture_command(model, token_file, directory / "r2.duckdb")
        ranked = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", *command[2:]])
        one.append(single)
        two.append(ranked)
        ratios.append(single / ranked)
        print(f"  rep {rep}: 1 rank {single:.1f} s, 2 ranks {ranked:.1f} s, speed-up {single / ranked:.2f}", flush=True)
    print(f"1 rank x 1 thread wall s: {summary(one)}")
    print(f"2 ranks x 1 thread wall s: {summary(two)}")
    print(f"2 ranks / 1 rank throughput: {summary(ratios)}")
    print(f"load average at the end: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["memory", "throughput", "ranks"])
    parser.add_argument("--dir", required=True, help="where checkpoints and stores are written (delete afterwards)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=None)
    args = parser.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()}; torch {torch.__version__}")
    if args.what == "memory":
        bench_memory(directory, args.reps, args.tokens or 2048)
    elif args.what == "throughput":
        bench_throughput(directory, args.reps, args.tokens or 8192)
    else:
        bench_ranks(directory, args.reps, args.tokens or 32768)


if __name__ == "__main__":
    main()
