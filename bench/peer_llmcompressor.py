"""moe_viz vs vllm-project/llm-compressor's REAP calibration on the same model and tokens.

llm-compressor 0.14 pins transformers <= 5.17, so it lives in its own virtual environment
(reusing this environment's torch through --system-site-packages, so both run the same torch):

    python -m venv --system-site-packages /work/venv-llmc
    /work/venv-llmc/bin/pip install "llmcompressor==0.14.*"
    python bench/peer_llmcompressor.py all --llmc-python /work/venv-llmc/bin/python [--write]
    python bench/peer_llmcompressor.py render [--write]    # the text again from the last run's results.json

`all` builds a random-init Qwen3-MoE checkpoint (hidden 512, 6 layers, 128 experts top-8,
expert width 128, vocab 8192) and 16,384 random token ids (32 x 512) once, then runs, each in a
fresh process, interleaved per repetition:
- moe_viz: `capture_model` into a new store (the REAP score is reap_sum / routed_tokens);
- llm-compressor `oneshot` with `REAPPruningModifier(sparsity=0.5)`, pipelines `basic` and
  `sequential`, with `moe_calibrate_all_experts` True (its default: every expert runs on every
  token) and False (routed tokens only). Its per-layer saliency sums and counts are read from its
  `REAPSaliencyTracker` just before it prunes.
Each reports the seconds of the calibration call (after loading the model) and the process's
peak RSS. Then the scores are compared: routed counts, REAP relative difference, and how many
layers keep exactly the same experts at 50% sparsity. Last, which attention each pipeline
runs: layer 0's attention output on the first sequences during `oneshot`, against the model's
own (causal) forward and against the same attention with every position seeing every other.

Not part of the test suite (it needs the other environment and minutes of CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = dict(hidden=512, layers=6, experts=128, top_k=8, width=128, vocab=8192, sequences=32, seq=512)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(work: Path) -> None:
    """Checkpoint + tokens, once (main environment)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    if (work / "model" / "config.json").exists() and (work / "tokens.json").exists():
        return
    s = SHAPE
    config = Qwen3MoeConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=8,
        num_key_value_heads=4, head_dim=s["hidden"] // 8, intermediate_size=4 * s["hidden"],
        moe_intermediate_size=s["width"], num_experts=s["experts"], num_experts_per_tok=s["top_k"],
        norm_topk_prob=True, max_position_embeddings=s["seq"],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "model")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, s["vocab"], (s["sequences"], s["seq"]), generator=g).tolist()
    (work / "tokens.json").write_text(json.dumps(tokens))


def run_moe_viz(work: Path, out: Path) -> None:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from moe_viz import store
    from moe_viz.capture.run import CaptureSettings, capture_model
    from moe_viz.capture.sources import Documents

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(work / "model").eval()
    tokens = json.loads((work / "tokens.json").read_text())
    docs = Documents(domain="peer", source="tokens.json", token_ids=tokens)
    settings = CaptureSettings(max_tokens=len(tokens) * len(tokens[0]), seq_len=len(tokens[0]), batch_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        (run_id,) = capture_model(model, None, "peer", [docs], settings, store_path=Path(tmp) / "s.duckdb")
        seconds = time.perf_counter() - start
        stats = store.expert_stats(Path(tmp) / "s.duckdb", [run_id])
    layers = {}
    for layer, rows in stats.groupby("layer"):
        rows = rows.sort_values("expert")
        routed = rows.routed_tokens.to_numpy()
        layers[int(layer)] = {"count": routed.tolist(),
                              "reap": (rows.reap_sum.to_numpy() / routed.clip(min=1)).tolist()}
    out.write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "layers": layers}))


