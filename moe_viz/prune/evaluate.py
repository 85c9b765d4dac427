"""Held-out evaluation: mean loss (demo), and the quality of a pruning plan without exporting it.

A plan is evaluated by masking its dropped experts in the loaded model (`masking.py`, the same
reference an export is verified against) and comparing with the unpruned model's next-token
distributions, which are computed once per evaluation set and reused for every plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from moe_viz.capture.run import padded_batches
from moe_viz.errors import MoeVizError
from moe_viz.capture.sources import Documents, pack_sequences, parse_domain, read_documents, token_stream


def _chunks(stream: list[int], seq_len: int) -> list[list[int]]:
    """A token stream cut into seq_len pieces, dropping a last piece too short to predict anything."""
    pieces = (stream[i : i + seq_len] for i in range(0, len(stream), seq_len))
    return [piece for piece in pieces if len(piece) > 1]


def heldout_sequences(texts: list[str], tokenizer, seq_len: int, max_tokens: int) -> list[list[int]]:
    """Deterministic evaluation sequences: documents in order, EOS-joined, cut to seq_len."""
    return _chunks(token_stream(texts, tokenizer, max_tokens), seq_len)


@torch.no_grad()
def mean_loss(model: nn.Module, sequences: list[list[int]], batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) over all predicted positions."""
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for ids, mask in padded_batches(sequences, batch_size):
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += int((targets != -100).sum())
    return total / max(count, 1)


# -- evaluating a pruning plan without exporting it ----------------------------------

BOOTSTRAP_SAMPLES = 1000


@dataclass
class ReferenceBatch:
    """One padded batch of an evaluation set and what every plan is compared with on it.

    P is the number of predicted positions (position t predicts token t+1, both real tokens).
    """

    ids: torch.Tensor  # (B, T) token ids, right-padded
    mask: torch.Tensor  # (B, T) 1 for real tokens
    rows: torch.Tensor  # (P,) batch row of each predicted position (for per-sequence sums)
    probs: torch.Tensor  # (P, V) float32 softmax of the original logits
    neg_entropy: torch.Tensor  # (P,) float64 Σ_v p log p of the original
    nll: torch.Tensor  # (P,) float64 original NLL of the next token
    argmax: torch.Tensor  # (P,) original top-1 token


def predicted_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: position t predicts token t+1 and both are real tokens."""
    valid = mask.bool()
    return valid[:, 1:] & valid[:, :-1]


def _forward_predicted(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, V) float32 logits at the predicted positions (on the model's device) and (P,) targets there."""
    device = model.get_input_embeddings().weight.device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    predicted = predicted_positions(mask)
    return logits[:, :-1][predicted.to(device)].float(), ids[:, 1:][predicted].to(device)


@torch.no_grad()
def reference_batches(model: nn.Module, sequences: list[list[int]], batch_size: int = 8) -> list[ReferenceBatch]:
    """Run the unpruned model once over an evaluation set; every plan evaluated on it reuses this."""
    out = []
    for ids, mask in padded_batches(sequences, batch_size):
        logits, targets = _forward_predicted(model, ids, mask)
        log_probs = F.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        predicted = predicted_positions(mask)
        out.append(ReferenceBatch(
            ids, mask, rows=torch.arange(ids.shape[0]).unsqueeze(1).expand_as(predicted)[predicted],
            probs=probs, neg_entropy=(probs * log_probs).sum(-1).double(),
            nll=-log_probs.gather(1, targets[:, None])[:, 0].double(), argmax=log_probs.argmax(-1)))
    return out


def _sequence_sums(model: nn.Module, batches: list[ReferenceBatch]) -> np.ndarray:
    """(S, 5) per sequence: [predicted tokens, NLL original, NLL pruned, KL(orig ‖ pruned), top-1 agreements].

    With q = softmax(x) of the pruned logits x: log q = x - logsumexp(x), so
    KL(p ‖ q) = Σ p log p - Σ p x + logsumexp(x), using Σ p = 1; no (P, V) temporary is made.
    """
    sums = []
    for batch in batches:
        logits, targets = _forward_predicted(model, batch.ids, batch.mask)
        lse = torch.logsumexp(logits, dim=-1)
        cross = torch.bmm(batch.probs.unsqueeze(1), logits.unsqueeze(2))[:, 0, 0]
        per_token = torch.stack([
            torch.ones(len(targets), dtype=torch.float64, device=logits.device),
            batch.nll,
            (lse - logits.gather(1, targets[:, None])[:, 0]).double(),
            batch.neg_entropy - (cross - lse).double(),
            (logits.argmax(-1) == batch.argmax).double(),
        ], dim=1).cpu()
        per_row = torch.zeros(batch.ids.shape[0], 5, dtype=torch.float64).index_add_(0, batch.rows, per_token)
        sums.append(per_row.numpy())
    return np.concatenate(sums) if sums else np.zeros((0, 5))


