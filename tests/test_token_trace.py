"""The token-level trace a capture stores equals an independent trace taken with plain hooks.

The reference pads the same batches itself, registers a forward pre-hook on every
`*.experts` module it finds by name (its positional args are hidden, top_k_index,
top_k_weights), reads the decoder layer index from the module path, drops padding with
its own mask and keeps the first N real tokens. It shares no code with moe_viz's capture.
"""

import re

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from moe_viz import store
from moe_viz.capture.run import CaptureSettings, capture_model
from moe_viz.capture.sources import Documents
from moe_viz.capture.trace import load_trace, save_trace, trace_text
from moe_viz.cli import main
from moe_viz.errors import MoeVizError
from tiny_models import VOCAB, tiny_model, tiny_tokenizer

LENGTHS = (12, 5, 9, 12, 3, 7)  # unequal: batches of 4 are padded; the limit cuts sequence 3 in the middle
LIMIT = 30  # 12 + 5 + 9 = 26 whole sequences, then 4 tokens of the fourth


def _sequences(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def reference_trace(model, sequences, batch_size, limit, pad_id=0):
    """Rows (seq, pos, token_id, layer, slot, expert, gate) from plain pre-hooks, first `limit` real tokens."""
    seen = []
    handles = []
    for name, module in model.named_modules():
        if name.endswith(".experts"):
            layer = int(re.findall(r"layers\.(\d+)\.", name)[-1])
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, layer=layer: seen.append((layer, args[1].clone(), args[2].clone()))))
    rows = []
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start : start + batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in chunk])
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
                seen.clear()
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                for layer, index, weights in seen:
                    for b, s in enumerate(chunk):
                        for p in range(len(s)):
                            rows.append((start + b, p, s[p], layer, index[b * width + p].tolist(),
                                         weights[b * width + p].float().tolist()))
    finally:
        for h in handles:
            h.remove()
    order = sorted({(r[0], r[1]) for r in rows})[:limit]
    keep = set(order)
    out = [(seq, pos, tok, layer, slot, e, g) for seq, pos, tok, layer, experts, gates in rows if (seq, pos) in keep
           for slot, (e, g) in enumerate(zip(experts, gates))]
    return pd.DataFrame(out, columns=["seq", "pos", "token_id", "layer", "slot", "expert", "gate"]), order


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_token_routes_equal_plain_hooks(tmp_path, family):
    model = tiny_model(family)
    sequences = _sequences()
    db = tmp_path / "store.duckdb"
    docs = Documents(domain="d", source="inline", token_ids=sequences)
    settings = CaptureSettings(max_tokens=1000, seq_len=64, batch_size=4, trace_tokens=LIMIT)
    [run_id] = capture_model(model, None, "tiny", [docs], settings, store_path=db)
    expected, order = reference_trace(model, sequences, 4, LIMIT)
    with duckdb.connect(str(db), read_only=True) as con:
        got = con.execute("""SELECT seq, pos, token_id, layer, slot, expert, gate, gate_rank FROM token_routes WHERE run_id = ?
                             ORDER BY layer, seq, pos, slot""", [run_id]).df()
        tokens = con.execute("SELECT seq, pos, token_id FROM run_tokens WHERE run_id = ? ORDER BY seq, pos",
                             [run_id]).df()
        pieces = con.execute("SELECT token_id, piece FROM token_pieces WHERE run_id = ? ORDER BY 1", [run_id]).df()
    expected = expected.sort_values(["layer", "seq", "pos", "slot"]).reset_index(drop=True)
    # rank of the gate within its token's k slots, 0 = largest, equal gates in slot order
    expected["gate_rank"] = expected.assign(neg=-expected.gate).sort_values(["neg", "slot"]).groupby(
        ["layer", "seq", "pos"]).cumcount()
    assert len(order) == LIMIT and order[-1] == (3, 3)
    if family == "deepseek_v3":
        assert sorted(got.layer.unique()) == [1, 2]  # decoder index: layer 0 is dense
        assert (got.gate_rank != got.slot).any()  # selection by biased scores: slot order is not gate order
    for column in ["seq", "pos", "token_id", "layer", "slot", "expert", "gate_rank"]:
        np.testing.assert_array_equal(got[column].to_numpy(), expected[column].to_numpy(), err_msg=column)
    np.testing.assert_array_equal(got.gate.to_numpy(np.float32), expected.gate.to_numpy(np.float32))
    assert tokens.values.tolist() == [[s, p, sequences[s][p]] for s, p in order]
    assert pieces.token_id.tolist() == sorted({sequences[s][p] for s, p in order})
    assert pieces.piece.tolist() == [f"[{i}]" for i in pieces.token_id]  # no tokenizer: the id in brackets


def _capture_text(db, trace_tokens, text="def f(x):\n    return x + 1\n" * 20):
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    docs = Documents(domain="code", source="inline", texts=[text])
    settings = CaptureSettings(max_tokens=300, seq_len=32, batch_size=4, trace_tokens=trace_tokens)
    return model, tokenizer, capture_model(model, tokenizer, "tiny", [docs], settings, store_path=db)[0]


def _count(db, table, run_id):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", [run_id]).fetchone()[0]


