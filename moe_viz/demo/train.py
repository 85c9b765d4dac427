"""Train the offline demo MoE: `moe-viz demo train`.

A byte-level BPE tokenizer and a small Qwen3-MoE (4 layers, hidden 128,
8 experts top-2, ~4.5M parameters) trained on CPU on an equal mix of the
built-in domains. Seeded; with 1 torch thread the run is reproducible.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from moe_viz.capture.sources import token_stream
from moe_viz.demo import corpora

SHIPPED_MODEL = Path(__file__).parent / "model"
SEQ_LEN = 256
EVAL_TOKENS = 20_000


def model_config(vocab_size: int, pad_id: int, eos_id: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=512, moe_intermediate_size=256,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.1,
        max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id,
        bos_token_id=None,
    )


def byte_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers (EOS and PAD specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", model_max_length=1024
    )


def train_tokenizer(vocab_size: int = 4096):
    texts = []
    for domain in corpora.DOMAINS:
        texts.extend(corpora.documents(domain, "train"))
    return byte_bpe_tokenizer(texts, vocab_size)


def heldout_losses(model, tokenizer) -> dict[str, float]:
    from moe_viz.prune.evaluate import heldout_sequences, mean_loss

    model.eval()
    return {
        d: round(mean_loss(model, heldout_sequences(corpora.documents(d, "heldout"), tokenizer, SEQ_LEN, EVAL_TOKENS)), 4)
        for d in corpora.DOMAINS
    }


def train(out: Path = SHIPPED_MODEL, steps: int = 700, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
          log=print) -> dict:
    """Train and save the demo model to `out`; returns a summary (also saved as training.json)."""
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = train_tokenizer()
    streams = {d: torch.tensor(token_stream(corpora.documents(d, "train"), tokenizer)) for d in corpora.DOMAINS}
    log(f"tokenizer {len(tokenizer)} tokens; train tokens " + ", ".join(f"{d}={len(s)}" for d, s in streams.items()))
    config = model_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))),
    )
    domains = list(corpora.DOMAINS)
    model.train()
    history = []
    for step in range(steps):
        rows = []
        for i in range(batch_size):
            stream = streams[domains[i % len(domains)]]
            start = rng.randrange(0, len(stream) - SEQ_LEN - 1)
            rows.append(stream[start : start + SEQ_LEN])
        batch = torch.stack(rows)
        out_ = model(input_ids=batch, labels=batch, output_router_logits=True)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(out_.loss.item(), 4)})
            log(f"step {step:4d}/{steps} loss {out_.loss.item():.3f} ({time.monotonic() - started:.0f}s)")
    model.eval()
    losses = heldout_losses(model, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "parameters": params, "steps": steps, "batch_size": batch_size, "seq_len": SEQ_LEN, "lr": lr, "seed": seed,
        "train_seconds": round(time.monotonic() - started, 1), "torch_threads": torch.get_num_threads(),
        "heldout_loss": losses, "history": history,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"saved {out}: held-out loss {losses}")
    return summary
