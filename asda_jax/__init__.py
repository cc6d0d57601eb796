"""asda-jax: ASDA (audio spectrogram differential attention) in JAX/Flax.

``LAYERS`` is the package's layer order, lowest first: a module imports only modules
of its own layer or of lower ones, at module level and in functions alike, and no
import cycle closes within a layer (tests/test_layers.py holds the package to it; the
README draws the same map). A subpackage's ``__init__`` is a module of its own
(``model``: the model's public names). ``testing`` is on top: what the tests and
benchmarks share, which no library module imports.
"""

LAYERS = (
    (
        "foundations",
        (
            "sharding",
            "hardware",
            "metrics",
            "launch_env",
            "throughput",
            "storage",
            "progress",
            "plots",
            "report",
        ),
    ),
    (
        "kernels and front end",
        (
            "kernels.mlp",
            "kernels.decoder",
            "kernels.short_attention",
            "attention",
            "audio",
            "windows",
        ),
    ),
    (
        "model and data",
        (
            "model.config",
            "model.layers",
            "model.encoder",
            "model.decoder",
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
    ("the loop", ("selfcheck", "train_lib", "evaluation", "probe", "aot")),
    (
        "tools",
        (
            "inference",
            "embeddings",
            "file_probe",
            "timeline",
            "streaming",
            "serving",
            "hear",
            "torch_import",
            "hf_weights",
            "hlo",
            "cli",
        ),
    ),
    (
        "test support",
        (
            "testing.fixtures",
            "testing.gcs_server",
            "testing.torch_reference",
            "testing.memory",
        ),
    ),
)
