"""Compare plans: quality vs sparsity per criterion from stored plan evaluations, the cut trade-off from
stored statistics, and sweeps run in the background with live progress."""

import json
import math
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from moe_viz.analysis import compare, criteria
from moe_viz import jobs
from moe_viz.errors import MoeVizError
from moe_viz.prune.plan import RouterConstraints
from moe_viz.prune.sweep import stored_sweeps
from moe_viz.ui.common import (CHART_HEIGHT, causal_vs_observational, layer_stats, model_config, pick_model,
                               plotly_chart, store_path)

# Paul Tol's "muted" qualitative scheme (distinguishable with the common colour-vision deficiencies);
# each criterion also has its own marker symbol. The random baseline is grey and dashed.
PALETTE = ["#332288", "#CC6677", "#117733", "#88CCEE", "#882255", "#DDCC77", "#44AA99", "#AA4499", "#999933"]
SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "x", "triangle-down", "star", "hexagon", "pentagon"]
RANDOM_COLOR = "#8c8c8c"
SPARSITY_AXIS = "sparsity (fraction of routed experts removed)"
QUALITY = {  # metric -> (chart title, y axis title)
    "kl": ("KL(original ‖ pruned) vs sparsity", "KL (nats/token)"),
    "nll_delta": ("ΔNLL = NLL pruned − NLL original vs sparsity", "ΔNLL (nats/token)"),
}
PANELS_PER_ROW = 3
DEFAULT_CRITERIA = ["frequency", "soft_count", "reap", "random"]


def style(criterion: str) -> dict:
    """Colour, marker and dash of a criterion, the same in every chart."""
    if criterion == "random":
        return {"color": RANDOM_COLOR, "symbol": "circle-open", "dash": "dash"}
    names = [c for c in criteria.CRITERIA if c != "random"]
    i = names.index(criterion) if criterion in names else len(names) + sum(map(ord, criterion))
    return {"color": PALETTE[i % len(PALETTE)], "symbol": SYMBOLS[i % len(SYMBOLS)],
            "dash": "solid" if i < len(PALETTE) else "dot"}


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _duration(seconds) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "…"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


@st.cache_data(show_spinner=False, max_entries=32)
def shared_keys(path: str, runs_key: tuple, model_id: str, group: tuple, points: tuple) -> dict:
    return compare.shared_plan_keys(path, model_id, dict(group), list(points), model_config(model_id))


@st.cache_data(show_spinner=False, max_entries=32)
def fully_shared(path: str, runs_key: tuple, model_id: str, group: tuple, stored: tuple, _evals) -> list[str]:
    """(`stored`: the stored plan keys, for the cache; `_evals` is not hashed.)"""
    return compare.fully_shared_criteria(path, model_id, _evals, dict(group), list(criteria.CRITERIA),
                                         model_config(model_id))


@st.cache_data(show_spinner=False, max_entries=32)
def tradeoff(path: str, runs_key: tuple, model_id: str, mix: str, names: tuple, keeps: tuple):
    return compare.cut_tradeoff(path, model_id, json.loads(mix), list(names), list(keeps), model_config(model_id))


