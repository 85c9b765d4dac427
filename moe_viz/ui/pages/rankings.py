"""Saliency rankings: experts of a layer ranked by a criterion, and how much criteria agree."""

import math

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from moe_viz.analysis import tables, criteria
from moe_viz.ui.common import (CHART_HEIGHT, COLOR_DIVERGING, DROPPED_COLOR, KEPT_COLOR, causal_vs_observational,
                               criteria_help, expert_stats, layer_format, layer_stats, pick_model, plotly_chart)


@st.cache_data(show_spinner=False, max_entries=32)
def agreement(stats, names: tuple[str, ...], k: int):
    return tables.criteria_agreement(stats, list(names), k)


st.title("Saliency rankings")
model_id, run_ids = pick_model()
c1, c2, c3, c4 = st.columns(4)
domain = c1.selectbox("Domain", list(run_ids), key="rk_domain")
stats = expert_stats([run_ids[domain]])
layers = layer_stats([run_ids[domain]])
layer = c2.selectbox("Layer", sorted(stats.layer.unique()), key="rk_layer", format_func=layer_format([run_ids[domain]]))
criterion = c3.selectbox("Criterion", list(criteria.CRITERIA), index=list(criteria.CRITERIA).index("reap"), key="rk_criterion",
                         help=criteria_help())
layer_row = layers[layers.layer == layer].iloc[0]
num_experts, top_k = int(layer_row.num_experts), int(layer_row.top_k)
# a layer routes every token to top-k experts, so a plan never keeps fewer than top-k of them
max_sparsity = math.floor(round((1 - top_k / num_experts) / 0.05, 6)) * 0.05
if max_sparsity > 0:
    sparsity = c4.slider("Sparsity (fraction dropped)", 0.0, round(max_sparsity, 2), min(0.5, round(max_sparsity, 2)), 0.05,
                         key="rk_sparsity", help=f"at most {1 - top_k / num_experts:.2f}: never fewer than top-k = "
                                                 f"{top_k} experts kept per layer")
else:
    sparsity = 0.0
    c4.caption(f"Top-k = {top_k} of {num_experts} experts: none can be dropped.")

if not criteria.measured(stats, criterion):
    st.info(f"{criterion} is measured, not derived from routing: run `moe-viz importance --model "
            f"{model_id} --domain {domain}` to fill it in.")
    st.stop()
ranked = criteria.rank(criteria.score(stats[stats.layer == layer], criterion)).sort_values("rank")
keep = max(top_k, num_experts - round(sparsity * num_experts))
st.caption(f"Keep {keep} of {num_experts} experts. A layer routes every token to its top-k = {top_k} experts, "
           f"so never fewer than {top_k} are kept.")
ranked["status"] = ["kept" if r < keep else "dropped" for r in ranked["rank"]]
ranked["expert_label"] = ranked.expert.astype(str)
figure = px.bar(ranked, x="expert_label", y="score", color="status",
                color_discrete_map={"kept": KEPT_COLOR, "dropped": DROPPED_COLOR},
                category_orders={"expert_label": ranked.expert_label.tolist(), "status": ["kept", "dropped"]},
                title=f"Layer {layer}, {domain}: experts by {criterion} (keep {keep} of {num_experts})",
                labels={"expert_label": "expert (best first)", "score": f"{criterion} score"})
figure.update_layout(height=CHART_HEIGHT)
# numeric-looking labels would make Plotly use a linear axis in expert-index order: bars in rank order
figure.update_xaxes(type="category", categoryorder="array", categoryarray=ranked.expert_label.tolist())
plotly_chart(figure, ranked[["rank", "expert", "score", "routed", "status"]], "ranking_bars")
st.dataframe(ranked[["rank", "expert", "score", "routed", "status"]], hide_index=True)

st.subheader("Criteria agreement")
names = tuple(c for c in criteria.CRITERIA if c != "random" and criteria.measured(stats, c))
k = st.slider("k for top-k overlap", 1, num_experts, max(1, keep), key="rk_agree_k")
table = agreement(stats, names, k)
overall = table.groupby(["criterion_a", "criterion_b"], as_index=False)[["spearman", "topk_overlap"]].mean()
matrix = overall.pivot(index="criterion_a", columns="criterion_b", values="spearman").reindex(index=names, columns=names)
for name in names:
    matrix.loc[name, name] = 1.0
matrix = matrix.combine_first(matrix.T)
heat = go.Figure(go.Heatmap(z=matrix.to_numpy(), x=list(names), y=list(names), zmin=-1, zmax=1, zmid=0,
                            colorscale=COLOR_DIVERGING, text=matrix.round(2).to_numpy(), texttemplate="%{text}",
                            hovertemplate="%{y} vs %{x}<br>Spearman %{z:.3f}<extra></extra>",
                            colorbar=dict(title="Spearman ρ")))
heat.update_layout(title=f"Rank correlation between criteria, mean over layers ({domain})", height=CHART_HEIGHT,
                   xaxis_title="criterion", yaxis_title="criterion")
plotly_chart(heat, matrix.rename_axis(index="criterion_a", columns="criterion_b").stack().rename("spearman")
             .reset_index(), "agreement_matrix")
st.caption(f"Per layer {layer}: Spearman ρ of the rankings and top-{k} overlap |A∩B|/k."
           + (" `reconstruction` is causal (measured by masking each expert); its row shows where routing "
              "statistics agree with what removing an expert really does." if "reconstruction" in names else ""))
st.dataframe(table[table.layer == layer].drop(columns="layer"), hide_index=True)

causal_vs_observational(model_id, run_ids[domain], domain)
