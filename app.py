"""moe_viz dashboard: `streamlit run app.py [-- --store PATH]` from a checkout (or `moe-viz ui`, `moe-viz demo`).

The app ships inside the package (moe_viz/ui/app.py); this file only calls it.
"""

from moe_viz.ui.app import main

main()
