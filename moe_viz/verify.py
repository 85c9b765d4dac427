"""Verify a pruned export against its source model.

1. The export loads with `AutoModelForCausalLM.from_pretrained` with no
   missing, unexpected or mismatched keys and no load warnings.
2. Its logits equal the *original* model's with the dropped experts masked
   (router logits and correction biases -inf): max |delta| is reported and is
   exactly 0 in fp32.
3. Quality vs the unpruned original, per domain: perplexity, mean next-token
   KL(original || pruned), top-1 agreement, and a greedy generation check
   (distinct-2 diversity, first step where the continuation diverges).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch.nn import functional as F

from .capture import padded_batches
from .export import PRUNE_MANIFEST
from .masking import masked_experts
from .models import MoeVizError
from .plan import PrunePlan

VERIFY_FILE = "moe_viz_verify.json"
PROMPT_TOKENS = 16
NEW_TOKENS = 24


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage().splitlines()[0])


def load_checked(path: Path, dtype: torch.dtype):
    """Load a checkpoint; return (model, problems) where problems lists load issues."""
    from transformers import AutoModelForCausalLM

    handler = _Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, output_loading_info=True
        )
    finally:
        logger.removeHandler(handler)
    problems = [f"{kind}: {sorted(keys)[:5]}" for kind, keys in info.items() if keys and kind != "error_msgs"]
    problems += [m for m in info.get("error_msgs", [])]
    problems += [m for m in handler.messages if "weight" in m.lower() or "key" in m.lower()]
    return model.eval(), problems


def _distinct2(tokens: list[int]) -> float:
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 0.0


@torch.no_grad()
def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    for _ in range(steps):  # plain loop: no generation config can change the decoding
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@torch.no_grad()
def compare_on(original, pruned, dropped: dict[int, list[int]], sequences: list[list[int]]) -> dict:
    """All metrics for one domain's evaluation sequences."""
    ids, mask = next(padded_batches(sequences, len(sequences)))
    orig = original(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    with masked_experts(original, dropped):
        reference = original(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    new = pruned(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    valid = mask.bool()
    max_delta = (new - reference).abs()[valid].max().item()

    pred_valid = valid[:, 1:] & valid[:, :-1]
    targets = ids[:, 1:][pred_valid]
    log_o = F.log_softmax(orig[:, :-1][pred_valid], dim=-1)
    log_p = F.log_softmax(new[:, :-1][pred_valid], dim=-1)
    nll_o = F.nll_loss(log_o, targets).item()
    nll_p = F.nll_loss(log_p, targets).item()
    kl = (log_o.exp() * (log_o - log_p)).sum(-1).mean().item()
    agree = (log_o.argmax(-1) == log_p.argmax(-1)).float().mean().item()

    generations = []
    for seq in sequences[:2]:
        prompt = seq[:PROMPT_TOKENS]
        a, b = _greedy(original, prompt, NEW_TOKENS), _greedy(pruned, prompt, NEW_TOKENS)
        diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        generations.append({"first_divergence": diverge, "distinct2_original": _distinct2(a), "distinct2_pruned": _distinct2(b)})
    return {
        "tokens": int(valid.sum()),
        "max_abs_logit_delta_vs_masked": max_delta,
        "ppl_original": math.exp(nll_o),
        "ppl_pruned": math.exp(nll_p),
        "kl_mean": kl,
        "top1_agreement": agree,
        "generation": generations,
    }


def verify_export(export_dir: str | Path, eval_sequences: dict[str, list[list[int]]],
                  source_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Run every check, save `moe_viz_verify.json` in the export and return the results."""
    export_dir = Path(export_dir)
    manifest_path = export_dir / PRUNE_MANIFEST
    if not manifest_path.exists():
        raise MoeVizError(f"{export_dir} has no {PRUNE_MANIFEST}: it is not a moe_viz export")
    manifest = json.loads(manifest_path.read_text())
    plan = PrunePlan.from_json(json.dumps(manifest["plan"]))
    source_dir = Path(source_dir or manifest["source_model"])
    if not eval_sequences:
        raise MoeVizError("no evaluation text to verify on")
    pruned, problems = load_checked(export_dir, dtype)
    original, _ = load_checked(source_dir, dtype)
    domains = {name: compare_on(original, pruned, plan.dropped, seqs) for name, seqs in eval_sequences.items()}
    max_delta = max(d["max_abs_logit_delta_vs_masked"] for d in domains.values())
    result = {
        "export": str(export_dir),
        "source_model": str(source_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "load_problems": problems,
        "max_abs_logit_delta_vs_masked": max_delta,
        "exact": max_delta == 0.0,
        "passed": not problems and (max_delta == 0.0 or dtype != torch.float32),
        "domains": domains,
    }
    (export_dir / VERIFY_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_report(result: dict) -> str:
    lines = [
        f"load: {'ok' if not result['load_problems'] else '; '.join(result['load_problems'])}",
        f"max |logit delta| vs masked original: {result['max_abs_logit_delta_vs_masked']:.3g} "
        f"({'exact' if result['exact'] else 'NOT exact'}, {result['dtype']})",
        f"{'domain':<14}{'tokens':>8}{'ppl orig':>10}{'ppl pruned':>12}{'KL':>9}{'top1 agree':>12}{'diverges at':>13}",
    ]
    for name, d in result["domains"].items():
        steps = [g["first_divergence"] for g in d["generation"]]
        diverge = ",".join("-" if s is None else str(s) for s in steps)
        lines.append(
            f"{name:<14}{d['tokens']:>8}{d['ppl_original']:>10.3f}{d['ppl_pruned']:>12.3f}{d['kl_mean']:>9.4f}"
            f"{d['top1_agreement']:>12.3f}{diverge:>13}"
        )
    return "\n".join(lines)


def evaluation_sequences(store_path, plan: PrunePlan, tokenizer, seq_len: int = 128, max_tokens: int = 2048,
                         ) -> tuple[dict[str, list[list[int]]], list[str]]:
    """Per plan domain: held-out sequences from the domain's source (its calibration text if it has no
    held-out split). Returns (sequences, notes about domains that could not be used)."""
    from . import store
    from .sources import evaluation_source, pack_sequences, read_documents

    runs = store.list_runs(store_path).set_index("run_id")
    sequences, notes = {}, []
    for domain, run_id in plan.run_ids.items():
        if run_id not in runs.index:
            notes.append(f"{domain}: run {run_id} is no longer in the store")
            continue
        source = evaluation_source(runs.loc[run_id, "source"])
        try:
            docs = read_documents(domain, source)
            vocab = len(tokenizer) if tokenizer is not None else 1 << 62
            sequences[domain] = pack_sequences(docs, tokenizer, seq_len, max_tokens, plan.seed + 1, vocab)
        except MoeVizError as exc:
            notes.append(f"{domain}: {exc}")
            continue
        if source == runs.loc[run_id, "source"]:
            notes.append(f"{domain}: no held-out split; evaluated on its calibration text")
    return sequences, notes


def verify_from_store(export_dir: str | Path, store_path, source_dir: str | Path | None = None) -> tuple[dict, list[str]]:
    """Verify an export on evaluation text of its plan's domains (found through the store).

    Returns (result, notes): notes say which domains had no held-out split or could not be used.
    """
    from transformers import AutoTokenizer

    manifest_path = Path(export_dir) / PRUNE_MANIFEST
    if not manifest_path.exists():
        raise MoeVizError(f"{export_dir} has no {PRUNE_MANIFEST}: it is not a moe_viz export")
    plan = PrunePlan.from_json(json.dumps(json.loads(manifest_path.read_text())["plan"]))
    try:
        tokenizer = AutoTokenizer.from_pretrained(export_dir)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    sequences, notes = evaluation_sequences(store_path, plan, tokenizer)
    return verify_export(export_dir, sequences, source_dir=source_dir), notes
