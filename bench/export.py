"""Streaming export vs `cp` of the same checkpoint, per byte written, warm and cold cache.

    python bench/export.py [--workdir /tmp/moe_viz_bench] [--reps 3] [--write]

Builds two random-init Qwen3-MoE checkpoints once (big: hidden 1024, 8 layers, 64
experts of width 512, ~3.6 GB in 500 MB shards; small: hidden 512, 2 layers,
64 experts of width 128, ~0.23 GB) and exports each at 50% sparsity (every other
expert). One worker process imports moe_viz/torch/transformers once and runs every
export call (what a user pays beyond imports), forgetting which primitives were
refused before each call. Interleaved per repetition: `cp -r` of the big checkpoint,
the export with its automatic primitive (the first of copy_file_range, sendfile,
pread/write that the kernel accepts), and the export forced onto each primitive
(MOE_VIZ_COPY); each followed by `sync` inside its timing. Cache modes: `warm` reads the source once before each
timing; `cold` drops the source's pages first (posix_fadvise DONTNEED after sync).

Throughput per byte written relative to cp = (written / t_export) / (source / t_cp),
per repetition: the export is credited only with the bytes it writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import machine, spread, table, write_section

BUILD = """
import sys, torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
experts, layers, hidden, width, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
config = Qwen3MoeConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
    num_key_value_heads=4, head_dim=hidden // 8, intermediate_size=4 * hidden, moe_intermediate_size=width,
    num_experts=experts, num_experts_per_tok=8)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained(out, max_shard_size="500MB")
