"""Plan evaluation without export equals a hand computation on the exported, reloaded model."""

import math
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_viz.prune.evaluate import evaluate_plan, reference_batches
from moe_viz.prune.export import export_pruned
from moe_viz.models.discovery import find_moe_layers
from moe_viz.prune.plan import PrunePlan
from tiny_models import VOCAB, tiny_model

GEN = torch.Generator().manual_seed(7)
# unequal lengths: token-weighted means differ from sequence-weighted ones
SEQUENCES = [torch.randint(0, VOCAB, (n,), generator=GEN).tolist() for n in (20, 7, 13, 2, 16)]


def _by_hand(original, pruned, sequences):
    """Per sequence: [tokens, NLL original, NLL pruned, KL(orig ‖ pruned), top-1 agreements], one sequence at a time."""
    rows = []
    for seq in sequences:
        ids = torch.tensor([seq])
        with torch.no_grad():
            o = torch.log_softmax(original(ids).logits[0, :-1].double(), -1)
            p = torch.log_softmax(pruned(ids).logits[0, :-1].double(), -1)
        target = ids[0, 1:]
        rows.append([len(target), -o[range(len(target)), target].sum().item(), -p[range(len(target)), target].sum().item(),
                     (o.exp() * (o - p)).sum().item(), (o.argmax(-1) == p.argmax(-1)).sum().item()])
    return np.array(rows)


@pytest.mark.parametrize("family, keep", [("qwen3_moe", 3), ("deepseek_v3", 6), ("olmoe", 5)])
def test_evaluation_equals_the_exported_model_by_hand(tmp_path, family, keep):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    layers = {layer.layer: layer.num_experts for layer in find_moe_layers(model)}
    rng = random.Random(keep)
    if family == "deepseek_v3":  # group-limited: the same count in each of the 2 groups
        kept = {l: sorted(rng.sample(range(4), 3) + [4 + e for e in rng.sample(range(4), 3)]) for l in layers}
    else:
        kept = {l: sorted(rng.sample(range(8), keep)) for l in layers}
    plan = PrunePlan(str(tmp_path / "src"), "fp", "random", "uniform", 1 - keep / 8, {}, {}, layers, kept)

    references = {"rand": reference_batches(model, SEQUENCES, batch_size=2)}
    (got,) = evaluate_plan(model, plan.dropped, references, seed=3)

    pruned = AutoModelForCausalLM.from_pretrained(export_pruned(plan, tmp_path / "src", tmp_path / "out")).eval()
    sums = _by_hand(model, pruned, SEQUENCES)
    tokens = sums[:, 0].sum()
    assert (got["tokens"], got["sequences"]) == (tokens, 5) == (53, 5)
    assert got["nll_original"] == pytest.approx(sums[:, 1].sum() / tokens, rel=1e-5)
    assert got["nll_pruned"] == pytest.approx(sums[:, 2].sum() / tokens, rel=1e-5)
    assert got["kl"] == pytest.approx(sums[:, 3].sum() / tokens, rel=1e-4, abs=1e-7)
    assert got["top1_agreement"] == sums[:, 4].sum() / tokens
    assert got["kl"] > 1e-4  # the plan really changes the model

    # bootstrap: resample whole sequences with the documented generator, token-weighted ratio, 2.5/97.5 percentiles
    picks = np.random.default_rng(3).integers(0, 5, size=(1000, 5))
    totals = sums[picks].sum(axis=1)
    for key, column in (("kl_ci", 3), ("top1_agreement_ci", 4)):
        expected = np.percentile(totals[:, column] / totals[:, 0], [2.5, 97.5])
        assert got[key] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-7)
    delta = np.percentile((totals[:, 2] - totals[:, 1]) / totals[:, 0], [2.5, 97.5])
    assert got["nll_delta_ci"] == pytest.approx(delta.tolist(), rel=1e-4, abs=1e-6)


def test_a_plan_that_drops_nothing_costs_nothing():
    model = tiny_model("mixtral")
    references = {"rand": reference_batches(model, SEQUENCES, batch_size=3)}
    (got,) = evaluate_plan(model, {}, references)
    # KL and NLL go through logsumexp in float32 here, so 0 up to float32 rounding of the logits' scale
    assert got["kl"] == pytest.approx(0.0, abs=1e-6) and got["top1_agreement"] == 1.0
    assert got["nll_pruned"] == pytest.approx(got["nll_original"], abs=1e-6)
    assert got["kl_ci"] == pytest.approx([0.0, 0.0], abs=1e-6)


