"""Expert detail's token profile and the Token routes page, driven with AppTest on a captured tiny model.

The data behind each view is compared with SQL written here on the raw token_routes rows.
"""

import time

import duckdb
import numpy as np
import pandas as pd
import pytest

from moe_viz import jobs
from moe_viz.capture.trace import load_trace
from moe_viz.cli import main
from moe_viz.prune.plan import build_plan
from chart_downloads import check_plotly_downloads, downloads  # noqa: F401 (fixture)
from test_ui import CODE, PROSE, _app, _array, _charts
from tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    model_dir = save_tiny_model(root / "model")
    domains = []
    for name, text in [("code", CODE), ("prose", PROSE)]:
        (root / f"{name}.txt").write_text(text)
        domains += ["--domain", f"{name}={root / f'{name}.txt'}"]
    store_path = root / "store.duckdb"
    assert main(["capture", "--model", str(model_dir), *domains, "--store", str(store_path),
                 "--seq-len", "64", "--max-tokens", "600", "--trace-tokens", "300"]) == 0
    return model_dir, store_path


def _sql(store_path, query, *params):
    with duckdb.connect(str(store_path), read_only=True) as con:
        return con.execute(query, list(params)).df()


def _run_ids(store_path):
    return dict(_sql(store_path, "SELECT domain, run_id FROM runs WHERE status = 'complete'").values.tolist())


def _tables(at, *columns):
    return [e.value for e in at.dataframe if set(columns) <= set(e.value.columns)]


def reference_profile(store_path, run_id, layer, expert):
    rows = _sql(store_path, """
        SELECT r.token_id, count(*) AS count, sum(r.gate::DOUBLE) AS gate_mass, any_value(o.c) AS occurrences
        FROM token_routes r JOIN (SELECT token_id, count(*) AS c FROM run_tokens WHERE run_id = $1 GROUP BY 1) o
             USING (token_id)
        WHERE r.run_id = $1 AND r.layer = $2 AND r.expert = $3 GROUP BY r.token_id""", run_id, layer, expert)
    traced = _sql(store_path, "SELECT count(*) AS t, count(DISTINCT token_id) AS v FROM run_tokens WHERE run_id = $1", run_id)
    share = rows["count"].sum() / traced.t[0]
    rows["lift"] = rows["count"] / rows.occurrences / share
    return rows, int(traced.v[0])


def test_expert_page_shows_the_token_profile(traced, monkeypatch):
    _, store_path = traced
    run_ids = _run_ids(store_path)
    busiest = _sql(store_path, """SELECT expert FROM token_routes WHERE run_id = $1 AND layer = 1
                                  GROUP BY expert ORDER BY count(*) DESC, expert LIMIT 1""", run_ids["code"]).expert[0]
    at = _app(store_path, monkeypatch, "expert")
    at.selectbox(key="ex_layer").set_value(1).run()
    at.selectbox(key="ex_expert").set_value(int(busiest)).run()
    at.selectbox(key="ex_domain").set_value("code").run()
    assert not at.exception, [e.value for e in at.exception]
    expected, domain_distinct = reference_profile(store_path, run_ids["code"], 1, int(busiest))
    by_count, by_mass = _tables(at, "piece", "count", "gate_mass", "lift")
    want = expected.sort_values(["count", "gate_mass", "token_id"], ascending=[False, False, True]).head(20)
    assert by_count.token_id.tolist() == want.token_id.tolist()
    np.testing.assert_allclose(by_count.lift, want.lift, rtol=1e-12)
    want = expected.sort_values(["gate_mass", "count", "token_id"], ascending=[False, False, True]).head(20)
    assert by_mass.token_id.tolist() == want.token_id.tolist()
    np.testing.assert_allclose(by_mass.gate_mass, want.gate_mass, rtol=1e-12)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Vocabulary coverage"] == f"{len(expected):,} token ids"
    assert metrics["Share of the domain's distinct ids"] == f"{len(expected) / domain_distinct:.1%}"
    contexts = [m.value for m in at.markdown if "<mark" in m.value]
    top_gate = _sql(store_path, """SELECT max(gate) AS g FROM token_routes WHERE run_id = $1 AND layer = 1
                                   AND expert = $2""", run_ids["code"], int(busiest)).g[0]
    assert len(contexts) == 8 and f"gate {top_gate:.3f}" in contexts[0]
    # cross-domain: one row per expert routed in both domains, total variation distance of token distributions
    differences = _tables(at, "expert", "tv")[0]
    counts = _sql(store_path, """SELECT run_id, expert, token_id, count(*) AS n FROM token_routes WHERE layer = 1
                                 GROUP BY ALL""")
    for row in differences.itertuples():
        a = counts[(counts.run_id == run_ids["code"]) & (counts.expert == row.expert)].set_index("token_id").n
        b = counts[(counts.run_id == run_ids["prose"]) & (counts.expert == row.expert)].set_index("token_id").n
        tv = 0.5 * (a / a.sum()).sub(b / b.sum(), fill_value=0).abs().sum()
        assert row.tv == pytest.approx(tv, rel=1e-12)
    assert differences.tv.is_monotonic_decreasing and len(differences) > 0


