"""Router health: load imbalance, router entropy and never-routed experts per layer."""

import plotly.express as px
import streamlit as st

from moe_viz.analysis import tables
from moe_viz.ui.common import expert_stats, layer_stats, pick_model, plotly_chart

st.title("Router health")
_, run_ids = pick_model()
health = tables.router_health(expert_stats(run_ids.values(), ["routed_tokens"]), layer_stats(run_ids.values()))
labels = {"layer": "MoE layer (decoder index)", "load_imbalance": "max share / mean share",
          "entropy_normalised": "entropy / ln E", "never_routed": "experts"}
c1, c2 = st.columns(2)
imbalance = px.line(health, x="layer", y="load_imbalance", color="domain", markers=True,
                    title="Load imbalance (1 = perfectly balanced)", labels=labels)
imbalance.update_xaxes(type="category")
plotly_chart(imbalance, health[["domain", "layer", "load_imbalance"]], "health_imbalance", c1)
entropy = px.line(health, x="layer", y="entropy_normalised", color="domain", markers=True,
                  title="Mean router entropy, normalised (1 = uniform)", labels=labels)
entropy.update_layout(yaxis_range=[0, 1.02])
entropy.update_xaxes(type="category")
plotly_chart(entropy, health[["domain", "layer", "entropy_mean", "entropy_normalised"]], "health_entropy", c2)
never = px.bar(health, x="layer", y="never_routed", color="domain", barmode="group",
               title="Experts never routed on the calibration data", labels=labels)
never.update_xaxes(type="category")
plotly_chart(never, health[["domain", "layer", "never_routed", "num_experts"]], "health_never")
st.dataframe(health, hide_index=True)
