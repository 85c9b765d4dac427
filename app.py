"""moe_viz dashboard entry point: `streamlit run app.py [-- --store PATH]`.

For now it lists the runs in the store; the analysis pages are tracked in the dashboard issue.
"""

import argparse
import sys

import streamlit as st

from moe_viz import store
from moe_viz.models import MoeVizError


def _store_path() -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default=str(store.DEFAULT_STORE))
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args.store


st.set_page_config(page_title="moe_viz", layout="wide")
st.title("moe_viz")
path = _store_path()
try:
    runs = store.list_runs(path)
except MoeVizError as exc:
    st.info(f"{exc}")
    st.stop()
if runs.empty:
    st.info(f"The store {path} has no runs yet: run `moe-viz capture --model PATH --domain NAME=SOURCE`.")
    st.stop()
st.subheader("Runs")
st.dataframe(
    runs[["domain", "model_id", "status", "tokens", "sequences", "started_at", "finished_at", "run_id"]],
    hide_index=True,
)
