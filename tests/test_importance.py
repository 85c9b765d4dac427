"""Causal importance: reconstruction error stored and ranked as a criterion, knockout KL, agreement."""

import json

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from moe_viz import store
from moe_viz.cli import main
from moe_viz.prune.evaluate import evaluate_plan, heldout_text, reference_batches
from moe_viz.analysis.importance import calibration_sequences, causal_agreement
from test_criteria_plan import _write_stats
from moe_viz.prune.masking import masked_experts
from moe_viz.models.discovery import find_moe_layers
from moe_viz.prune.plan import build_plan
from moe_viz.capture.sources import pack_sequences, read_documents
from tiny_models import SAMPLE_TEXT, save_tiny_model


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("importance")
    model_dir = save_tiny_model(root / "model")
    text = root / "code.txt"
    text.write_text(SAMPLE_TEXT * 40)
    store_path = root / "store.duckdb"
    assert main(["capture", "--model", str(model_dir), "--domain", f"code={text}", "--store", str(store_path),
                 "--seq-len", "48", "--max-tokens", "300", "--seed", "3"]) == 0
    (run_id,) = store.list_runs(store_path).run_id
    plan_before = None
    try:
        build_plan(store_path, str(model_dir.resolve()), "reconstruction", {"code": 1.0},
                   config=AutoConfig.from_pretrained(model_dir), keep=3)
    except Exception as exc:  # kept to assert on below, with the measured state
        plan_before = str(exc)
    return root, model_dir, store_path, run_id, text, plan_before


def _by_hand_recon(model, sequences, layer_index, expert):
    """‖y − y_{−e}‖² / ‖y‖² over real tokens, recording the block's inputs one sequence at a time."""
    layer = next(m for m in find_moe_layers(model) if m.layer == layer_index)
    inputs = []
    handle = layer.block.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    with torch.no_grad():
        for seq in sequences:
            model(torch.tensor([seq]))
    handle.remove()
    num = den = 0.0
    with torch.no_grad():
        for x in inputs:
            y = layer.block(x)
            y = y[0] if isinstance(y, tuple) else y
            with masked_experts(model, {layer_index: [expert]}):
                y_e = layer.block(x)
            y_e = y_e[0] if isinstance(y_e, tuple) else y_e
            num += float(((y.double() - y_e.double()) ** 2).sum())
            den += float((y.double() ** 2).sum())
    return num / den


def test_reconstruction_is_measured_stored_and_ranked(measured, capsys):
    root, model_dir, store_path, run_id, text, plan_before = measured
    assert plan_before.startswith("criterion reconstruction has no scores for domain(s) code: run `moe-viz importance")
    capsys.readouterr()
    assert main(["importance", "--model", str(model_dir), "--store", str(store_path), "--domain", "code",
                 "--max-tokens", "150", "--knockout-layer", "1", "--seq-len", "32", "--json"]) == 0
    output = json.loads(capsys.readouterr().out)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = calibration_sequences(store_path, run_id, tokenizer, len(tokenizer))
    # the run's own calibration tokens, packed again exactly as capture did (seed 3, seq_len 48, 300 tokens)
    assert calibration == pack_sequences(read_documents("code", str(text)), tokenizer, 48, 300, 3, len(tokenizer))
    first_150 = [calibration[0], calibration[1], calibration[2], calibration[3][:6]]
    assert sum(map(len, first_150)) == 150

    stored = store.expert_stats(store_path, [run_id], ["recon_error"])
    assert stored.recon_error.notna().all() and len(stored) == 2 * 8
    for layer, expert in ((0, 2), (1, 5), (1, 0)):
        value = stored[(stored.layer == layer) & (stored.expert == expert)].recon_error.item()
        assert value == pytest.approx(_by_hand_recon(model, first_150, layer, expert), rel=1e-5)
    assert {(r["layer"], r["expert"]) for r in output["reconstruction"]} == {(l, e) for l in (0, 1) for e in range(8)}

    # the criterion keeps, per layer, the experts whose removal hurts the block most
    plan = build_plan(store_path, str(model_dir.resolve()), "reconstruction", {"code": 1.0},
                      config=AutoConfig.from_pretrained(model_dir), keep=3)
    for layer in (0, 1):
        errors = stored[stored.layer == layer].set_index("expert").recon_error
        assert plan.kept[layer] == sorted(errors.sort_values(ascending=False).index[:3].tolist())

    # knockout of layer 1: each expert alone masked, on the held-out part of the source
    texts, notes = heldout_text(store_path, {"code": run_id}, tokenizer, len(tokenizer), 32, 150)
    assert notes == []
    references = {"eval": reference_batches(model, texts["code"])}
    rows = store.knockout(store_path, [run_id]).set_index("expert")
    assert sorted(rows.index) == list(range(8)) and set(rows.layer) == {1}
    for expert in (0, 6):
        (direct,) = evaluate_plan(model, {1: [expert]}, references)
        assert rows.loc[expert, "kl"] == pytest.approx(direct["kl"], rel=1e-6)
        assert [rows.loc[expert, "kl_ci_low"], rows.loc[expert, "kl_ci_high"]] == pytest.approx(direct["kl_ci"], rel=1e-6)

    # agreement: Spearman per layer between each causal measure and each observational criterion
    agreement = {(r["causal"], r["layer"], r["criterion"]): r["spearman"] for r in output["agreement"]}
    frequency = store.expert_stats(store_path, [run_id], ["routed_tokens"])
    for causal, layer, values in (("reconstruction", 0, stored[stored.layer == 0].recon_error.to_numpy()),
                                  ("knockout_kl", 1, rows.kl.to_numpy())):
        routed = frequency[frequency.layer == layer].routed_tokens.to_numpy(float)
        expected = np.corrcoef(_average_ranks(values), _average_ranks(routed))[0, 1]
        assert agreement[(causal, layer, "frequency")] == pytest.approx(expected, rel=1e-12)
    assert ("knockout_kl", 0, "frequency") not in agreement


