"""The Compare plans page and the Prune & export page's evaluated numbers, driven with AppTest on a store
holding a real sweep of a tiny captured model. Plotted values are checked against SQL on plan_evals
(each (criterion, sparsity) point is the stored row of the plan that criterion builds there) and
against plan.preview; background jobs are followed to their terminal state."""

import json
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from transformers import AutoConfig

from moe_viz import jobs
from moe_viz.cli import main
from moe_viz.prune.plan import RouterConstraints, build_plan, preview
from moe_viz.prune.sweep import plan_key
from test_sweep import captured  # noqa: F401  (a tiny model captured on code and prose)
from chart_downloads import check_plotly_downloads, downloads  # noqa: F401 (fixture)
from test_ui import _app, _array, _charts, _frame

MIX = {"code": 1.0, "prose": 0.5}
SWEPT = ["frequency", "soft_count", "reap"]
SPARSITIES = [0.25, 0.5, 0.75]
EVAL = ["--seq-len", "32", "--max-tokens", "256", "--dtype", "fp32", "--seed", "0"]


@pytest.fixture(scope="module")
def swept(captured, tmp_path_factory):
    """(root, model, store with statistics only, copy of it after a sweep of SWEPT x SPARSITIES on MIX)."""
    model_dir, captured_store = captured
    store_path = tmp_path_factory.mktemp("compare") / "store.duckdb"
    shutil.copy(captured_store, store_path)
    assert main(["sweep", "--model", str(model_dir), "--store", str(store_path), "--domain", "code",
                 "--domain", "prose:0.5", "--criteria", ",".join(SWEPT),
                 "--sparsities", ",".join(map(str, SPARSITIES)), *EVAL]) == 0
    return store_path.parent, model_dir, captured_store, store_path


def _copy(store_path, tmp_path) -> Path:
    """A private copy of a store (its own jobs folder), for tests that write to it."""
    copy = tmp_path / "store" / "store.duckdb"
    copy.parent.mkdir()
    shutil.copy(store_path, copy)
    return copy


def _sql(store_path, query, *params):
    with duckdb.connect(str(store_path), read_only=True) as con:
        return con.execute(query, list(params)).df()


def _plan(store_path, model_dir, criterion, mix=MIX, **amount):
    return build_plan(store_path, str(Path(model_dir).resolve()), criterion, mix,
                      config=AutoConfig.from_pretrained(model_dir), **amount)


def _wait_for_end(store_path, job, seconds=240) -> dict:
    """Poll until the job is done/failed/cancelled (states that stay once reached)."""
    deadline = time.time() + seconds
    while jobs.job_status(store_path, job)["state"] == "running":
        assert time.time() < deadline, f"job {job} still running after {seconds} s"
        time.sleep(0.5)
    return jobs.job_status(store_path, job)


def _lines(figure):
    """{(criterion, evaluation domain): (line trace, band trace)} of a quality figure; a line drawn for
    several criteria (the same plans at every point) is named 'a = b = ...' and counts for each."""
    lines = {(t.name, t.meta): t for t in figure.data if t.mode == "lines+markers"}
    bands = {(t.name.removesuffix(" 95% CI"), t.meta): t for t in figure.data if t.fill == "toself"}
    assert set(lines) == set(bands)
    out = {}
    for (name, domain), line in lines.items():
        for criterion in name.split(" = "):
            assert (criterion, domain) not in out
            out[(criterion, domain)] = (line, bands[(name, domain)])
    return out


