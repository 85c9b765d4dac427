"""Analysis: everything computed from stored statistics (formulas: docs/METRICS.md).

    criteria        expert saliency criteria
    tables          the tables behind the dashboard's views
    domain_stats    cross-domain measures (MI, Jaccard, shares)
    compare         two runs or plans side by side
    reconstruction  measured block output error when experts are dropped
    importance      causal importance (reconstruction, knock-out) of each expert
"""
