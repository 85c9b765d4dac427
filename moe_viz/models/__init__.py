"""Models: find a MoE model's sparse blocks, read their routers, load the model.

    discovery    the MoE blocks of a model, found by structure, and how capture observes each (`find_moe_layers`)
    score_fn     which score function (softmax, sigmoid, sqrt-softplus) a block's router really applies
    routing      a block's routing tensors outside its experts (router rows, selection biases), for pruning
    fingerprint  a short hash that identifies a model's weights
    loading      device and dtype choices, checkpoint path checks, the model and its tokenizer
"""
