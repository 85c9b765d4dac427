"""Prune & export: choose a criterion, sparsity and domain mix, preview the cost, export and verify in one click."""

from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from moe_viz.analysis import compare, criteria
from moe_viz import jobs
from moe_viz.prune.command import prune_command
from moe_viz.prune.export import PRUNE_MANIFEST, export_name_path, export_pruned
from moe_viz.errors import MoeVizError
from moe_viz.prune.plan import RouterConstraints, build_plan, preview, size_summary
from moe_viz.prune.sweep import plan_key, stored_plan_results
from moe_viz.ui.common import (CHART_HEIGHT, DROPPED_COLOR, KEPT_COLOR, criteria_help, layer_stats,
                               model_config, pick_model, plotly_chart, store_path)
from moe_viz.prune.verify import verify_from_store


def show_verification(result: dict) -> None:
    """The verdict in the same words as the CLI and moe_viz_verify.json, then quality per domain."""
    (st.success if result["verdict"] == "PASS" else st.error)(f"Verification {result['verdict']}: {result['reason']}")
    st.caption(f"{result['export']} (checked in {result['dtype']}; details in moe_viz_verify.json)")
    rows = [{"domain": d, "tokens": v["tokens"], "ppl original": v["ppl_original"], "ppl pruned": v["ppl_pruned"],
             "KL(orig‖pruned)": v["kl_mean"], "top-1 agreement": v["top1_agreement"],
             "first divergence": ", ".join("-" if g["first_divergence"] is None else str(g["first_divergence"])
                                           for g in v["generation"])}
            for d, v in result["domains"].items()]
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True)


# the core's messages are worded for the CLI; here the folder is the "Export name" box and --force the checkbox
REPLACE_BOX = "Replace an existing export of that name"
CLI_WORDS = [
    ("pass --force to replace it", f"tick “{REPLACE_BOX}” to replace it"),
    ("choose another --out", "choose another name in the “Export name” box"),
    ("choose a writable --out directory", "make the exports folder writable"),
    ("choose an --out outside it", "keep the store (and its exports folder) outside it"),
    ("--out ", "the export folder "),
    ("--force", f"“{REPLACE_BOX}”"),
]


def dashboard_message(message: str) -> str:
    """A core error message in the page's words: the box and the checkbox instead of CLI flags."""
    for cli, page in CLI_WORDS:
        message = message.replace(cli, page)
    return message


st.title("Prune & export")
path = store_path()
model_id, run_ids = pick_model()
layers = layer_stats(run_ids.values())
num_experts = int(layers.num_experts.max())
config = model_config(model_id)
constraints = RouterConstraints.from_config(config, int(layers.top_k.max())) if config else RouterConstraints(int(layers.top_k.max()))
valid = constraints.valid_keeps(num_experts)

c1, c2, c3 = st.columns(3)
criterion = c1.selectbox("Criterion", list(criteria.CRITERIA), index=list(criteria.CRITERIA).index("reap"), key="pr_criterion",
                         help=criteria_help())
scope = c2.radio("Scope", ["uniform", "global"], key="pr_scope", horizontal=True,
                 help="uniform: same count per layer (exportable); global: one ranking across layers (analysis)")
half = min(valid, key=lambda k: (abs(k - num_experts / 2), k))  # default: sparsity closest to 0.5
keep = c3.select_slider("Experts kept per layer", options=valid, value=half, key="pr_keep",
                        format_func=lambda k: f"{k} (sparsity {1 - k / num_experts:.2f})")
domains = st.multiselect("Calibration domains to score on", list(run_ids), default=list(run_ids)[:1], key="pr_domains")
if not domains:
    st.info("Pick at least one calibration domain.")
    st.stop()
weights = {}
if len(domains) > 1:
    columns = st.columns(len(domains))
    for column, domain in zip(columns, domains):
        weights[domain] = column.number_input(f"weight of {domain}", min_value=0.01, value=1.0, step=0.1, key=f"pr_w_{domain}")
else:
    weights = {domains[0]: 1.0}

try:
    plan = build_plan(path, model_id, criterion, weights, config=config, keep=keep, scope=scope)
