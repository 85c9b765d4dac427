"""Token routes: a text as tokens x MoE layers, coloured by the top-1 expert or by what a pruning plan removes."""

import html

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from moe_viz import jobs
from moe_viz.analysis import criteria, token_profiles
from moe_viz.capture.trace import load_trace
from moe_viz.errors import MoeVizError
from moe_viz.prune.plan import RouterConstraints, build_plan
from moe_viz.ui.common import (CHART_HEIGHT, COLOR_SEQUENTIAL, DROPPED_COLOR, criteria_help, 
                               layer_stats, model_config, pick_model, plotly_chart, store_path, trace_view,
                               visible)

# Okabe-Ito: categorical colours told apart by every common colour-vision deficiency (up to 8 experts)
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]


@st.cache_data(show_spinner=False, max_entries=8)
def text_trace(path: str, job_id: str) -> dict[str, pd.DataFrame]:
    return load_trace(jobs.trace_dir(path, job_id))


def text_view(path: str, job_id: str, view: str, *args):
    """A token_profiles view on the trace of a pasted text (a finished trace job)."""
    source = token_profiles.TraceSource(frames=text_trace(path, job_id))
    return getattr(token_profiles, view)(source, *args)


st.title("Token routes")
path = store_path()
model_id, run_ids = pick_model()
layers = layer_stats(run_ids.values())
num_experts = {int(l): int(e) for l, e in zip(layers.layer, layers.num_experts)}

kind = st.radio("Text", ["domain sample", "pasted text"], key="tr_kind", horizontal=True,
                help="a calibration domain's traced tokens (`capture --trace-tokens`), or any text traced now")
if kind == "domain sample":
    domain = st.selectbox("Domain", list(run_ids), key="tr_domain")
    run_id = run_ids[domain]
    if not trace_view(run_id, "has_trace"):
        st.info(f"The run of {domain} has no token trace: capture it again with `--trace-tokens N` (N > 0).")
        st.stop()

    def view(name: str, *args):
        return trace_view(run_id, name, *args)
    label = domain
else:
    text = st.text_area("Text to trace", key="tr_text", height=120,
                        placeholder="Paste text; the model traces up to 2,048 of its tokens in the background.")
    if st.button("Trace", key="tr_trace", disabled=not text.strip()):
        st.session_state["tr_job"] = jobs.start_trace(path, model_id, text)
    job_id = st.session_state.get("tr_job")
    if job_id is None:
        st.info("Paste a text and press **Trace**.")
        st.stop()
    status = jobs.job_status(path, job_id)
    if status["state"] == "running":
        @st.fragment(run_every=1.0)
        def follow() -> None:
            now = jobs.job_status(path, job_id)
            if now["state"] != "running":
                st.rerun()  # the whole page, now with the trace
            st.info(f"Tracing in the background ({now['progress'].get('stage', 'starting')}) …")
            if st.button("Cancel", key="tr_cancel"):
                jobs.cancel(path, job_id)
                st.rerun()
        follow()
        st.stop()
    if status["state"] == "cancelled":
        st.info("Trace cancelled: press **Trace** to start again.")
        st.stop()
    if status["state"] != "done":
        st.error(f"The trace {status['state']}: {status['error']}")
        st.stop()

    def view(name: str, *args):
        return text_view(path, job_id, name, *args)
    label = "pasted text"

sequences = view("trace_sequences")
c1, c2, c3 = st.columns(3)
seq = c1.selectbox("Sequence", sequences.seq.tolist(), key="tr_seq",
                   format_func=lambda s: f"{s} ({int(sequences.set_index('seq').tokens[s])} tokens)")
length = int(sequences.set_index("seq").tokens[seq])
width = c2.select_slider("Tokens shown", [16, 32, 48, 64, 96, 128], value=64, key="tr_width")
start = c3.number_input("From position", min_value=0, max_value=max(0, length - 1), value=0, step=width,
                        key="tr_start")