def test_curves_are_the_stored_evaluations_of_each_criterions_plan(swept, monkeypatch):
    _, model_dir, _, store_path = swept
    at = _app(store_path, monkeypatch, "compare")
    kl_figure, delta_figure = _charts(at)[:2]
    assert "KL" in kl_figure.layout.title.text and "ΔNLL" in delta_figure.layout.title.text
    kl, delta = _lines(kl_figure), _lines(delta_figure)
    # the swept criteria, the random baseline the sweep adds, and criteria that were not swept but keep
    # the same experts as a swept one at every sparsity (their numbers are known: the same plans)
    shown = {c for c, _ in kl}
    assert shown >= {*SWEPT, "random"} and set(kl) == set(delta) == {(c, d) for c in shown for d in ("code", "prose")}
    shared = 0
    for criterion in sorted(shown):
        keys = [plan_key(_plan(store_path, model_dir, criterion, sparsity=s), 0) for s in SPARSITIES]
        for domain in ("code", "prose"):
            rows = [_sql(store_path, "SELECT * FROM plan_evals WHERE plan_key = ? AND eval_domain = ?", key, domain)
                    for key in keys]
            assert all(len(r) == 1 for r in rows)
            rows = [r.iloc[0] for r in rows]
            shared += sum(r.criterion != criterion for r in rows) if domain == "code" else 0
            line, band = kl[(criterion, domain)]
            np.testing.assert_allclose(_array(line.x), SPARSITIES)
            np.testing.assert_allclose(_array(line.y), [r.kl for r in rows], rtol=1e-12)
            np.testing.assert_allclose(_array(band.y), [r.kl_ci_high for r in rows] + [r.kl_ci_low for r in rows][::-1],
                                       rtol=1e-12)
            line, band = delta[(criterion, domain)]
            np.testing.assert_allclose(_array(line.y), [r.nll_pruned - r.nll_original for r in rows], rtol=1e-9)
            np.testing.assert_allclose(_array(band.y), [r.nll_delta_ci_high for r in rows]
                                       + [r.nll_delta_ci_low for r in rows][::-1], rtol=1e-12)
            assert line.line.dash == ("dash" if line.name == "random" else "solid")
    # plans that keep the same experts are stored once, under the first criterion: the page still
    # draws the other criterion's points from that row (this sweep has such plans: soft_count keeps
    # frequency's experts at every sparsity, and is drawn on frequency's line)
    assert shared > 0
    assert next(name for name, _ in _lines_named(kl_figure) if "soft_count" in name.split(" = ")).startswith("frequency")


def _lines_named(figure):
    return [(t.name, t.meta) for t in figure.data if t.mode == "lines+markers"]


def test_picked_points_table_shows_their_numbers_per_domain(swept, monkeypatch):
    _, model_dir, _, store_path = swept
    at = _app(store_path, monkeypatch, "compare")
    at.multiselect(key="cp_points").set_value(["reap @ 0.750", "random @ 0.250"]).run()
    table = _frame(at, "evaluation domain", "kl_ci_low").rename(columns={"evaluation domain": "domain"})
    assert sorted(zip(table.criterion, table.sparsity)) == [("random", 0.25)] * 2 + [("reap", 0.75)] * 2
    for row in table.itertuples():
        key = plan_key(_plan(store_path, model_dir, row.criterion, sparsity=row.sparsity), 0)
        expected = _sql(store_path, "SELECT * FROM plan_evals WHERE plan_key = ? AND eval_domain = ?",
                        key, row.domain).iloc[0]
        assert (row.kl, row.kl_ci_low, row.kl_ci_high, row.top1_agreement, row.tokens) == (
            expected.kl, expected.kl_ci_low, expected.kl_ci_high, expected.top1_agreement, expected.tokens)
        assert row.nll_delta == pytest.approx(expected.nll_pruned - expected.nll_original, rel=1e-12)
    picked = [t for t in _charts(at)[0].data if t.name == "picked points"]
    assert sorted((t.meta, tuple(_array(t.x))) for t in picked) == [("code", (0.25, 0.75)), ("prose", (0.25, 0.75))]
    # each chart rings the picked points at that chart's metric: KL on the first, ΔNLL on the second
    for figure, metric in zip(_charts(at)[:2], ("kl", "nll_delta")):
        for trace in (t for t in figure.data if t.name == "picked points"):
            mine = table[table.domain == trace.meta]
            expected = dict(zip(mine.sparsity, mine[metric]))
            np.testing.assert_allclose(_array(trace.y), [expected[x] for x in _array(trace.x)], rtol=1e-12)