"""

# Reads "SOURCE PLAN OUT [PRIMITIVE]" lines; answers with the call's seconds, the primitive used, peak RSS.
WORKER = """
import json, os, resource, shutil, subprocess, sys, time
t0 = time.perf_counter()
from moe_viz.prune import copy_ranges
from moe_viz.prune.export import export_pruned
from moe_viz.prune.plan import PrunePlan
from transformers import AutoModelForCausalLM, CONFIG_MAPPING
from transformers.models.qwen3_moe import modeling_qwen3_moe  # lazy imports an export triggers (the meta-device
CONFIG_MAPPING["qwen3_moe"]                                   # model of check_exportable), paid once per process
print(json.dumps({"imports_s": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
for line in sys.stdin:
    source, plan_file, out, *forced = line.split()
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    os.environ.pop("MOE_VIZ_COPY", None)
    if forced:
        os.environ["MOE_VIZ_COPY"] = forced[0]
    copy_ranges._copiers.clear()
    plan = PrunePlan.from_json(open(plan_file).read())
    start = time.perf_counter()
    export_pruned(plan, source, out, streaming=True)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    used = [c.name for c in copy_ranges._copiers.values()]
    print(json.dumps({"seconds": seconds, "primitive": used[0] if used else None,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
"""


def shard_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def drop_cache(path: Path) -> None:
    subprocess.run(["sync"], check=True)
    for file in path.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as handle:
            while handle.read(16 << 20):
                pass


def prepare(work: Path, name: str, dims: tuple[int, int, int, int]) -> tuple[Path, Path]:
    from moe_viz.prune.plan import PrunePlan

    source = work / name
    if not (source / "config.json").exists():
        shutil.rmtree(source, ignore_errors=True)
        subprocess.run([sys.executable, "-c", BUILD, *map(str, dims), str(source)], check=True)
    config = json.loads((source / "config.json").read_text())
    experts = config.get("num_experts") or config["num_local_experts"]
    layers = config["num_hidden_layers"]
    plan = PrunePlan(
        model_id=str(source), model_fingerprint="bench", criterion="random", scope="uniform", sparsity=0.5,
        domains={"bench": 1.0}, run_ids={"bench": "none"}, num_experts={l: experts for l in range(layers)},
        kept={l: list(range(0, experts, 2)) for l in range(layers)},
    )
    plan_file = work / f"{name}-plan.json"
    plan_file.write_text(plan.to_json())
    return source, plan_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/moe_viz_bench")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update the marked section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    big, big_plan = prepare(work, "big", (64, 8, 1024, 512))
    small, small_plan = prepare(work, "small", (64, 2, 512, 128))
    from moe_viz.prune.copy_ranges import available_primitives

    primitives = list(available_primitives())
    worker = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    started = json.loads(worker.stdout.readline())

    def export(source: Path, plan: Path, forced: str | None = None) -> dict:
        worker.stdin.write(f"{source} {plan} {work / 'out'} {forced or ''}\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())

    def cp() -> float:
        shutil.rmtree(work / "copy", ignore_errors=True)
        subprocess.run(["sync"], check=True)
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(big), str(work / "copy")], check=True)
        subprocess.run(["sync"], check=True)
        seconds = time.perf_counter() - start
        shutil.rmtree(work / "copy")
        return seconds

    size = shard_bytes(big)
    variants = ["auto", *primitives]
    results = {mode: {"cp": [], **{v: [] for v in variants}, "small": [], "chosen": []} for mode in ("warm", "cold")}
    written = small_written = 0
    for _ in range(args.reps):
        for mode in ("warm", "cold"):
            prime = warm_cache if mode == "warm" else drop_cache
            prime(big)
            results[mode]["cp"].append(cp())
            for variant in variants:
                prime(big)
                done = export(big, big_plan, None if variant == "auto" else variant)
                results[mode][variant].append(done["seconds"])
                if variant == "auto":
                    results[mode]["chosen"].append(done["primitive"])
                written = shard_bytes(work / "out")
            prime(small)
            results[mode]["small"].append(export(small, small_plan)["seconds"])
            small_written = shard_bytes(work / "out")
    final = export(small, small_plan)
    worker.stdin.close()
    worker.wait()

    rows = []
    for mode, r in results.items():
        cp_rate = [size / t for t in r["cp"]]
        rows.append([mode, "`cp -r` + sync (all source bytes)", spread(r["cp"], "{:.2f}"),
                     f"{size / 1e9 / statistics.median(r['cp']):.2f}", ""])
        for variant in variants:
            label = f"export, automatic primitive ({', '.join(sorted(set(r['chosen'])))})" \
                if variant == "auto" else f"export forced to `{variant}`"
            per_byte = [(written / t) / c for t, c in zip(r[variant], cp_rate)]
            rows.append([mode, label, spread(r[variant], "{:.2f}"), f"{written / 1e9 / statistics.median(r[variant]):.2f}",
                         spread(per_byte, "{:.2f}")])
        big_rate = written / statistics.median(r["auto"])
        fixed = [t - small_written / big_rate for t in r["small"]]
        rows.append([mode, f"small export ({small_written / 1e9:.2f} GB written): call + sync",
                     spread(r["small"], "{:.2f}"), "", f"fixed part ≈ {spread(fixed, '{:.2f}')} s"])
    body = "\n".join([
        f"Source {size / 1e9:.2f} GB ({len(list(big.glob('*.safetensors')))} shards); 50% export writes "
        f"{written / 1e9:.2f} GB. {args.reps} repetitions, variants interleaved within each; export times are the "
        "export call in a worker that has already imported moe_viz, torch and transformers "
        f"({started['imports_s']:.1f} s to import, {started['rss_mb']:.0f} MB RSS after imports).", "",
        table(["cache", "what", "seconds: median (min–max)", "GB/s written", "per byte written vs cp"], rows), "",
        f"Peak RSS of the worker after every export: {final['rss_mb']:.0f} MB "
        f"({final['rss_mb'] - started['rss_mb']:+.0f} MB over imports): memory does not grow with the checkpoint.",
        "", f"Machine: {machine()}; `{subprocess.run(['cp', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}`; "
        f"filesystem of {work}: `{fs_type(work)}`.",
    ])
    print(body)
    if args.write:
        write_section("export", body)


def fs_type(path: Path) -> str:
    out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout.splitlines()
    return out[-1].split()[1] if len(out) > 1 else "?"


if __name__ == "__main__":
    main()
