"""Pallas TPU kernels: pure functions of arrays, each with a hand-written backward.

``short_attention`` (differential attention over at most one lane-width of tokens),
``decoder`` (the decoder's block: grouped convolution, LayerNorm, GELU, residual) and
``mlp`` (an encoder block's MLP). The model's modules own the parameters and hand them
to these; the tests hold each to the XLA form it replaces, interpreted on CPU.
"""