def test_default_picks_are_the_best_criterion_and_random_at_the_middle_sparsity(swept, monkeypatch):
    _, _, _, store_path = swept
    at = _app(store_path, monkeypatch, "compare")
    lines = _lines(_charts(at)[0])  # KL per (criterion, evaluation domain), at SPARSITIES
    middle = SPARSITIES[len(SPARSITIES) // 2]
    mean_kl = {c: np.mean([_array(line.y)[SPARSITIES.index(middle)] for (name, _), (line, _) in lines.items()
                           if name == c]) for c in {c for c, _ in lines}}
    picks = at.multiselect(key="cp_points").value
    assert f"random @ {middle:.3f}" in picks and len(picks) == 2
    (best,) = [p for p in picks if not p.startswith("random")]
    criterion, sparsity = best.split(" @ ")
    assert float(sparsity) == middle
    others = [kl for c, kl in mean_kl.items() if c != "random"]
    assert mean_kl[criterion] == min(others) and min(others) < max(others)  # the lowest, and not a tie of all


def test_cut_tradeoff_equals_plan_preview(swept, monkeypatch):
    _, model_dir, _, store_path = swept
    at = _app(store_path, monkeypatch, "compare")
    mix = json.dumps(MIX, sort_keys=True)
    assert at.selectbox(key="cp_cut_mix").value == mix  # the swept mix by default
    # the sweep form scores experts on the first captured domain by default
    assert at.multiselect(key="cp_sw_domains").value == ["code"]
    at.multiselect(key="cp_cut_criteria").set_value(["ean_sum", "reap", "random"]).run()
    cut = {t.name: t for t in _charts(at)[-1].data}
    assert set(cut) == {"ean_sum", "reap", "random"}
    config = AutoConfig.from_pretrained(model_dir)
    keeps = [k for k in RouterConstraints.from_config(config, 2).valid_keeps(8) if k < 8][::-1]
    assert keeps == [7, 6, 5, 4, 3, 2]
    for criterion, trace in cut.items():
        routed, reap = [], []
        for keep in keeps:
            lost = preview(_plan(store_path, model_dir, criterion, keep=keep), store_path, ["code", "prose"])
            per_domain = lost.groupby("domain")[["routed_share_lost", "reap_share_lost"]].mean()
            routed.append((per_domain.routed_share_lost["code"] * 1.0 + per_domain.routed_share_lost["prose"] * 0.5) / 1.5)
            reap.append((per_domain.reap_share_lost["code"] * 1.0 + per_domain.reap_share_lost["prose"] * 0.5) / 1.5)
        np.testing.assert_allclose(_array(trace.x), routed, rtol=1e-12)
        np.testing.assert_allclose(_array(trace.y), reap, rtol=1e-12)
        assert np.all(np.diff(_array(trace.x)) >= 0)  # more experts dropped, more traffic deleted

    at.selectbox(key="cp_cut_mix").set_value(json.dumps({"prose": 1.0})).run()
    trace = next(t for t in _charts(at)[-1].data if t.name == "reap")
    lost = preview(_plan(store_path, model_dir, "reap", mix={"prose": 1.0}, keep=4), store_path, ["prose"])
    assert _array(trace.y)[keeps.index(4)] == pytest.approx(lost.reap_share_lost.mean(), rel=1e-12)


def test_empty_state_explains_how_to_run_a_sweep(swept, monkeypatch):
    _, _, captured, _ = swept  # statistics, no evaluations
    at = _app(captured, monkeypatch, "compare")
    assert any("moe-viz sweep" in i.value for i in at.info)
    assert not at.error
    assert [t.name for t in _charts(at)[0].data] == ["frequency", "soft_count", "reap", "random"]  # the cut trade-off


def test_prune_page_shows_and_evaluates_the_current_plan(swept, monkeypatch, tmp_path, capsys):
    _, model_dir, _, swept_store = swept
    store_path = _copy(swept_store, tmp_path)
    at = _app(store_path, monkeypatch, "prune")
    at.selectbox(key="pr_criterion").set_value("soft_count").run()
    at.select_slider(key="pr_keep").set_value(4).run()
    at.multiselect(key="pr_domains").set_value(["code", "prose"]).run()
    at.number_input(key="pr_w_prose").set_value(0.5).run()
    # a swept plan: its stored numbers, found by the plan's key
    key = plan_key(_plan(store_path, model_dir, "soft_count", keep=4), 0)
    expected = _sql(store_path, "SELECT * FROM plan_evals WHERE plan_key = ? ORDER BY eval_domain", key)
    table = _frame(at, "evaluation domain", "kl_ci_high")
    assert table["evaluation domain"].tolist() == ["code", "prose"]
    np.testing.assert_array_equal(table.kl, expected.kl)
    np.testing.assert_array_equal(table.kl_ci_low, expected.kl_ci_low)
    np.testing.assert_array_equal(table.nll_delta_ci_high, expected.nll_delta_ci_high)
    # the sweep evaluated this plan for frequency first (the same experts), and the page says so
    assert set(expected.criterion) == {"frequency"}
    assert any("Stored under frequency, which keeps the same experts" in c.value for c in at.caption)
    assert "pr_evaluate" not in [b.key for b in at.button]

    # a plan never evaluated: one click evaluates it in the background and stores it
    at.selectbox(key="pr_criterion").set_value("ean_sum").run()
    at.select_slider(key="pr_keep").set_value(3).run()
    assert any("not been evaluated" in c.value for c in at.caption)
    at.button(key="pr_evaluate").click().run()
    job, key = at.session_state["pr_eval_job"]
    assert key == plan_key(_plan(store_path, model_dir, "ean_sum", keep=3), 0)
    status = _wait_for_end(store_path, job)
    assert status["state"] == "done", status
    at.run()
    assert not at.exception and not at.error
    assert "pr_evaluate" not in [b.key for b in at.button]  # evaluated now: the numbers replace the button
    stored = _sql(store_path, "SELECT * FROM plan_evals WHERE plan_key = ? ORDER BY eval_domain", key)
    table = _frame(at, "evaluation domain", "kl_ci_high")
    assert table["evaluation domain"].tolist() == stored.eval_domain.tolist() == ["code", "prose"]
    np.testing.assert_array_equal(table.kl, stored.kl)
    # the stored numbers are those of `moe-viz evaluate` on the same plan
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model_dir), "--store", str(store_path), "--criterion", "ean_sum",
                 "--keep", "3", "--domain", "code", "--domain", "prose:0.5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    for row, result in zip(stored.itertuples(), results):  # float32 forwards; the job runs another thread count
        assert (row.eval_domain, row.tokens) == (result["domain"], result["tokens"])
        assert [row.kl, row.kl_ci_low, row.kl_ci_high, row.nll_pruned] == pytest.approx(
            [result["kl"], *result["kl_ci"], result["nll_pruned"]], rel=1e-5)