def test_default_evaluation_text_is_what_the_capture_did_not_use(tmp_path):
    """A file source: evaluation continues the capture's packed stream exactly where calibration stopped."""
    import json

    from moe_viz.capture.run import CaptureSettings, capture_model
    from moe_viz.prune.evaluate import evaluation_sequences
    from moe_viz.capture.sources import pack_sequences, read_documents
    from tiny_models import SAMPLE_TEXT, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    source = tmp_path / "docs"
    source.mkdir()
    for i in range(12):  # several documents, so the seeded shuffle matters
        (source / f"{i}.txt").write_text(f"document {i}: " + SAMPLE_TEXT[i * 7:] * 2)
    store_path = tmp_path / "store.duckdb"
    settings = CaptureSettings(max_tokens=300, seq_len=64, seed=4)
    (run_id,) = capture_model(model, tokenizer, "m", [read_documents("text", str(source))], settings, store_path=store_path)
    plan = PrunePlan("m", "fp", "random", "uniform", 0.5, {"text": 1.0}, {"text": run_id}, {0: 8, 1: 8},
                     {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})

    sequences, notes = evaluation_sequences(store_path, plan, tokenizer, len(tokenizer), seq_len=50, max_tokens=200)
    assert notes == []
    full = [t for s in pack_sequences(read_documents("text", str(source)), tokenizer, 64, 10_000, 4, len(tokenizer)) for t in s]
    assert [t for s in sequences["text"] for t in s] == full[300:500]
    assert [len(s) for s in sequences["text"]] == [50, 50, 50, 50]

    # a pre-tokenised source: the lines after those the capture used, as given
    lines = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15], [16, 17, 18]]
    jsonl = tmp_path / "ids.jsonl"
    jsonl.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in lines))
    (ids_run,) = capture_model(model, None, "m", [read_documents("ids", str(jsonl))],
                               CaptureSettings(max_tokens=5, seq_len=64), store_path=store_path)
    plan.run_ids = {"ids": ids_run}
    sequences, notes = evaluation_sequences(store_path, plan, None, len(tokenizer))
    assert sequences == {"ids": lines[2:]} and notes == []


def test_evaluate_cli_json_plan_file_and_eval_domains(tmp_path, capsys):
    import json

    from moe_viz.cli import main
    from tiny_models import SAMPLE_TEXT, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    text = tmp_path / "code.txt"
    text.write_text(SAMPLE_TEXT * 30)
    store_path = tmp_path / "store.duckdb"
    assert main(["capture", "--model", str(model_dir), "--domain", f"code={text}", "--store", str(store_path),
                 "--seq-len", "64", "--max-tokens", "400"]) == 0
    capsys.readouterr()
    base = ["evaluate", "--model", str(model_dir), "--store", str(store_path), "--dtype", "fp32", "--json"]
    assert main(base + ["--criterion", "frequency", "--keep", "3", "--domain", "code", "--seq-len", "32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    (result,) = printed["results"]
    assert result["domain"] == "code" and sorted(printed["plan"]["kept"]) == ["0", "1"]
    assert {len(v) for v in printed["plan"]["kept"].values()} == {3}

    # the same plan from a file gives the same numbers
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(printed["plan"]))
    assert main(base + ["--plan", str(plan_file), "--seq-len", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == printed["results"]

    # pre-tokenised evaluation text is used exactly as given: 4 + 2 predicted tokens
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"input_ids": [5, 6, 7, 8, 9]}\n{"input_ids": [10, 11, 12]}\n')
    assert main(base + ["--plan", str(plan_file), "--eval-domain", f"ids={ids}"]) == 0
    (by_ids,) = json.loads(capsys.readouterr().out)["results"]
    assert (by_ids["domain"], by_ids["tokens"], by_ids["sequences"]) == ("ids", 6, 2)

    assert main(["evaluate", "--model", str(model_dir), "--store", str(store_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moe-viz: error: give --criterion and one of --sparsity or --keep, or a --plan FILE "
                   f"[store: {store_path}]"]


@pytest.mark.parametrize("family, keep", [("qwen3_moe", 8), ("granitemoe", 4)])
def test_lowered_top_k_equals_the_exported_config_change(tmp_path, family, keep):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    layers = {layer.layer: layer.num_experts for layer in find_moe_layers(model)}
    kept = {l: list(range(8 - keep, 8)) for l in layers}
    plan = PrunePlan(str(tmp_path / "src"), "fp", "random", "uniform", 1 - keep / 8, {}, {}, layers, kept, top_k=1)
    references = {"rand": reference_batches(model, SEQUENCES, batch_size=2)}
    (got,) = evaluate_plan(model, plan.dropped, references, top_k=1)
    pruned = AutoModelForCausalLM.from_pretrained(export_pruned(plan, tmp_path / "src", tmp_path / "out")).eval()
    assert pruned.config.num_experts_per_tok == 1
    sums = _by_hand(model, pruned, SEQUENCES)
    assert got["nll_pruned"] == pytest.approx(sums[:, 2].sum() / sums[:, 0].sum(), rel=1e-5)
    assert got["kl"] == pytest.approx(sums[:, 3].sum() / sums[:, 0].sum(), rel=1e-4)
    assert got["kl"] > 1e-3


def test_a_router_that_ignores_top_k_is_refused():
    from moe_viz.errors import MoeVizError

    model = tiny_model("phimoe")  # sparsemixer: always top-2
    references = {"rand": reference_batches(model, SEQUENCES[:2])}
    with pytest.raises(MoeVizError, match="still routes 2 experts per token with top_k set to 1"):
        evaluate_plan(model, {}, references, top_k=1)
