"""moe_viz: analyse and prune the experts of Mixture-of-Experts language models.

Public API (the CLI and the dashboard call only these):

    from moe_viz.capture import capture, capture_model, CaptureSettings
    from moe_viz import store   # DuckDB store: list_runs, expert_stats, ...
"""

__version__ = "0.1.0"
