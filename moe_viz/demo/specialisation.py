"""Does the demo model really specialise? Two measurements on held-out text.

(a) Removal: for each domain D, mask the 2 experts per layer most used by D
    relative to the other domains (router statistics on D's calibration
    split) and compare D's held-out loss increase with the mean increase of
    the other domains.
(b) Mutual information between domain and selected expert, averaged over
    layers, against the same model with its router weights re-initialised.
"""

from __future__ import annotations

import copy

import pandas as pd
import torch

from moe_viz.capture.run import collect_routing_stats
from moe_viz.analysis.domain_stats import mutual_information, specific_experts
from moe_viz.prune.evaluate import heldout_sequences, mean_loss
from moe_viz.prune.masking import masked_experts
from moe_viz.models.discovery import find_moe_layers
from moe_viz.demo import corpora

SEQ_LEN = 256
CALIBRATION_TOKENS = 16_384
EVAL_TOKENS = 8_192
REMOVED_PER_LAYER = 2


def domain_sequences(tokenizer, split: str, max_tokens: int) -> dict[str, list[list[int]]]:
    return {d: heldout_sequences(corpora.documents(d, split), tokenizer, SEQ_LEN, max_tokens) for d in corpora.DOMAINS}


def routing_by_domain(model, sequences: dict[str, list[list[int]]], pad_id: int) -> pd.DataFrame:
    frames = [collect_routing_stats(model, seqs, batch_size=8, pad_id=pad_id)[0].assign(domain=d)
              for d, seqs in sequences.items()]
    return pd.concat(frames, ignore_index=True)


def heldout_losses(model, heldout: dict[str, list[list[int]]]) -> dict[str, float]:
    return {d: mean_loss(model, seqs) for d, seqs in heldout.items()}


def with_reinitialised_routers(model, seed: int = 0):
    """A copy of `model` whose router weights are drawn afresh (normal, std = initializer_range)."""
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(clone.config, "initializer_range", 0.02)
    with torch.no_grad():
        for layer in find_moe_layers(clone):
            weight = layer.router.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    return clone


def measure(model, tokenizer, eval_tokens: int = EVAL_TOKENS) -> dict:
    """Both measurements; every number in the returned dict is printed by `moe-viz demo eval`."""
    pad = tokenizer.pad_token_id or 0
    calibration = domain_sequences(tokenizer, "train", CALIBRATION_TOKENS)
    heldout = domain_sequences(tokenizer, "heldout", eval_tokens)
    stats = routing_by_domain(model, calibration, pad)
    base = heldout_losses(model, heldout)
    removal = {}
    for domain in corpora.DOMAINS:
        dropped = specific_experts(stats, domain, REMOVED_PER_LAYER)
        with masked_experts(model, dropped):
            losses = heldout_losses(model, heldout)
        own = losses[domain] - base[domain]
        others = [losses[d] - base[d] for d in corpora.DOMAINS if d != domain]
        mean_others = sum(others) / len(others)
        removal[domain] = {
            "own_increase": round(own, 4),
            "others_mean_increase": round(mean_others, 4),
            "ratio": round(own / mean_others, 2) if mean_others > 0 else float("inf"),
        }
    reinit = with_reinitialised_routers(model)
    mi = float(mutual_information(stats).mean())
    mi_reinit = float(mutual_information(routing_by_domain(reinit, calibration, pad)).mean())
    return {
        "heldout_loss": {d: round(v, 4) for d, v in base.items()},
        "removal": removal,
        "specialised_domains": sum(r["ratio"] >= 3 for r in removal.values()),
        "mutual_information": round(mi, 4),
        "mutual_information_reinit_router": round(mi_reinit, 4),
    }
