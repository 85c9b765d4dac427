"""The moe_viz dashboard, shipped inside the package: `moe-viz ui` runs this file with Streamlit.

`streamlit run app.py [-- --store PATH]` from a checkout runs the top-level app.py, which calls main().
"""

from pathlib import Path

import streamlit as st

from moe_viz.ui.common import store_path, warm_imports

PAGES_DIR = Path(__file__).resolve().parent / "pages"


def page_path(name: str) -> str:
    """A page script by its file stem, as an absolute path: st.Page and st.switch_page accept it from any entry script."""
    return str(PAGES_DIR / f"{name}.py")


def main() -> None:
    # An emoji favicon is drawn in the browser (a data: URL); without one the pages' Material icons would be
    # fetched from fonts.gstatic.com as favicons. Nothing the dashboard shows leaves this machine.
    st.set_page_config(page_title="moe_viz", page_icon="🧩", layout="wide")
    navigation = st.navigation(
        [
            st.Page(page_path("heatmaps"), title="Heatmaps", icon=":material/grid_on:", default=True),
            st.Page(page_path("overlap"), url_path="overlap", title="Domain overlap", icon=":material/join_inner:"),
            st.Page(page_path("rankings"), url_path="rankings", title="Saliency rankings",
                    icon=":material/format_list_numbered:"),
            st.Page(page_path("expert"), url_path="expert", title="Expert detail", icon=":material/person_search:"),
            st.Page(page_path("tokens"), url_path="tokens", title="Token routes", icon=":material/text_fields:"),
            st.Page(page_path("health"), url_path="health", title="Router health", icon=":material/monitor_heart:"),
            st.Page(page_path("prune"), url_path="prune", title="Prune & export", icon=":material/content_cut:"),
            st.Page(page_path("compare"), url_path="compare", title="Compare plans", icon=":material/compare_arrows:"),
            st.Page(page_path("runs"), url_path="runs", title="Runs", icon=":material/database:"),
        ]
    )
    st.sidebar.caption(f"store: `{store_path()}`")
    try:
        navigation.run()
    finally:  # started once the first page's script is done: it would compete with it for the GIL
        warm_imports()


if __name__ == "__main__":  # how Streamlit runs its entry script
    main()
