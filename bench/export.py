"""Streaming export of a synthetic multi-GB checkpoint vs `cp` of the same shards.

    python bench/export.py --workdir /tmp/moe_viz_bench [--experts 64 --layers 8]

Builds a random-init Qwen3-MoE checkpoint in shards (once; reused if present),
then alternates `cp -r` of the checkpoint and `moe-viz`'s streaming export at
50% sparsity, each in its own process, and reports the median time ratio
(same source bytes, so ratio = throughput relative to cp) and each export's
peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXPORT_SNIPPET = """
import resource, subprocess, sys, time
from moe_viz.prune.export import export_pruned
from moe_viz.prune.plan import PrunePlan
plan = PrunePlan.from_json(open(sys.argv[1]).read())
start = time.perf_counter()
export_pruned(plan, sys.argv[2], sys.argv[3], streaming=True)
subprocess.run(["sync"], check=True)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

BUILD_SNIPPET = """
import sys, torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
experts, layers, hidden, width, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
config = Qwen3MoeConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
    num_key_value_heads=4, head_dim=hidden // 8, intermediate_size=4 * hidden, moe_intermediate_size=width,
    num_experts=experts, num_experts_per_tok=8)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config)
model.save_pretrained(out, max_shard_size="500MB")
"""


def _checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/moe_viz_bench")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    work = Path(args.workdir)
    source = work / "source"
    if not (source / "config.json").exists():
        shutil.rmtree(source, ignore_errors=True)
        subprocess.run([sys.executable, "-c", BUILD_SNIPPET, str(args.experts), str(args.layers), str(args.hidden),
                        str(args.width), str(source)], check=True)
    config = json.loads((source / "config.json").read_text())
    experts = config["num_local_experts"] if "num_local_experts" in config else config["num_experts"]
    layers = config["num_hidden_layers"]
    from moe_viz.prune.plan import PrunePlan

    plan = PrunePlan(
        model_id=str(source), model_fingerprint="bench", criterion="random", scope="uniform", sparsity=0.5,
        domains={"bench": 1.0}, run_ids={"bench": "none"}, num_experts={l: experts for l in range(layers)},
        kept={l: list(range(0, experts, 2)) for l in range(layers)},
    )
    plan_file = work / "plan.json"
    plan_file.write_text(plan.to_json())
    size = _checkpoint_bytes(source)
    cp_times, export_times, call_times, peaks = [], [], [], []
    for _ in range(args.reps):
        for target in (work / "copy", work / "pruned"):
            shutil.rmtree(target, ignore_errors=True)
        subprocess.run(["sync"], check=True)  # start each timing with no dirty pages pending
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(source), str(work / "copy")], check=True)
        subprocess.run(["sync"], check=True)
        cp_times.append(time.perf_counter() - start)
        shutil.rmtree(work / "copy")
        subprocess.run(["sync"], check=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", EXPORT_SNIPPET, str(plan_file), str(source), str(work / "pruned")],
                                check=True, capture_output=True, text=True)
        export_times.append(time.perf_counter() - start)
        call, peak_kib = result.stdout.strip().splitlines()[-1].split()
        call_times.append(float(call))
        peaks.append(int(peak_kib) / 1024)  # ru_maxrss is KiB on Linux
    written = _checkpoint_bytes(work / "pruned")
    ratios = [c / e for c, e in zip(cp_times, export_times)]
    print(f"checkpoint {size / 1e9:.2f} GB in {len(list(source.glob('*.safetensors')))} shards; "
          f"{experts} experts x {layers} layers; export keeps 50% ({written / 1e9:.2f} GB written)")
    print(f"cp median {statistics.median(cp_times):.2f}s ({size / 1e6 / statistics.median(cp_times):.0f} MB/s)")
    print(f"export median {statistics.median(export_times):.2f}s with process start and imports "
          f"({size / 1e6 / statistics.median(export_times):.0f} MB/s of source); export call + sync "
          f"{statistics.median(call_times):.2f}s")
    print(f"throughput relative to cp (median of pairs): {statistics.median(ratios):.2f}x whole process, "
          f"{statistics.median(c / e for c, e in zip(cp_times, call_times)):.2f}x export call")
    print(f"peak RSS of the export process: max {max(peaks):.0f} MB (includes importing torch/transformers)")


if __name__ == "__main__":
    main()
