"""The offline demo: deterministic built-in domains, the shipped model, real specialisation, `moe-viz demo`."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_viz import store
from moe_viz.demo import SHIPPED_MODEL, corpora
from moe_viz.demo.specialisation import measure
from moe_viz.capture.sources import read_documents

ROOT = Path(__file__).resolve().parent.parent


def _digest(domain, split):
    h = hashlib.sha256()
    for doc in corpora.documents(domain, split):
        h.update(doc.encode())
        h.update(b"\0")
    return h.hexdigest()


@pytest.mark.parametrize("domain", corpora.DOMAINS)
def test_builtin_domain_is_deterministic_and_heldout_is_disjoint(domain):
    first = {s: _digest(domain, s) for s in corpora.SPLITS}
    corpora._documents.cache_clear()
    assert {s: _digest(domain, s) for s in corpora.SPLITS} == first
    train, heldout = corpora.documents(domain, "train"), corpora.documents(domain, "heldout")
    assert train and heldout and not set(train) & set(heldout)
    size = sum(len(t.encode()) for t in train)
    assert 200_000 < size <= corpora.TRAIN_BYTES + 10_000  # "a few MB at most"


def test_builtin_sources_resolve_through_the_source_parser():
    docs = read_documents("m", "builtin:math:heldout")
    assert docs.texts == corpora.documents("math", "heldout")
    with pytest.raises(Exception, match="unknown built-in domain 'poetry'"):
        read_documents("p", "builtin:poetry")
    # no split: the calibration (train) split
    assert read_documents("m", "builtin:math").texts == corpora.documents("math", "train")


def test_evaluation_reads_the_heldout_split_of_a_builtin_domain_and_the_same_file_otherwise():
    from moe_viz.capture.sources import evaluation_source

    assert evaluation_source("builtin:math") == "builtin:math:heldout"
    assert evaluation_source("builtin:code:train") == "builtin:code:heldout"
    assert evaluation_source("/data/calib/code.jsonl") == "/data/calib/code.jsonl"
    assert evaluation_source("hf:org/set:cfg:train") == "hf:org/set:cfg:train"


def _documented():
    text = (ROOT / "docs" / "DEMO.md").read_text()
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    losses = {r[0]: float(r[1]) for r in rows}
    mi = re.search(r"\*\*([\d.]+) nats\*\*, against\s+\*\*([\d.]+) nats\*\*", text)
    return losses, (float(mi.group(1)), float(mi.group(2)))


def _documented_removal():
    """DEMO.md's removal table: domain -> (own increase, others' mean increase, ratio), and its "N of 5" sentence."""
    text = (ROOT / "docs" / "DEMO.md").read_text()
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    count = re.search(r"^(\d) of (\d) domains have an own-domain increase ≥ 3× the others' mean", text, re.M)
    return {r[0]: tuple(float(x) for x in r[2:]) for r in rows}, (int(count.group(1)), int(count.group(2)))


@pytest.fixture(scope="module")
def measured():
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL).eval()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    result = measure(model, tokenizer)
    print(result)
    return result


def test_shipped_model_heldout_losses_match_the_docs(measured):
    documented, _ = _documented()
    assert set(documented) == set(corpora.DOMAINS)
    for domain, loss in documented.items():
        assert measured["heldout_loss"][domain] == pytest.approx(loss, rel=0.01)


def test_experts_really_specialise(measured):
    """The documented removal table and mutual information, recomputed (same 1% tolerance as the losses)."""
    removal, (specialised, domains) = _documented_removal()
    assert set(removal) == set(measured["removal"]) == set(corpora.DOMAINS) and domains == len(corpora.DOMAINS)
    for domain, (own, others, ratio) in removal.items():
        got = measured["removal"][domain]
        assert got["own_increase"] == pytest.approx(own, rel=0.01), domain
        assert got["others_mean_increase"] == pytest.approx(others, rel=0.01), domain
        assert got["ratio"] == pytest.approx(got["own_increase"] / got["others_mean_increase"], abs=0.01), domain
        assert got["ratio"] == pytest.approx(ratio, rel=0.02), domain
    ratios = {d: r["ratio"] for d, r in measured["removal"].items()}
    assert measured["specialised_domains"] == sum(r >= 3 for r in ratios.values()) == specialised, ratios
    assert specialised >= 3  # the demo's requirement (DEMO.md)
    _, (mi, mi_reinit) = _documented()
    assert measured["mutual_information"] == pytest.approx(mi, rel=0.01)
    assert measured["mutual_information_reinit_router"] == pytest.approx(mi_reinit, rel=0.01)


def test_shipped_model_is_small_and_loads_plainly():
    size = sum(p.stat().st_size for p in SHIPPED_MODEL.iterdir())
    assert size < 25 * 2**20
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"


def test_demo_command_populates_a_fresh_store(tmp_path):
    db = tmp_path / "demo.duckdb"
    result = subprocess.run([sys.executable, "-m", "moe_viz", "--threads", "1", "demo", "--no-ui", "--store", str(db)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    runs = store.list_runs(db)
    assert sorted(runs.domain) == sorted(corpora.DOMAINS) and (runs.status == "complete").all()
    assert (runs.tokens == 20_000).all()
    again = subprocess.run([sys.executable, "-m", "moe_viz", "demo", "--no-ui", "--store", str(db)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already complete" in again.stdout