def _reap_oneshot(model, tokens: list[list[int]], pipeline: str, all_experts: bool) -> None:
    """Inside the llm-compressor environment: its REAP calibration and 50% pruning of `model` on `tokens`."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

    dataset = Dataset.from_dict({"input_ids": tokens, "attention_mask": [[1] * len(t) for t in tokens]})
    oneshot(model=model, dataset=dataset, recipe=REAPPruningModifier(sparsity=0.5), pipeline=pipeline,
            moe_calibrate_all_experts=all_experts, num_calibration_samples=len(tokens),
            max_seq_length=len(tokens[0]), shuffle_calibration_samples=False, batch_size=1)


def run_llmc(work: Path, out: Path, pipeline: str, all_experts: bool) -> None:
    """Inside the llm-compressor environment."""
    import re

    import torch
    from llmcompressor.modifiers.pruning.reap import utils as reap_utils
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    captured: dict[int, dict] = {}
    original = reap_utils.REAPSaliencyTracker.compute_retained_experts

    def recording(self, *args, **kwargs):
        captured[len(captured)] = {"count": self.count.cpu().round().long().tolist(),
                                   "reap": self.mean_saliency.tolist()}
        return original(self, *args, **kwargs)

    reap_utils.REAPSaliencyTracker.compute_retained_experts = recording
    tokens = json.loads((work / "tokens.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(work / "model").eval()
    start = time.perf_counter()
    _reap_oneshot(model, tokens, pipeline, all_experts)
    seconds = time.perf_counter() - start
    # Trackers are pruned in sorted layer-name order; map them back to layer numbers.
    names = sorted(f"model.layers.{i}.mlp" for i in range(len(captured)))
    layers = {int(re.search(r"layers\.(\d+)", n).group(1)): captured[i] for i, n in enumerate(names)}
    out.write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "layers": layers}))


def run_llmc_attention(work: Path, out: Path, pipeline: str, sequences: int = 2) -> None:
    """Inside the llm-compressor environment: layer 0's attention output during `oneshot` vs causal and
    non-causal attention on the same input (max absolute differences)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tokens = json.loads((work / "tokens.json").read_text())[:sequences]
    model = AutoModelForCausalLM.from_pretrained(work / "model").eval()
    attention = model.model.layers[0].self_attn
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of layer 0's attention, per call
    attention.register_forward_hook(
        lambda module, args, kwargs, output: seen.append((kwargs["hidden_states"].detach().clone(),
                                                          output[0].detach().clone())), with_kwargs=True)
    _reap_oneshot(model, tokens, pipeline, all_experts=False)
    causal_error = full_error = 0.0
    with torch.no_grad():
        for hidden, got in seen[:sequences]:  # the calibration pass over the sequences, in order
            length = hidden.shape[-2]
            hidden = hidden.reshape(1, length, -1)
            rotary = model.model.rotary_emb(hidden, torch.arange(length)[None])
            causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
            expected = attention(hidden_states=hidden, attention_mask=causal, position_embeddings=rotary)[0]
            every = attention(hidden_states=hidden, attention_mask=torch.zeros(1, 1, length, length),
                              position_embeddings=rotary)[0]
            got = got.reshape(expected.shape)
            causal_error = max(causal_error, (got - expected).abs().max().item())
            full_error = max(full_error, (got - every).abs().max().item())
    out.write_text(json.dumps({"vs_causal": causal_error, "vs_non_causal": full_error,
                               "output_scale": max(o.abs().max().item() for _, o in seen[:sequences])}))


def compare(mine: dict, theirs: dict, keep: int) -> dict:
    """Counts equal per layer, REAP max relative difference where both routed, same kept set per layer."""
    import numpy as np

    same_counts, max_rel, same_kept = 0, 0.0, 0
    for layer, ours in mine["layers"].items():
        other = theirs["layers"][str(layer)]
        same_counts += ours["count"] == other["count"]
        a, b = np.array(ours["reap"]), np.array(other["reap"])
        both = (np.array(ours["count"]) > 0) & (np.array(other["count"]) > 0)
        max_rel = max(max_rel, float(np.max(np.abs(a - b)[both] / np.abs(b)[both])))
        same_kept += set(np.argsort(-a, kind="stable")[:keep]) == set(np.argsort(-b, kind="stable")[:keep])
    ours, other = np.array(mine["layers"]["0"]["count"]), np.array(theirs["layers"]["0"]["count"])
    moved = int(np.abs(ours - other).sum()) // 2  # a slot routed elsewhere moves two counts by one; opposite moves cancel
    return {"same_counts": same_counts, "max_rel": max_rel, "same_kept": same_kept, "layers": len(mine["layers"]),
            "moved_layer0": moved, "slots_layer0": int(ours.sum())}


