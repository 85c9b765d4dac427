"""The Streamlit dashboard. Pages only call moe_viz's public functions; no analysis logic lives here."""
