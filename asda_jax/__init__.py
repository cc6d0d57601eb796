"""asda-jax: ASDA (audio spectrogram differential attention) in JAX/Flax.

``LAYERS`` is the package's layer order, lowest first: a module imports only modules
of its own layer or of lower ones, at module level and in functions alike
(tests/test_layers.py holds the package to it; the README draws the same map).
"""

LAYERS = (
    ("foundations", ("platforms", "sharding", "metrics", "launch_env")),
    (
        "kernels and front end",
        ("short_attention", "decoder_kernel", "mlp_kernel", "attention", "audio", "windows"),
    ),
    (
        "model and data",
        (
            "model",
            "masking",
            "data.synthetic",
            "data.builders",
            "data.audioset",
            "data.datasets",
            "data.pipeline",
        ),
    ),
    (
        "objectives and state on disk",
        ("objectives", "optim", "checkpoints", "release_weights", "flop_counts"),
    ),
    ("typed config blocks", ("config_lib", "recipes")),
    ("tasks", ("train_state", "pretraining", "finetuning")),
    ("the loop", ("train_lib", "evaluation", "probe", "aot")),
    ("tools", ("inference", "embeddings", "timeline", "hear", "torch_import", "cli")),
)