def test_trace_lifecycle_follows_the_run(tmp_path):
    db = tmp_path / "store.duckdb"
    model, tokenizer, run_id = _capture_text(db, 100)
    assert _count(db, "run_tokens", run_id) == 100
    assert _count(db, "token_routes", run_id) == 100 * 2 * 2  # 2 MoE layers, top-2
    with duckdb.connect(str(db), read_only=True) as con:
        pieces = dict(con.execute("SELECT token_id, piece FROM token_pieces WHERE run_id = ?", [run_id]).fetchall())
    assert pieces and all(pieces[i] == tokenizer.decode([i]) for i in pieces)
    # a re-capture with the same settings replaces the run, its trace included
    _, _, again = _capture_text(db, 50)
    assert _count(db, "run_tokens", run_id) == 0 and _count(db, "token_routes", run_id) == 0
    assert _count(db, "run_tokens", again) == 50
    store.delete_runs(db, [again])
    for table in store.TRACE_TABLES:
        assert _count(db, table, again) == 0
    _, _, none = _capture_text(db, 0, text="x = 1\n" * 30)
    assert _count(db, "run_tokens", none) == 0 and store.list_runs(db).status.tolist() == ["complete"]


def test_a_saved_run_imports_with_its_trace(tmp_path, monkeypatch):
    db = tmp_path / "store.duckdb"
    original = store._commit_run

    def locked(*args, **kwargs):
        raise store.StoreLockedError("locked for the test")

    monkeypatch.setattr(store, "_commit_run", locked)
    with pytest.raises(store.RunSavedToFile) as info:
        _capture_text(db, 40)
    monkeypatch.setattr(store, "_commit_run", original)
    run_id = store.import_run_file(info.value.saved, db)
    assert _count(db, "run_tokens", run_id) == 40 and _count(db, "token_routes", run_id) == 160
    assert _count(db, "token_pieces", run_id) > 0


def test_negative_trace_tokens_is_a_one_line_error(tmp_path, capsys):
    assert main(["capture", "--model", "x", "--domain", "a=b.txt", "--trace-tokens", "-1",
                 "--store", str(tmp_path / "s.duckdb")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--trace-tokens -1" in err


def test_trace_text_round_trip(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    text = "class Point:\n    x: int\n" * 5
    frames = trace_text(model, tokenizer, text, max_tokens=40, seq_len=16)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:40]
    assert frames["run_tokens"].token_id.tolist() == ids
    assert frames["run_tokens"].seq.tolist() == [i // 16 for i in range(len(ids))]
    assert len(frames["token_routes"]) == len(ids) * 2 * 2
    out = save_trace(tmp_path / "t", frames, {"model": "tiny"})
    back = load_trace(out)
    pd.testing.assert_frame_equal(back["token_routes"], frames["token_routes"], check_dtype=False)
    with pytest.raises(MoeVizError, match="already exists"):
        save_trace(out, frames, {})
    with pytest.raises(MoeVizError, match="no tokens"):
        trace_text(model, tokenizer, "")


def test_token_routes_of_later_batches_equal_plain_hooks(tmp_path):
    # Batches of 2: (12, 5), (9, 12), (3, 7); a budget of 40 = 17 + 21 + 2 ends inside the third batch, so the
    # seq of every batch after the first is checked, and the cut falls in a later batch.
    model = tiny_model("mixtral")
    sequences = _sequences()
    db = tmp_path / "store.duckdb"
    docs = Documents(domain="d", source="inline", token_ids=sequences)
    settings = CaptureSettings(max_tokens=1000, seq_len=64, batch_size=2, trace_tokens=40)
    [run_id] = capture_model(model, None, "tiny", [docs], settings, store_path=db)
    expected, order = reference_trace(model, sequences, 2, 40)
    with duckdb.connect(str(db), read_only=True) as con:
        got = con.execute("""SELECT seq, pos, token_id, layer, slot, expert, gate FROM token_routes WHERE run_id = ?
                             ORDER BY layer, seq, pos, slot""", [run_id]).df()
        tokens = con.execute("SELECT seq, pos, token_id FROM run_tokens WHERE run_id = ? ORDER BY seq, pos",
                             [run_id]).df()
    expected = expected.sort_values(["layer", "seq", "pos", "slot"]).reset_index(drop=True)
    assert order[-1] == (4, 1) and len(order) == 40
    assert tokens.values.tolist() == [[s, p, sequences[s][p]] for s, p in order]
    for column in ["seq", "pos", "token_id", "layer", "slot", "expert"]:
        np.testing.assert_array_equal(got[column].to_numpy(), expected[column].to_numpy(), err_msg=column)
    np.testing.assert_array_equal(got.gate.to_numpy(np.float32), expected.gate.to_numpy(np.float32))


def test_trace_text_numbers_the_sequences_of_every_batch():
    # 45 tokens in chunks of 8, batches of 2: (8, 8), (8, 8), (8, 5). Pasted text has no batch starts of its
    # own, so every batch after the first must continue the sequence numbering.
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    text = "class Point:\n    x: int\n" * 10
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:45]
    assert len(ids) == 45
    frames = trace_text(model, tokenizer, text, max_tokens=45, seq_len=8, batch_size=2)
    tokens = frames["run_tokens"]
    assert tokens.seq.tolist() == [i // 8 for i in range(45)]
    assert tokens.pos.tolist() == [i % 8 for i in range(45)]
    assert tokens.token_id.tolist() == ids
    routes = frames["token_routes"].sort_values(["layer", "seq", "pos", "slot"])
    for layer in (0, 1):
        here = routes[routes.layer == layer]
        assert here[["seq", "pos", "token_id"]].values.tolist() == [[i // 8, i % 8, ids[i]] for i in range(45) for _ in range(2)]