def test_background_sweep_from_the_page_stores_its_plans(swept, monkeypatch, tmp_path):
    _, model_dir, _, swept_store = swept
    store_path = _copy(swept_store, tmp_path)
    at = _app(store_path, monkeypatch, "compare")
    at.multiselect(key="cp_sw_criteria").set_value(["ean_sum"])
    at.text_input(key="cp_sw_sparsities").set_value("0.5")
    at.multiselect(key="cp_sw_domains").set_value(["code"])
    at.number_input(key="cp_sw_tokens").set_value(256)
    at.number_input(key="cp_sw_seq").set_value(32)
    at.button(key="cp_sw_start").click().run()
    assert not at.exception
    job = at.session_state["cp_sweep_job"]
    assert jobs.list_jobs(store_path, kind="sweep") == [job] and jobs.list_jobs(store_path) == []  # Runs lists captures
    assert jobs.job_kind(store_path, job) == "sweep"
    status = _wait_for_end(store_path, job)
    assert status["state"] == "done", status
    progress = status["progress"]
    assert (progress["done"], progress["total"], progress["finished"], progress["eta_s"]) == (2, 2, True, 0.0)
    at.run()
    assert not at.exception and not at.error
    assert any(job in s.value for s in at.success)
    rows = _sql(store_path, "SELECT criterion, sparsity, eval_domain FROM plan_evals WHERE domains = ?",
                json.dumps({"code": 1.0}))
    # random keeps the same experts whatever the mix, and the fixture's sweep already evaluated that plan
    # on the same text: served from the store, so the only new row is ean_sum's
    assert rows.values.tolist() == [["ean_sum", 0.5, "code"]]
    # a fresh visit opens on the newest setting: the sweep just run
    fresh = _app(store_path, monkeypatch, "compare")
    assert fresh.selectbox(key="cp_group").value == 0
    assert fresh.selectbox(key="cp_group").options[0].startswith("code:1 · uniform · seed 0 (1 plan stored)")
    assert {d for _, d in _lines(_charts(fresh)[0])} == {"code"}
    labels = at.selectbox(key="cp_group").options
    new = next(i for i, label in enumerate(labels) if label.startswith("code:1 · uniform · seed 0 (1 plan stored)"))
    at.selectbox(key="cp_group").set_value(new).run()
    lines = _lines(_charts(at)[0])
    shown = {c for c, _ in lines}
    assert shown >= {"ean_sum", "random"} and {d for _, d in lines} == {"code"}
    for criterion in shown:
        key = plan_key(_plan(store_path, model_dir, criterion, mix={"code": 1.0}, sparsity=0.5), 0)
        expected = _sql(store_path, "SELECT kl FROM plan_evals WHERE plan_key = ? AND eval_domain = 'code'", key)
        np.testing.assert_allclose(_array(lines[(criterion, "code")][0].y), expected.kl, rtol=1e-12)


def test_quality_curves_offer_their_data_as_csv_and_save_svg(swept, monkeypatch, downloads):
    _, _, _, store_path = swept
    at = _app(store_path, monkeypatch, "compare")
    assert set(check_plotly_downloads(at, downloads, "compare")) == {"cp_kl", "cp_nll_delta", "cp_cut"}


# -- the page's table functions on small inline frames ----------------------------------------------------------

