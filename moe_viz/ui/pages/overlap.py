"""Domain overlap: Jaccard overlap of each domain's top-k experts, against random sets, plus mutual information."""

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from moe_viz.analysis import domain_stats
from moe_viz.ui.common import (CHART_HEIGHT, COLOR_SEQUENTIAL, criteria_help, layer_format, layer_stats,
                               measured_criteria, mutual_information, overlap, pick_model, plotly_chart)

st.title("Domain overlap")
_, run_ids = pick_model()
if len(run_ids) < 2:
    st.info("Overlap needs at least two captured domains of this model.")
    st.stop()
layers = layer_stats(run_ids.values())
num_experts = int(layers.num_experts.max())
top_k = int(layers.top_k.max())

c1, c2 = st.columns(2)
measured = measured_criteria(run_ids.values())
criterion = c1.selectbox("Criterion", measured, key="ov_criterion", help=criteria_help(measured))
k = c2.slider("k (experts per domain set)", 1, num_experts, min(max(top_k, 2), num_experts), key="ov_k")
jaccard = overlap(run_ids.values(), criterion, k)
jaccard["pair"] = jaccard.domain_a + " / " + jaccard.domain_b
reference = domain_stats.random_jaccard(num_experts, k)

domains = sorted(run_ids)
layer = st.selectbox("Layer for the domain × domain matrix", sorted(jaccard.layer.unique()), key="ov_layer",
                     format_func=layer_format(run_ids.values()))
matrix = pd.DataFrame(1.0, index=domains, columns=domains)
for row in jaccard[jaccard.layer == layer].itertuples():
    matrix.loc[row.domain_a, row.domain_b] = matrix.loc[row.domain_b, row.domain_a] = row.jaccard
heat = go.Figure(go.Heatmap(z=matrix.to_numpy(), x=domains, y=domains, zmin=0, zmax=1, colorscale=COLOR_SEQUENTIAL,
                            text=matrix.round(3).to_numpy(), texttemplate="%{text}",
                            hovertemplate="%{y} vs %{x}<br>Jaccard %{z:.3f}<extra></extra>",
                            colorbar=dict(title="Jaccard")))
heat.update_layout(title=f"Top-{k} Jaccard overlap at layer {layer} (random k-sets: {reference:.3f})",
                   xaxis_title="domain", yaxis_title="domain", height=CHART_HEIGHT)
plotly_chart(heat, matrix.rename_axis(index="domain_a", columns="domain_b").stack().rename("jaccard").reset_index(),
             "overlap_matrix")

VIEWS = ["Mean over layers", "Lines across layers"]
view = st.radio("Across layers", VIEWS, horizontal=True, key="ov_view",
                help="Mean over layers: one bar per domain pair (range over layers as error bars).  \n"
                     "Lines across layers: one line per domain pair.")
# The random reference is a dashed line listed in the legend, never a text label on top of the data.
reference_line = dict(y=reference, line_dash="dash", line_color="grey", showlegend=True,
                      name=f"random k-sets: {reference:.3f}")
if view == VIEWS[0]:
    summary = (jaccard.groupby("pair", sort=True).jaccard.agg(["mean", "min", "max"]).reset_index()
               .sort_values(["mean", "pair"], ascending=[False, True]))
    figure = go.Figure(go.Bar(
        x=summary["pair"], y=summary["mean"], name="mean over layers", marker_color="#0072B2",
        error_y=dict(type="data", symmetric=False, array=summary["max"] - summary["mean"],
                     arrayminus=summary["mean"] - summary["min"], color="grey"),
        customdata=summary[["min", "max"]].to_numpy(),
        hovertemplate="%{x}<br>mean Jaccard %{y:.3f}<br>layers: %{customdata[0]:.3f}–%{customdata[1]:.3f}"
                      "<extra></extra>"))
    figure.update_layout(title=f"Top-{k} Jaccard overlap by {criterion}, mean over layers (bars: min–max)",
                         xaxis_title="domain pair", yaxis_title="Jaccard overlap (0–1)")
    figure.update_xaxes(type="category", categoryorder="array", categoryarray=summary["pair"].tolist())
    key, data = "overlap_mean", summary.rename(columns={"mean": "mean_jaccard", "min": "min_over_layers", "max": "max_over_layers"})
else:
    figure = go.Figure([  # plain traces: plotly.express takes ~10x longer to build 45 of them
        go.Scatter(x=group.layer.astype(str), y=group.jaccard, mode="lines+markers", name=pair,
                   hovertemplate=f"{pair}<br>layer %{{x}}<br>Jaccard %{{y:.3f}}<extra></extra>")
        for pair, group in jaccard.groupby("pair", sort=True)
    ])
    figure.update_layout(title=f"Top-{k} Jaccard overlap by {criterion} across layers", legend_title_text="pair",
                         xaxis_title="MoE layer (decoder index)", yaxis_title="Jaccard overlap (0–1)")
    figure.update_xaxes(type="category")
    key, data = "overlap_lines", jaccard[["pair", "layer", "jaccard"]]
figure.add_hline(**reference_line)
figure.update_layout(height=CHART_HEIGHT, yaxis_range=[0, 1.02], showlegend=True)  # one pair keeps its legend too
plotly_chart(figure, data.assign(random_k_sets=reference), key)

st.subheader("Does expert choice depend on the domain?")
st.caption("Top-k overlap is a weak signal on its own: busy generalist experts sit in every domain's top-k. "
           "Mutual information between domain and routed expert measures the dependence directly.")
mi = mutual_information(run_ids.values()).rename_axis("layer").reset_index()
mi_figure = px.bar(mi, x="layer", y="mutual_information", title="Mutual information I(domain; expert) per layer",
                   labels={"layer": "MoE layer (decoder index)", "mutual_information": "nats"})
mi_figure.update_layout(height=360)
mi_figure.update_xaxes(type="category")
plotly_chart(mi_figure, mi, "overlap_mi")
