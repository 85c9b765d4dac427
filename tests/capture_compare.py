"""Compare what two captures stored: counts exactly, float sums within a stated bound (see test_layerwise)."""

import json

import numpy as np
import pytest
import torch

from moe_viz import store
from moe_viz.capture.run import CaptureSettings, capture_model
from moe_viz.capture.sources import read_documents
from moe_viz.models.loading import canonical_model_id, load_model
from tiny_models import VOCAB, tiny_model

COUNTS = ["routed_tokens", "top1_tokens"]
SUMS = ["top1_prob_sum", "gate_sum", "prob_sum", "ean_sum", "ean_sq_sum", "ean_max", "reap_sum", "contribution_sum"]
SETTINGS = CaptureSettings(max_tokens=10_000, seq_len=16, batch_size=2)


def save_model(path, family, **overrides):
    tiny_model(family, **overrides).save_pretrained(path)
    return str(path)


def write_domain(path, seed, lengths):
    """Pre-tokenised sequences of unequal lengths (so batches carry padding)."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as handle:
        for n in lengths:
            handle.write(json.dumps({"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()}) + "\n")
    return path


@pytest.fixture
def domains(tmp_path):
    """Two pre-tokenised domains: 5 and 3 sequences of unequal lengths (3 and 2 batches of 2)."""
    return [f"code={write_domain(tmp_path / 'a.jsonl', 1, (16, 11, 16, 5, 9))}",
            f"prose={write_domain(tmp_path / 'b.jsonl', 2, (7, 16, 13))}"]


def reference(model_dir, domains, store_path):
    """The in-memory capture of the same model and tokens."""
    model, _ = load_model(model_dir, device="cpu")
    docs = [read_documents(*d.split("=", 1)) for d in domains]
    return capture_model(model, None, canonical_model_id(model_dir), docs, SETTINGS, store_path=store_path)


def stored(store_path, run_ids):
    runs = store.list_runs(store_path).set_index("run_id").loc[run_ids]
    experts = store.expert_stats(store_path, run_ids).astype({"domain": str})
    layers = store.layer_stats(store_path, run_ids).astype({"domain": str})
    return runs, experts.drop(columns="run_id"), layers.drop(columns="run_id")


def assert_same_statistics(store_a, ids_a, store_b, ids_b):
    runs_a, experts_a, layers_a = stored(store_a, ids_a)
    runs_b, experts_b, layers_b = stored(store_b, ids_b)
    assert list(runs_a.domain) == list(runs_b.domain)
    assert list(runs_a.model_fingerprint) == list(runs_b.model_fingerprint)
    assert list(runs_a.tokens) == list(runs_b.tokens)
    key = ["domain", "layer", "expert"]
    a = experts_a.sort_values(key).reset_index(drop=True)
    b = experts_b.sort_values(key).reset_index(drop=True)
    assert len(a) > 0 and a[key].equals(b[key])
    for column in COUNTS:
        assert a[column].tolist() == b[column].tolist(), column
    for column in SUMS:
        np.testing.assert_allclose(b[column], a[column], rtol=1e-12, atol=0, err_msg=column)
    la = layers_a.sort_values(["domain", "layer"]).reset_index(drop=True)
    lb = layers_b.sort_values(["domain", "layer"]).reset_index(drop=True)
    for column in ("layer", "tokens", "num_experts", "top_k", "router_score", "module"):
        assert la[column].tolist() == lb[column].tolist(), column
    np.testing.assert_allclose(lb.entropy_mean, la.entropy_mean, rtol=1e-12, atol=0)
    for run_a, run_b in zip(ids_a, ids_b):
        for layer in la.layer.unique():
            ca = store.coactivation(store_a, run_a, int(layer)).drop(columns="run_id", errors="ignore")
            cb = store.coactivation(store_b, run_b, int(layer)).drop(columns="run_id", errors="ignore")
            assert ca.reset_index(drop=True).equals(cb.reset_index(drop=True))
