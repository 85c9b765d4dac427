"""moe_viz dashboard: `streamlit run app.py [-- --store PATH]` (or `moe-viz ui`, `moe-viz demo`)."""

import streamlit as st

from moe_viz.ui.common import store_path, warm_imports

# An emoji favicon is drawn in the browser (a data: URL); without one the pages' Material icons would be
# fetched from fonts.gstatic.com as favicons. Nothing the dashboard shows leaves this machine.
st.set_page_config(page_title="moe_viz", page_icon="🧩", layout="wide")
warm_imports()
PAGES = "moe_viz/ui/pages"
navigation = st.navigation(
    [
        st.Page(f"{PAGES}/heatmaps.py", title="Heatmaps", icon=":material/grid_on:", default=True),
        st.Page(f"{PAGES}/overlap.py", url_path="overlap", title="Domain overlap", icon=":material/join_inner:"),
        st.Page(f"{PAGES}/rankings.py", url_path="rankings", title="Saliency rankings", icon=":material/format_list_numbered:"),
        st.Page(f"{PAGES}/expert.py", url_path="expert", title="Expert detail", icon=":material/person_search:"),
        st.Page(f"{PAGES}/health.py", url_path="health", title="Router health", icon=":material/monitor_heart:"),
        st.Page(f"{PAGES}/prune.py", url_path="prune", title="Prune & export", icon=":material/content_cut:"),
        st.Page(f"{PAGES}/compare.py", url_path="compare", title="Compare plans", icon=":material/compare_arrows:"),
        st.Page(f"{PAGES}/runs.py", url_path="runs", title="Runs", icon=":material/database:"),
    ]
)
st.sidebar.caption(f"store: `{store_path()}`")
navigation.run()
