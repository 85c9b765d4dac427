"""Every dashboard page driven with Streamlit's AppTest on a store captured from a tiny model.

Assertions look at the data behind charts and tables and compare it with
values computed here straight from the store with SQL.
"""

import base64
import json
import math
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import plotly.io as pio
import pytest
from streamlit.testing.v1 import AppTest

from moe_viz.analysis import criteria
from moe_viz.cli import main
from moe_viz.analysis.domain_stats import random_jaccard
from sql_reference import METRIC_SQL, metric_table, mixed_ranks, ranks, share_lost, spearman
from sql_reference import partners as sql_partners, router_health as sql_router_health
from tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PAGES = "moe_viz/ui/pages"
CODE = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n" * 40
MATH = "2 + 3 = 5; 7 * 6 = 42; solve x + 4 = 9 so x = 5.\n" * 40
PROSE = "The quick brown fox jumps over the lazy dog. Experts route tokens by domain.\n" * 40


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    model_dir = save_tiny_model(root / "model")
    domains = []
    for name, text in [("code", CODE), ("math", MATH), ("prose", PROSE)]:
        (root / f"{name}.txt").write_text(text)
        domains += ["--domain", f"{name}={root / f'{name}.txt'}"]
    store_path = root / "store.duckdb"
    assert main(["capture", "--model", str(model_dir), *domains, "--store", str(store_path),
                 "--seq-len", "64", "--max-tokens", "600"]) == 0
    return root, model_dir, store_path


def _sql(store_path, query, *params):
    with duckdb.connect(str(store_path), read_only=True) as con:
        return con.execute(query, list(params)).df()