except MoeVizError as exc:
    st.error(str(exc))
    st.stop()

mask = pd.DataFrame(0, index=sorted(plan.num_experts), columns=range(num_experts))
for layer, kept in plan.kept.items():
    mask.loc[layer, kept] = 1
heat = go.Figure(go.Heatmap(z=mask.to_numpy(), x=[str(e) for e in mask.columns], y=[str(l) for l in mask.index],
                            zmin=0, zmax=1, colorscale=[[0, DROPPED_COLOR], [1, KEPT_COLOR]], showscale=False,
                            hovertemplate="layer %{y}<br>expert %{x}<br>%{z:d} = kept<extra></extra>"))
heat.update_layout(title=f"Kept (blue) and dropped (orange) experts — {criterion}, sparsity {plan.sparsity:.2f}",
                   xaxis_title="expert", yaxis_title="MoE layer (decoder index)", height=CHART_HEIGHT)
heat.update_yaxes(autorange="reversed", type="category")
heat.update_xaxes(type="category")
plotly_chart(heat, mask.rename_axis(index="layer", columns="expert").stack().rename("kept").reset_index(), "prune_mask")

lost = preview(plan, path)
summary = lost.groupby("domain", as_index=False)[["routed_share_lost", "reap_share_lost"]].mean()
lost_shares = summary.melt(id_vars="domain", var_name="measure", value_name="share")
bars = px.bar(lost_shares, x="domain", y="share",
              color="measure", barmode="group", title="Mass carried by the dropped experts (mean over layers)",
              labels={"share": "fraction of the domain's total", "domain": "calibration domain"})
bars.update_layout(yaxis_range=[0, 1])
plotly_chart(bars, lost_shares, "prune_lost")
st.dataframe(summary, hide_index=True)

if config is not None:
    size = size_summary(plan, config)
    m1, m2, m3 = st.columns(3)
    # fewer parameters and bytes is the point of pruning: a saving shows as good (green), not as a red loss
    m1.metric("Parameters", f"{size['params_after'] / 1e6:,.2f}M", f"-{(size['params_before'] - size['params_after']) / 1e6:,.2f}M",
              delta_color="inverse")
    m2.metric(f"Size ({size['dtype']})", f"{size['bytes_after'] / 1e9:,.3f} GB", f"-{(size['bytes_before'] - size['bytes_after']) / 1e9:,.3f} GB",
              delta_color="inverse")
    m3.metric("Routed experts removed", f"{plan.sparsity:.0%}")


# -- evaluated quality of the current plan (plan_evals; `moe-viz sweep` / `evaluate --store-result`) --
@st.fragment(run_every=1.0)
def evaluation_job(job_id: str) -> None:
    """Follows the "Evaluate this plan" job; the page redraws with the stored numbers when it ends."""
    status = jobs.job_status(path, job_id)
    if status["state"] == "running":
        stage = status["progress"].get("stage", "starting")
        st.info(f"Evaluating this plan in the background ({stage}) …")
        if st.button("Cancel", key="pr_eval_cancel"):
            jobs.cancel(path, job_id)
            st.rerun()
    elif status["state"] == "failed":
        st.error(f"Evaluation failed: {status['error']}")
    elif status["state"] == "done":
        del st.session_state["pr_eval_job"]
        st.rerun()
    else:
        st.caption("Evaluation cancelled.")


st.subheader("Evaluated quality")
try:
    evaluated = stored_plan_results(path, plan, plan.seed)
except MoeVizError as exc:
    st.error(str(exc))
    evaluated = None
if evaluated is not None and not evaluated.empty:
    newest = evaluated.drop_duplicates("eval_domain")
    st.dataframe(compare.results_table(newest.drop(columns=["criterion", "sparsity"])), hide_index=True,
                 key="pr_evaluated")
    others = sorted(set(newest.criterion) - {criterion})
    st.caption(f"From the store (evaluated {newest.created_at.max():%Y-%m-%d %H:%M} UTC by masking the dropped "
               "experts, no export): nats per token with 95% bootstrap intervals; KL(original ‖ pruned)."
               + (f" Stored under {', '.join(others)}, which keeps the same experts." if others else "")
               + " Compare criteria and sparsities on the **Compare plans** page.")
