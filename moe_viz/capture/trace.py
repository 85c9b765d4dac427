"""Token-level routing traces: every routed slot of the first N calibration tokens of a domain.

A `TokenTracer` rides along a capture (`collect_routing_stats(..., tracer=...)`). The
routing observer hands it, per MoE layer and forward pass, the top-k indices and the
gate weights the model really applied (what the experts module received). While the
domain's budget of N tokens lasts, the tracer keeps only the rows of those tokens
(an index copy on the layer's device); once the budget is spent it does nothing. Frames
are built once, at the end, so a capture pays no per-batch host copy or pandas work.

Identity of a traced token (docs/STORE.md): `seq` is the index of the calibration
sequence in capture order (as `pack_sequences` returned them), `pos` the position in
it. Tokens are traced in that order, sequences first then positions: the first N
non-padding tokens of the domain.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import torch

from moe_viz.errors import MoeVizError

DEFAULT_TRACE_TOKENS = 4096  # per domain; `moe-viz capture --trace-tokens N` (0 disables)
TRACE_FILES = ("token_routes", "run_tokens", "token_pieces")  # one frame each (store tables of the same names)


class TokenTracer:
    """Collects (seq, pos, token_id) and per-layer (top_k_index, top_k_weights) of the first `limit` tokens.

    `batch_starts`: the sequence index of each batch's first row, when the batches seen are not all
    of them in order (a data-parallel rank runs every world-th batch); default: consecutive batches.
    """

    def __init__(self, limit: int, batch_starts: list[int] | None = None):
        if limit < 0:
            raise MoeVizError(f"--trace-tokens {limit} must be 0 (no trace) or a positive number of tokens")
        self.limit = limit
        self.traced = 0  # tokens traced so far
        self._next_seq = 0  # sequence index of the next batch's first row
        self._batch_starts = list(batch_starts) if batch_starts is not None else None
        self._rows: torch.Tensor | None = None  # (n,) flat indices into the batch's B*L tokens, or None
        self._rows_on: dict[str, torch.Tensor] = {}
        self._batch_rows: list[torch.Tensor | None] = []  # every batch's rows, for `use_batch`
        self._tokens: list[np.ndarray] = []  # (n, 3) int64 blocks: seq, pos, token_id
        self._routes: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def begin_batch(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Before each forward: ids, mask (B, L) on the host, right-padded, sequences in capture order."""
        batch, width = ids.shape
        first_seq, self._next_seq = self._next_seq, self._next_seq + batch
        if self._batch_starts is not None:
            first_seq = self._batch_starts.pop(0)
        self._rows, self._rows_on = None, {}
        self._batch_rows.append(None)
        if self.traced >= self.limit:
            return
        rows = mask.reshape(-1).nonzero().squeeze(1)[: self.limit - self.traced]  # row-major: sequence by sequence
        if rows.numel() == 0:
            return
        self._rows = self._batch_rows[-1] = rows
        self.traced += rows.numel()
        self._tokens.append(np.stack([(first_seq + rows // width).numpy(), (rows % width).numpy(),
                                      ids.reshape(-1)[rows].numpy()], axis=1))

    def use_batch(self, number: int) -> None:
        """Layer-wise capture: every batch was begun first (in order); the next `add` calls belong to batch `number`.

        Run the batches in the same order within each layer: each layer's rows are kept in call order.
        """
        self._rows, self._rows_on = self._batch_rows[number], {}

    def routes_of(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What `add` kept for one MoE layer (to persist it for a layer-wise --resume)."""
        return [(index.cpu(), gate.cpu()) for index, gate in self._routes.get(layer, [])]

    def restore(self, layer: int, routes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put back what `routes_of` returned for a layer an earlier attempt ran."""
        if routes:
            self._routes[layer] = list(routes)

    def add(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """Called by the observer per MoE layer: top_k_index, top_k_weights (T, k) with T = B*L (padding included)."""
        if self._rows is None:
            return
        key = str(top_k_index.device)
        rows = self._rows_on.get(key)
        if rows is None:
            rows = self._rows_on[key] = self._rows.to(top_k_index.device, non_blocking=True)
        # advanced indexing copies: the model's buffers may be reused by the next batch
        self._routes.setdefault(layer, []).append((top_k_index[rows], top_k_weights[rows].float()))

    def frames(self, tokenizer=None) -> dict[str, pd.DataFrame]:
        """token_routes, run_tokens and token_pieces frames (columns as in docs/STORE.md, no run_id)."""
        if not self._tokens:
            return {name: frame for name, frame in zip(TRACE_FILES, empty_frames())}
        tokens = np.concatenate(self._tokens)
        seq, pos, token_id = (tokens[:, i] for i in range(3))
        run_tokens = pd.DataFrame({"seq": seq.astype(np.int32), "pos": pos.astype(np.int32),
                                   "token_id": token_id.astype(np.int32)})
        blocks = []
        for layer in sorted(self._routes):
            index = torch.cat([i for i, _ in self._routes[layer]]).cpu().numpy()
            gate = torch.cat([w for _, w in self._routes[layer]]).cpu().numpy()
            n, k = index.shape
            if n != len(tokens):
                raise RuntimeError(f"layer {layer} traced {n} tokens, the inputs {len(tokens)}")
            rank = gate_ranks(gate)
            blocks.append(pd.DataFrame({
                "seq": np.repeat(run_tokens.seq.to_numpy(), k), "pos": np.repeat(run_tokens.pos.to_numpy(), k),
                "token_id": np.repeat(run_tokens.token_id.to_numpy(), k), "layer": np.int16(layer),
                "slot": np.tile(np.arange(k, dtype=np.int16), n), "expert": index.reshape(-1).astype(np.int16),
                "gate": gate.reshape(-1).astype(np.float32), "gate_rank": rank.reshape(-1)}))
        routes = pd.concat(blocks, ignore_index=True) if blocks else empty_frames()[0]
        return {"token_routes": routes, "run_tokens": run_tokens,
                "token_pieces": token_pieces(tokenizer, np.unique(token_id))}


def gate_ranks(gate: np.ndarray) -> np.ndarray:
    """(n, k) rank of each slot's gate within its token: 0 for the largest (the top-1 expert), ties by slot."""
    order = np.argsort(-gate, axis=1, kind="stable")  # stable: equal gates keep slot order
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(gate.shape[1])[None, :].repeat(len(gate), 0), axis=1)
    return rank.astype(np.int16)


def empty_frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    routes = pd.DataFrame({"seq": np.zeros(0, np.int32), "pos": np.zeros(0, np.int32),
                           "token_id": np.zeros(0, np.int32), "layer": np.zeros(0, np.int16),
                           "slot": np.zeros(0, np.int16), "expert": np.zeros(0, np.int16),
                           "gate": np.zeros(0, np.float32), "gate_rank": np.zeros(0, np.int16)})
    tokens = routes[["seq", "pos", "token_id"]].copy()
    pieces = pd.DataFrame({"token_id": np.zeros(0, np.int32), "piece": pd.Series([], dtype=object)})
    return routes, tokens, pieces


def token_pieces(tokenizer, token_ids) -> pd.DataFrame:
    """The text of each token id on its own: `tokenizer.decode([id])`; `[id]` without a tokenizer.

    A byte-level piece that is part of a multi-byte character decodes to U+FFFD on its own.
    """
    ids = [int(i) for i in token_ids]
    if tokenizer is None:
        pieces = [f"[{i}]" for i in ids]
    else:
        pieces = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]
    return pd.DataFrame({"token_id": np.asarray(ids, dtype=np.int32), "piece": pieces})


# -- tracing pasted text (the dashboard's `trace` job) -----------------------------

def trace_text(model, tokenizer, text: str, max_tokens: int = 2048, seq_len: int = 512,
               batch_size: int = 8) -> dict[str, pd.DataFrame]:
    """Trace `text` (tokenised without special tokens, cut to max_tokens, in seq_len chunks) like a capture."""
    from moe_viz.capture.run import collect_routing_stats

    if max_tokens < 1 or seq_len < 1:
        raise MoeVizError("--max-tokens and --seq-len must be positive integers")
    if tokenizer is None:
        raise MoeVizError("the model has no tokenizer, so text cannot be traced: add tokenizer files to the model")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    if not ids:
        raise MoeVizError("the text has no tokens: paste some text")
    vocab = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= vocab:
        raise MoeVizError(f"the tokenizer produced id {max(ids)}, outside the model's vocabulary ({vocab}): "
                          "the tokenizer does not belong to this model")
    sequences = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    tracer = TokenTracer(len(ids))
    pad = getattr(tokenizer, "pad_token_id", None)
    collect_routing_stats(model, sequences, batch_size, 0 if pad is None else pad, tracer=tracer)
    return tracer.frames(tokenizer)


def save_trace(out_dir: str | Path, frames: dict[str, pd.DataFrame], meta: dict) -> Path:
    """Write frames as Parquet plus meta.json into `out_dir`, atomically (a temporary sibling renamed into place)."""
    from moe_viz.atomic import fsync_tree

    out = Path(out_dir)
    if out.exists():
        raise MoeVizError(f"{out} already exists: choose a new --out directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        with duckdb.connect() as mem:
            for name in TRACE_FILES:
                mem.register("frame", frames[name])
                target = str(tmp / f"{name}.parquet").replace("'", "''")
                mem.execute(f"COPY frame TO '{target}' (FORMAT parquet)")
                mem.unregister("frame")
        (tmp / "meta.json").write_text(json.dumps(meta))
        fsync_tree(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_trace(out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The frames `save_trace` wrote (plus `meta`: a one-row frame of its meta.json)."""
    out = Path(out_dir)
    try:
        with duckdb.connect() as mem:
            frames = {name: mem.execute("SELECT * FROM read_parquet(?)", [str(out / f"{name}.parquet")]).df()
                      for name in TRACE_FILES}
        frames["meta"] = pd.DataFrame([json.loads((out / "meta.json").read_text())])
    except (OSError, ValueError, duckdb.Error) as exc:
        raise MoeVizError(f"{out} is not a trace written by moe_viz ({str(exc).splitlines()[0]})") from exc
    return frames
