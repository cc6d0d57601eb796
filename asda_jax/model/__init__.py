"""The model: what it is (``config``), its pieces (``layers``), the encoder and its
classification head (``encoder``) and the pretraining decoder (``decoder``).

The names below are the package's public surface (``from asda_jax import model``).
"""

from asda_jax.model.config import (
    PRESETS,
    REMAT_POLICIES,
    Execution,
    ModelConfig,
    preset,
)
from asda_jax.model.decoder import Decoder, grouped_conv
from asda_jax.model.encoder import (
    AsdaAttention,
    Block,
    Classifier,
    DiffTransformerAttention,
    Encoder,
    EncoderOutput,
    Mlp,
    block_class,
    lambda_init,
    pool,
    sincos_positions,
    sincos_table,
)
from asda_jax.model.layers import abstract_params

__all__ = [
    "PRESETS",
    "REMAT_POLICIES",
    "AsdaAttention",
    "Block",
    "Classifier",
    "Decoder",
    "DiffTransformerAttention",
    "Encoder",
    "EncoderOutput",
    "Execution",
    "Mlp",
    "ModelConfig",
    "abstract_params",
    "block_class",
    "grouped_conv",
    "lambda_init",
    "pool",
    "preset",
    "sincos_positions",
    "sincos_table",
]