def table_body(results: dict[str, list[dict]], reps: int, attention: dict[str, dict], machine: str) -> str:
    from benchlib import spread, table

    keep = SHAPE["experts"] // 2
    base = results["moe_viz capture"]
    rows = []
    for name, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        ratio = [r["seconds"] / b["seconds"] for r, b in zip(runs, base)]
        agreement = ""
        if name != "moe_viz capture":
            c = compare(base[0], runs[0], keep)
            agreement = (f"routed counts identical in {c['same_counts']}/{c['layers']} layers; REAP max rel. diff "
                         f"{c['max_rel']:.1e} where both routed; same kept half in {c['same_kept']}/{c['layers']} layers")
            if c["moved_layer0"]:
                agreement += f"; layer 0: ≥ {c['moved_layer0']:,} of {c['slots_layer0']:,} slots routed elsewhere"
        rows.append([name, spread(seconds, "{:.1f}"), spread(ratio, "{:.2f}") if name != "moe_viz capture" else "1",
                     f"{max(r['peak_rss_mb'] for r in runs):.0f}", agreement])
    s = SHAPE
    return "\n".join([
        f"Random-init Qwen3-MoE (hidden {s['hidden']}, {s['layers']} layers, {s['experts']} experts top-{s['top_k']}, "
        f"expert width {s['width']}, vocab {s['vocab']}, fp32), {s['sequences'] * s['seq']:,} tokens "
        f"({s['sequences']} × {s['seq']}, batch 1 in both tools); llm-compressor 0.14 with transformers 5.17 in its own "
        f"virtual environment, same torch, 1 thread; {reps} repetition(s), each tool in a fresh process, interleaved. "
        "Seconds = the calibration call after the model is loaded (moe_viz: `capture_model` including the store "
        "write; llm-compressor: `oneshot`, which also prunes). Agreement is against moe_viz's first run.", "",
        table(["run", "seconds: median (min–max)", "× moe_viz", "peak RSS (MB)", "score agreement with moe_viz"], rows),
        "", "Layer 0's attention output during `oneshot` (first 2 sequences), max absolute difference from the "
        "model's own causal attention and from the same attention without the causal mask:", "",
        table(["pipeline", "vs causal", "vs non-causal", "largest output value (abs)"],
              [[name, f"{a['vs_causal']:.1e}", f"{a['vs_non_causal']:.1e}", f"{a['output_scale']:.2f}"]
               for name, a in attention.items()]),
        "", f"Machine: {machine}.",
    ])


def run_all(args) -> None:
    from benchlib import machine

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    variants = {"moe_viz capture": [sys.executable, __file__, "moe-viz"]}
    for pipeline in ("basic", "sequential"):
        for all_experts in (True, False):
            label = f"llm-compressor {pipeline}, {'every expert on every token (default)' if all_experts else 'routed tokens only'}"
            variants[label] = [args.llmc_python, __file__, "llmc", "--pipeline", pipeline,
                               "--all-experts", str(int(all_experts))]
    results = {name: [] for name in variants}
    for rep in range(args.reps):
        for name, command in variants.items():
            out = work / f"result-{len(results[name])}-{list(variants).index(name)}.json"
            subprocess.run([*command, "--workdir", str(work), "--out", str(out)], check=True,
                           cwd=HERE.parent, stdout=subprocess.DEVNULL)
            results[name].append(json.loads(out.read_text()))
            print(name, f"{results[name][-1]['seconds']:.1f}s", flush=True)
    attention = {}
    for pipeline in ("basic", "sequential"):
        out = work / f"attention-{pipeline}.json"
        subprocess.run([args.llmc_python, __file__, "llmc-attention", "--pipeline", pipeline, "--workdir", str(work),
                        "--out", str(out)], check=True, cwd=HERE.parent, stdout=subprocess.DEVNULL)
        attention[pipeline] = json.loads(out.read_text())
    (work / "results.json").write_text(json.dumps({"runs": results, "attention": attention, "reps": args.reps,
                                                   "machine": machine(1)}))
    render(args)


def render(args) -> None:
    """The section's text from the last `all` run's results.json (to change the wording without re-running)."""
    from benchlib import write_section

    saved = json.loads((Path(args.workdir) / "results.json").read_text())
    body = table_body(saved["runs"], saved["reps"], saved["attention"], saved["machine"])
    print(body)
    if args.write:
        write_section("peer-llmcompressor", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["all", "render", "moe-viz", "llmc", "llmc-attention"])
    parser.add_argument("--workdir", default="/tmp/moe_viz_peer")
    parser.add_argument("--out")
    parser.add_argument("--pipeline", default="basic")
    parser.add_argument("--all-experts", type=int, default=1)
    parser.add_argument("--llmc-python", default="/work/venv-llmc/bin/python")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update the marked section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    if args.command == "all":
        run_all(args)
    elif args.command == "render":
        render(args)
    elif args.command == "llmc-attention":
        run_llmc_attention(Path(args.workdir), Path(args.out), args.pipeline)
    elif args.command == "moe-viz":
        run_moe_viz(Path(args.workdir), Path(args.out))
    else:
        run_llmc(Path(args.workdir), Path(args.out), args.pipeline, bool(args.all_experts))


if __name__ == "__main__":
    main()
