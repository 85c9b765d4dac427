"""Pruned exports: exact against the masked original for every family, in both paths; atomic; verified."""

import errno
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from moe_viz.capture.run import CaptureSettings, capture_model
from moe_viz.cli import main
from moe_viz.atomic import fsync_file
from moe_viz.prune import export as export_module
from moe_viz.prune.export import PRUNE_MANIFEST, export_pruned
from moe_viz.models.discovery import find_moe_layers
from moe_viz.prune.masking import masked_experts
from moe_viz.prune.plan import PrunePlan, build_plan
from moe_viz.capture.sources import Documents
from moe_viz.prune.verify import verify_export
from tiny_models import FAMILIES, SAMPLE_TEXT, VOCAB, save_tiny_model, tiny_model

GEN = torch.Generator().manual_seed(0)
SEQUENCES = [torch.randint(0, VOCAB, (24,), generator=GEN).tolist() for _ in range(8)]


def _saved_and_captured(tmp_path, family, max_shard_size=None):
    model_dir = tmp_path / family
    model = tiny_model(family)
    model.save_pretrained(model_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    store_path = tmp_path / "store.duckdb"
    docs = Documents("rand", "inline", token_ids=SEQUENCES)
    capture_model(model, None, str(model_dir.resolve()), [docs], CaptureSettings(seq_len=64), store_path=store_path)
    plan = build_plan(store_path, str(model_dir.resolve()), "reap", {"rand": 1.0},
                      config=AutoConfig.from_pretrained(model_dir), keep=4)
    return model_dir, plan


def _tensors(directory):
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_export_is_exact_and_both_paths_agree(tmp_path, family):
    model_dir, plan = _saved_and_captured(tmp_path, family)
    in_memory = export_pruned(plan, model_dir, tmp_path / "mem", streaming=False)
    streamed = export_pruned(plan, model_dir, tmp_path / "stream", streaming=True)

    a, b = _tensors(in_memory), _tensors(streamed)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name

    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor(SEQUENCES[:3])
    with torch.no_grad(), masked_experts(original, plan.dropped):
        reference = original(ids).logits
    for export in (in_memory, streamed):
        pruned = AutoModelForCausalLM.from_pretrained(export).eval()
        with torch.no_grad():
            assert torch.equal(pruned(ids).logits, reference)
        config = json.loads((export / "config.json").read_text())
        counts = {k: v for k, v in config.items() if k in ("num_experts", "num_local_experts", "n_routed_experts")}
        assert counts and set(counts.values()) == {4}
    manifest = json.loads((streamed / PRUNE_MANIFEST).read_text())
    assert manifest["kept"] == {str(k): v for k, v in plan.kept.items()} and manifest["method"] == "streaming"

    result = verify_export(streamed, {"rand": SEQUENCES[:4]})
    assert result["verdict"] == "PASS", result["reason"]
    assert result["load_problems"] == [] and result["end_to_end"]["max_abs_delta"] == 0.0  # keep 4 of 8: bit-identical here


def test_sharded_checkpoint_streams_with_a_new_index(tmp_path):
    model_dir, plan = _saved_and_captured(tmp_path, "qwen2_moe", max_shard_size="20KB")
    assert (model_dir / "model.safetensors.index.json").exists()
    out = export_pruned(plan, model_dir, tmp_path / "stream", streaming=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not any(".experts.4." in name or ".experts.7." in name for name in tensors)  # renumbered 0..3
    in_memory = _tensors(export_pruned(plan, model_dir, tmp_path / "mem", streaming=False))
    assert all(torch.equal(in_memory[k], tensors[k]) for k in tensors)
    # the sharded export loads back (index and shards agree) and equals the masked original
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor(SEQUENCES[:3])
    with torch.no_grad(), masked_experts(original, plan.dropped):
        assert torch.equal(pruned(ids).logits, original(ids).logits)
    assert verify_export(out, {"rand": SEQUENCES[:4]})["verdict"] == "PASS"


def test_existing_out_is_refused_unless_forced(tmp_path):
    model_dir, plan = _saved_and_captured(tmp_path, "mixtral")
    out = export_pruned(plan, model_dir, tmp_path / "out", streaming=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="already exists"):
        export_pruned(plan, model_dir, out, streaming=True)
    assert (out / "keep.txt").read_text() == "mine"
    export_pruned(plan, model_dir, out, streaming=True, force=True)  # a previous export (tests/test_safe_writes.py: nothing else)
    assert not (out / "keep.txt").exists() and (out / PRUNE_MANIFEST).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_interrupted_export_leaves_nothing(tmp_path):
    model_dir, plan = _saved_and_captured(tmp_path, "mixtral")

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_pruned(plan, model_dir, tmp_path / "out", streaming=True, progress=interrupt)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []



def test_shards_are_flushed_in_the_background_and_a_flush_error_fails_the_export(tmp_path, monkeypatch):
    model_dir, plan = _saved_and_captured(tmp_path, "qwen2_moe", max_shard_size="20KB")
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    flushed = []

    def record(path):  # the real fsync, plus who called it and what existed then
        fsync_file(path)
        flushed.append((Path(path).name, threading.current_thread().name))

    monkeypatch.setattr(export_module, "fsync_file", record)
    export_pruned(plan, model_dir, tmp_path / "ok", streaming=True)
    assert sorted(name for name, _ in flushed) == shards and len(shards) > 1
    assert all(thread.startswith("moe-viz-fsync") for _, thread in flushed)

    def fail(path):
        raise OSError(errno.EIO, "disk gone")

    monkeypatch.setattr(export_module, "fsync_file", fail)
    with pytest.raises(OSError, match="disk gone"):
        export_pruned(plan, model_dir, tmp_path / "bad", streaming=True)
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

# -- the CLI ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_cli")
    model_dir = save_tiny_model(root / "model")
    text = root / "code.txt"
    text.write_text(SAMPLE_TEXT * 20)
    store_path = root / "store.duckdb"
    assert main(["capture", "--model", str(model_dir), "--domain", f"code={text}", "--domain", f"prose={text}",
                 "--store", str(store_path), "--seq-len", "64", "--max-tokens", "800"]) == 0
    return model_dir, store_path


def test_prune_cli_exports_and_verifies(tmp_path, captured, capsys):
    model_dir, store_path = captured
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(model_dir), "--criterion", "reap", "--sparsity", "0.5",
                 "--domain", "code", "--domain", "prose:0.5", "--out", str(out), "--store", str(store_path)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads((out / "moe_viz_verify.json").read_text())
    assert report["verdict"] == "PASS" and set(report["domains"]) == {"code", "prose"}
    assert f"verification PASS: {report['reason']}" in printed.out.splitlines()
    assert (out / "tokenizer.json").exists()
    manifest = json.loads((out / PRUNE_MANIFEST).read_text())
    assert manifest["domains"] == {"code": 1.0, "prose": 0.5} and manifest["criterion"] == "reap"
    assert main(["verify", str(out), "--store", str(store_path)]) == 0


@pytest.mark.parametrize("extra, expected", [
    (["--sparsity", "1.0"], "must be in [0, 1)"),
    (["--sparsity", "-0.5"], "must be in [0, 1)"),
    (["--keep", "1"], "fewer than top-k 2"),
    (["--sparsity", "0.5", "--criterion", "vibes"], "unknown criterion 'vibes'"),
    (["--sparsity", "0.5", "--domain", "law"], "no complete run for domain 'law'"),
])
def test_prune_bad_input_is_one_line_and_leaves_nothing(tmp_path, captured, capsys, extra, expected):
    model_dir, store_path = captured
    argv = ["prune", "--model", str(model_dir), "--criterion", "reap", "--domain", "code",
            "--out", str(tmp_path / "out"), "--store", str(store_path)]
    code = main(argv + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    errors = [line for line in err if line.startswith("moe-viz: error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert list(tmp_path.iterdir()) == []


def test_prune_into_existing_or_unwritable_out(tmp_path, captured, capsys):
    model_dir, store_path = captured
    base = ["prune", "--model", str(model_dir), "--criterion", "frequency", "--keep", "4", "--domain", "code",
            "--store", str(store_path), "--no-verify"]
    (tmp_path / "taken").mkdir()
    assert main(base + ["--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(base + ["--out", "/sys/moe_viz_cannot_write_here"]) == 2
    assert "cannot write to /sys" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_verify_refuses_a_directory_that_is_not_an_export(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a moe_viz export" in capsys.readouterr().err


def test_dropped_experts_lose_to_kept_experts_with_negative_correction_biases(tmp_path):
    """DeepSeek-V3 picks experts by sigmoid(logit) + correction bias. With every bias at -2 the kept experts'
    selection scores are all below 0, so a dropped expert must be masked with a -inf bias (not 0), or the
    masked reference routes tokens to it and differs from the pruned export."""
    model = tiny_model("deepseek_v3")
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.fill_(-2.0)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    layers = {layer.layer: layer.num_experts for layer in find_moe_layers(model)}
    assert layers == {1: 8, 2: 8}
    kept = {1: [0, 2, 5, 7], 2: [1, 3, 4, 6]}  # two of each router group of four
    plan = PrunePlan(str(model_dir), "fp", "random", "uniform", 0.5, {}, {}, layers, kept)
    pruned = AutoModelForCausalLM.from_pretrained(export_pruned(plan, model_dir, tmp_path / "out", streaming=True))
    ids = torch.tensor(SEQUENCES[:3])
    with torch.no_grad(), masked_experts(model, plan.dropped):
        reference = model(ids).logits
    with torch.no_grad():
        assert torch.equal(pruned.eval()(ids).logits, reference)
