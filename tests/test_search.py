"""Layer-local reconstruction, Lu et al. enumeration and the evolutionary plan search, against hand computations."""

import itertools
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_viz.prune.evaluate import evaluate_plan, reference_batches
from moe_viz.prune.masking import masked_layer
from moe_viz.models.discovery import find_moe_layers
from moe_viz.prune.plan import PrunePlan, RouterConstraints
from moe_viz.analysis.reconstruction import (
    enumeration_plan,
    expert_reconstruction_scores,
    reconstruction_error,
    record_block_inputs,
)
from moe_viz.prune.search import search
from tiny_models import VOCAB, family_config, tiny_model

GEN = torch.Generator().manual_seed(11)
# unequal lengths, batched in twos: the padded rows must not count
SEQUENCES = [torch.randint(0, VOCAB, (n,), generator=GEN).tolist() for n in (9, 4, 7, 12, 3)]


def _block_inputs_alone(model, layer, sequences):
    """Each sequence run alone (no padding): the block's input hidden states (n, H)."""
    seen = []
    handle = layer.block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            for seq in sequences:
                model(input_ids=torch.tensor([seq]))
    finally:
        handle.remove()
    return [h[0] for h in seen]


def _per_token_error(layer, hidden_states, dropped):
    """Σ‖y − y_S‖² / Σ‖y‖², running the block on one token at a time."""
    num = den = 0.0
    with torch.no_grad():
        for hidden in hidden_states:
            for token in hidden:
                x = token.reshape(1, 1, -1)
                y = layer.block(x)
                with masked_layer(layer, dropped):
                    y_s = layer.block(x)
                y, y_s = (t[0] if isinstance(t, tuple) else t for t in (y, y_s))
                num += ((y.double() - y_s.double()) ** 2).sum().item()
                den += (y.double() ** 2).sum().item()
    return num / den


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "llama4_text", "gpt_oss"])
def test_reconstruction_error_equals_a_per_token_computation(family):
    model = tiny_model(family)
    inputs = record_block_inputs(model, SEQUENCES, batch_size=2)
    layer = find_moe_layers(model)[0]
    assert inputs[layer.layer].tokens == sum(map(len, SEQUENCES)) == 35  # padding excluded
    hidden = _block_inputs_alone(model, layer, SEQUENCES)
    kept = [0, 3, 4, 6] if family != "llama4_text" else [1, 2, 5]
    dropped = [e for e in range(8) if e not in kept]
    got = reconstruction_error(layer, inputs[layer.layer], kept)
    assert got == pytest.approx(_per_token_error(layer, hidden, dropped), rel=1e-5)
    assert got > 1e-3  # the kept set really changes the block
    assert reconstruction_error(layer, inputs[layer.layer], range(8)) == 0.0


def test_expert_scores_equal_dropping_that_expert_alone():
    model = tiny_model("qwen3_moe")
    scores = expert_reconstruction_scores(model, SEQUENCES, batch_size=2, max_tokens=30)
    assert list(scores.columns) == ["layer", "expert", "recon_error", "tokens"]
    assert len(scores) == 16 and set(scores.tokens) == {30} and scores.attrs["tokens"] == 30
    layers = find_moe_layers(model)
    used = [SEQUENCES[0], SEQUENCES[1], SEQUENCES[2], SEQUENCES[3][:10]]  # the first 30 tokens
    for layer in layers:
        hidden = _block_inputs_alone(model, layer, used)
        for expert in (0, 5):
            row = scores[(scores.layer == layer.layer) & (scores.expert == expert)].iloc[0]
            assert row.recon_error == pytest.approx(_per_token_error(layer, hidden, [expert]), rel=1e-5)
    assert (scores.recon_error >= 0).all() and scores.recon_error.max() > 0


