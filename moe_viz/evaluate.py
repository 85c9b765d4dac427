"""Held-out evaluation helpers shared by the demo and export verification."""

from __future__ import annotations

import torch
from torch import nn

from .capture import padded_batches
from .sources import token_stream


def heldout_sequences(texts: list[str], tokenizer, seq_len: int, max_tokens: int) -> list[list[int]]:
    """Deterministic evaluation sequences: documents in order, EOS-joined, cut to seq_len."""
    stream = token_stream(texts, tokenizer, max_tokens)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - 1, seq_len) if len(stream[i : i + seq_len]) > 1]


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