def _bootstrap(sums: np.ndarray, seed: int, samples: int = BOOTSTRAP_SAMPLES) -> dict[str, list[float]]:
    """95% percentile intervals of the token-weighted means, resampling whole sequences."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(samples, len(sums)))
    totals = sums[picks].sum(axis=1)  # (samples, 5)
    tokens = np.maximum(totals[:, 0], 1)
    values = {"kl": totals[:, 3] / tokens, "nll_delta": (totals[:, 2] - totals[:, 1]) / tokens,
              "top1_agreement": totals[:, 4] / tokens}
    return {f"{name}_ci": np.percentile(v, [2.5, 97.5]).tolist() for name, v in values.items()}


def evaluate_plan(model: nn.Module, dropped: dict[int, list[int]], references: dict[str, list[ReferenceBatch]],
                  seed: int = 0, top_k: int | None = None) -> list[dict]:
    """Quality of `model` with the `dropped` experts masked (and top-k lowered to `top_k`), per evaluation domain.

    Returns one dict per domain: tokens (predicted positions), sequences, nll_original and
    nll_pruned (nats/token), kl = mean KL(original ‖ pruned) per token, top1_agreement, and
    95% bootstrap intervals over sequences (kl_ci, nll_delta_ci, top1_agreement_ci).
    """
    from moe_viz.prune.masking import applied_plan

    results = []
    with torch.no_grad(), applied_plan(model, dropped, top_k):
        for domain, batches in references.items():
            sums = _sequence_sums(model, batches)
            tokens = sums[:, 0].sum()
            if tokens == 0:
                raise MoeVizError(f"evaluation domain {domain} has no sequence of two or more tokens")
            results.append({
                "domain": domain, "tokens": int(tokens), "sequences": len(sums),
                "nll_original": sums[:, 1].sum() / tokens, "nll_pruned": sums[:, 2].sum() / tokens,
                "kl": sums[:, 3].sum() / tokens, "top1_agreement": sums[:, 4].sum() / tokens,
                **_bootstrap(sums, seed),
            })
    return results


# -- evaluation text -------------------------------------------------------------

def heldout_after_calibration(docs: Documents, tokenizer, run_settings: dict, calibration_tokens: int,
                              seq_len: int, max_tokens: int, vocab_size: int) -> list[list[int]]:
    """Sequences of a source that its calibration run did not use (empty when it used everything).

    A capture packs the shuffled documents (seed from its settings) and keeps the first
    `calibration_tokens`; the same packing continued past them is text the statistics never saw.
    Pre-tokenised sources: the lines after those the capture used.
    """
    seed, cal_seq_len = run_settings.get("seed", 0), run_settings.get("seq_len", seq_len)
    if docs.pretokenised:
        used = len(pack_sequences(docs, None, cal_seq_len, run_settings.get("max_tokens", calibration_tokens),
                                  seed, vocab_size))
        rest = Documents(docs.domain, docs.source, token_ids=docs.token_ids[used:])
        return pack_sequences(rest, None, seq_len, max_tokens, seed, vocab_size) if rest.token_ids else []
    packed = pack_sequences(docs, tokenizer, cal_seq_len, calibration_tokens + max_tokens, seed, vocab_size)
    stream = [token for sequence in packed for token in sequence][calibration_tokens:]
    return _chunks(stream, seq_len)


def evaluation_sequences(store_path, plan, tokenizer, vocab_size: int, seq_len: int = 128,
                         max_tokens: int = 2048) -> tuple[dict[str, list[list[int]]], list[str]]:
    """Evaluation text for each domain of a plan (see `heldout_text`)."""
    return heldout_text(store_path, plan.run_ids, tokenizer, vocab_size, seq_len, max_tokens, plan.seed + 1)


def heldout_text(store_path, run_ids: dict[str, str], tokenizer, vocab_size: int, seq_len: int = 128,
                 max_tokens: int = 2048, seed: int = 1) -> tuple[dict[str, list[list[int]]], list[str]]:
    """Per domain (-> run id), evaluation text its statistics did not see: a built-in domain's held-out
    split, else the part of the source its capture did not use, else (with a note) the calibration
    text itself. Returns (sequences, notes about domains that could not be used or were reused)."""
    import json

    from moe_viz import store
    from moe_viz.capture.sources import evaluation_source, read_documents

    runs = store.list_runs(store_path).set_index("run_id")
    sequences, notes = {}, []
    for domain, run_id in run_ids.items():
        if run_id not in runs.index:
            notes.append(f"{domain}: run {run_id} is no longer in the store")
            continue
        run = runs.loc[run_id]
        source = evaluation_source(run["source"])
        try:
            docs = read_documents(domain, source)
            if source != run["source"]:
                sequences[domain] = pack_sequences(docs, tokenizer, seq_len, max_tokens, seed, vocab_size)
                continue
            heldout = heldout_after_calibration(docs, tokenizer, json.loads(run["settings"]), int(run["tokens"]),
                                                seq_len, max_tokens, vocab_size)
            if heldout:
                sequences[domain] = heldout
                continue
            sequences[domain] = pack_sequences(docs, tokenizer, seq_len, max_tokens, seed, vocab_size)
            notes.append(f"{domain}: its capture used all of {source}; evaluated on its calibration text")
        except MoeVizError as exc:
            notes.append(f"{domain}: {exc}")
    return sequences, notes


def named_sequences(specs: list[str], tokenizer, vocab_size: int, seq_len: int = 128,
                    max_tokens: int = 2048) -> dict[str, list[list[int]]]:
    """`NAME=SOURCE` evaluation domains (capture source syntax), packed in document order."""
    out = {}
    for spec in specs:
        name, source = parse_domain(spec)
        if name in out:
            raise MoeVizError(f"evaluation domain {name!r} given twice")
        out[name] = pack_sequences(read_documents(name, source), tokenizer, seq_len, max_tokens, 0, vocab_size)
    return out
