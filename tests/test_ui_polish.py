"""Dashboard polish (issue 13): clearer overlap views, picker names, help text, threads, quiet terminal."""

import time

import numpy as np
import pandas as pd
import pytest

from moe_viz.analysis import domain_stats
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
    from moe_viz.ui.common import criteria_help

    picker = at.selectbox(key="ov_criterion")
    assert picker.help == criteria_help(picker.options) and picker.help.count("\n- **") == len(picker.options) - 1
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
    from moe_viz.analysis import criteria
    from moe_viz.ui.common import criteria_help

    assert criteria_help(["frequency", "easy_ep"]) == (
        "- **frequency**: routed tokens (how often the expert is in the top-k)\n"
        "- **easy\\_ep**: gate \\* ||f\\_e(x)|| weighted by token shift 1 - cos(h, h + r) (EASY-EP)")
    lines = criteria_help().split("\n")
    assert [line.split("**")[1].replace("\\_", "_") for line in lines] == list(criteria.CRITERIA)
    assert all(line.startswith("- **") for line in lines)


def test_favicon_is_local_and_config_hides_deploy_and_watches_no_store(captured, monkeypatch):
    import tomllib

    import streamlit
    from streamlit import config as st_config
    from streamlit.commands.page_config import _get_favicon_string

    from test_ui import ROOT

    calls = []
    original = streamlit.set_page_config
    monkeypatch.setattr(streamlit, "set_page_config", lambda **kw: (calls.append(kw), original(**kw))[1])
    _app(captured[2], monkeypatch)
    assert calls and calls[0]["page_icon"] == "🧩"
    assert _get_favicon_string(calls[0]["page_icon"]) == "emoji:🧩"  # drawn by the browser as a data: URL

    settings = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert settings["client"]["toolbarMode"] == "minimal"
    assert settings["browser"]["gatherUsageStats"] is False
    assert settings["server"]["fileWatcherType"] == "auto"
    assert settings["server"]["folderWatchBlacklist"] == ["**/cache", "**/jobs", "**/.git", "**/__pycache__"]
    assert {"client.toolbarMode", "browser.gatherUsageStats", "server.fileWatcherType",
            "server.folderWatchBlacklist"} <= set(st_config.get_config_options())


@pytest.mark.parametrize("argv, threads", [
    (["ui", "--threads", "3"], "3"),
    (["--threads", "2", "ui"], "2"),
    (["demo", "--threads", "4"], "4"),
    (["ui"], None),
])
def test_dashboard_command_passes_threads_and_quiet_settings(tmp_path, monkeypatch, argv, threads):
    import subprocess

    seen = {}
    monkeypatch.delenv("MOE_VIZ_THREADS", raising=False)
    monkeypatch.setattr("moe_viz.cli._set_threads", lambda n: None)  # leave this test process's torch alone
    monkeypatch.setattr("moe_viz.demo.prepare", lambda store: [])
    monkeypatch.setattr(subprocess, "call", lambda command, env: seen.update(command=command, env=env) or 0)
    store_path = str(tmp_path / "store.duckdb")
    assert main([*argv, "--store", store_path, "--port", "8599"]) == 0
    command = seen["command"]
    assert command[command.index("--server.fileWatcherType") + 1] == "none"
    assert command[command.index("--client.toolbarMode") + 1] == "minimal"
    assert command[command.index("--browser.gatherUsageStats") + 1] == "false"
    assert command[-3:] == ["--", "--store", store_path]
    assert seen["env"].get("MOE_VIZ_THREADS") == threads


def test_runs_form_sets_threads_of_the_capture_job(captured, tmp_path, monkeypatch):
    import json

    from moe_viz import jobs

    root, model_dir, _ = captured
    store_path = tmp_path / "store.duckdb"
    monkeypatch.setenv("MOE_VIZ_THREADS", "2")
    at = _app(store_path, monkeypatch, "runs")
    assert at.number_input(key="cap_threads").value == 2  # the dashboard's --threads is the default
    at.text_input(key="cap_model").set_value(str(model_dir))
    at.text_area(key="cap_domains").set_value(f"broken={root / 'missing.txt'}")  # fails fast, before loading
    at.number_input(key="cap_threads").set_value(1)
    at.button[0].click().run()
    job = at.session_state["last_job"]
    command = json.loads((jobs.jobs_dir(store_path) / job / "command.json").read_text())
    assert command[3:6] == ["--threads", "1", "capture"]
    deadline = time.time() + 120
    while jobs.job_status(store_path, job)["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.3)
    assert jobs.job_status(store_path, job)["state"] == "failed"


def test_capture_prints_no_token_length_warning(tmp_path, monkeypatch):
    """transformers' own handler writes to the stderr it saw when configured, so its records are collected here."""
    import json
    import logging

    from transformers import AutoTokenizer

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        model_dir = save_tiny_model(tmp_path / "model")
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "model_max_length": 64}))  # above checkpoint.TOKENIZER_SAMPLE
        document = CODE * 3  # one document, far longer than 64 tokens
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer(document, add_special_tokens=False)  # the warning, as transformers prints it
        assert any(m.startswith("Token indices sequence length is longer") for m in messages), messages
        messages.clear()
        (tmp_path / "code.txt").write_text(document)
        assert main(["capture", "--model", str(model_dir), "--domain", f"code={tmp_path / 'code.txt'}",
                     "--store", str(tmp_path / "store.duckdb"), "--seq-len", "16", "--max-tokens", "128"]) == 0
    finally:
        library_logger.removeHandler(handler)
    assert not [m for m in messages if "Token indices" in m]