def _average_ranks(values):
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):  # ties share their mean rank
        ranks[values == v] = ranks[values == v].mean()
    return ranks


def test_rankings_page_sets_reconstruction_against_the_routing_criteria(measured, monkeypatch):
    from test_ui import _app, _frame

    _, _, store_path, run_id, _, _ = measured
    at = _app(store_path, monkeypatch, "rankings")
    at.selectbox(key="rk_layer").set_value(1).run()
    at.selectbox(key="rk_criterion").set_value("reconstruction").run()
    table = _frame(at, "rank", "expert", "score")
    stored = store.expert_stats(store_path, [run_id], ["recon_error"])
    errors = stored[stored.layer == 1].set_index("expert").recon_error
    assert table.expert.tolist() == errors.sort_values(ascending=False).index.tolist()
    assert table.score.tolist() == errors.sort_values(ascending=False).tolist()
    agreement = _frame(at, "criterion_a", "spearman")
    assert "reconstruction" in set(agreement.criterion_a) | set(agreement.criterion_b)
    assert len(agreement) == 10 * 9 // 2  # nine routing criteria and the measured one
    causal = _frame(at, "causal", "layer", "frequency")
    assert causal[["causal", "layer"]].values.tolist() == [["knockout_kl", 1], ["reconstruction", 0], ["reconstruction", 1]]
    expected = causal_agreement(store_path, run_id).pivot_table(index=["causal", "layer"], columns="criterion",
                                                                values="spearman").reset_index()
    assert causal.reap.tolist() == pytest.approx(expected.reap.tolist(), rel=1e-12)
    at.switch_page("moe_viz/ui/pages/compare.py").run()  # the same view beside the plan curves
    assert not at.exception, [e.value for e in at.exception]
    assert _frame(at, "causal", "layer", "frequency").equals(causal)


def test_a_deleted_run_takes_its_knockout_rows_along(store_path):
    """Knockout rows of two runs: deleting one run deletes its rows (both evaluation sets) and only those."""
    runs = [_write_stats(store_path, domain, {1: {"routed_tokens": [3, 1, 2]}}) for domain in ("code", "prose")]
    rows = pd.DataFrame({"layer": 1, "expert": [0, 1, 2], "tokens": 50, "kl": [0.5, 0.25, 0.125],
                         "kl_ci_low": 0.0, "kl_ci_high": 1.0})
    for run_id in runs:
        for eval_set in ("set-a", "set-b"):
            store.save_knockout(store_path, run_id, eval_set, rows)
    store.delete_runs(store_path, [runs[0]])
    with duckdb.connect(str(store_path), read_only=True) as con:
        left = con.execute("SELECT run_id, count(*) FROM expert_knockout GROUP BY run_id").fetchall()
    assert left == [(runs[1], 6)]


def test_agreement_gives_tied_values_their_mean_rank(store_path):
    """Spearman with ties: reconstruction errors tie at 0.3 and routed counts at 4; ordinal ranks would differ."""
    routed, recon = [4, 4, 1, 2, 4], [0.3, 0.1, 0.0, 0.2, 0.3]
    run_id = _write_stats(store_path, "code", {2: {"routed_tokens": routed}})
    store.set_reconstruction(store_path, run_id, pd.DataFrame({"layer": 2, "expert": range(5), "recon_error": recon}))
    table = causal_agreement(store_path, run_id).set_index(["causal", "layer", "criterion"]).spearman
    # mean ranks: recon [4.5, 2, 1, 3, 4.5], routed [4, 4, 1, 2, 4]
    assert _average_ranks(np.array(recon)).tolist() == [4.5, 2, 1, 3, 4.5]
    expected = np.corrcoef([4.5, 2, 1, 3, 4.5], [4, 4, 1, 2, 4])[0, 1]
    assert table[("reconstruction", 2, "frequency")] == pytest.approx(expected, rel=1e-12)
    assert set(table.index.get_level_values("causal")) == {"reconstruction"}