def quality_figure(points: pd.DataFrame, metric: str, picked: pd.DataFrame) -> go.Figure:
    """One panel per evaluation domain; per criterion a line with its 95% bootstrap band."""
    domains = sorted(points.eval_domain.unique())
    cols = min(len(domains), PANELS_PER_ROW)
    rows = math.ceil(len(domains) / cols)
    title, y_title = QUALITY[metric]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"evaluated on {d}" for d in domains],
                        horizontal_spacing=0.08, vertical_spacing=0.16)
    # criteria whose plans are the same at every point draw one line, named after all of them
    ordered = points.sort_values(["eval_domain", "sparsity"])
    signature = {c: tuple(zip(g.eval_domain, g.sparsity, g.plan_key)) for c, g in ordered.groupby("criterion")}
    same: dict[tuple, list[str]] = {}
    for criterion in [c for c in criteria.CRITERIA if c in signature] + sorted(set(signature) - set(criteria.CRITERIA)):
        same.setdefault(signature[criterion], []).append(criterion)
    for i, domain in enumerate(domains):
        row, col = i // cols + 1, i % cols + 1
        on_domain = points[points.eval_domain == domain]
        for names in same.values():
            criterion, line = " = ".join(names), on_domain[on_domain.criterion == names[0]].sort_values("sparsity")
            if line.empty:
                continue
            look = style(names[0])
            x, low, high = line.sparsity.tolist(), line[f"{metric}_ci_low"].tolist(), line[f"{metric}_ci_high"].tolist()
            fig.add_trace(go.Scatter(
                x=x + x[::-1], y=high + low[::-1], mode="lines", fill="toself", fillcolor=_rgba(look["color"], 0.15),
                line={"width": 0}, hoverinfo="skip", showlegend=False, legendgroup=criterion,
                name=f"{criterion} 95% CI", meta=domain), row=row, col=col)
            shared = line.shared_with.fillna("").tolist()
            fig.add_trace(go.Scatter(
                x=x, y=line[metric].tolist(), mode="lines+markers", name=criterion, legendgroup=criterion,
                showlegend=i == 0, meta=domain, line={"color": look["color"], "dash": look["dash"], "width": 2},
                marker={"symbol": look["symbol"], "size": 8, "color": look["color"]},
                customdata=list(zip(low, high, line.tokens.tolist(), [f" (plan shared with {s})" if s else ""
                                                                      for s in shared])),
                hovertemplate=(f"<b>{criterion}</b>%{{customdata[3]}}<br>sparsity %{{x:.3f}}<br>{y_title}: "
                               "%{y:.4f}<br>95% CI [%{customdata[0]:.4f}, %{customdata[1]:.4f}]"
                               "<br>%{customdata[2]} tokens<extra>" + domain + "</extra>")),
                row=row, col=col)
        mine = picked[picked.eval_domain == domain]
        if len(mine):
            fig.add_trace(go.Scatter(
                x=mine.sparsity.tolist(), y=mine[metric].tolist(), mode="markers", name="picked points",
                legendgroup="picked", showlegend=i == 0, meta=domain, hoverinfo="skip",
                marker={"symbol": "circle-open", "size": 16, "color": "black", "line": {"width": 2}}),
                row=row, col=col)
        fig.update_xaxes(title_text=SPARSITY_AXIS if row == rows else None, row=row, col=col)
        fig.update_yaxes(title_text=y_title if col == 1 else None, row=row, col=col)
    fig.update_layout(title=title, height=max(CHART_HEIGHT, 330 * rows), legend_title_text="criterion")
    return fig


def tradeoff_figure(cut: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for criterion, line in cut.groupby("criterion", sort=False):
        line = line.sort_values("sparsity")
        look = style(criterion)
        fig.add_trace(go.Scatter(
            x=line.routed_share_lost.tolist(), y=line.reap_share_lost.tolist(), mode="lines+markers", name=criterion,
            line={"color": look["color"], "dash": look["dash"], "width": 2},
            marker={"symbol": look["symbol"], "size": 8, "color": look["color"]},
            customdata=list(zip(line.sparsity.tolist(), line.keep.tolist())),
            hovertemplate=(f"<b>{criterion}</b><br>sparsity %{{customdata[0]:.3f}} (keep %{{customdata[1]}})"
                           "<br>routed tokens deleted %{x:.1%}<br>REAP mass deleted %{y:.1%}<extra></extra>")))
    fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"color": "#bbbbbb", "dash": "dot", "width": 1})
    fig.update_layout(
        title="Cut trade-off: routed traffic vs saliency deleted as sparsity grows (lower right is better)",
        xaxis_title="routed tokens deleted (share of the mix's routed token slots)",
        yaxis_title="REAP saliency mass deleted (share of the mix's total)", height=CHART_HEIGHT,
        legend_title_text="criterion")
    fig.update_xaxes(range=[0, 1], tickformat=".0%")
    fig.update_yaxes(range=[0, 1], tickformat=".0%")
    return fig