elif evaluated is not None:
    st.caption("This plan has not been evaluated yet: evaluate it (masking the dropped experts on held-out text "
               "of its calibration domains, no export), or run a sweep on the **Compare plans** page.")
job = st.session_state.get("pr_eval_job")  # (job id, plan key) of the last "Evaluate this plan"
job = job if job and job[1] == plan_key(plan, plan.seed) else None  # only this plan's job is shown here
if Path(model_id).is_dir() and evaluated is not None and (evaluated.empty or job):
    if st.button("Evaluate this plan", key="pr_evaluate",
                 disabled=bool(job) and jobs.job_status(path, job[0])["state"] == "running"):
        job = (jobs.start_evaluate(path, model_id, plan.to_json(), seed=plan.seed), plan_key(plan, plan.seed))
        st.session_state["pr_eval_job"] = job
    if job:
        evaluation_job(job[0])

exports_dir = Path(path).resolve().parent / "exports"  # beside the store, so it follows MOE_VIZ_HOME
with st.expander("Verify an existing export"):
    existing = sorted(p.name for p in exports_dir.iterdir() if (p / PRUNE_MANIFEST).is_file()) if exports_dir.is_dir() else []
    if not existing:
        st.caption(f"No moe_viz exports under {exports_dir} yet.")
    else:
        picked = st.selectbox("Export", existing, key="pr_verify_pick")
        if st.button("Verify", key="pr_verify"):
            try:
                with st.spinner(f"Verifying {picked} against the masked original …"):
                    checked, notes = verify_from_store(exports_dir / picked, path)
                for note in notes:
                    st.caption(note)
                show_verification(checked)
            except MoeVizError as exc:
                st.error(dashboard_message(str(exc)))

st.subheader("Export")
if not plan.exportable:
    st.warning("This global plan keeps different numbers of experts per layer, so it cannot be exported: "
               "switch the scope to uniform.")
    st.caption("The same plan, evaluated from a terminal (copy button on the right):")
    st.code(prune_command(plan, path, ""), language="bash")
    st.stop()
if config is None or not Path(model_id).is_dir():
    st.warning(f"The model {model_id} is not a local directory, so it cannot be exported from here.")
    st.stop()
default_name = f"{Path(model_id).name}-{criterion}-keep{keep}"
# the name follows the plan (criterion, keep) unless the user typed their own
if st.session_state.get("pr_name") in (None, st.session_state.get("pr_name_default")):
    st.session_state["pr_name"] = default_name
st.session_state["pr_name_default"] = default_name
name = st.text_input(f"Export name (under {exports_dir})", key="pr_name",
                     help=f"follows the plan ({default_name}) until you type your own name")
force = st.checkbox(REPLACE_BOX, key="pr_force",
                    help="only ever replaces a previous moe_viz export (a folder holding moe_viz_prune.json)")
st.caption("The same export from a terminal (copy button on the right):" if plan.scope == "uniform" else
           "The same plan, evaluated from a terminal (`moe-viz prune` builds uniform plans; copy button on the right):")
st.code(prune_command(plan, path, exports_dir / name, force=force), language="bash")
if st.button("Export and verify", type="primary", key="pr_export"):
    st.session_state.pop("pr_result", None)  # a result shown below always belongs to this export
    status = None
    try:
        out = export_name_path(exports_dir, name)  # one plain name, else refused
        status = st.status(f"Exporting to {out} …", expanded=True)
        with status:
            export_pruned(plan, model_id, out, force=force, protect=[path],
                          progress=lambda done, total: status.write(f"shard {done}/{total} written"))
            status.write("export written; verifying against the masked original …")
            result, notes = verify_from_store(out, path)
            for note in notes:
                status.write(note)
            st.session_state["pr_result"] = result
            status.update(label=f"Exported {out}: verification {result['verdict']}",
                          state="complete" if result["verdict"] == "PASS" else "error")
    except MoeVizError as exc:
        message = dashboard_message(str(exc))
        if status is not None:
            status.update(label=f"Export failed: {message}", state="error", expanded=False)
        st.error(message)

result = st.session_state.get("pr_result")
if result:
    show_verification(result)
