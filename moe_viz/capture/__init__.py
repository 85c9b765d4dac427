"""Capture: run calibration text through a model and accumulate routing statistics.

    sources        calibration sources (files, hf:, builtin:) -> token sequences
    observe        hooks that watch the routing a forward pass really does
    routing_stats  per-layer accumulators of exact per-expert sums
    run            the capture itself: batches in, a run in the store out
    layerwise      stream one decoder layer at a time from the shards (models larger than memory)
    distributed    data-parallel capture over torchrun / accelerate launch ranks
"""
