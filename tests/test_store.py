import subprocess
import sys
import textwrap
import time

import duckdb
import pandas as pd
import pytest

from moe_viz import store
from moe_viz.capture import CaptureSettings, capture_model
from moe_viz.models import MoeVizError
from moe_viz.sources import Documents
from tiny_models import tiny_model, tiny_tokenizer

SETTINGS = CaptureSettings(max_tokens=400, seq_len=32, batch_size=4)
TEXT = "def f(x):\n    return x + 1\n" * 40


def _capture(model, tokenizer, path, domain="code", progress=None):
    docs = Documents(domain=domain, source="inline", texts=[TEXT])
    return capture_model(model, tokenizer, "tiny", [docs], SETTINGS, store_path=path, progress=progress)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = tiny_tokenizer()
    return tiny_model("qwen3_moe", vocab_size=len(tokenizer)), tokenizer


def test_schema_round_trip(store_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    [run_id] = _capture(model, tokenizer, store_path)
    runs = store.list_runs(store_path)
    assert runs.status.tolist() == ["complete"] and runs.run_id[0] == run_id
    assert runs.tokens[0] == 400 and runs.sequences[0] == 13

    stored = store.expert_stats(store_path, [run_id])
    assert len(stored) == 2 * 8
    assert stored[["layer", "expert"]].equals(stored.sort_values(["layer", "expert"])[["layer", "expert"]].reset_index(drop=True))
    assert stored.routed_tokens.sum() == 2 * 2 * 400  # layers * top_k * tokens
    layers = store.layer_stats(store_path, [run_id])
    assert layers.tokens.tolist() == [400, 400] and layers.top_k.tolist() == [2, 2]
    pairs = store.coactivation(store_path, run_id, 0)
    assert (pairs.expert_a < pairs.expert_b).all() and pairs.tokens.sum() == 400  # one pair per token at k=2
    with duckdb.connect(str(store_path), read_only=True) as con:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == store.SCHEMA_VERSION


def test_reopening_does_not_migrate_twice(store_path):
    with store.connect(store_path):
        pass
    with store.connect(store_path):
        pass
    with duckdb.connect(str(store_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == store.SCHEMA_VERSION


def test_failed_run_leaves_no_complete_rows(store_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    [good] = _capture(model, tokenizer, store_path, domain="prose")

    def explode(progress):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        _capture(model, tokenizer, store_path, domain="code", progress=explode)
    runs = store.list_runs(store_path).set_index("domain")
    assert runs.loc["code", "status"] == "failed" and "disk on fire" in runs.loc["code", "error"]
    assert runs.loc["prose", "status"] == "complete"
    failed_id = runs.loc["code", "run_id"]
    assert store.expert_stats(store_path, [failed_id]).empty
    assert len(store.expert_stats(store_path, [good])) == 16


def test_recapture_replaces_the_old_run(store_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    [first] = _capture(model, tokenizer, store_path)
    before = store.expert_stats(store_path, [first])
    [second] = _capture(model, tokenizer, store_path)
    runs = store.list_runs(store_path)
    assert runs.run_id.tolist() == [second]
    after = store.expert_stats(store_path, [second])
    pd.testing.assert_frame_equal(before.drop(columns="run_id"), after.drop(columns="run_id"))
    with duckdb.connect(str(store_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM expert_stats WHERE run_id = ?", [first]).fetchone()[0] == 0


def test_different_settings_are_kept_side_by_side(store_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    _capture(model, tokenizer, store_path)
    docs = Documents(domain="code", source="inline", texts=[TEXT])
    capture_model(model, tokenizer, "tiny", [docs], CaptureSettings(max_tokens=200, seq_len=32), store_path=store_path)
    assert len(store.list_runs(store_path, status="complete")) == 2


def test_corrupted_store_gets_one_line_error(tmp_path):
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(MoeVizError) as info:
        store.list_runs(bad)
    assert "\n" not in str(info.value) and "bad.duckdb" in str(info.value)


def test_missing_store_read_is_a_clear_error(tmp_path):
    with pytest.raises(MoeVizError, match="moe-viz demo"):
        store.list_runs(tmp_path / "nothing.duckdb")


def test_reader_in_another_process_works_while_a_capture_runs(store_path, model_and_tokenizer):
    """A separate process polls the store during a capture and must see the run as `running`."""
    model, tokenizer = model_and_tokenizer
    reader = textwrap.dedent(
        f"""
        import time
        from moe_viz import store
        deadline = time.time() + 120
        seen = set()
        while time.time() < deadline:
            try:
                statuses = store.list_runs({str(store_path)!r}).status.tolist()
            except store.MoeVizError as exc:
                if "no store" in str(exc):
                    time.sleep(0.05); continue
                raise
            seen.update(statuses)
            if "complete" in statuses:
                break
            time.sleep(0.02)
        print(sorted(seen))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)  # let the reader import and start polling before the capture begins
    docs = Documents(domain="code", source="inline", texts=[TEXT * 20])
    slow = CaptureSettings(max_tokens=6000, seq_len=16, batch_size=1)
    capture_model(model, tokenizer, "tiny", [docs], slow, store_path=store_path, progress=lambda p: time.sleep(0.002))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "running" in out and "complete" in out


def test_runs_of_two_models_with_the_same_domain_read_back_together(store_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    docs = Documents(domain="code", source="inline", texts=[TEXT])
    a = capture_model(model, tokenizer, "model-a", [docs], SETTINGS, store_path=store_path)[0]
    b = capture_model(model, tokenizer, "model-b", [docs], SETTINGS, store_path=store_path)[0]
    both = store.expert_stats(store_path, [a, b])
    assert both.domain.astype(str).unique().tolist() == ["code"]
    assert both.run_id.astype(str).value_counts().to_dict() == {a: 16, b: 16}
    assert store.expert_stats(store_path, [b]).run_id.astype(str).unique().tolist() == [b]