def _top1_matrix(routes, positions):
    """top-1 expert (largest gate, first slot on ties) per (layer, pos), computed here."""
    best = routes.assign(neg=-routes.gate.astype(np.float64)).sort_values(["layer", "pos", "neg", "slot"])
    first = best.groupby(["layer", "pos"]).head(1)
    return first.pivot(index="layer", columns="pos", values="expert").reindex(columns=positions).to_numpy()


def test_token_routes_page_domain_sample_and_plan(traced, monkeypatch, downloads):
    model_dir, store_path = traced
    run_ids = _run_ids(store_path)
    at = _app(store_path, monkeypatch, "tokens")
    at.selectbox(key="tr_domain").set_value("code").run()
    at.selectbox(key="tr_seq").set_value(1).run()
    at.select_slider(key="tr_width").set_value(16).run()
    at.number_input(key="tr_start").set_value(5).run()
    assert not at.exception, [e.value for e in at.exception]
    routes = _sql(store_path, "SELECT * FROM token_routes WHERE run_id = $1 AND seq = 1 AND pos BETWEEN 5 AND 20",
                  run_ids["code"])
    heat = _charts(at)[0].data[0]
    assert _array(heat.x).tolist() == list(range(5, 21))
    np.testing.assert_array_equal(_array(heat.z), _top1_matrix(routes, list(range(5, 21))))
    # colour by the plan: reap, keep 3 of 8 scored on prose (not half; a domain other than the shown one)
    at.radio(key="tr_colour").set_value("gate mass the plan removes").run()
    at.selectbox(key="tr_criterion").set_value("frequency").run()
    at.select_slider(key="tr_keep").set_value(3).run()
    at.multiselect(key="tr_plan_domains").set_value(["prose"]).run()
    assert not at.exception, [e.value for e in at.exception]
    plan = build_plan(store_path, str(model_dir.resolve()), "frequency", {"prose": 1.0}, keep=3)
    dropped = [(l, e) for l, kept in plan.kept.items() for e in range(8) if e not in kept]
    marked = routes.assign(dropped=[(l, e) in dropped for l, e in zip(routes.layer, routes.expert)],
                           g=routes.gate.astype(np.float64))
    per_cell = marked.groupby(["layer", "pos"]).apply(lambda c: c.g[c.dropped].sum() / c.g.sum(), include_groups=False)
    heat = _charts(at)[0].data[0]
    np.testing.assert_allclose(_array(heat.z), per_cell.unstack("pos").to_numpy(), rtol=1e-12)
    assert set(check_plotly_downloads(at, downloads, "tokens under a plan")) == {"tr_routes", "tr_dependence"}
    # the most hurt occurrences of the whole trace
    everything = _sql(store_path, "SELECT * FROM token_routes WHERE run_id = $1", run_ids["code"])
    everything["dropped"] = [(l, e) in dropped for l, e in zip(everything.layer, everything.expert)]
    everything["g"] = everything.gate.astype(np.float64)
    hurt = everything.groupby(["seq", "pos"]).apply(lambda c: c.g[c.dropped].sum() / c.g.sum(),
                                                     include_groups=False).rename("hurt").reset_index()
    hurt = hurt.sort_values(["hurt", "seq", "pos"], ascending=[False, True, True]).head(20)
    shown = _tables(at, "seq", "pos", "hurt")[0]
    assert shown[["seq", "pos"]].values.tolist() == hurt[["seq", "pos"]].values.tolist()
    np.testing.assert_allclose(shown.hurt, hurt.hurt, rtol=1e-9)
    # context dependence per layer: distinct top-1 experts per token id seen at least twice
    dependence = _tables(at, "layer", "mean_distinct_top1")[0]
    top1 = everything.assign(neg=-everything.g).sort_values(["layer", "seq", "pos", "neg", "slot"]).groupby(
        ["layer", "seq", "pos"]).head(1)
    for layer, rows in top1.groupby("layer"):
        per_id = rows.groupby("token_id").expert.agg(["nunique", "size"])
        per_id = per_id[per_id["size"] >= 2]
        got = dependence.set_index("layer").loc[layer]
        assert got.token_ids == len(per_id) and got.mean_distinct_top1 == pytest.approx(per_id["nunique"].mean())


