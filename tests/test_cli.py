"""`moe-viz capture` end to end, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import duckdb
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from moe_viz.cli import main
from tiny_models import SAMPLE_TEXT, save_tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_moe"))


@pytest.fixture
def domains(tmp_path):
    text = tmp_path / "code.txt"
    text.write_text(SAMPLE_TEXT * 30)
    jsonl = tmp_path / "math.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"{a} + {a} = {2 * a}"}) for a in range(50)) + "\n")
    return text, jsonl


def test_capture_end_to_end(model_dir, domains, tmp_path):
    text, jsonl = domains
    db = tmp_path / "out.duckdb"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "moe_viz", "capture", "--model", str(model_dir),
         "--domain", f"code={text}", "--domain", f"math={jsonl}",
         "--max-tokens", "1500", "--seq-len", "64", "--batch-size", "4", "--store", str(db)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "stored 2 run(s)" in result.stdout
    assert "tok/s" in result.stderr  # the progress bar shows throughput
    with duckdb.connect(str(db), read_only=True) as con:
        runs = dict(con.execute("SELECT domain, tokens FROM runs WHERE status = 'complete'").fetchall())
        assert runs["code"] == 1500 and 0 < runs["math"] < 1500
        per_layer = con.execute(
            """SELECT r.domain, s.layer, sum(s.routed_tokens) FROM expert_stats s JOIN runs r USING (run_id)
               GROUP BY ALL ORDER BY ALL"""
        ).fetchall()
    # every token is routed to exactly top_k = 2 experts in each of the 2 layers
    assert [row[2] for row in per_layer if row[0] == "code"] == [3000, 3000]


def test_pretokenised_jsonl_is_used_exactly(model_dir, tmp_path):
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"input_ids": [5, 6, 7, 8, 9]}\n{"input_ids": [10, 11, 12]}\n')
    db = tmp_path / "ids.duckdb"
    assert main(["capture", "--model", str(model_dir), "--domain", f"ids={ids}", "--store", str(db), "--seq-len", "4"]) == 0
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT tokens, sequences FROM runs").fetchone() == (7, 2)  # 4 (truncated) + 3


def test_pretokenised_sequences_are_cut_at_the_token_budget_and_the_vocabulary_is_checked():
    from moe_viz.capture.sources import Documents, pack_sequences
    from moe_viz.errors import MoeVizError

    docs = Documents("ids", "inline", token_ids=[[1, 2, 3], [4, 5, 6], [7, 8]])
    # the budget (5) ends inside the second line: it is cut there, the third line is not used
    assert pack_sequences(docs, None, seq_len=64, max_tokens=5, seed=0, vocab_size=9) == [[1, 2, 3], [4, 5]]
    assert pack_sequences(docs, None, seq_len=2, max_tokens=100, seed=0, vocab_size=9) == [[1, 2], [4, 5], [7, 8]]
    # the largest id the model has (vocab_size - 1 = 8) is fine; one more is outside its vocabulary
    with pytest.raises(MoeVizError, match=r"token id 8 is outside the model's vocabulary \(8\)"):
        pack_sequences(docs, None, seq_len=64, max_tokens=100, seed=0, vocab_size=8)


def test_text_documents_are_shuffled_by_the_seed_and_each_ends_with_eos():
    """The packed stream is the documents in `random.Random(seed)` order, each tokenised and followed by EOS,
    cut at max_tokens and chunked into seq_len pieces (docs: capture.sources.pack_sequences)."""
    import random

    from moe_viz.capture.sources import Documents, pack_sequences

    tokenizer = tiny_tokenizer()
    texts = [f"{word} " * (i + 2) for i, word in enumerate(["add", "class", "fox", "solve", "return", "lazy"])]
    docs = Documents("code", "inline", texts=texts)
    eos = tokenizer.eos_token_id
    assert eos is not None
    orders = {}
    for seed in (0, 1):
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        orders[seed] = order
        stream = []
        for i in order:
            stream += tokenizer(texts[i], add_special_tokens=False)["input_ids"] + [eos]
        assert len(stream) > 40
        expected = [stream[:40][i:i + 7] for i in range(0, 40, 7)]  # 5 of 7 tokens and one of 5
        packed = pack_sequences(docs, tokenizer, seq_len=7, max_tokens=40, seed=seed, vocab_size=len(tokenizer))
        assert packed == expected, seed
    assert orders[0] != orders[1] and orders[0] != list(range(len(texts)))  # the inputs tell the variants apart


@pytest.fixture(scope="module")
def dense_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _bad_input_cases(tmp_path, model_dir, dense_model_dir, text):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "oops"\n')
    return {
        "missing model": (["--model", str(tmp_path / "nope"), "--domain", f"d={text}"], "does not exist"),
        "missing domain file": (["--model", str(model_dir), "--domain", f"d={tmp_path / 'none.txt'}"], "does not exist"),
        "dense model": (["--model", str(dense_model_dir), "--domain", f"d={text}"], "no MoE layers"),
        "empty domain": (["--model", str(model_dir), "--domain", f"d={empty}"], "has no text"),
        "malformed jsonl": (["--model", str(model_dir), "--domain", f"d={broken}"], "line 2 is not valid JSON"),
        "unknown hf dataset": (["--model", str(model_dir), "--domain", "d=hf:nobody/no-such-dataset"], "cannot load hf:"),
        "bad domain syntax": (["--model", str(model_dir), "--domain", "justaname"], "NAME=SOURCE"),
        "bad seq len": (["--model", str(model_dir), "--domain", f"d={text}", "--seq-len", "0"], "--seq-len"),
    }


@pytest.mark.parametrize("case", ["missing model", "missing domain file", "dense model", "empty domain",
                                  "malformed jsonl", "unknown hf dataset", "bad domain syntax", "bad seq len"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, model_dir, dense_model_dir, domains, capsys):
    text, _ = domains
    argv, expected = _bad_input_cases(tmp_path, model_dir, dense_model_dir, text)[case]
    db = tmp_path / "never.duckdb"
    code = main(["capture", *argv, "--store", str(db)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    error_lines = [line for line in err if line.startswith("moe-viz: error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], err
    assert not any("Traceback" in line for line in err)
    assert not db.exists()