window = view("token_window", seq, int(start), int(width))

# -- the plan whose removed gate mass is shown ----------------------------------------
colour_by = st.radio("Colour cells by", ["top-1 expert", "gate mass the plan removes"], key="tr_colour",
                     horizontal=True)
config = model_config(model_id)
top_k = int(layers.top_k.max())
constraints = RouterConstraints.from_config(config, top_k) if config else RouterConstraints(top_k)
valid = constraints.valid_keeps(max(num_experts.values()))
with st.expander("Pruning plan", expanded=colour_by != "top-1 expert"):
    p1, p2, p3 = st.columns(3)
    names = list(criteria.CRITERIA)
    criterion = p1.selectbox("Criterion", names, index=names.index(st.session_state.get("pr_criterion", "reap")),
                             key="tr_criterion", help=criteria_help())
    half = min(valid, key=lambda k: (abs(k - max(num_experts.values()) / 2), k))
    keep = p2.select_slider("Experts kept per layer", options=valid, value=half, key="tr_keep")
    plan_domains = p3.multiselect("Scored on", list(run_ids), default=list(run_ids)[:1], key="tr_plan_domains")
plan = None
if plan_domains:
    try:
        plan = build_plan(path, model_id, criterion, {d: 1.0 for d in plan_domains}, config=config, keep=keep)
    except MoeVizError as exc:
        st.error(str(exc))
elif colour_by != "top-1 expert":
    st.info("Pick at least one domain to score the plan on.")

# -- tokens x layers --------------------------------------------------------------------
positions = sorted(window.pos.unique())
layer_ids = sorted(window.layer.unique())
pieces = window.drop_duplicates("pos").set_index("pos").piece
slots = window.sort_values(["pos", "layer", "gate_rank"]).groupby(["layer", "pos"])
hover = slots.apply(lambda g: " · ".join(f"e{e} {w:.3f}" for e, w in zip(g.expert, g.gate)), include_groups=False)
top1 = window[window.gate_rank == 0].pivot(index="layer", columns="pos", values="expert").reindex(index=layer_ids, columns=positions)
routes_text = hover.unstack("pos").reindex(index=layer_ids, columns=positions)
tick_text = [f"{visible(pieces[p])}" for p in positions]
custom = [[[routes_text.loc[l, p], visible(pieces[p])] for p in positions] for l in layer_ids]
removed = None
if plan is not None:
    removed = token_profiles.gate_removed(window, plan.kept, num_experts)
    removed_z = removed.pivot(index="layer", columns="pos", values="removed_fraction").reindex(index=layer_ids, columns=positions)
if colour_by == "top-1 expert" or removed is None:
    experts_max = max(num_experts.values())
    if experts_max <= len(OKABE_ITO):  # one colour per expert, drawn as equal bands of a stepped scale
        scale = [[edge, OKABE_ITO[i]] for i in range(experts_max)
                 for edge in (i / experts_max, (i + 1) / experts_max)]
    else:
        scale = COLOR_SEQUENTIAL
    heat = go.Heatmap(z=top1.to_numpy(), x=positions, y=[str(l) for l in layer_ids], customdata=custom,
                      zmin=-0.5, zmax=experts_max - 0.5, colorscale=scale,
                      colorbar={"title": "top-1 expert"}, texttemplate="%{z}" if width <= 64 else None,
                      hovertemplate="%{customdata[1]} (pos %{x}), layer %{y}<br>top-1 expert %{z}"
                                    "<br>experts · gates: %{customdata[0]}<extra></extra>")
    title = f"{label}, sequence {seq}: top-1 expert (largest applied gate) per token and MoE layer"
