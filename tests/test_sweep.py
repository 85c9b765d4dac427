"""Sweeps: every (criterion, sparsity) plan evaluated like `evaluate`, stored, and served from the store."""

import json

import duckdb
import pytest

from transformers import AutoConfig

from moe_viz.cli import main
from moe_viz.prune.sweep import plan_key, sweep_plans
from tiny_models import SAMPLE_TEXT, save_tiny_model


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model_dir = save_tiny_model(root / "model")
    domains = []
    for name, text in (("code", SAMPLE_TEXT * 30), ("prose", SAMPLE_TEXT[::-1] * 30)):
        (root / f"{name}.txt").write_text(text)
        domains += ["--domain", f"{name}={root / f'{name}.txt'}"]
    store_path = root / "store.duckdb"
    assert main(["capture", "--model", str(model_dir), *domains, "--store", str(store_path),
                 "--seq-len", "64", "--max-tokens", "400"]) == 0
    return model_dir, store_path


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_sweep_equals_evaluate_and_is_served_from_the_store(captured, capsys):
    model_dir, store_path = captured
    common = ["--model", str(model_dir), "--store", str(store_path), "--domain", "code", "--domain", "prose:0.5",
              "--seq-len", "32", "--dtype", "fp32", "--seed", "2", "--json"]
    capsys.readouterr()
    assert main(["sweep", *common, "--criteria", "frequency,reap", "--sparsities", "0.25,0.625"]) == 0
    first = _json(capsys)["results"]
    # 3 criteria (random always included) x 2 sparsities x 2 evaluation domains
    assert sorted({(r["criterion"], r["sparsity"]) for r in first}) == [
        (c, s) for c in ("frequency", "random", "reap") for s in (0.25, 0.625)]
    assert len(first) == 12 and sorted({r["domain"] for r in first}) == ["code", "prose"]

    for criterion, sparsity in (("reap", 0.625), ("random", 0.25)):
        assert main(["evaluate", *common, "--criterion", criterion, "--sparsity", str(sparsity)]) == 0
        evaluated = _json(capsys)["results"]
        swept = [{k: v for k, v in r.items() if k not in ("criterion", "sparsity", "scope", "top_k", "cached")}
                 for r in first if (r["criterion"], r["sparsity"]) == (criterion, sparsity)]
        assert swept == evaluated

    assert main(["sweep", *common, "--criteria", "frequency,reap", "--sparsities", "0.25,0.625"]) == 0
    again = _json(capsys)["results"]
    assert [{**r, "cached": None} for r in again] == [{**r, "cached": None} for r in first]
    assert all(r["cached"] for r in again) and not any(r["cached"] for r in first[:2])

    # one stored row per distinct plan (plans keeping the same experts share a key) and evaluation domain
    plans = sweep_plans(store_path, str(model_dir.resolve()), ["frequency", "reap"], [0.25, 0.625],
                        {"code": 1.0, "prose": 0.5}, AutoConfig.from_pretrained(model_dir), seed=2)
    keys = {plan_key(plan, 2) for plan in plans}
    with duckdb.connect(str(store_path), read_only=True) as con:
        stored = con.execute("SELECT count(*), count(DISTINCT plan_key), count(DISTINCT eval_set) FROM plan_evals").fetchone()
        stored_keys = {r[0] for r in con.execute("SELECT DISTINCT plan_key FROM plan_evals").fetchall()}
    assert stored == (2 * len(keys), len(keys), 2) and stored_keys == keys

    # more evaluation text (the same first sequences, more after them) is a new evaluation set: nothing cached
    assert main(["sweep", *common, "--criteria", "frequency,reap", "--sparsities", "0.25,0.625",
                 "--max-tokens", "4096"]) == 0
    longer = _json(capsys)["results"]
    assert not any(r["cached"] for r in longer)
    assert {r["domain"]: r["tokens"] for r in longer} != {r["domain"]: r["tokens"] for r in first}


def test_bad_sparsities_fail_before_the_model_loads(captured, capsys):
    model_dir, store_path = captured
    code = main(["sweep", "--model", str(model_dir), "--store", str(store_path), "--domain", "code",
                 "--sparsities", "0.5,x"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moe-viz: error: --sparsities '0.5,x' must be numbers separated by commas, e.g. 0.25,0.5 "
                   f"[store: {store_path}]"]


def test_a_stored_result_is_reused_only_for_the_same_top_k_seed_and_evaluation_domains(tmp_path):
    """The store key holds the lowered top-k and the bootstrap seed, and a result is served only when every
    evaluation domain was evaluated: anything else is computed, and equals `evaluate_plan` run directly."""
    import torch

    from moe_viz import store
    from moe_viz.models.discovery import find_moe_layers
    from moe_viz.prune.evaluate import evaluate_plan, reference_batches
    from moe_viz.prune.plan import PrunePlan
    from moe_viz.prune.sweep import run_sweep
    from tiny_models import VOCAB, tiny_model

    model = tiny_model("qwen3_moe")
    layers = {layer.layer: layer.num_experts for layer in find_moe_layers(model)}
    plan = PrunePlan("tiny", "fp", "random", "uniform", 0.25, {}, {}, layers, {l: [0, 1, 2, 4, 5, 7] for l in layers})
    lowered = PrunePlan(**{**vars(plan), "top_k": 1})
    gen = torch.Generator().manual_seed(4)
    text = {d: [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (12, 9, 15, 7, 11, 14, 10, 13)]
            for d in ("a", "b")}
    store_path = tmp_path / "store.duckdb"
    with store.connect(store_path):
        pass

    def direct(p, domains, seed):
        references = {d: reference_batches(model, text[d]) for d in domains}
        return evaluate_plan(model, p.dropped, references, seed=seed, top_k=p.top_k)

    def results(rows):
        return [{k: v for k, v in r.items() if k not in ("criterion", "sparsity", "scope", "top_k", "cached")}
                for r in rows]

    def sweep(plans, domains, seed):
        return run_sweep(model, store_path, plans, {d: text[d] for d in domains}, seed=seed)

    first = sweep([plan, lowered], ["a"], 0)
    assert [(r["top_k"], r["cached"]) for r in first] == [(None, False), (1, False)]
    assert results(first[1:]) == direct(lowered, ["a"], 0) != direct(plan, ["a"], 0) == results(first[:1])

    other_seed = sweep([plan], ["a"], 1)
    assert [r["cached"] for r in other_seed] == [False]
    assert results(other_seed) == direct(plan, ["a"], 1) and other_seed[0]["kl_ci"] != first[0]["kl_ci"]

    more_domains = sweep([plan], ["a", "b"], 0)
    assert [(r["domain"], r["cached"]) for r in more_domains] == [("a", False), ("b", False)]
    assert results(more_domains) == direct(plan, ["a", "b"], 0)
    assert [r["cached"] for r in sweep([plan, lowered], ["a"], 0)] == [True, True]