def quality_section(evals: pd.DataFrame, path: str, runs_key: tuple, model_id: str) -> tuple[dict | None, list]:
    """The curves and the point picker; returns the chosen setting (None when nothing is stored) and criteria."""
    st.subheader("Quality vs sparsity")
    if evals.empty:
        st.info("No plan evaluations are stored for this model yet. Run a sweep below, or from a shell:\n\n"
                f"`moe-viz sweep --model {model_id} --store {path} --domain DOMAIN "
                "--criteria frequency,soft_count,reap --sparsities 0.25,0.5,0.75`\n\n"
                "It evaluates every (criterion, sparsity) plan and the random baseline by masking the dropped "
                "experts (no export) on held-out text, and stores the results here.")
        return None, []
    groups = compare.evaluation_groups(evals)
    index = st.selectbox("Evaluations (calibration mix · scope · seed)", range(len(groups)), key="cp_group",
                         format_func=lambda i: groups.label[i],
                         help="plans were scored on this calibration mix; curves only compare plans of one setting")
    group = {c: groups.loc[index, c] for c in compare.GROUP_COLUMNS}
    in_group = compare.group_rows(evals, group)
    group_key = tuple(sorted(group.items()))
    with st.spinner("Matching each criterion's plans with the stored ones …"):
        also = fully_shared(path, runs_key, model_id, group_key, tuple(sorted(set(evals.plan_key))), evals)
    swept = [c for c in criteria.CRITERIA if c in set(in_group.criterion) or c in also]
    options = list(dict.fromkeys([*criteria.CRITERIA, *in_group.criterion]))
    chosen = st.multiselect("Criteria", options, default=swept, key="cp_criteria::" + "::".join(map(str, group_key)),
                            help="a criterion that keeps the same experts as an evaluated plan shares its numbers")
    if not chosen:
        st.info("Pick at least one criterion.")
        return group, chosen
    missing = compare.missing_points(evals, group, chosen)
    shared = shared_keys(path, runs_key, model_id, group_key, tuple(missing)) if missing else {}
    points = compare.curves(evals, group, chosen, shared)
    if points.empty:
        st.info("None of these criteria has evaluations in this setting.")
        return group, chosen
    labels = {f"{c} @ {s:.3f}": (c, s) for c, s in points[["criterion", "sparsity"]].drop_duplicates().itertuples(index=False)}
    picks = st.multiselect("Points to compare (criterion @ sparsity)", list(labels), key="cp_points",
                           default=_default_picks(points, labels))
    chosen_points = [labels[p] for p in picks]
    picked = points[[(c, s) in chosen_points for c, s in zip(points.criterion, points.sparsity)]]
    for metric in QUALITY:
        plotly_chart(quality_figure(points, metric, picked), points, f"cp_{metric}")
    if (points.shared_with.notna()).any():
        st.caption("Some points share a plan with another criterion (the same experts kept): a sweep evaluates "
                   "such a plan once and stores it under the first criterion; hover a point to see which.")
    if len(picked):
        st.dataframe(compare.results_table(picked), hide_index=True, key="cp_picked_table")
    return group, chosen