def test_kept_and_dropped_are_told_apart_without_red_green(captured, monkeypatch):
    """Okabe-Ito blue/orange on the Prune mask and the Rankings bars (issue 13: colour-blind safe)."""
    _, _, store_path = captured
    at = _app(store_path, monkeypatch, "prune")
    mask = _charts(at)[0]
    assert [list(stop) for stop in mask.data[0].colorscale] == [[0.0, "#E69F00"], [1.0, "#0072B2"]]
    assert mask.layout.title.text.startswith("Kept (blue) and dropped (orange) experts")
    at = _app(store_path, monkeypatch, "rankings")
    bars = {trace.name: trace.marker.color for trace in _charts(at)[0].data}
    assert bars == {"kept": "#0072B2", "dropped": "#E69F00"}


WARM_CHECK = """
import gc, json, sys
sys.argv = ["app.py", "--store", sys.argv[1]]
import threading
from moe_viz.ui.common import warm_imports
from streamlit.testing.v1 import AppTest

warm_imports()  # the app's background thread, as the app starts it; the app's own call below starts no other
for thread in threading.enumerate():
    if thread.name == "moe_viz-warm-imports":
        thread.join()
tracked = {{id(o) for o in gc.get_objects()}}  # what a full collection traverses: not the frozen generation
unfrozen = sorted(name for name, module in sys.modules.items() if id(module) in tracked)
at = AppTest.from_file({app!r}, default_timeout=300)
at.switch_page({pages!r} + "/runs.py")  # the session opens here: its first run imports the app shell's modules
at.run()
seen = {{}}
for page in {visited!r}:
    before = set(sys.modules)
    at.switch_page({pages!r} + f"/{{page}}.py").run()
    seen[page] = {{"new": sorted(set(sys.modules) - before), "title": [t.value for t in at.title][:1],
                  "exception": [e.value for e in at.exception]}}
print(json.dumps({{"unfrozen": unfrozen, "pages": seen}}))
"""


def test_warm_up_leaves_no_page_a_module_to_import(captured):
    """Once the app's warm-up thread (warm.warm_up) is done, no page's first visit imports a module.

    A first import costs the import, and under `streamlit run app.py` (file watcher on) Streamlit then rescans
    every loaded module's path before the page's run is reported finished (~0.3 s CPU). A fresh process: this
    one has imported everything already. The session opens on Runs; every other page is visited once after it.
    The model family's own transformers modules depend on the store's model and are left to their first use.
    And what the thread loaded is frozen out of the garbage collector's reach (every module object).
    """
    import json
    import subprocess
    import sys

    from test_ui import PAGES, ROOT

    _, model_dir, store_path = captured
    family = "transformers.models." + json.loads((model_dir / "config.json").read_text())["model_type"]
    visited = ["overlap", "rankings", "expert", "tokens", "health", "prune", "compare", "heatmaps"]
    code = WARM_CHECK.format(app=str(ROOT / "app.py"), pages=str(ROOT / PAGES), visited=visited)
    result = subprocess.run([sys.executable, "-c", code, str(store_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["unfrozen"] == []
    seen = report["pages"]
    assert {page: (seen[page]["title"], seen[page]["exception"]) for page in visited} == {
        "overlap": (["Domain overlap"], []), "rankings": (["Saliency rankings"], []),
        "expert": (["Expert detail"], []), "tokens": (["Token routes"], []), "health": (["Router health"], []),
        "prune": (["Prune & export"], []), "compare": (["Compare plans"], []),
        "heatmaps": (["Expert heatmaps"], [])}
    new = {page: [m for m in seen[page]["new"] if m != family and not m.startswith(family + ".")] for page in visited}
    assert new == {page: [] for page in visited}
