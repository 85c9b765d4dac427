"""Expert detail: one expert across domains, its co-activation partners and its rank under each criterion."""

import plotly.express as px
import streamlit as st

from moe_viz.analysis import tables, criteria
from moe_viz.analysis import token_profiles
from moe_viz.ui.common import (coactivation, context_html, domain_differences, expert_stats,
                               layer_format, layer_stats, pick_model, plotly_chart, trace_view, visible)

st.title("Expert detail")
_, run_ids = pick_model()
layers = layer_stats(run_ids.values())
c1, c2 = st.columns(2)
layer = c1.selectbox("Layer", sorted(int(l) for l in layers.layer.unique()), key="ex_layer",
                     format_func=layer_format(run_ids.values()))
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

# -- what the expert does, token by token (the run's token trace) --------------------------
st.subheader(f"Tokens expert {expert} handles on {domain}")
if not trace_view(run_ids[domain], "has_trace"):
    st.info(f"The run of {domain} has no token trace: capture it again with `--trace-tokens N` (N > 0).")
    st.stop()
tokens, summary = trace_view(run_ids[domain], "expert_tokens", layer, expert)
m1, m2, m3 = st.columns(3)
m1.metric("Traced tokens routed here", f"{summary['routed']:,} of {summary['traced_tokens']:,}",
          help="tokens of the trace (the first N of the domain) with this expert among their k")
m2.metric("Vocabulary coverage", f"{summary['distinct_tokens']:,} token ids",
          help="distinct token ids routed here at least once")
m3.metric("Share of the domain's distinct ids", f"{summary['coverage']:.1%}",
          help=f"{summary['distinct_tokens']} of the {summary['domain_distinct']} distinct ids in {domain}'s trace")
shown = ["piece", "count", "gate_mass", "lift", "share_here", "occurrences", "token_id"]
help_lift = ("lift = (share of this token's occurrences routed here) / (share of all traced tokens routed here); "
             "> 1: the expert prefers this token")
c1, c2 = st.columns(2)
c1.markdown("**Top tokens by count**", help=help_lift)
by_count = token_profiles.top_by_count(tokens, 20).assign(piece=lambda f: f.piece.map(visible))
c1.dataframe(by_count[shown], hide_index=True, key="ex_top_count")
c2.markdown("**Top tokens by gate mass**", help=help_lift)
by_mass = token_profiles.top_by_gate_mass(tokens, 20).assign(piece=lambda f: f.piece.map(visible))
c2.dataframe(by_mass[shown], hide_index=True, key="ex_top_mass")

choices = [None] + by_count.token_id.tolist()
pieces = dict(zip(by_count.token_id, by_count.piece))
focus = st.selectbox("Example contexts of", choices, key="ex_context_token",
                     format_func=lambda t: "any token (largest gates)" if t is None else f"{pieces[t]} (id {t})")
contexts = trace_view(run_ids[domain], "example_contexts", layer, expert, focus, 8, 10)
st.caption("Occurrences routed to this expert with the largest gates, ±10 tokens of their sequence (⏎ = newline).")
for row in contexts.itertuples():
    st.markdown(f"{context_html(row.before, row.piece, row.after)} &nbsp; gate {row.gate:.3f} · seq {row.seq}, "
                f"pos {row.pos}", unsafe_allow_html=True)

if len(run_ids) > 1:
    st.subheader(f"Layer {layer}: experts whose tokens differ most between two domains")
    d1, d2 = st.columns(2)
    names = list(run_ids)
    domain_a = d1.selectbox("Domain A", names, index=names.index(domain), key="ex_diff_a")
    domain_b = d2.selectbox("Domain B", names, index=(names.index(domain) + 1) % len(names), key="ex_diff_b")
    if trace_view(run_ids[domain_a], "has_trace") and trace_view(run_ids[domain_b], "has_trace"):
        differences = domain_differences(run_ids[domain_a], run_ids[domain_b], layer)
        st.caption("tv: total variation distance between the expert's token distributions in A and B (0: the "
                   "same tokens in the same proportions, 1: no token in common); top tokens by count, side by side.")
        st.dataframe(differences.rename(columns={"top_a": f"top tokens in {domain_a}", "top_b": f"top tokens in {domain_b}",
                                                 "routed_a": f"routed in {domain_a}", "routed_b": f"routed in {domain_b}"}),
                     hide_index=True, key="ex_differences")
    else:
        st.info("Both domains need a token trace (capture with `--trace-tokens N`).")
