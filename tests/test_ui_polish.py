"""Dashboard polish (issue 13): clearer overlap views, picker names, help text, threads, quiet terminal."""

import time

import numpy as np
import pandas as pd
import pytest

from moe_viz import domain_stats
from moe_viz.cli import main
from test_ui import CODE, MATH, _app, _array, _charts, _sql, captured  # noqa: F401  (captured: pytest fixture)
from tiny_models import save_tiny_model


def _frequency_scores(store_path) -> pd.DataFrame:
    return _sql(store_path, """SELECT r.domain, s.layer, s.expert, s.routed_tokens::DOUBLE AS score
        FROM expert_stats s JOIN runs r USING (run_id) WHERE r.status = 'complete'""")


def test_overlap_default_is_matrix_and_mean_over_layers(captured, monkeypatch):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "overlap")
    at.selectbox(key="ov_criterion").set_value("frequency").run()
    at.slider(key="ov_k").set_value(3).run()
    at.selectbox(key="ov_layer").set_value(1).run()
    assert at.radio(key="ov_view").value == "Mean over layers"
    expected = domain_stats.topk_jaccard(_frequency_scores(store_path), 3)
    reference = domain_stats.random_jaccard(8, 3)
    charts = _charts(at)
    assert len(charts) == 3 and all(t.type != "scatter" for c in charts for t in c.data)  # no per-pair lines by default
    heat, mean = charts[0].data[0], charts[1]
    domains = ["code", "math", "prose"]
    assert list(heat.x) == domains and list(heat.y) == domains
    matrix = pd.DataFrame(np.eye(3), index=domains, columns=domains)
    for row in expected[expected.layer == 1].itertuples():
        matrix.loc[row.domain_a, row.domain_b] = matrix.loc[row.domain_b, row.domain_a] = row.jaccard
    np.testing.assert_array_equal(_array(heat.z), matrix.to_numpy())
    # mean over layers, one bar per pair, highest first; the random reference is a dashed legend entry, no label on data
    means = expected.assign(pair=expected.domain_a + " / " + expected.domain_b).groupby("pair").jaccard.mean()
    bars = mean.data[0]
    assert dict(zip(bars.x, _array(bars.y))) == pytest.approx(means.to_dict(), rel=1e-12)
    assert list(_array(bars.y)) == sorted(_array(bars.y), reverse=True)
    assert not mean.layout.annotations
    (shape,) = mean.layout.shapes
    assert (shape.y0, shape.showlegend, shape.name, shape.line.dash) == (reference, True, f"random k-sets: {reference:.3f}", "dash")
    assert mean.layout.showlegend is True


def test_overlap_lines_keep_a_legend_for_one_pair(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "model")
    (tmp_path / "code.txt").write_text(CODE)
    (tmp_path / "math.txt").write_text(MATH)
    store_path = tmp_path / "store.duckdb"
    assert main(["capture", "--model", str(model_dir), "--domain", f"code={tmp_path / 'code.txt'}",
                 "--domain", f"math={tmp_path / 'math.txt'}", "--store", str(store_path),
                 "--seq-len", "64", "--max-tokens", "200"]) == 0
    at = _app(store_path, monkeypatch, "overlap")
    at.selectbox(key="ov_criterion").set_value("frequency").run()
    at.slider(key="ov_k").set_value(2).run()
    at.radio(key="ov_view").set_value("Lines across layers").run()
    lines = _charts(at)[1]
    expected = domain_stats.topk_jaccard(_frequency_scores(store_path), 2)
    (trace,) = lines.data
    assert trace.name == "code / math" and trace.mode == "lines+markers"
    assert list(_array(trace.y)) == expected.sort_values("layer").jaccard.tolist()
    assert lines.layout.showlegend is True
    reference = domain_stats.random_jaccard(8, 2)
    assert not lines.layout.annotations
    (shape,) = lines.layout.shapes
    assert (shape.y0, shape.showlegend, shape.name) == (reference, True, f"random k-sets: {reference:.3f}")


def test_picker_names_the_shipped_demo_and_local_models(tmp_path, monkeypatch):
    from moe_viz.demo import SHIPPED_MODEL

    model_dir = save_tiny_model(tmp_path / "checkpoints" / "tiny-moe")
    (tmp_path / "code.txt").write_text(CODE)
    store_path = tmp_path / "store.duckdb"
    for model in (SHIPPED_MODEL, model_dir):
        assert main(["capture", "--model", str(model), "--domain", f"code={tmp_path / 'code.txt'}",
                     "--store", str(store_path), "--seq-len", "32", "--max-tokens", "64"]) == 0
    at = _app(store_path, monkeypatch)
    picker = at.sidebar.selectbox(key="model")
    assert sorted(picker.options) == ["checkpoints/tiny-moe (qwen3_moe)", "demo (moe_viz/demo/model)"]


def test_criteria_help_is_one_markdown_bullet_per_criterion():
    from moe_viz import criteria
    from moe_viz.ui.common import criteria_help

    assert criteria_help(["frequency", "easy_ep"]) == (
        "- **frequency**: routed tokens (how often the expert is in the top-k)\n"
        "- **easy\\_ep**: gate \\* ||f\\_e(x)|| weighted by token shift 1 - cos(h, h + r) (EASY-EP)")
    lines = criteria_help().split("\n")
    assert [line.split("**")[1].replace("\\_", "_") for line in lines] == list(criteria.CRITERIA)
    assert all(line.startswith("- **") for line in lines)
