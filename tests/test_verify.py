"""Verification: PASS for every correct export at every valid keep, FAIL for each way an export can be wrong.

Correct exports are made by the exporter; wrong ones by editing a correct export's files the way a
buggy exporter would (a wrong expert kept, a router row or bias left unsliced, the config count left
alone, the shard index pointing at the wrong file, a non-MoE tensor changed).
"""

import json
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig
from torch.nn import functional as F

from moe_viz.cli import main
from moe_viz.prune.export import INDEX_FILE, PRUNE_MANIFEST, export_pruned
from moe_viz.models.discovery import find_moe_layers
from moe_viz.prune.plan import PrunePlan, RouterConstraints
from moe_viz.prune.verify import FAIL, PASS, VERIFY_FILE, quality, verify_export
from tiny_models import FAMILIES, VOCAB, tiny_model

GEN = torch.Generator().manual_seed(1)
SEQUENCES = {"a": [torch.randint(0, VOCAB, (20,), generator=GEN).tolist() for _ in range(3)],
             "b": [torch.randint(0, VOCAB, (n,), generator=GEN).tolist() for n in (16, 9)]}


def _layers(family: str) -> dict[int, int]:
    return {layer.layer: layer.num_experts for layer in find_moe_layers(tiny_model(family))}


def _plan(family: str, model_dir, keep: int, seed: int) -> PrunePlan:
    """A plan keeping `keep` random experts per layer (the same count in each group for group-limited routers)."""
    layers = _layers(family)
    groups = int(getattr(AutoConfig.from_pretrained(model_dir), "n_group", None) or 1)
    rng = random.Random(seed)
    kept = {}
    for layer, experts in layers.items():
        size = experts // groups
        kept[layer] = sorted(g * size + e for g in range(groups) for e in rng.sample(range(size), keep // groups))
    return PrunePlan(str(model_dir), "fp", "random", "uniform", 1 - keep / 8, {}, {}, layers, kept, seed=seed)


def _valid_keeps(family: str) -> list[int]:
    model = tiny_model(family)
    top_k = 1 if family == "llama4_text" else 2
    return RouterConstraints.from_config(model.config, top_k).valid_keeps(8)


CASES = [(family, keep) for family in FAMILIES for keep in _valid_keeps(family)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> saved tiny model directory (each built once)."""
    root = tmp_path_factory.mktemp("verify_models")
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = root / family
            tiny_model(family).save_pretrained(cache[family])
        return cache[family]

    return get


@pytest.mark.parametrize("family, keep", CASES)
def test_correct_export_passes_at_every_valid_keep(tmp_path, saved, family, keep):
    model_dir = saved(family)
    plan = _plan(family, model_dir, keep, seed=keep)
    out = export_pruned(plan, model_dir, tmp_path / "out", streaming=keep % 2 == 1)
    result = verify_export(out, SEQUENCES)
    assert result["verdict"] == PASS, result["reason"]
    assert result["load_problems"] == [] and result["structure_problems"] == []
    blocks = result["float64_blocks"]
    assert blocks["failed_layers"] == [] and blocks["max_abs_delta"] <= blocks["bound"]
    assert set(blocks["layers"]) == set(plan.kept)
    e2e = result["end_to_end"]
    assert e2e["max_abs_delta"] <= e2e["tolerance"] == max(4 * e2e["noise_floor"], 2**-40 * max(1, e2e["logit_scale"]))
    assert e2e["noise_floor"] > 0  # float32 vs float64 always rounds somewhere on these models
    saved_json = json.loads((out / VERIFY_FILE).read_text())
    assert saved_json["verdict"] == PASS and saved_json["reason"] == result["reason"]


# -- deliberately wrong exports fail, in the JSON and the CLI alike -------------------

def _sharded_family_dir(root, family):
    path = root / f"{family}-sharded"
    tiny_model(family).save_pretrained(path, max_shard_size="20KB")
    assert (path / INDEX_FILE).exists()
    return path


@pytest.fixture(scope="module")
def broken_setup(tmp_path_factory):
    """Source models captured on a pre-tokenised domain, and a correct keep-3 export of each."""
    from moe_viz.capture.run import CaptureSettings, capture_model
    from moe_viz.prune.plan import build_plan
    from moe_viz.capture.sources import Documents

    root = tmp_path_factory.mktemp("broken")
    source = root / "rand.jsonl"
    source.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in SEQUENCES["a"] + SEQUENCES["b"]))
    store_path = root / "store.duckdb"
    setups = {}
    for family in ("qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe"):
        model_dir = _sharded_family_dir(root, family) if family == "qwen2_moe" else root / family
        model = tiny_model(family)
        if family != "qwen2_moe":
            model.save_pretrained(model_dir)
        docs = Documents("rand", str(source), token_ids=SEQUENCES["a"] + SEQUENCES["b"])
        capture_model(model, None, str(model_dir.resolve()), [docs], CaptureSettings(seq_len=32), store_path=store_path)
        keep = 4 if family == "deepseek_v3" else 3  # group-limited: equal count per group
        plan = build_plan(store_path, str(model_dir.resolve()), "reap", {"rand": 1.0},
                          config=AutoConfig.from_pretrained(model_dir), keep=keep)
        correct = export_pruned(plan, model_dir, root / f"{family}-correct", streaming=True)
        setups[family] = (model_dir, plan, correct)
    return root, store_path, setups


def _edit_tensor(export_dir, name, value):
    """Replace one tensor of an export in whichever shard holds it."""
    for shard in sorted(export_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = value.contiguous()
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise AssertionError(f"{name} not in {export_dir}")


def _source_tensor(model_dir, name):
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        if name in tensors:
            return tensors[name]
    raise AssertionError(name)


def _wrong_expert_kept(root, model_dir, plan, bad):
    layer = sorted(plan.kept)[-1]
    swapped = plan.dropped[layer][0]
    kept = {**plan.kept, layer: sorted(plan.kept[layer][1:] + [swapped])}
    wrong = PrunePlan(**{**vars(plan), "kept": kept})
    shutil.rmtree(bad)
    export_pruned(wrong, model_dir, bad, streaming=True)
    shutil.copy(root / f"{plan_family(model_dir)}-correct" / PRUNE_MANIFEST, bad / PRUNE_MANIFEST)


def plan_family(model_dir):
    return model_dir.name.removesuffix("-sharded")


def _router_rows(model_dir, plan, bad, wrong_rows: bool):
    layer = sorted(plan.kept)[-1]
    name = f"model.layers.{layer}.mlp.gate.weight"
    full = _source_tensor(model_dir, name)
    rows = plan.dropped[layer][:1] + plan.kept[layer][1:] if wrong_rows else list(range(full.shape[0]))
    _edit_tensor(bad, name, full[rows])


def _unsliced(model_dir, plan, bad, suffix):
    layer = sorted(plan.kept)[-1]
    name = f"model.layers.{layer}.mlp.{suffix}"
    _edit_tensor(bad, name, _source_tensor(model_dir, name))


def _config_count(bad):
    config = json.loads((bad / "config.json").read_text())
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if key in config:
            config[key] = 8
    (bad / "config.json").write_text(json.dumps(config))


def _set_config(bad, **values):
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **values}))


def _index_wrong_file(bad):
    index = json.loads((bad / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in sorted(index["weight_map"].items()) if s == shards[0])
    index["weight_map"][name] = shards[1]
    (bad / INDEX_FILE).write_text(json.dumps(index))


def _perturb(bad, name, scale):
    tensors = {}
    for shard in sorted(bad.glob("*.safetensors")):
        tensors.update(load_file(shard))
    value = tensors[name].clone()
    value.view(-1)[0] += scale
    _edit_tensor(bad, name, value)


BROKEN = {
    "wrong expert kept": ("qwen3_moe", lambda root, d, p, b: _wrong_expert_kept(root, d, p, b),
                          "differ from the masked original in float64"),
    "router rows not sliced": ("qwen3_moe", lambda root, d, p, b: _router_rows(d, p, b, wrong_rows=False),
                               "does not load cleanly"),
    "router sliced with a dropped row": ("qwen3_moe", lambda root, d, p, b: _router_rows(d, p, b, wrong_rows=True),
                                         "differ from the masked original in float64"),
    "correction bias not sliced": ("deepseek_v3", lambda root, d, p, b: _unsliced(d, p, b, "gate.e_score_correction_bias"),
                                   "does not load cleanly"),
    "router bias not sliced": ("gpt_oss", lambda root, d, p, b: _unsliced(d, p, b, "router.bias"),
                               "does not load cleanly"),
    "config count not updated": ("qwen3_moe", lambda root, d, p, b: _config_count(b), "does not load cleanly"),
    "shard index points at the wrong file": ("qwen2_moe", lambda root, d, p, b: _index_wrong_file(b),
                                             "does not load cleanly"),
    "kept expert weight off by 1e-6": ("qwen3_moe", lambda root, d, p, b: _perturb(
        b, "model.layers.1.mlp.experts.2.up_proj.weight", 1e-6), "differ from the masked original in float64"),
    "a norm's epsilon changed in config.json": ("qwen3_moe", lambda root, d, p, b: _set_config(b, rms_norm_eps=0.5),
                                                "end to end in float32"),
    "embedding changed": ("qwen3_moe", lambda root, d, p, b: _perturb(b, "model.embed_tokens.weight", 1e-3),
                          "outside the pruned experts differ from the source"),
    # a NaN in a block's output fails the float64 check itself (max() would skip a NaN difference)
    "kept expert weight NaN": ("qwen3_moe", lambda root, d, p, b: _perturb(
        b, "model.layers.1.mlp.experts.2.up_proj.weight", math.nan), "differ from the masked original in float64"),
    # the shared expert sits in the MoE block but is not pruned: compared bit for bit, named as such
    "shared expert changed": ("qwen2_moe", lambda root, d, p, b: _perturb(
        b, "model.layers.1.mlp.shared_expert.up_proj.weight", 1e-3), "outside the pruned experts differ from the source"),
    # a second expert-count key the model does not read still has to hold the kept count
    "stale extra expert-count key": ("qwen2_moe", lambda root, d, p, b: _set_config(b, num_local_experts=8),
                                     "config num_local_experts = 8, the plan keeps 3"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_wrong_export_fails_in_json_and_cli(tmp_path, broken_setup, capsys, case):
    root, store_path, setups = broken_setup
    family, corrupt, expected = BROKEN[case]
    model_dir, plan, correct = setups[family]
    bad = tmp_path / "bad"
    shutil.copytree(correct, bad)
    corrupt(root, model_dir, plan, bad)

    assert main(["verify", str(bad), "--store", str(store_path)]) == 1
    printed = capsys.readouterr().out.splitlines()
    report = json.loads((bad / VERIFY_FILE).read_text())
    assert report["verdict"] == FAIL and expected in report["reason"], report["reason"]
    assert printed[0] == f"verification FAIL: {report['reason']}"


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_the_same_correct_exports_pass_in_the_cli(tmp_path, broken_setup, capsys, family):
    """The other direction: the untouched exports the broken ones were made from pass."""
    _, store_path, setups = broken_setup
    good = tmp_path / "good"
    shutil.copytree(setups[family][2], good)
    assert main(["verify", str(good), "--store", str(store_path)]) == 0
    report = json.loads((good / VERIFY_FILE).read_text())
    assert capsys.readouterr().out.splitlines()[0] == f"verification PASS: {report['reason']}"


def test_dashboard_shows_the_same_verdicts(tmp_path, broken_setup, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from test_ui import ROOT

    root, store_path, setups = broken_setup
    model_dir, plan, correct = setups["qwen3_moe"]
    exports = root / "exports"
    shutil.copytree(correct, exports / "good", dirs_exist_ok=True)
    shutil.copytree(correct, exports / "bad", dirs_exist_ok=True)
    _router_rows(model_dir, plan, exports / "bad", wrong_rows=True)
    monkeypatch.setattr("sys.argv", ["app.py", "--store", str(store_path)])
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("moe_viz/ui/pages/prune.py").run()
    at.sidebar.selectbox(key="model").set_value(str(model_dir.resolve())).run()
    for name, verdict, element in (("bad", FAIL, "error"), ("good", PASS, "success")):
        at.selectbox(key="pr_verify_pick").set_value(name).run()
        at.button(key="pr_verify").click().run()
        assert not at.exception, [e.value for e in at.exception]
        report = json.loads((exports / name / VERIFY_FILE).read_text())
        assert report["verdict"] == verdict
        shown = [e.value for e in getattr(at, element)]
        assert f"Verification {verdict}: {report['reason']}" in shown, shown


def test_demo_model_passes_at_keeps_where_float32_can_differ(tmp_path):
    """The reported case: keep 3 and 6 of 8 on the shipped demo model differ by ~1e-5 in float32 on an
    8-lane (AVX2) CPU, where a softmax over fewer logits sums in another order; with 16 lanes (AVX-512)
    8 logits fit one vector and the exports are bit-identical. Correct either way."""
    from transformers import AutoTokenizer

    from moe_viz.demo import shipped_model
    from moe_viz.demo.corpora import documents
    from moe_viz.capture.sources import token_stream

    source = shipped_model()
    tokenizer = AutoTokenizer.from_pretrained(source)
    stream = token_stream(documents("code", "heldout")[:10], tokenizer, 384)
    sequences = {"code": [stream[i:i + 128] for i in range(0, 384, 128)]}
    rng = random.Random(5)
    for keep in (3, 6):
        kept = {layer: sorted(rng.sample(range(8), keep)) for layer in range(4)}
        plan = PrunePlan(str(source), "fp", "random", "uniform", 1 - keep / 8, {}, {}, {l: 8 for l in range(4)}, kept)
        result = verify_export(export_pruned(plan, source, tmp_path / f"keep{keep}", streaming=True), sequences)
        assert result["verdict"] == PASS, result["reason"]
        assert result["float64_blocks"]["max_abs_delta"] <= result["float64_blocks"]["bound"]


def test_correct_export_passes_where_float32_is_not_bit_identical(tmp_path):
    """24 experts span several vectors at any lane width, so keeping 13 or 18 changes the softmax's summation
    order on every CPU: the float32 end to end differs from the masked reference, and is still correct."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    experts = 24
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=experts, num_experts_per_tok=2, norm_topk_prob=True)
    torch.manual_seed(0)
    source = tmp_path / "source"
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    generator = torch.Generator().manual_seed(1)
    sequences = {"a": [torch.randint(0, VOCAB, (64,), generator=generator).tolist() for _ in range(4)]}
    rng = random.Random(0)
    for keep in (13, 18):
        kept = {layer: sorted(rng.sample(range(experts), keep)) for layer in range(2)}
        plan = PrunePlan(str(source), "fp", "random", "uniform", 1 - keep / experts, {}, {},
                         {layer: experts for layer in range(2)}, kept)
        result = verify_export(export_pruned(plan, source, tmp_path / f"keep{keep}"), sequences)
        assert result["verdict"] == PASS, result["reason"]
        assert result["end_to_end"]["max_abs_delta"] > 0  # not bit-identical, and still PASS
        assert result["end_to_end"]["max_abs_delta"] <= result["end_to_end"]["tolerance"]
        assert result["float64_blocks"]["max_abs_delta"] <= result["float64_blocks"]["bound"]


# -- the quality numbers against an independent computation ---------------------------

def test_quality_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(3)
    original, pruned = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    ids = torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = quality(original, pruned, ids, mask)

    nll_o = nll_p = kl = agree = 0.0
    positions = [(b, t) for b in range(2) for t in range(4) if mask[b, t] and mask[b, t + 1]]
    for b, t in positions:
        p = [math.exp(x) for x in original[b, t].tolist()]
        q = [math.exp(x) for x in pruned[b, t].tolist()]
        p = [x / sum(p) for x in p]
        q = [x / sum(q) for x in q]
        target = int(ids[b, t + 1])
        nll_o -= math.log(p[target])
        nll_p -= math.log(q[target])
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # KL(original ‖ pruned)
        agree += p.index(max(p)) == q.index(max(q))
    n = len(positions)
    assert (got["tokens"], got["predicted_tokens"]) == (8, n) == (8, 6)
    assert got["ppl_original"] == pytest.approx(math.exp(nll_o / n), rel=1e-12)
    assert got["ppl_pruned"] == pytest.approx(math.exp(nll_p / n), rel=1e-12)
    assert got["kl_mean"] == pytest.approx(kl / n, rel=1e-12)
    reverse = quality(pruned, original, ids, mask)["kl_mean"]
    assert abs(reverse - got["kl_mean"]) > 1e-3  # the direction matters on these logits
    assert got["top1_agreement"] == agree / n


# -- lowering top-k: a config change, verified against the original routing fewer experts ------

@pytest.mark.parametrize("family, keep", [("qwen3_moe", 8), ("qwen3_moe_nonorm", 5), ("deepseek_v3", 6),
                                          ("gpt_oss", 3), ("mixtral", 8), ("olmoe", 4)])
def test_top_k_exports_pass_and_a_stale_top_k_fails(tmp_path, saved, family, keep):
    model_dir = saved(family)
    plan = _plan(family, model_dir, keep, seed=keep)
    plan.top_k = 1
    out = export_pruned(plan, model_dir, tmp_path / "out", streaming=keep % 2 == 0)
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 1
    result = verify_export(out, SEQUENCES)
    assert result["verdict"] == PASS, result["reason"]
    assert result["end_to_end"]["max_abs_delta"] <= result["end_to_end"]["tolerance"]

    stale = tmp_path / "stale"  # weights right, config still routes 2 experts per token
    shutil.copytree(out, stale)
    _set_config(stale, num_experts_per_tok=2)
    result = verify_export(stale, SEQUENCES)
    assert result["verdict"] == FAIL and result["reason"] == "config num_experts_per_tok = 2, the plan routes 1"

    unrecorded = tmp_path / "unrecorded"  # config lowered, but the manifest's plan does not say so
    shutil.copytree(out, unrecorded)
    manifest = json.loads((unrecorded / PRUNE_MANIFEST).read_text())
    manifest["plan"]["top_k"] = None
    (unrecorded / PRUNE_MANIFEST).write_text(json.dumps(manifest))
    result = verify_export(unrecorded, SEQUENCES)
    assert result["verdict"] == FAIL and "differ from the masked original in float64" in result["reason"]


def test_prune_cli_lowers_top_k_and_verifies(tmp_path, broken_setup, capsys):
    _, store_path, setups = broken_setup
    model_dir = setups["qwen3_moe"][0]
    base = ["prune", "--model", str(model_dir), "--criterion", "reap", "--domain", "rand", "--store", str(store_path)]
    assert main(base + ["--keep", "8", "--top-k", "1", "--out", str(tmp_path / "topk")]) == 0
    report = json.loads((tmp_path / "topk" / VERIFY_FILE).read_text())
    assert report["verdict"] == PASS and f"verification PASS: {report['reason']}" in capsys.readouterr().out
    assert json.loads((tmp_path / "topk" / PRUNE_MANIFEST).read_text())["plan"]["top_k"] == 1

    assert main(base + ["--keep", "4", "--top-k", "3", "--out", str(tmp_path / "more")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"moe-viz: error: --top-k 3 must be between 1 and the model's top-k 2 [store: {store_path}]"]
    assert not (tmp_path / "more").exists()


# -- the float64 bound itself -----------------------------------------------------------------------

def test_float64_bound_is_2_to_the_minus_40_of_each_blocks_output_scale(tmp_path, saved):
    """The per-layer bound is 2^-40 · max(1, max |masked original block output|), not a looser one: the
    scale is read here from the block outputs of the masked original's own forward pass."""
    from transformers import AutoModelForCausalLM

    from moe_viz.prune.masking import masked_experts

    model_dir = saved("qwen3_moe")
    plan = _plan("qwen3_moe", model_dir, 4, seed=4)
    out = export_pruned(plan, model_dir, tmp_path / "out", streaming=True)
    sequences = {"a": SEQUENCES["a"]}  # equal lengths: one batch, no padding
    result = verify_export(out, sequences)
    assert result["verdict"] == PASS, result["reason"]

    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    scale = {}

    def record(index):
        def hook(module, args, output):
            output = output[0] if isinstance(output, tuple) else output
            scale[index] = max(scale.get(index, 1.0), output.abs().max().item())
        return hook

    handles = [layer.block.register_forward_hook(record(layer.layer)) for layer in find_moe_layers(original)]
    with torch.no_grad(), masked_experts(original, plan.dropped):
        original(torch.tensor(sequences["a"]))
    for handle in handles:
        handle.remove()
    layers = result["float64_blocks"]["layers"]
    assert sorted(layers) == sorted(scale) == sorted(plan.kept)
    for index, value in scale.items():  # float32 forward vs the float64 replay: the same scale to ~1e-7
        assert layers[index]["bound"] == pytest.approx(2**-40 * value, rel=1e-5), index
    assert result["float64_blocks"]["bound"] == max(v["bound"] for v in layers.values())