def _default_picks(points: pd.DataFrame, labels: dict) -> list[str]:
    """At the middle swept sparsity: the criterion with the lowest mean KL, and random."""
    sparsities = sorted(points.sparsity.unique())
    middle = sparsities[len(sparsities) // 2]
    at = points[points.sparsity == middle].groupby("criterion").kl.mean().sort_values()
    picks = [c for c in at.index if c != "random"][:1] + (["random"] if "random" in at.index else [])
    return [label for label, (c, s) in labels.items() if s == middle and c in picks]


def tradeoff_section(path: str, runs_key: tuple, model_id: str, run_ids: dict, group: dict | None,
                     curve_criteria: list[str]) -> None:
    st.subheader("Cut trade-off (from stored statistics, no forward pass)")
    st.caption("For each criterion, as more experts are dropped: the share of the calibration mix's routed "
               "tokens the dropped experts received (x) against the share of REAP saliency mass they carried "
               "(y), mean over MoE layers. A criterion below the diagonal deletes traffic that matters little.")
    mixes = [group["domains"]] if group else []
    mixes += [json.dumps({d: 1.0}) for d in run_ids]
    if len(run_ids) > 1:
        mixes.append(json.dumps({d: 1.0 for d in sorted(run_ids)}, sort_keys=True))
    mixes = [m for m in dict.fromkeys(mixes) if set(json.loads(m)) <= set(run_ids)]
    mix = st.selectbox("Calibration mix", mixes, key="cp_cut_mix", format_func=compare.mix_label)
    default = [c for c in (curve_criteria or DEFAULT_CRITERIA) if c in criteria.CRITERIA]
    names = st.multiselect("Criteria", list(criteria.CRITERIA), default=default, key="cp_cut_criteria")
    if not names or mix is None:
        st.info("Pick a calibration mix and at least one criterion.")
        return
    layers = layer_stats(run_ids.values())
    num_experts, top_k = int(layers.num_experts.max()), int(layers.top_k.max())
    config = model_config(model_id)
    constraints = RouterConstraints.from_config(config, top_k) if config else RouterConstraints(top_k)
    keeps = compare.tradeoff_keeps(constraints.valid_keeps(num_experts), num_experts)
    with st.spinner("Building a plan per criterion and sparsity from the stored statistics …"):
        cut, notes = tradeoff(path, runs_key, model_id, mix, tuple(names), tuple(keeps))
    for note in notes:
        st.caption(f"left out: {note}")
    if cut.empty:
        return
    plotly_chart(tradeoff_figure(cut), cut, "cp_cut")
    st.dataframe(cut, hide_index=True, key="cp_cut_table")


def sweep_form(path: str, model_id: str, run_ids: dict) -> None:
    st.subheader("Run a sweep")
    if not Path(model_id).is_dir():
        st.warning(f"The model {model_id} is not a local directory, so it cannot be evaluated from here.")
        return
    with st.form("cp_sweep"):
        names = st.multiselect("Criteria (the random baseline is always included)", list(criteria.CRITERIA),
                               default=[c for c in DEFAULT_CRITERIA if c != "random"], key="cp_sw_criteria")
        sparsities = st.text_input("Sparsities (fractions of routed experts removed, comma-separated)",
                                   value="0.25,0.5,0.75", key="cp_sw_sparsities")
        domains = st.multiselect("Calibration domains to score experts on (equal weights)", list(run_ids),
                                 default=list(run_ids)[:1], key="cp_sw_domains")
        eval_domains = st.text_area("Evaluation text, one NAME=SOURCE per line (empty: held-out text of the "
                                    "calibration domains)", key="cp_sw_eval", value="")
        c1, c2 = st.columns(2)
        max_tokens = c1.number_input("Evaluation tokens per domain", min_value=16, value=2048, step=512,
                                     key="cp_sw_tokens")
        seq_len = c2.number_input("Sequence length", min_value=8, value=128, step=32, key="cp_sw_seq")
        submitted = st.form_submit_button("Start sweep", key="cp_sw_start")
    if not submitted:
        return
    try:
        values = [float(x) for x in sparsities.split(",") if x.strip()]
    except ValueError:
        st.error(f"Sparsities {sparsities!r} must be numbers separated by commas, e.g. 0.25,0.5")
        return
    if not names or not values or not domains:
        st.error("Give at least one criterion, one sparsity and one calibration domain.")
        return
    job = jobs.start_sweep(path, model_id, names, values, {d: 1.0 for d in domains},
                           [line.strip() for line in eval_domains.splitlines() if line.strip()],
                           seq_len=int(seq_len), max_tokens=int(max_tokens))
    st.session_state["cp_sweep_job"] = job
    st.session_state.setdefault("cp_running", set()).add(job)


def _progress_line(status: dict) -> tuple[float, str]:
    progress = status["progress"]
    done, total = progress.get("done", 0), progress.get("total") or 0
    if not total or progress.get("stage") == "loading model":
        return 0.0, "loading the model and the evaluation text …"
    return min(done / total, 1.0), (f"{done}/{total} plans ({progress.get('cached', 0)} from the store) · "
                                    f"{_duration(progress.get('elapsed_s'))} elapsed · "
                                    f"about {_duration(progress.get('eta_s'))} to go")


@st.fragment(run_every=1.0)
def sweep_jobs(path: str) -> None:
    """Sweeps started from this store: live progress, Cancel; the page redraws when one ends."""
    recent = jobs.list_jobs(path, kind="sweep")[:3]
    if not recent:
        return
    st.markdown("**Sweeps started here**")
    running = st.session_state.setdefault("cp_running", set())
    ended = False
    for job_id in recent:
        status = jobs.job_status(path, job_id)
        state, label = status["state"], f"`{job_id}` — {status['state']}"
        if state == "running":
            running.add(job_id)
            fraction, text = _progress_line(status)
            st.progress(fraction, text=f"{label}: {text}")
            if st.button("Cancel", key=f"cp_cancel_{job_id}"):
                jobs.cancel(path, job_id)
                st.rerun()
        else:
            if job_id in running:
                running.discard(job_id)
                ended = True
            if state == "failed":
                st.error(f"{label}: {status['error']}")
            elif state == "done":
                progress = status["progress"]
                st.success(f"{label}: {progress.get('total', '?')} plans evaluated or served from the store "
                           f"in {_duration(progress.get('elapsed_s'))}")
            else:
                st.caption(f"{label}: the plans it finished are stored")
    if ended:
        st.rerun()  # the whole page: new evaluations are in the store


st.title("Compare plans")
path = store_path()
model_id, run_ids = pick_model()
runs_key = tuple(sorted(run_ids.items()))
try:
    evals = stored_sweeps(path, model_id)
    group, shown = quality_section(evals, path, runs_key, model_id)
    tradeoff_section(path, runs_key, model_id, run_ids, group, shown)
except MoeVizError as exc:
    st.error(str(exc).splitlines()[0])
sweep_form(path, model_id, run_ids)
sweep_jobs(path)
causal_domain = st.selectbox("Domain for the causal view", list(run_ids), key="cp_causal_domain")
causal_vs_observational(model_id, run_ids[causal_domain], causal_domain)