def test_token_routes_page_traces_pasted_text(traced, monkeypatch):
    _, store_path = traced
    at = _app(store_path, monkeypatch, "tokens")
    at.radio(key="tr_kind").set_value("pasted text").run()
    at.text_area(key="tr_text").set_value("class Point:\n    x: int\n    y: int\n" * 3).run()
    at.button(key="tr_trace").click().run()
    job = at.session_state["tr_job"]
    deadline = time.time() + 300
    while jobs.job_status(store_path, job)["state"] == "running":  # wait for the terminal state
        assert time.time() < deadline, "trace job still running after 300 s"
        time.sleep(0.5)
    assert jobs.job_status(store_path, job)["state"] == "done", jobs.job_status(store_path, job)["error"]
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    frames = load_trace(jobs.trace_dir(store_path, job))
    routes = frames["token_routes"]
    positions = list(range(min(64, len(frames["run_tokens"]))))
    heat = _charts(at)[0].data[0]
    assert _array(heat.x).tolist() == positions
    np.testing.assert_array_equal(_array(heat.z), _top1_matrix(routes[routes.pos < 64], positions))


def test_token_routes_page_cancels_a_running_trace(traced, monkeypatch):
    import psutil

    _, store_path = traced
    at = _app(store_path, monkeypatch, "tokens")
    at.radio(key="tr_kind").set_value("pasted text").run()
    at.text_area(key="tr_text").set_value("def f(x):\n    return x\n" * 4).run()
    at.button(key="tr_trace").click().run()  # the job was launched during this run: it is still importing torch
    job = at.session_state["tr_job"]
    pid = int((jobs.jobs_dir(store_path) / job / "pid").read_text().split()[0])
    at.button(key="tr_cancel").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert jobs.job_status(store_path, job)["state"] == "cancelled"
    assert any("Trace cancelled" in i.value for i in at.info), [i.value for i in at.info]
    try:
        psutil.Process(pid).wait(timeout=60)  # SIGTERM ends it; the test process is its parent, so wait() reaps it
    except psutil.NoSuchProcess:
        pass  # already reaped
    assert not psutil.pid_exists(pid)


def test_example_contexts_are_escaped_html_with_whitespace_made_visible():
    """Token text is data: in the expert page's HTML it can never open a tag (markdown renders it as HTML)."""
    from moe_viz.ui.common import KEPT_COLOR, context_html, visible

    assert context_html('say "<b>', "&x", "</div>\ny") == (
        f"<code>say &quot;&lt;b&gt;<mark style='background:{KEPT_COLOR};color:white'>&amp;x</mark>&lt;/div&gt;⏎y</code>")
    assert visible(" a\n\tb") == "·a⏎→b"