def _evals(*rows):
    """plan_evals-like rows of one setting (code:1, uniform, seed 0, model top-k); each row a dict of overrides."""
    import pandas as pd

    base = {"domains": json.dumps({"code": 1.0}), "scope": "uniform", "seed": 0, "plan_top_k": -1,
            "tokens": 100, "nll_original": 2.0, "nll_pruned": 2.5, "kl": 0.1, "top1_agreement": 0.9,
            **{f"{m}_ci_{end}": 0.0 for m in ("kl", "nll_delta", "top1_agreement") for end in ("low", "high")}}
    return pd.DataFrame([{**base, **row} for row in rows])


GROUP = {"domains": json.dumps({"code": 1.0}), "scope": "uniform", "seed": 0, "plan_top_k": -1}


def test_panel_sets_take_the_evaluation_set_most_plans_used_newest_on_a_tie():
    from moe_viz.analysis.compare import panel_sets

    evals = _evals(
        *[{"plan_key": p, "criterion": "reap", "sparsity": s, "eval_domain": "code", "eval_set": "A", "created_at": 1}
          for p, s in (("p1", 0.25), ("p2", 0.5), ("p3", 0.75))],
        {"plan_key": "p1", "criterion": "reap", "sparsity": 0.25, "eval_domain": "code", "eval_set": "B", "created_at": 9},
        *[{"plan_key": p, "criterion": "reap", "sparsity": s, "eval_domain": "prose", "eval_set": es, "created_at": t}
          for p, s, es, t in (("p1", 0.25, "C", 2), ("p2", 0.5, "C", 2), ("p1", 0.25, "D", 5), ("p3", 0.75, "D", 5))],
    )
    assert panel_sets(evals, GROUP) == {"code": "A", "prose": "D"}


def test_curves_use_the_newest_evaluation_of_a_point():
    from moe_viz.analysis.compare import curves

    evals = _evals(
        {"plan_key": "p1", "criterion": "reap", "sparsity": 0.5, "eval_domain": "code", "eval_set": "A",
         "created_at": 1, "kl": 0.125, "nll_pruned": 2.25},
        {"plan_key": "p1", "criterion": "reap", "sparsity": 0.5, "eval_domain": "code", "eval_set": "A",
         "created_at": 7, "kl": 0.375, "nll_pruned": 2.75},
        {"plan_key": "p2", "criterion": "frequency", "sparsity": 0.5, "eval_domain": "code", "eval_set": "A",
         "created_at": 3, "kl": 0.5, "nll_pruned": 3.0},
    )
    table = curves(evals, GROUP, ["reap", "frequency"])
    assert table[["criterion", "kl", "nll_delta", "created_at"]].values.tolist() == [
        ["frequency", 0.5, 1.0, 3], ["reap", 0.375, 0.75, 7]]
    # a criterion without rows of its own, drawn from the (newest) row of the plan it shares
    shared = curves(evals, GROUP, ["soft_count"], shared={("soft_count", 0.5): "p1"})
    assert shared[["criterion", "kl", "shared_with", "created_at"]].values.tolist() == [["soft_count", 0.375, "reap", 7]]


def test_tradeoff_keeps_spread_over_the_valid_counts_most_kept_first():
    from moe_viz.analysis.compare import tradeoff_keeps

    # 14 counts below 16 (15 .. 2); positions round(linspace(0, 13, 4)) = 0, 4, 9, 13
    assert tradeoff_keeps(list(range(2, 17)), 16, points=4) == [15, 11, 6, 2]
    assert tradeoff_keeps([4, 6, 8], 8) == [6, 4]  # keeping every expert drops nothing: left out


def test_mix_label_names_domains_in_sorted_order():
    from moe_viz.analysis.compare import mix_label

    assert mix_label({"prose": 0.5, "code": 1.0}) == "code:1 + prose:0.5"
    assert mix_label(json.dumps({"zeta": 2, "alpha": 0.25})) == "alpha:0.25 + zeta:2"


def test_shared_plan_keys_leave_out_sparsities_the_router_cannot_reach(swept):
    """0.3 of 8 experts keeps 6 (sparsity 0.25): that plan is not the 0.3 point, so it gets no key."""
    from moe_viz.analysis.compare import evaluation_groups, shared_plan_keys
    from moe_viz.prune.sweep import stored_sweeps

    _, model_dir, _, store_path = swept
    model_id = str(Path(model_dir).resolve())
    (group,) = evaluation_groups(stored_sweeps(store_path, model_id)).to_dict("records")
    config = AutoConfig.from_pretrained(model_dir)
    keys = shared_plan_keys(store_path, model_id, group, [("ean_sum", 0.3), ("ean_sum", 0.25)], config)
    assert keys == {("ean_sum", 0.25): plan_key(_plan(store_path, model_dir, "ean_sum", sparsity=0.25), 0)}
