"""Causal importance: what removing an expert really changes, next to what routing statistics suggest.

Observational criteria (frequency, REAP, ...) describe routing; whether an expert matters is an
interventional question. Two measurements, both with the masking reference every plan uses:

- **layer-local** (`measure_reconstruction`): per (layer, expert), the MoE block's relative output
  error when that expert alone is masked, on the first tokens of the run's own calibration text;
  stored as `expert_stats.recon_error` and offered as the criterion `reconstruction`.
- **end to end** (`measure_knockout`): for every expert of one chosen layer, KL(original ‖ model with
  that expert masked) per token on evaluation text, with a 95% bootstrap interval; stored in
  `expert_knockout`.

`causal_agreement` sets both against every observational criterion (Spearman ρ per layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from torch import nn

from moe_viz.analysis import criteria
from moe_viz import store
from moe_viz.prune.evaluate import evaluate_plan, reference_batches
from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import find_moe_layers
from moe_viz.capture.sources import pack_sequences, read_documents
from moe_viz.prune.sweep import sequences_key


def _run(store_path: str | Path, run_id: str) -> pd.Series:
    runs = store.list_runs(store_path).set_index("run_id")
    if run_id not in runs.index or runs.loc[run_id, "status"] != "complete":
        raise MoeVizError(f"run {run_id} is not a complete run of the store")
    return runs.loc[run_id]


def calibration_sequences(store_path: str | Path, run_id: str, tokenizer, vocab_size: int) -> list[list[int]]:
    """The run's calibration sequences, packed again exactly as its capture packed them."""
    run = _run(store_path, run_id)
    settings = json.loads(run["settings"])
    docs = read_documents(str(run["domain"]), str(run["source"]))
    sequences = pack_sequences(docs, tokenizer, settings["seq_len"], settings["max_tokens"], settings["seed"], vocab_size)
    if sum(map(len, sequences)) != int(run["tokens"]):
        raise MoeVizError(f"{run['source']} no longer gives the {int(run['tokens'])} tokens run {run_id} captured: "
                          "re-capture the domain")
    return sequences


def measure_reconstruction(model: nn.Module, store_path: str | Path, run_id: str, tokenizer,
                           max_tokens: int = 4096, batch_size: int = 8) -> pd.DataFrame:
    """Measure and store `recon_error` for every expert of a run; returns (layer, expert, recon_error, tokens)."""
    from moe_viz.analysis.reconstruction import expert_reconstruction_scores

    vocab = model.get_input_embeddings().weight.shape[0]
    sequences = calibration_sequences(store_path, run_id, tokenizer, vocab)
    scores = expert_reconstruction_scores(model, sequences, batch_size=batch_size, max_tokens=max_tokens)
    store.set_reconstruction(store_path, run_id, scores)
    return scores


def measure_knockout(model: nn.Module, store_path: str | Path, run_id: str, layer: int,
                     sequences: list[list[int]], batch_size: int = 8, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Knock out each expert of `layer` alone; store and return (layer, expert, tokens, kl, kl_ci_low, kl_ci_high)."""
    moe = {m.layer: m for m in find_moe_layers(model)}
    if layer not in moe:
        raise MoeVizError(f"layer {layer} is not a MoE layer; MoE layers: {sorted(moe)}")
    _run(store_path, run_id)
    references = {"eval": reference_batches(model, sequences, batch_size)}
    rows = []
    for expert in range(moe[layer].num_experts):
        (result,) = evaluate_plan(model, {layer: [expert]}, references, seed=seed)
        rows.append({"layer": layer, "expert": expert, "tokens": result["tokens"], "kl": result["kl"],
                     "kl_ci_low": result["kl_ci"][0], "kl_ci_high": result["kl_ci"][1]})
        if progress is not None:
            progress(expert + 1, moe[layer].num_experts)
    frame = pd.DataFrame(rows)
    store.save_knockout(store_path, run_id, sequences_key(sequences), frame)
    return frame


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman ρ with average ranks for ties (Pearson correlation of the ranks)."""
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator else float("nan")


def causal_agreement(store_path: str | Path, run_id: str) -> pd.DataFrame:
    """Per layer: Spearman ρ between each causal measure (`reconstruction`, `knockout_kl` where measured)
    and each observational criterion's scores, over the layer's experts (one run)."""
    stats = store.expert_stats(store_path, [run_id])
    knocked = store.knockout(store_path, [run_id])
    observational = [c for c in criteria.CRITERIA if c not in ("random", "reconstruction")]
    scores = {name: criteria.score(stats, name).set_index(["layer", "expert"]).score for name in observational}
    causal = {}
    if stats.recon_error.notna().all():
        causal["reconstruction"] = stats.set_index(["layer", "expert"]).recon_error
    if not knocked.empty:
        causal["knockout_kl"] = knocked.set_index(["layer", "expert"]).kl
    if not causal:
        raise MoeVizError(f"run {run_id} has no causal measurements: run `moe-viz importance` first")
    rows = []
    for measure, values in causal.items():
        for layer in sorted(values.index.get_level_values("layer").unique()):
            measured = values.xs(layer, level="layer")
            for name, score in scores.items():
                observed = score.xs(layer, level="layer").reindex(measured.index)
                rows.append({"layer": int(layer), "causal": measure, "criterion": name,
                             "spearman": _spearman(measured.to_numpy(float), observed.to_numpy(float))})
    return pd.DataFrame(rows)