def _app(store_path, monkeypatch, page=None):
    monkeypatch.setattr("sys.argv", ["app.py", "--store", str(store_path)])
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    if page:
        at.switch_page(f"{PAGES}/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _array(value):
    if isinstance(value, dict) and "bdata" in value:
        shape = [int(s) for s in str(value.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).reshape(shape)
    return np.asarray(value)


def _frame(at, *columns):
    """The first table on the page that has all these columns."""
    for element in at.dataframe:
        if set(columns) <= set(element.value.columns):
            return element.value
    raise AssertionError(f"no table with columns {columns}")


def _charts(at):
    return [pio.from_json(e.proto.spec) for e in at.get("plotly_chart")]


# the heatmap's data holds the hover's values rounded to 6 significant digits: at most this far from exact
SIX_DIGITS = {"rtol": 5e-6, "atol": 1e-15}


def _heatmap(at, raw=False):
    """The Heatmaps page's Altair chart: its Vega-Lite spec and the frame it draws.

    Unless raw, the frame's columns are renamed to layer, expert, value, colour (and a, b for a
    difference): the colour column is the one the spec's colour encodes; value is the statistic's
    column (or "A minus B"); a and b are the "A <domain>" and "B <domain>" columns.
    """
    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    (chart,) = at.get("vega_lite_chart")
    (dataset,) = chart.proto.datasets
    spec, data = json.loads(chart.proto.spec), convert_arrow_bytes_to_pandas_df(dataset.data.data)
    if raw:
        return spec, data
    names = list(data.columns)
    assert names[:2] == ["layer", "expert"] and names[-1] == "unit", names
    frame = data[["layer", "expert"]].copy()
    if "A minus B" in names:
        frame["a"], frame["b"], frame["value"] = data[names[2]], data[names[3]], data["A minus B"]
    else:
        frame["value"] = data[names[2]]
    frame["colour"] = data[spec["encoding"]["color"]["field"]]
    return spec, frame


def _grid(frame, column):
    """A long (layer, expert) column as a layer x expert array."""
    return frame.pivot(index="layer", columns="expert", values=column).sort_index().sort_index(axis=1).to_numpy()


def _frequency_share(store_path, domain):
    frame = _sql(store_path, """
        SELECT s.layer, s.expert, s.routed_tokens / (l.top_k * l.tokens) AS share
        FROM expert_stats s JOIN layer_stats l USING (run_id, layer) JOIN runs r USING (run_id)
        WHERE r.domain = ? AND r.status = 'complete' ORDER BY 1, 2""", domain)
    return frame.pivot(index="layer", columns="expert", values="share").to_numpy()


def test_heatmap_shows_the_chosen_statistic_and_differences(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch)
    _, frame = _heatmap(at)
    np.testing.assert_allclose(_grid(frame, "value"), _frequency_share(store_path, "code"), **SIX_DIGITS)
    np.testing.assert_allclose(_grid(frame, "colour"), _frequency_share(store_path, "code"), **SIX_DIGITS)

    at.selectbox(key="hm_domain").set_value("math").run()
    np.testing.assert_allclose(_grid(_heatmap(at)[1], "value"), _frequency_share(store_path, "math"), **SIX_DIGITS)

    at.radio(key="hm_mode").set_value("Difference A − B").run()
    at.selectbox(key="hm_domain").set_value("code").run()
    at.selectbox(key="hm_domain_b").set_value("prose").run()
    spec, frame = _heatmap(at)
    expected = _frequency_share(store_path, "code") - _frequency_share(store_path, "prose")
    np.testing.assert_allclose(_grid(frame, "value"), expected, **SIX_DIGITS)
    scale = spec["encoding"]["color"]["scale"]
    limit = np.abs(expected).max()
    assert scale["domainMid"] == 0 and scale["domain"] == pytest.approx([-limit, limit])

    at.radio(key="hm_mode").set_value("One domain").run()
    at.selectbox(key="hm_metric").set_value("reap").run()
    reap = _sql(store_path, """SELECT s.layer, s.expert, coalesce(s.reap_sum / nullif(s.routed_tokens, 0), 0) AS v
        FROM expert_stats s JOIN runs r USING (run_id) WHERE r.domain = 'code' ORDER BY 1, 2""")
    reap = reap.pivot(index="layer", columns="expert", values="v").to_numpy()
    np.testing.assert_allclose(_grid(_heatmap(at)[1], "value"), reap, **SIX_DIGITS)
    at.radio(key="hm_scale").set_value("log").run()
    spec, frame = _heatmap(at)
    assert "log10" in spec["title"]
    floor = reap[reap > 0].min() / 10
    np.testing.assert_allclose(_grid(frame, "colour"), np.log10(np.maximum(reap, floor)), **SIX_DIGITS)
    np.testing.assert_allclose(_grid(frame, "value"), reap, **SIX_DIGITS)  # the hover shows the value, not its log


def test_heatmap_cell_opens_expert_detail(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch)
    at.selectbox(key="hm_layer").set_value(1).run()
    at.selectbox(key="hm_expert").set_value(5).run()
    at.button(key="hm_open").click().run()
    assert not at.exception
    assert at.selectbox(key="ex_layer").value == 1 and at.selectbox(key="ex_expert").value == 5


def test_heatmap_chart_data_rounds_to_six_significant_digits():
    """chart_data: the hover's values are the exact ones rounded to 6 significant digits; NaN stays NaN."""
    from moe_viz.ui.heatmap_chart import chart_data, heatmap_frame

    matrix = pd.DataFrame([[1234567.89, 0.000123456789], [np.nan, -2 / 3]], index=[3, 5], columns=[0, 7])
    data, colour = chart_data(heatmap_frame(matrix), "reap", "unit u", "code")
    assert colour == "reap" and list(data.columns) == ["layer", "expert", "reap", "unit"]
    assert data.reap.tolist()[:2] == [1234570.0, 0.000123457] and np.isnan(data.reap.iloc[2])
    assert data.reap.iloc[3] == -0.666667 and repr(float(data.reap.iloc[3])) == "-0.666667"  # shortest text: 6 digits
    assert (data.layer.tolist(), data.expert.tolist()) == ([3, 3, 5, 5], [0, 7, 0, 7])
    assert data.index.dtype == "category"  # not numeric: Streamlit would hand Vega (and the hover) an "(index)" field
    data, colour = chart_data(heatmap_frame(matrix, matrix * 2), "reap", "u", "code", "math")
    assert colour == "A minus B" and list(data.columns) == ["layer", "expert", "A code", "B math", "A minus B", "unit"]
    assert data["A minus B"].tolist()[:2] == [-1234570.0, -0.000123457]
    data, colour = chart_data(heatmap_frame(matrix, log=True), "reap", "u", "code", log=True)
    assert colour == "log10 reap" and data["log10 reap"].iloc[1] == float(f"{np.log10(0.000123456789):.6g}")


def test_heatmap_click_selects_the_cell_it_names():
    """The selection payload st.altair_chart returns for a click on the point parameter `cell`."""
    from moe_viz.ui.heatmap_chart import SELECTION, clicked_cell

    assert SELECTION == "cell"
    assert clicked_cell({"selection": {"cell": [{"layer": 3, "expert": 17}]}}) == (3, 17)
    # shift-click adds points; the newest is last
    assert clicked_cell({"selection": {"cell": [{"layer": 0, "expert": 1}, {"layer": 2, "expert": 0}]}}) == (2, 0)
    assert clicked_cell({"selection": {"cell": [{"layer": "1", "expert": "4"}]}}) == (1, 4)
    for nothing in (None, {}, {"selection": {}}, {"selection": {"cell": {}}}, {"selection": {"cell": []}},
                    {"selection": {"cell": [{"layer": 1}]}}):
        assert clicked_cell(nothing) is None


def test_overlap_page_follows_k_and_shows_random_reference(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "overlap")
    at.radio(key="ov_view").set_value("Lines across layers").run()  # the default view is matrix + mean over layers
    at.selectbox(key="ov_criterion").set_value("frequency").run()
    at.slider(key="ov_k").set_value(3).run()
    lines = _charts(at)[1]
    assert lines.layout.shapes[0].y0 == pytest.approx(random_jaccard(8, 3))
    pairs = {trace.name for trace in lines.data}
    assert pairs == {"code / math", "code / prose", "math / prose"}
    freq = _sql(store_path, """SELECT r.domain, s.layer, s.expert, s.routed_tokens FROM expert_stats s
        JOIN runs r USING (run_id) ORDER BY r.domain, s.layer, s.routed_tokens DESC, s.expert""")
    top = {(d, l): set(g.expert.head(3)) for (d, l), g in freq.groupby(["domain", "layer"])}

    def check_lines(lines, top):  # one line per domain pair: Jaccard of the two top-k sets at each layer
        for trace in lines.data:
            first, second = trace.name.split(" / ")
            assert [int(x) for x in _array(trace.x)] == [0, 1]
            for layer, value in zip(_array(trace.x), _array(trace.y)):
                a, b = top[(first, int(layer))], top[(second, int(layer))]
                assert value == pytest.approx(len(a & b) / len(a | b), rel=1e-12), (trace.name, layer)

    check_lines(lines, top)

    # another criterion and k: reap's top-2 (ties to the lower index), every pair, and the domain x domain matrix
    at.selectbox(key="ov_criterion").set_value("reap").run()
    at.slider(key="ov_k").set_value(2).run()
    at.selectbox(key="ov_layer").set_value(1).run()
    reap = _sql(store_path, """SELECT r.domain, s.layer, s.expert, coalesce(s.reap_sum / nullif(s.routed_tokens, 0), 0) AS v
        FROM expert_stats s JOIN runs r USING (run_id) ORDER BY r.domain, s.layer, v DESC, s.expert""")
    top = {(d, l): set(g.expert.head(2)) for (d, l), g in reap.groupby(["domain", "layer"])}
    lines, heat = _charts(at)[1], _charts(at)[0].data[0]
    assert lines.layout.shapes[0].y0 == pytest.approx(random_jaccard(8, 2))
    check_lines(lines, top)
    domains = ["code", "math", "prose"]
    assert list(heat.x) == domains and list(heat.y) == domains
    expected = [[len(top[(a, 1)] & top[(b, 1)]) / len(top[(a, 1)] | top[(b, 1)]) for b in domains] for a in domains]
    np.testing.assert_allclose(_array(heat.z), expected, rtol=1e-12)

    # mutual information I(domain; expert) per layer, domains weighted equally, from the joint count table
    counts = _sql(store_path, """SELECT r.domain, s.layer, s.expert, s.routed_tokens FROM expert_stats s
        JOIN runs r USING (run_id) WHERE r.domain IN ('code', 'math', 'prose')""")
    bars = _charts(at)[2].data[0]
    assert [int(x) for x in _array(bars.x)] == [0, 1]
    for layer, value in zip(_array(bars.x), _array(bars.y)):
        table = counts[counts.layer == int(layer)].pivot(index="domain", columns="expert", values="routed_tokens")
        cond = table.to_numpy(float) / table.to_numpy(float).sum(axis=1, keepdims=True)  # p(e | d)
        marginal = cond.mean(axis=0)  # p(e), p(d) = 1/3
        mi = sum(cond[d, e] * math.log(cond[d, e] / marginal[e]) for d in range(3) for e in range(8) if cond[d, e] > 0) / 3
        assert value == pytest.approx(mi, rel=1e-12), layer


def test_rankings_page_marks_dropped_experts(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "rankings")
    at.selectbox(key="rk_criterion").set_value("frequency").run()
    at.slider(key="rk_sparsity").set_value(0.25).run()
    table = _frame(at, "rank", "status")
    assert table.status.tolist() == ["kept"] * 6 + ["dropped"] * 2 and list(table["rank"]) == list(range(8))
    expected = _sql(store_path, """SELECT s.expert, s.routed_tokens FROM expert_stats s JOIN runs r USING (run_id)
        WHERE r.domain = 'code' AND s.layer = 0 ORDER BY s.routed_tokens DESC, s.expert""")
    assert table.expert.tolist() == expected.expert.tolist()
    assert table.score.tolist() == expected.routed_tokens.astype(float).tolist()
    assert table.routed.tolist() == (expected.routed_tokens > 0).tolist()
    # criteria agreement of layer 0 at k = 3, from ranks computed here by the ranking rule
    at.slider(key="rk_agree_k").set_value(3).run()
    agreement = _frame(at, "criterion_a", "spearman")
    names = [c for c in METRIC_SQL if c in criteria.CRITERIA and c != "reconstruction"]  # not measured here: left out
    code_run = _sql(store_path, "SELECT run_id FROM runs WHERE domain = 'code' AND status = 'complete'").run_id[0]
    reference = {}
    for name in names:
        ranked = ranks(metric_table(store_path, name, [code_run]))
        reference[name] = ranked[ranked.layer == 0]["rank"].to_numpy()
    assert len(agreement) == len(names) * (len(names) - 1) // 2
    for row in agreement.itertuples():
        a, b = reference[row.criterion_a], reference[row.criterion_b]
        assert row.spearman == pytest.approx(spearman(a, b), abs=1e-12), (row.criterion_a, row.criterion_b)
        assert row.topk_overlap == pytest.approx(len(set(np.flatnonzero(a < 3)) & set(np.flatnonzero(b < 3))) / 3)


def test_expert_page_profile_matches_the_store(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "expert")
    at.selectbox(key="ex_layer").set_value(1).run()
    at.selectbox(key="ex_expert").set_value(2).run()
    bars = _charts(at)[0].data[0]
    shares = dict(zip(_array(bars.x), _array(bars.y)))
    expected = _sql(store_path, """SELECT r.domain, s.routed_tokens / (l.top_k * l.tokens) AS share
        FROM expert_stats s JOIN layer_stats l USING (run_id, layer) JOIN runs r USING (run_id)
        WHERE s.layer = 1 AND s.expert = 2""")
    for row in expected.itertuples():
        assert shares[row.domain] == pytest.approx(row.share)
    shown = _frame(at, "reap", "frequency")
    assert shown.index.tolist() == ["code", "math", "prose"]
    assert shown.columns.tolist() == [c for c in criteria.CRITERIA if c not in ("random", "reconstruction")]
    run_ids = dict(_sql(store_path, "SELECT domain, run_id FROM runs WHERE status = 'complete'").values.tolist())
    for domain in shown.index:
        for name in shown.columns:  # each criterion's rank of expert 2 in layer 1, by the ranking rule
            ranked = ranks(metric_table(store_path, name, [run_ids[domain]]))
            assert shown.loc[domain, name] == ranked[(ranked.layer == 1) & (ranked.expert == 2)]["rank"].item(), (domain, name)
    _assert_partners_shown(at, store_path, run_ids["code"])  # expert 2 of layer 1 has partners on code here


def _assert_partners_shown(at, store_path, run_id):
    """The expert page's partner table for layer 1, expert 2 equals SQL co-activation over that run's routed tokens."""
    coact = sql_partners(store_path, run_id, 1, 2).head(10)
    assert not coact.empty
    partners = _frame(at, "partner", "tokens")
    assert partners.partner.tolist() == coact.partner.tolist() and partners.tokens.tolist() == coact.tokens.tolist()
    np.testing.assert_allclose(partners.p_given_expert, coact.p, rtol=1e-12)


def test_health_page_counts_never_routed_experts(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "health")
    table = _frame(at, "load_imbalance", "never_routed")
    expected = _sql(store_path, """SELECT r.domain, s.layer, count(*) FILTER (WHERE s.routed_tokens = 0) AS never
        FROM expert_stats s JOIN runs r USING (run_id) GROUP BY ALL ORDER BY ALL""")
    merged = table.merge(expected, on=["domain", "layer"])
    assert len(merged) == len(expected) and (merged.never_routed == merged.never).all()
    # load imbalance = max share / mean share; entropy normalised by ln E (docs/METRICS.md router health)
    health = sql_router_health(store_path).drop(columns="never")
    merged = table.merge(health, on=["domain", "layer"])
    assert len(merged) == len(table) == len(health)
    np.testing.assert_allclose(merged.load_imbalance, merged.imbalance, rtol=1e-12)
    np.testing.assert_allclose(merged.entropy_normalised, merged.entropy, rtol=1e-12)


def test_prune_page_previews_and_exports_a_verified_model(captured, monkeypatch):
    root, _, store_path = captured
    at = _app(store_path, monkeypatch, "prune")
    at.select_slider(key="pr_keep").set_value(3).run()  # not half: float32 rounds differently there
    at.multiselect(key="pr_domains").set_value(["code", "math"]).run()
    mask = _array(_charts(at)[0].data[0].z)
    assert (mask.sum(axis=1) == 3).all()
    # the plan the mask shows, from SQL: reap scores as per-layer shares of code and math, mixed 1:1, best 3 kept
    run_ids = dict(_sql(store_path, "SELECT domain, run_id FROM runs WHERE status = 'complete'").values.tolist())
    reference = mixed_ranks(store_path, "reap", run_ids, {"code": 1.0, "math": 1.0})
    assert mask.tolist() == (reference["rank"] < 3).astype(int).to_numpy().reshape(mask.shape).tolist()
    # the table: share of each domain's routed tokens and REAP mass on the dropped experts, mean over layers
    lost = _frame(at, "routed_share_lost").set_index("domain")
    layers = sorted(reference.layer.unique())
    dropped = {layers[i]: list(np.flatnonzero(row == 0)) for i, row in enumerate(mask)}
    expected = share_lost(store_path, [run_ids[d] for d in ("code", "math", "prose")], dropped)
    expected = expected.groupby("domain")[["routed_share_lost", "reap_share_lost"]].mean()
    assert sorted(lost.index) == ["code", "math", "prose"]
    for domain, row in expected.iterrows():
        assert lost.loc[domain, "routed_share_lost"] == pytest.approx(row.routed_share_lost, rel=1e-12)
        assert lost.loc[domain, "reap_share_lost"] == pytest.approx(row.reap_share_lost, rel=1e-12)
    at.text_input(key="pr_name").set_value("ui-export").run()
    at.button(key="pr_export").click().run()
    assert not at.exception, [e.value for e in at.exception]
    export = root / "exports" / "ui-export"
    report = json.loads((export / "moe_viz_verify.json").read_text())
    assert report["verdict"] == "PASS"
    assert at.success[0].value == f"Verification PASS: {report['reason']}"  # the CLI's and the JSON's words
    assert not at.error
    table = _frame(at, "ppl pruned")
    assert set(table.domain) == {"code", "math"}


def test_runs_page_captures_in_the_background(captured, monkeypatch):
    """Each job is followed to its terminal state (done/failed), never to an intermediate sign:
    on a loaded machine a run shows up as `running` long before it completes."""
    from moe_viz import jobs

    root, model_dir, store_path = captured
    at = _app(store_path, monkeypatch, "runs")
    assert set(_frame(at, "run_id", "status").domain) >= {"code", "math", "prose"}
    (root / "extra.txt").write_text(PROSE + CODE)

    def submit_and_wait(domains: str) -> dict:
        at.text_input(key="cap_model").set_value(str(model_dir))
        at.text_area(key="cap_domains").set_value(domains)
        at.number_input(key="cap_tokens").set_value(300)
        at.number_input(key="cap_seq").set_value(64)
        at.button[0].click().run()  # the form's submit button
        job = at.session_state["last_job"]
        deadline = time.time() + 240
        while jobs.job_status(store_path, job)["state"] == "running":
            assert time.time() < deadline, f"job {job} still running after 240 s"
            time.sleep(0.5)
        at.run()  # the page as it is once the job has ended
        return jobs.job_status(store_path, job)

    status = submit_and_wait(f"extra={root / 'extra.txt'}\nbroken={root / 'missing.txt'}")
    # the bad source fails the whole job before the model loads, with its one-line reason
    assert status["state"] == "failed", status
    assert at.error and "missing.txt does not exist" in at.error[0].value
    status = submit_and_wait(f"extra={root / 'extra.txt'}")
    assert status["state"] == "done", status
    runs = _frame(at, "run_id", "status")
    assert runs[runs.domain == "extra"].status.tolist() == ["complete"]


def test_missing_and_corrupted_stores_get_one_line_messages(tmp_path, monkeypatch):
    for page in ("heatmaps", "prune", "runs"):
        at = _app(tmp_path / "none.duckdb", monkeypatch, None if page == "heatmaps" else page)
        assert "moe-viz demo" in at.info[0].value
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(b"garbage" * 1000)
    at = _app(bad, monkeypatch)
    assert "cannot open store" in at.info[0].value and "\n" not in at.info[0].value


def _running_job(store_path, job, tokens_done, tokens_total):
    """A capture job folder as the Runs page starts it, with a live process (its real pid and start time)
    standing in for the capture; it ends when its stdin is closed."""
    from run_rows import job_folder, pid_line, stand_in_process

    stand_in = stand_in_process()
    job_folder(store_path, job, pid_line(stand_in.pid), progress={
        "domain": "code", "tokens_done": tokens_done, "tokens_total": tokens_total, "elapsed_s": 3.0, "detail": "",
        "finished": False})
    return stand_in


def test_runs_page_shows_a_running_jobs_progress(tmp_path, monkeypatch):
    """The progress bar is tokens done over tokens total, with the rate; a running job can be cancelled."""
    store_path = tmp_path / "store.duckdb"
    job = "20250101-000000-aaaaaa"
    stand_in = _running_job(store_path, job, tokens_done=150, tokens_total=600)
    try:
        at = _app(store_path, monkeypatch, "runs")
        (bar,) = at.get("progress")
        assert (bar.proto.value, bar.proto.text) == (25, f"`{job}` — running: code 150/600 tokens (50 tok/s)")
        assert at.button(key=f"cancel_{job}").label == "Cancel"
    finally:
        stand_in.stdin.close()
        assert stand_in.wait(timeout=60) == 0


def test_runs_page_lists_the_stores_runs_newest_first_with_their_status(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "runs")
    table = _frame(at, "run_id", "status", "started_at")
    expected = _sql(store_path, "SELECT run_id, domain, status FROM runs ORDER BY started_at DESC")
    assert len(set(_sql(store_path, "SELECT started_at FROM runs").started_at)) == len(expected)  # no ties
    assert table.run_id.tolist() == expected.run_id.tolist()
    assert table.status.tolist() == expected.status.tolist() and table.domain.tolist() == expected.domain.tolist()


def test_runs_page_cancel_stops_the_job_it_sits_under(tmp_path, monkeypatch):
    """Two running captures: Cancel under the older one cancels that one, and leaves the newer running."""
    from moe_viz import jobs

    store_path = tmp_path / "store.duckdb"
    older, newer = "20250101-000000-aaaaaa", "20250102-000000-bbbbbb"
    stand_ins = {}
    try:
        for job in (older, newer):
            stand_ins[job] = _running_job(store_path, job, tokens_done=1, tokens_total=2)
        at = _app(store_path, monkeypatch, "runs")
        assert jobs.list_jobs(store_path) == [newer, older]
        at.button(key=f"cancel_{older}").click().run()
        assert not at.exception
        assert jobs.job_status(store_path, older)["state"] == "cancelled"
        assert jobs.job_status(store_path, newer)["state"] == "running"
    finally:
        for process in stand_ins.values():
            process.stdin.close()
            process.wait(timeout=60)


def test_pages_offer_only_models_with_complete_runs_and_name_the_store_absolutely(captured, tmp_path, monkeypatch):
    """A run still capturing (or interrupted) has no statistics: no page offers it. A relative --store is shown absolute."""
    from moe_viz import store

    _, model_dir, captured_store = captured
    copy = tmp_path / "store.duckdb"
    shutil.copyfile(captured_store, copy)
    store.begin_run(copy, model_id="other/model", model_fingerprint="f", model_type="qwen3_moe", domain="code",
                    source="inline", settings={"seq_len": 8}, tool_version="test")  # `running`: this process lives
    runs = store.list_runs(copy)
    assert runs[runs.model_id == "other/model"].status.tolist() == ["running"]
    monkeypatch.chdir(tmp_path)
    at = _app("store.duckdb", monkeypatch)
    assert at.sidebar.selectbox(key="model").options == [f"{model_dir.parent.name}/{model_dir.name} (qwen3_moe)"]
    assert f"store: `{copy}`" in [c.value for c in at.sidebar.caption]


def test_rankings_bars_in_rank_order_and_never_below_top_k(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "rankings")
    at.selectbox(key="rk_criterion").set_value("frequency").run()
    at.selectbox(key="rk_layer").set_value(1).run()
    expected = _sql(store_path, """SELECT s.expert FROM expert_stats s JOIN runs r USING (run_id)
        WHERE r.domain = 'code' AND s.layer = 1 ORDER BY s.routed_tokens DESC, s.expert""")
    order = [str(e) for e in expected.expert]
    bars = _charts(at)[0]
    assert bars.layout.xaxis.type == "category"  # not a linear axis in expert-index order
    assert list(bars.layout.xaxis.categoryarray) == order  # best first, as the axis title says
    top_k = int(_sql(store_path, "SELECT max(top_k) AS k FROM layer_stats").k[0])
    slider = at.slider(key="rk_sparsity")
    assert slider.max == pytest.approx(1 - top_k / 8)  # 0.75: keep at least top-k = 2 of 8
    slider.set_value(slider.max).run()
    assert _frame(at, "rank", "status").status.tolist() == ["kept"] * top_k + ["dropped"] * (8 - top_k)
    assert f"keep {top_k} of 8" in _charts(at)[0].layout.title.text
    assert any(f"never fewer than {top_k}" in c.value for c in at.caption)


def test_expert_partners_chart_sorted_by_probability(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "expert")
    at.selectbox(key="ex_layer").set_value(1).run()
    at.selectbox(key="ex_expert").set_value(2).run()
    run_id = _sql(store_path, "SELECT run_id FROM runs WHERE domain = 'code' AND status = 'complete'").run_id[0]
    coact = sql_partners(store_path, run_id, 1, 2).head(10)
    coact = coact.sort_values(["p", "partner"], ascending=[False, True])
    chart = _charts(at)[1]
    assert chart.layout.xaxis.type == "category"  # no gaps for partner indices that are absent
    assert list(chart.layout.xaxis.categoryarray) == [str(p) for p in coact.partner]
    bars = chart.data[0]
    assert list(bars.x) == [str(p) for p in coact.partner]
    np.testing.assert_allclose(_array(bars.y), coact.p, rtol=1e-12)
    assert (np.diff(_array(bars.y)) <= 0).all()


def test_prune_export_name_follows_the_plan_until_typed(captured, monkeypatch):
    _, model_dir, store_path = captured
    at = _app(store_path, monkeypatch, "prune")
    keep = at.select_slider(key="pr_keep").value
    assert at.text_input(key="pr_name").value == f"{model_dir.name}-reap-keep{keep}"
    at.select_slider(key="pr_keep").set_value(3).run()
    assert at.text_input(key="pr_name").value == f"{model_dir.name}-reap-keep3"
    at.selectbox(key="pr_criterion").set_value("frequency").run()
    assert at.text_input(key="pr_name").value == f"{model_dir.name}-frequency-keep3"
    at.selectbox(key="pr_criterion").set_value("reap").run()
    at.select_slider(key="pr_keep").set_value(4).run()
    assert at.text_input(key="pr_name").value == f"{model_dir.name}-reap-keep4"  # never a stale keep in the name
    at.text_input(key="pr_name").set_value("my-own-name").run()
    at.select_slider(key="pr_keep").set_value(3).run()
    assert at.text_input(key="pr_name").value == "my-own-name"  # the user's own name is kept


def test_prune_page_errors_name_the_box_and_savings_are_good(captured, monkeypatch):
    root, _, store_path = captured
    taken = root / "exports" / "ui-taken"
    taken.mkdir(parents=True, exist_ok=True)
    (taken / "notes.txt").write_text("not an export")
    at = _app(store_path, monkeypatch, "prune")
    # savings are shown as good news, not as red losses
    savings = [m for m in at.metric if m.label.startswith(("Parameters", "Size"))]
    assert len(savings) == 2
    for metric in savings:
        assert metric.proto.delta.startswith("-") and metric.proto.color == metric.proto.MetricColor.GREEN
    at.session_state["pr_result"] = {"verdict": "PASS", "reason": "an older export", "export": "old",
                                     "dtype": "float64", "domains": {}}
    at.run()
    assert at.success[0].value == "Verification PASS: an older export"
    at.text_input(key="pr_name").set_value("ui-taken").run()
    at.button(key="pr_export").click().run()
    assert not at.exception, [e.value for e in at.exception]
    message = at.error[0].value
    assert message == (f"{taken.resolve()} already exists: choose another name in the “Export name” box or tick "
                       "“Replace an existing export of that name” to replace it")
    assert not at.success  # the older result is gone
    assert [(s.label, s.state) for s in at.status] == [(f"Export failed: {message}", "error")]
    at.checkbox(key="pr_force").check().run()
    at.button(key="pr_export").click().run()
    message = at.error[0].value
    assert "--out" not in message and "--force" not in message
    assert message.endswith("refusing to replace it; choose another name in the “Export name” box")
    assert not any("Exporting" in s.label for s in at.status)


def test_heatmap_colour_bar_names_the_unit_and_difference_hover_shows_both(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch)
    spec, _ = _heatmap(at)
    unit = "(fraction of the layer's k·T slots)"
    assert spec["encoding"]["color"]["title"] == ["frequency_share", unit]
    # the hover is the datum: its columns are named as the hover shows them, with the unit
    assert spec["mark"]["tooltip"] == {"content": "data"}
    _, data = _heatmap(at, raw=True)
    assert list(data.columns) == ["layer", "expert", "frequency_share", "unit"]
    assert set(data.unit) == {"fraction of the layer's k·T slots"}
    assert spec["encoding"]["color"]["field"] == "frequency_share"
    assert spec["params"] == [{"name": "cell", "select": {"type": "point", "fields": ["layer", "expert"], "on": "click"}}]
    at.selectbox(key="hm_metric").set_value("reap").run()
    at.radio(key="hm_scale").set_value("log").run()
    spec, data = _heatmap(at, raw=True)
    assert spec["encoding"]["color"]["title"] == ["log10 reap", "(gate·‖f_e(x)‖, mean over routed tokens)"]
    assert list(data.columns) == ["layer", "expert", "reap", "log10 reap", "unit"]
    assert spec["encoding"]["color"]["field"] == "log10 reap"
    at.radio(key="hm_scale").set_value("linear").run()
    at.selectbox(key="hm_metric").set_value("frequency_share").run()
    at.radio(key="hm_mode").set_value("Difference A − B").run()
    at.selectbox(key="hm_domain").set_value("math").run()
    at.selectbox(key="hm_domain_b").set_value("code").run()
    spec, frame = _heatmap(at)
    np.testing.assert_allclose(_grid(frame, "a"), _frequency_share(store_path, "math"), **SIX_DIGITS)
    np.testing.assert_allclose(_grid(frame, "b"), _frequency_share(store_path, "code"), **SIX_DIGITS)
    np.testing.assert_allclose(_grid(frame, "value"),
                               _frequency_share(store_path, "math") - _frequency_share(store_path, "code"),
                               **SIX_DIGITS)
    _, data = _heatmap(at, raw=True)
    assert list(data.columns) == ["layer", "expert", "A math", "B code", "A minus B", "unit"]
    assert spec["encoding"]["color"]["field"] == "A minus B"
    assert spec["encoding"]["color"]["title"] == ["frequency_share, A − B", unit]


def test_prune_page_cli_command_exports_the_same_plan(captured, tmp_path, monkeypatch, capsys):
    import shlex

    from moe_viz.prune.export import PRUNE_MANIFEST

    _, model_dir, store_path = captured
    at = _app(store_path, monkeypatch, "prune")
    at.selectbox(key="pr_criterion").set_value("frequency").run()
    at.select_slider(key="pr_keep").set_value(3).run()
    at.multiselect(key="pr_domains").set_value(["code", "prose"]).run()
    at.number_input(key="pr_w_prose").set_value(0.3).run()  # unequal weights: the mix must come through exactly
    at.text_input(key="pr_name").set_value("from-cli").run()
    heat = _charts(at)[0].data[0]
    mask = _array(heat.z)
    page_dropped = {int(layer): np.flatnonzero(row == 0).tolist() for layer, row in zip(heat.y, mask)}
    (command,) = [c.value for c in at.code]
    argv = shlex.split(command)
    assert argv[:2] == ["moe-viz", "prune"]
    assert argv[argv.index("--store") + 1] == str(store_path) and argv[argv.index("--keep") + 1] == "3"
    assert argv[argv.index("--out") + 1] == str(store_path.parent / "exports" / "from-cli")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--domain"] == ["code:1.0", "prose:0.3"]
    monkeypatch.chdir(tmp_path)  # the command names everything absolutely
    assert main(argv[1:]) == 0, capsys.readouterr().err
    manifest = json.loads((store_path.parent / "exports" / "from-cli" / PRUNE_MANIFEST).read_text())
    exported = manifest["plan"]
    dropped = {int(layer): sorted(set(range(n)) - set(exported["kept"][layer]))
               for layer, n in exported["num_experts"].items()}
    assert dropped == page_dropped
    assert exported["criterion"] == "frequency" and exported["domains"] == {"code": 1.0, "prose": 0.3}
    # the mix matters here: the same criterion on code alone drops other experts
    alone = _array(_charts(at.multiselect(key="pr_domains").set_value(["code"]).run())[0].data[0].z)
    assert alone.tolist() != mask.tolist()
    # a global plan cannot be exported: the page gives the `evaluate --scope global` command instead
    at.multiselect(key="pr_domains").set_value(["code", "prose"]).run()
    at.radio(key="pr_scope").set_value("global").run()
    (command,) = [c.value for c in at.code]
    assert shlex.split(command)[:2] == ["moe-viz", "evaluate"] and command.endswith("--scope global")


def test_prune_command_is_shell_quoted_and_keeps_the_replace_choice():
    """The copied command must run as shown: paths with spaces quoted, --force when "replace" is ticked."""
    import shlex

    from moe_viz.errors import MoeVizError
    from moe_viz.prune.command import prune_command
    from moe_viz.prune.plan import PrunePlan

    plan = PrunePlan(model_id="/models/my model", model_fingerprint="f", criterion="frequency", scope="uniform",
                     sparsity=0.5, domains={"code": 1.0, "prose": 0.3}, run_ids={"code": "a", "prose": "b"},
                     num_experts={0: 8, 1: 8}, kept={0: [0, 1, 2, 3], 1: [1, 2, 3, 4]}, protected={1: [4]})
    expected = ("moe-viz prune --model '/models/my model' --store '/data/my store.duckdb' --criterion frequency "
                "--keep 4 --domain code:1.0 --domain prose:0.3 --protect 1:4 --out '/data/exports/keep 4'")
    assert prune_command(plan, "/data/my store.duckdb", "/data/exports/keep 4") == expected
    forced = prune_command(plan, "/data/my store.duckdb", "/data/exports/keep 4", force=True)
    assert forced == expected + " --force"
    assert shlex.split(forced)[shlex.split(forced).index("--out") + 1] == "/data/exports/keep 4"
    plan.domains = {"code:v2": 1.0}  # NAME:WEIGHT could not be parsed back
    with pytest.raises(MoeVizError, match="domain 'code:v2' has a ':' that the command line cannot pass"):
        prune_command(plan, "/data/my store.duckdb", "/data/exports/keep 4")


# -- defaults, drill-down values and per-domain numbers of each page -------------------------------------------

def test_heatmap_difference_defaults_to_two_different_domains(captured, monkeypatch):
    """Switching to A − B without touching the pickers: B is the second domain, never A minus itself (all zeros)."""
    _, _, store_path = captured
    at = _app(store_path, monkeypatch)
    first, second = sorted(_sql(store_path, "SELECT DISTINCT domain FROM runs WHERE status = 'complete'").domain)[:2]
    at.radio(key="hm_mode").set_value("Difference A − B").run()
    assert at.selectbox(key="hm_domain").value == first and at.selectbox(key="hm_domain_b").value == second
    _, frame = _heatmap(at)
    np.testing.assert_allclose(_grid(frame, "value"),
                               _frequency_share(store_path, first) - _frequency_share(store_path, second), **SIX_DIGITS)


def test_heatmap_cell_metric_shows_the_picked_cells_value_not_its_log(captured, monkeypatch):
    _, _, store_path = captured
    reap = _sql(store_path, """SELECT s.layer, s.expert, coalesce(s.reap_sum / nullif(s.routed_tokens, 0), 0) AS v
        FROM expert_stats s JOIN runs r USING (run_id) WHERE r.domain = 'prose' ORDER BY 1, 2""")
    reap = reap.set_index(["layer", "expert"]).v
    layer, expert = reap[reap > 0].index[-1]  # a routed expert of the last layer: its log10 differs from it
    at = _app(store_path, monkeypatch)
    at.selectbox(key="hm_metric").set_value("reap").run()
    at.selectbox(key="hm_domain").set_value("prose").run()
    at.radio(key="hm_scale").set_value("log").run()
    at.selectbox(key="hm_layer").set_value(int(layer)).run()
    at.selectbox(key="hm_expert").set_value(int(expert)).run()
    (metric,) = [m for m in at.metric if m.label.startswith("reap at layer")]
    assert metric.label == f"reap at layer {layer}, expert {expert}"
    assert float(metric.value) == pytest.approx(reap[(layer, expert)], rel=1e-5)


def test_overlap_matrix_of_the_first_layer_is_that_layers_jaccard(captured, monkeypatch):
    """The domain x domain matrix at layer 0 (the default layer), not another layer's overlap."""
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "overlap")
    at.selectbox(key="ov_criterion").set_value("frequency").run()
    at.slider(key="ov_k").set_value(3).run()
    assert at.selectbox(key="ov_layer").value == 0
    freq = _sql(store_path, """SELECT r.domain, s.layer, s.expert, s.routed_tokens FROM expert_stats s
        JOIN runs r USING (run_id) ORDER BY r.domain, s.layer, s.routed_tokens DESC, s.expert""")
    top = {(d, l): set(g.expert.head(3)) for (d, l), g in freq.groupby(["domain", "layer"])}
    domains = sorted(freq.domain.unique())  # other tests may have captured more domains into this store
    expected = [[len(top[(a, 0)] & top[(b, 0)]) / len(top[(a, 0)] | top[(b, 0)]) for b in domains] for a in domains]
    heat = _charts(at)[0]
    np.testing.assert_allclose(_array(heat.data[0].z), expected, rtol=1e-12)
    assert heat.layout.title.text.startswith("Top-3 Jaccard overlap at layer 0")


def test_overlap_default_k_is_the_routers_top_k(captured, monkeypatch):
    _, _, store_path = captured
    top_k = int(_sql(store_path, "SELECT max(top_k) AS k FROM layer_stats").k[0])
    at = _app(store_path, monkeypatch, "overlap")
    assert at.slider(key="ov_k").value == min(max(top_k, 2), 8)


def test_expert_partners_on_another_domain_divide_by_that_domains_routed_tokens(captured, monkeypatch):
    _, _, store_path = captured
    run_ids = dict(_sql(store_path, "SELECT domain, run_id FROM runs WHERE status = 'complete'").values.tolist())
    at = _app(store_path, monkeypatch, "expert")
    at.selectbox(key="ex_layer").set_value(1).run()
    at.selectbox(key="ex_expert").set_value(2).run()
    at.selectbox(key="ex_domain").set_value("prose").run()
    _assert_partners_shown(at, store_path, run_ids["prose"])


def test_health_charts_draw_the_normalised_entropy_and_imbalance(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "health")
    health = sql_router_health(store_path).set_index(["domain", "layer"])
    imbalance, entropy, never = _charts(at)
    for chart, column in [(imbalance, "imbalance"), (entropy, "entropy"), (never, "never")]:
        assert {t.name for t in chart.data} == set(health.index.get_level_values("domain"))
        for trace in chart.data:
            for layer, value in zip(_array(trace.x), _array(trace.y)):
                assert value == pytest.approx(health.loc[(trace.name, int(layer)), column], rel=1e-12), (column, trace.name)


def test_rankings_agreement_table_follows_the_picked_layer_and_default_k(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "rankings")
    assert at.slider(key="rk_sparsity").value == 0.5
    assert at.slider(key="rk_agree_k").value == 4  # starts at the experts the plan keeps (4 of 8 at sparsity 0.5)
    at.selectbox(key="rk_criterion").set_value("frequency").run()
    at.selectbox(key="rk_layer").set_value(1).run()
    at.slider(key="rk_agree_k").set_value(6).run()
    agreement = _frame(at, "criterion_a", "spearman")
    code_run = _sql(store_path, "SELECT run_id FROM runs WHERE domain = 'code' AND status = 'complete'").run_id[0]
    ranked = {name: ranks(metric_table(store_path, name, [code_run])) for name in ("frequency", "reap")}
    a, b = (ranked[n][ranked[n].layer == 1]["rank"].to_numpy() for n in ("frequency", "reap"))
    (row,) = [r for r in agreement.itertuples() if {r.criterion_a, r.criterion_b} == {"frequency", "reap"}]
    assert row.spearman == pytest.approx(spearman(a, b), abs=1e-12)
    assert row.topk_overlap == pytest.approx(len(set(np.flatnonzero(a < 6)) & set(np.flatnonzero(b < 6))) / 6)


def test_prune_page_names_the_sparsity_of_the_keep_it_offers(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "prune")
    at.select_slider(key="pr_keep").set_value(6).run()
    assert at.select_slider(key="pr_keep").format_func(6) == "6 (sparsity 0.25)"
    removed = {m.label: m.value for m in at.metric}["Routed experts removed"]
    assert removed == "25%"


def test_pages_use_the_newest_complete_run_of_a_domain(captured, tmp_path, monkeypatch):
    """A domain captured again: the pages show the new run's statistics, not the older one's."""
    _, model_dir, captured_store = captured
    copy = tmp_path / "store.duckdb"
    shutil.copyfile(captured_store, copy)
    (tmp_path / "code.txt").write_text(PROSE)  # "code" captured again, now from other text
    assert main(["capture", "--model", str(model_dir), "--domain", f"code={tmp_path / 'code.txt'}", "--store", str(copy),
                 "--seq-len", "64", "--max-tokens", "300"]) == 0
    newest = _sql(copy, """SELECT run_id FROM runs WHERE domain = 'code' AND status = 'complete'
                           ORDER BY started_at DESC LIMIT 1""").run_id[0]
    assert len(_sql(copy, "SELECT run_id FROM runs WHERE domain = 'code' AND status = 'complete'")) >= 2
    share = _sql(copy, """SELECT s.layer, s.expert, s.routed_tokens / (l.top_k * l.tokens) AS share
        FROM expert_stats s JOIN layer_stats l USING (run_id, layer) WHERE s.run_id = ? ORDER BY 1, 2""", newest)
    share = share.pivot(index="layer", columns="expert", values="share").to_numpy()
    assert not np.allclose(share, _frequency_share(captured_store, "code"))  # the two runs differ
    at = _app(copy, monkeypatch)
    assert at.selectbox(key="hm_domain").value == "code"
    np.testing.assert_allclose(_grid(_heatmap(at)[1], "value"), share, **SIX_DIGITS)


def test_prune_page_with_an_unmeasured_criterion_says_how_to_measure_it(captured, monkeypatch):
    """reconstruction is causal and not measured in this store: a one-line message, never a traceback."""
    _, model_dir, store_path = captured
    at = _app(store_path, monkeypatch, "prune")
    at.selectbox(key="pr_criterion").set_value("reconstruction").run()
    assert not at.exception, [e.value for e in at.exception]
    (error,) = at.error
    assert error.value == (f"criterion reconstruction has no scores for domain(s) code: run `moe-viz importance "
                           f"--model {model_dir} --domain code` first")
    assert not at.get("plotly_chart")  # the page stops: no plan drawn
