"""Runs: what the store holds, and new captures in the background with live progress."""

import streamlit as st

from moe_viz import jobs
from moe_viz.errors import MoeVizError
from moe_viz.ui.common import runs, store_path

st.title("Runs")
path = store_path()
try:
    table = runs()
except MoeVizError as exc:
    st.info(f"{exc}. Start a capture below, or run `moe-viz demo`.")
    table = None
if table is not None:
    if table.empty:
        st.info("No runs yet: start a capture below, or run `moe-viz demo`.")
    else:
        st.dataframe(
            table[["domain", "model_id", "status", "tokens", "sequences", "started_at", "finished_at", "error", "run_id"]],
            hide_index=True,
            column_config={"tokens": st.column_config.NumberColumn("tokens", format="%d")},
        )
        if (table.status == "interrupted").any():
            st.caption("interrupted: the capture's process ended without finishing the run (killed, crashed, "
                       "machine restarted); it has no statistics. Capture the domain again, or, if the capture "
                       "printed a `moe-viz import-run` command, run that.")

st.subheader("New capture")
with st.form("capture"):
    model = st.text_input("Model directory or hub id", key="cap_model")
    domains = st.text_area("Domains, one NAME=SOURCE per line", key="cap_domains",
                           value="code=builtin:code\nmath=builtin:math",
                           help="SOURCE: a .txt/.jsonl file, a directory, hf:DATASET[:CONFIG[:SPLIT[:FIELD]]] or builtin:NAME")
    c1, c2, c3, c4 = st.columns(4)
    max_tokens = c1.number_input("Tokens per domain", min_value=1, value=50_000, step=10_000, key="cap_tokens")
    seq_len = c2.number_input("Sequence length", min_value=8, value=512, step=64, key="cap_seq")
    batch = c3.number_input("Batch size", min_value=1, value=8, key="cap_batch")
    threads = c4.number_input("CPU threads", min_value=0, value=jobs.default_threads() or 0, step=1, key="cap_threads",
                              help="torch CPU threads for the capture; 0: torch's choice. "
                                   "`moe-viz ui --threads N` sets the default.")
    submitted = st.form_submit_button("Start capture")
if submitted:
    lines = [l.strip() for l in domains.splitlines() if l.strip()]
    if not model.strip() or not lines:
        st.error("Give a model and at least one NAME=SOURCE line.")
    else:
        job = jobs.start_capture(path, model.strip(), lines, int(max_tokens), int(seq_len), int(batch),
                                 threads=int(threads))  # 0: no --threads, torch decides
        st.session_state["last_job"] = job


@st.fragment(run_every=1.0)
def job_panel() -> None:
    recent = jobs.list_jobs(path)[:5]
    if not recent:
        return
    st.subheader("Captures started here")
    for job_id in recent:
        status = jobs.job_status(path, job_id)
        progress = status["progress"]
        label = f"`{job_id}` — {status['state']}"
        if status["state"] == "running" and progress.get("tokens_total"):
            done, total = progress["tokens_done"], progress["tokens_total"]
            rate = done / progress["elapsed_s"] if progress.get("elapsed_s") else 0
            st.progress(min(done / total, 1.0), text=f"{label}: {progress['domain']} {done:,}/{total:,} tokens ({rate:,.0f} tok/s)"
                        + (f", {progress['detail']}" if progress.get("detail") else ""))
        elif status["state"] == "failed":
            st.error(f"{label}: {status['error']}")
        else:
            st.write(label)
        if status["state"] == "running" and st.button("Cancel", key=f"cancel_{job_id}"):
            jobs.cancel(path, job_id)
            st.rerun()


job_panel()