else:
    heat = go.Heatmap(z=removed_z.to_numpy(), x=positions, y=[str(l) for l in layer_ids], customdata=custom,
                      zmin=0, zmax=1, colorscale=COLOR_SEQUENTIAL, colorbar={"title": "gate mass removed (fraction)"},
                      hovertemplate="%{customdata[1]} (pos %{x}), layer %{y}<br>removed: %{z:.2f} of the gate mass"
                                    "<br>experts · gates: %{customdata[0]}<extra></extra>")
    title = f"{label}, sequence {seq}: fraction of each token's gate mass the plan ({criterion}, keep {keep}) removes"
figure = go.Figure(heat)
figure.update_layout(title=title, xaxis_title="token", yaxis_title="MoE layer (decoder index)", height=CHART_HEIGHT)
figure.update_xaxes(tickmode="array", tickvals=positions, ticktext=tick_text, tickangle=-60)
figure.update_yaxes(autorange="reversed", type="category")
# the CSV: one row per drawn cell (layer, position), with the colour's value and every expert and gate
cells = top1.stack().rename("top1_expert").reset_index()
cells = cells.merge(hover.rename("experts_gates").reset_index(), on=["layer", "pos"])
cells.insert(2, "piece", cells.pos.map(pieces))
if removed is not None:
    cells = cells.merge(removed[["layer", "pos", "removed", "total", "removed_fraction"]], on=["layer", "pos"])
plotly_chart(figure, cells, "tr_routes")

# -- which tokens does this plan hurt? ----------------------------------------------------
if plan is not None:
    st.subheader(f"Which tokens does this plan hurt? ({criterion}, keep {keep} of {max(num_experts.values())})")
    st.caption("hurt = share of the token's applied gate mass, all MoE layers together, on experts the plan "
               "drops (0: untouched, 1: every routed expert dropped in every layer). Darker = more hurt.")
    sums = removed.groupby("pos")[["removed", "total"]].sum()
    per_token = sums.removed / sums.total.where(sums.total > 0, 1.0)
    spans = "".join(
        f"<span title='hurt {per_token[p]:.2f}' style='background:rgba(230,159,0,{per_token[p]:.2f});"
        f"border-bottom:1px solid {DROPPED_COLOR}'>{html.escape(pieces[p].replace(chr(10), '⏎'))}</span>"
        for p in positions)
    st.markdown(f"<div style='font-family:monospace;white-space:pre-wrap;line-height:1.8'>{spans}</div>",
                unsafe_allow_html=True)
    occurrences, by_id = view("tokens_hurt", plan.kept, num_experts, 20)
    h1, h2 = st.columns(2)
    h1.markdown(f"**Most hurt occurrences in {label}'s trace**")
    h1.dataframe(occurrences.assign(piece=occurrences.piece.map(visible)), hide_index=True, key="tr_hurt")
    h2.markdown("**Most hurt token ids (mean over their occurrences)**")
    h2.dataframe(by_id.assign(piece=by_id.piece.map(visible)), hide_index=True, key="tr_hurt_ids")

# -- context dependence -------------------------------------------------------------------
st.subheader("Context dependence: one token id, how many experts?")
dependence = view("context_dependence")
if dependence.empty:
    st.info("No token id occurs twice in this trace.")
    st.stop()
bars = px.bar(dependence, x=dependence.layer.astype(str), y="mean_distinct_top1",
              title=f"Distinct top-1 experts per token id across its occurrences ({label}; ids seen ≥ 2 times)",
              labels={"x": "MoE layer (decoder index)", "mean_distinct_top1": "mean distinct top-1 experts"},
              hover_data=["token_ids", "same_top1_share"])
bars.update_xaxes(type="category")
plotly_chart(bars, dependence, "tr_dependence")
st.dataframe(dependence, hide_index=True, key="tr_dependence_table")
dep_layer = st.selectbox("Layer", dependence.layer.tolist(), key="tr_dep_layer")
listed = view("context_dependent_tokens", dep_layer, 20)
st.dataframe(listed.assign(piece=listed.piece.map(visible)), hide_index=True, key="tr_dep_tokens")
