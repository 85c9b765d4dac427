"""moe_viz: analyse and prune the experts of Mixture-of-Experts language models.

The flow, one package per stage (the CLI and the dashboard call only these):

    models/, checkpoint  find MoE blocks in a Hugging Face model; load and check models
    capture/   calibration text through the model into routing statistics
    store      the DuckDB store: schema, migrations, queries
    analysis/  criteria and the tables behind every view
    prune/     plans, evaluation, search, export, verification
    ui/        the Streamlit dashboard, one module per page
    demo/      built-in domains and the shipped demo model
    cli        the `moe-viz` command, a thin layer over the above
    errors     MoeVizError, the one-line error every stage raises for a problem the user can fix
"""

__version__ = "0.1.0"
