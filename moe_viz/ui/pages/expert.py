"""Expert detail: one expert across domains, its co-activation partners and its rank under each criterion."""

import plotly.express as px
import streamlit as st

from moe_viz.analysis import tables, criteria
from moe_viz.ui.common import coactivation, domain_run_ids, expert_stats, layer_stats, pick_model_runs, plotly_chart

st.title("Expert detail")
model_runs = pick_model_runs()
run_ids = domain_run_ids(model_runs)
layers = layer_stats(run_ids.values())
c1, c2 = st.columns(2)
layer = c1.selectbox("Layer", sorted(int(l) for l in layers.layer.unique()), key="ex_layer")
stats = expert_stats(run_ids.values(), layer=layer)
expert = c2.selectbox("Expert", sorted(int(e) for e in stats.expert.unique()), key="ex_expert")

profile = tables.expert_profile(stats, layers, layer, expert)
share = px.bar(profile, x="domain", y="frequency_share", title=f"Layer {layer}, expert {expert}: routed share by domain",
               labels={"frequency_share": "routed-token share (fraction of k·T slots)", "domain": "domain"})
share.add_hline(y=1 / int(layers.num_experts.max()), line_dash="dash", line_color="grey", annotation_text="uniform 1/E")
plotly_chart(share, profile, "expert_share")

ranks = profile.set_index("domain")[[c for c in profile.columns if c.startswith("rank:")]]
ranks.columns = [c.removeprefix("rank:") for c in ranks.columns]
st.subheader("Rank under each criterion (0 = most important)")
st.dataframe(ranks)

st.subheader("Co-activation partners")
domain = st.selectbox("Domain", list(run_ids), key="ex_domain")
routed = int(profile.set_index("domain").loc[domain, "routed_tokens"])
partners = tables.coactivation_partners(coactivation(run_ids[domain], layer), routed, expert).head(10)
if partners.empty:
    st.info(f"Expert {expert} of layer {layer} was never routed together with another expert on {domain}.")
else:
    bars = px.bar(partners, x=partners.partner.astype(str), y="p_given_expert",
                  title=f"Top partners of expert {expert} on {domain}: P(partner also routed | expert routed)",
                  labels={"x": "partner expert (most likely first)", "p_given_expert": "probability"})
    # numeric-looking labels would make Plotly use a linear axis (index order, gaps): categories by probability
    bars.update_xaxes(type="category", categoryorder="array", categoryarray=partners.partner.astype(str).tolist())
    plotly_chart(bars, partners, "expert_partners")
    st.dataframe(partners, hide_index=True)
