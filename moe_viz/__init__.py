"""moe_viz: analyse and prune the experts of Mixture-of-Experts language models.

The flow, one module each (the CLI and the dashboard call only these):

    models      find MoE blocks in a Hugging Face model; load models
    observe     watch real routing during forward passes (hooks)
    capture     run calibration domains through a model into the store
    sources     calibration sources (files, hf:, builtin:)
    store       the DuckDB store: schema, migrations, queries
    criteria    expert saliency criteria from stored statistics
    plan        pruning plans, previews, sizes
    export      pruned checkpoints (in memory or streaming)
    masking     mask experts in a loaded model (the export's reference)
    verify      check an export against its source
    analysis    tables behind the dashboard's views
    domain_stats  cross-domain measures (MI, Jaccard, ...)
    demo        built-in domains and the shipped demo model
"""

__version__ = "0.1.0"