def _brute_force(layer, sample, keep, groups=1):
    size = layer.num_experts // groups
    best = None
    for kept in itertools.combinations(range(layer.num_experts), keep):
        if len({sum(1 for e in kept if e // size == g) for g in range(groups)}) != 1:
            continue  # group-limited: the same count in every group
        error = reconstruction_error(layer, sample, kept)
        if best is None or error < best[0]:
            best = (error, list(kept))
    return best


@pytest.mark.parametrize("family, keep, groups", [("qwen3_moe", 3, 1), ("qwen3_moe", 5, 1), ("deepseek_v3", 4, 2),
                                                  ("deepseek_v3", 6, 2)])
def test_enumeration_finds_the_brute_force_optimum(family, keep, groups):
    model = tiny_model(family)
    inputs = record_block_inputs(model, SEQUENCES, batch_size=2)
    plan, info = enumeration_plan(model, inputs, keep)
    assert plan.criterion == "enumeration" and plan.exportable and plan.keep_per_layer == keep
    for layer in find_moe_layers(model):
        error, kept = _brute_force(layer, inputs[layer.layer], keep, groups)
        assert plan.kept[layer.layer] == kept
        assert info[layer.layer]["recon_error"] == error and info[layer.layer]["method"] == "exact"
        if groups > 1:
            assert [sum(1 for e in kept if e // 4 == g) for g in range(2)] == [keep // 2] * 2
    assert plan.dropped == {l: sorted(set(range(8)) - set(k)) for l, k in plan.kept.items()}


def test_enumeration_refuses_counts_the_router_cannot_keep():
    from moe_viz.errors import MoeVizError

    model = tiny_model("deepseek_v3")
    inputs = record_block_inputs(model, SEQUENCES[:2])
    with pytest.raises(MoeVizError, match="possible: 4, 6, 8"):
        enumeration_plan(model, inputs, 5)
    with pytest.raises(MoeVizError, match="top-k 2"):
        enumeration_plan(tiny_model("qwen3_moe"), record_block_inputs(tiny_model("qwen3_moe"), SEQUENCES[:2]), 1)


def test_greedy_elimination_beyond_eight_experts():
    config = family_config("qwen3_moe")
    config.num_experts = 12
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    inputs = record_block_inputs(model, SEQUENCES, batch_size=2)
    plan, info = enumeration_plan(model, inputs, 6)
    scores = expert_reconstruction_scores(model, inputs=inputs)
    for layer in find_moe_layers(model):
        kept = plan.kept[layer.layer]
        assert info[layer.layer]["method"] == "greedy" and layer.num_experts == 12
        assert len(kept) == 6 == len(set(kept)) and kept == sorted(kept) and all(0 <= e < 12 for e in kept)
        # 12 + 11 + ... + 7 candidate removals, not C(12, 6) = 924 subsets
        assert info[layer.layer]["subsets_evaluated"] == sum(range(7, 13))
        # the first elimination is the expert whose removal alone costs least
        single = scores[scores.layer == layer.layer].sort_values(["recon_error", "expert"])
        assert single.expert.iloc[0] not in kept
        assert info[layer.layer]["recon_error"] == reconstruction_error(layer, inputs[layer.layer], kept)


def _random_plan(model, keep, seed, template=None):
    rng = random.Random(seed)
    layers = {layer.layer: layer.num_experts for layer in find_moe_layers(model)}
    kept = {l: sorted(rng.sample(range(E), keep)) for l, E in layers.items()}
    return PrunePlan("m", "fp", f"random{seed}", "uniform", 1 - keep / 8, {}, {}, layers, kept)


def _search_setup(family="qwen3_moe", **overrides):
    model = tiny_model(family, **overrides)
    references = {"a": reference_batches(model, SEQUENCES[:3], batch_size=2),
                  "b": reference_batches(model, SEQUENCES[3:], batch_size=2)}
    seeds = [_random_plan(model, 4, s) for s in range(3)]
    seeds.append(enumeration_plan(model, record_block_inputs(model, SEQUENCES), 4, template=seeds[0])[0])
    return model, references, seeds, RouterConstraints.from_config(model.config, 0)


def test_search_is_deterministic_and_never_worse_than_its_best_seed():
    model, references, seeds, constraints = _search_setup()
    runs = [search(model, references, seeds, constraints, generations=4, population=6, seed=5) for _ in range(2)]
    a, b = runs
    assert a.plan.kept == b.plan.kept and a.fitness == b.fitness and a.evaluated == b.evaluated
    strip = lambda h: [{k: v for k, v in row.items() if k != "elapsed_s"} for row in h]  # noqa: E731
    assert strip(a.history) == strip(b.history) and len(a.history) == 5

    # fitness = mean over domains of evaluate_plan's KL, recomputed independently
    kl = [r["kl"] for r in evaluate_plan(model, a.plan.dropped, references)]
    assert a.fitness == sum(kl) / 2
    seed_fitness = [sum(r["kl"] for r in evaluate_plan(model, p.dropped, references)) / 2 for p in seeds]
    assert [row["fitness"] for row in a.seeds] == seed_fitness
    assert a.best_seed_fitness == min(seed_fitness) and a.fitness <= min(seed_fitness)
    bests = [row["best_fitness"] for row in a.history]
    assert bests == sorted(bests, reverse=True)  # elitism: the best never gets worse
    assert a.evaluations == len(a.evaluated) == a.history[-1]["evaluations"]
    assert a.plan.criterion == "search" and a.plan.exportable and a.plan.keep_per_layer == 4 and not a.note
    assert a.plan.model_id == "m" and a.plan.sparsity == 0.5

    other = search(model, references, seeds, constraints, generations=4, population=6, seed=6)
    assert other.evaluated != a.evaluated  # the seed matters


def test_nonuniform_search_keeps_the_total_and_top_k():
    model, references, seeds, constraints = _search_setup(num_hidden_layers=3)
    result = search(model, references, seeds, constraints, mode="nonuniform", generations=4, population=6, seed=1)
    assert result.fitness <= result.best_seed_fitness
    counts = [[len(kept) for _, kept in ind] for ind in result.evaluated]
    assert all(sum(c) == 12 and min(c) >= 2 and max(c) <= 8 for c in counts)
    assert any(len(set(c)) > 1 for c in counts)  # budgets really moved
    for ind in result.evaluated:
        assert all(len(set(kept)) == len(kept) and list(kept) == sorted(kept) for _, kept in ind)
    if not result.plan.exportable:
        assert "not exportable" in result.note


def test_uniform_search_refuses_a_nonuniform_seed():
    from moe_viz.errors import MoeVizError

    model, references, seeds, constraints = _search_setup()
    seeds[1].kept[0] = seeds[1].kept[0][:3]
    with pytest.raises(MoeVizError, match="seed plan random1 cannot seed a uniform search"):
        search(model, references, seeds, constraints, generations=1, population=2)
    seeds[1].kept[0] = seeds[0].kept[0]
    seeds[2].top_k = 1
    with pytest.raises(MoeVizError, match="seed plan random2 lowers top-k to 1"):
        search(model, references, seeds, constraints, generations=1, population=2)


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """A tiny model captured on two text domains: (model dir, store path)."""
    from moe_viz.cli import main
    from tiny_models import SAMPLE_TEXT, save_tiny_model

    root = tmp_path_factory.mktemp("search_cli")
    model_dir = save_tiny_model(root / "model")
    lines = SAMPLE_TEXT.splitlines()
    domains = []
    for name, part in (("code", lines[:6]), ("prose", lines[6:])):
        (root / f"{name}.txt").write_text("\n".join(part * 40))
        domains += ["--domain", f"{name}={root / (name + '.txt')}"]
    store_path = root / "store.duckdb"
    assert main(["capture", "--model", str(model_dir), "--store", str(store_path), "--seq-len", "64",
                 "--max-tokens", "300", *domains]) == 0
    return model_dir, store_path


def _search_cli(captured, *extra):
    model_dir, store_path = captured
    return ["search", "--model", str(model_dir), "--store", str(store_path), "--dtype", "fp32", "--domain", "code",
            "--domain", "prose", "--seq-len", "32", "--max-tokens", "256", "--criteria", "frequency,reap,random",
            "--generations", "2", "--population", "4", *extra]


def test_search_cli_json_plan_file_and_prune(captured, tmp_path, capsys):
    from moe_viz.cli import main

    plan_file = tmp_path / "best.json"
    assert main(_search_cli(captured, "--keep", "4", "--json", "--out", str(plan_file))) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in printed["seeds"]] == ["frequency", "reap", "random", "enumeration"]
    assert printed["exportable"] and {len(v) for v in printed["plan"]["kept"].values()} == {4}
    assert printed["fitness"] <= printed["best_seed_fitness"] == min(s["fitness"] for s in printed["seeds"])
    assert [r["domain"] for r in printed["results"]] == ["code", "prose"] and len(printed["history"]) == 3
    assert all(printed[key][d] > 0 for key in ("search_tokens", "heldout_tokens") for d in ("code", "prose"))
    assert json.loads(plan_file.read_text()) == printed["plan"]

    # the plan file exports with prune --plan
    model_dir, store_path = captured
    assert main(["prune", "--model", str(model_dir), "--store", str(store_path), "--plan", str(plan_file),
                 "--out", str(tmp_path / "pruned"), "--no-verify"]) == 0
    assert "kept 4 of 8 experts per layer (search" in capsys.readouterr().out
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**printed["plan"], "model_id": "/elsewhere"}))
    for plan_arg, extra, phrase in ((other, [], f"was made for /elsewhere, not {model_dir.resolve()}"),
                                    (plan_file, ["--keep", "4"], "--plan FILE replaces --criterion")):
        assert main(["prune", "--model", str(model_dir), "--store", str(store_path), "--plan", str(plan_arg),
                     "--out", str(tmp_path / "again"), "--no-verify", *extra]) == 2
        assert phrase in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_search_cli_nonuniform_table_and_bad_input(captured, tmp_path, capsys):
    from moe_viz.cli import main

    assert main(_search_cli(captured, "--sparsity", "0.5", "--mode", "nonuniform", "--out", str(tmp_path / "p.json"))) == 0
    out = capsys.readouterr().out
    assert "search (nonuniform)" in out and "enumeration" in out and "frequency/global" in out
    plan = PrunePlan.from_json((tmp_path / "p.json").read_text())
    assert sum(map(len, plan.kept.values())) == 8 and min(map(len, plan.kept.values())) >= 2
    assert ("not exportable" in out) == (not plan.exportable)

    assert main(_search_cli(captured, "--keep", "4", "--population", "1")) == 2
    store = f"[store: {captured[1]}]"  # every error names the store it used
    assert capsys.readouterr().err.strip().splitlines() == [f"moe-viz: error: --population 1 must be at least 2 {store}"]
    assert main(_search_cli(captured)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"moe-viz: error: give one of --keep K or --sparsity X {store}"]
    assert main(_search_cli(captured, "--keep", "4", "--criteria", "reap,nope")) == 2
    assert "unknown criterion 'nope'" in capsys.readouterr().err


# -- the keep-set searches on a known error function (no model needed) ---------------------------------------

def _removal_cost(weights):
    """error(kept) = Σ weights of the removed experts (additive, so the optimum is known by hand)."""
    return lambda kept: sum(w for e, w in enumerate(weights) if e not in kept)


def test_exact_search_breaks_ties_to_the_lexicographically_smallest_set():
    from moe_viz.analysis.reconstruction import _exact

    best, count = _exact(lambda kept: 1.0, [[0, 1, 2, 3]], 2)  # every set equally good
    assert best == (0, 1) and count == 6
    # per group: keep 2 of each group of 3; costs make (1, 2) and (3, 5) the cheapest removals to avoid
    best, count = _exact(_removal_cost([1, 5, 4, 9, 2, 7]), [[0, 1, 2], [3, 4, 5]], 4)
    assert best == (1, 2, 3, 5) and count == 9


def test_greedy_search_keeps_each_group_at_its_quota():
    from moe_viz.analysis.reconstruction import _greedy

    # group 0's experts are the cheapest to remove, but only one may go: keep 4 = 2 per group of 3
    best, count = _greedy(_removal_cost([0.1, 0.2, 0.3, 5, 6, 7]), [[0, 1, 2], [3, 4, 5]], 4)
    assert best == (1, 2, 4, 5)
    assert count == 6 + 3  # first round: all six candidates; second: only group 1's three


def test_greedy_search_ties_remove_the_lower_expert_first():
    from moe_viz.analysis.reconstruction import _greedy

    best, count = _greedy(lambda kept: 0.0, [[0, 1, 2, 3, 4]], 2)
    assert best == (3, 4) and count == 5 + 4 + 3
