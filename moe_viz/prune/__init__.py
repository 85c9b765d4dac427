"""Prune: decide which experts go, check the decision, write the checkpoint.

    plan      pruning plans from a criterion and a sparsity; previews and sizes
    masking   drop experts in a loaded model (the reference every export is checked against)
    evaluate  a plan's measured effect on held-out text
    sweep     many plans evaluated and stored
    search    search for a better plan than a criterion gives
    export    pruned checkpoints (in memory or streaming from the shards)
    verify    PASS/FAIL check of an export against its source
"""
