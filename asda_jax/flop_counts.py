"""Analytic FLOPs of the model and of one training step: matmuls and convolutions only.

Counted in the naive form (per differential head two QKᵀ and one A·V; a backward pass
is twice its forward), so a kernel that does extra work shows as lost utilisation.
The benchmarks and ``aot`` (against the compiler's own count) use these.
"""

from __future__ import annotations

from asda_jax import masking
from asda_jax import model as model_lib


def block_forward(tokens: int, length: int, dim: int = 768, mlp: float = 3.5) -> float:
    """One differential block's forward over ``tokens`` tokens in sequences of
    ``length``: the dense layers (q1 k1 q2 k2, v, proj, fc1, fc2) and per token two QKᵀ
    rows and one A·V row."""
    dense = 2 * dim * dim * (4 + 1 + 1 + mlp + mlp)
    attention = 2 * 2 * length * dim + 2 * length * dim
    return tokens * (dense + attention)


def embedding(cfg: model_lib.ModelConfig, patches: int) -> float:
    """The patch embedding of ``patches`` patches in all."""
    return 2 * cfg.patch_size**2 * cfg.embed_dim * patches


def blocks_forward(cfg: model_lib.ModelConfig, sequences: int, length: int) -> float:
    """Every block, for ``sequences`` of ``length`` tokens."""
    return cfg.depth * block_forward(sequences * length, length, cfg.embed_dim, cfg.mlp_ratio)


def encoder_forward(cfg: model_lib.ModelConfig, sequences: int, patches: int) -> float:
    """The patch embedding and every block, for ``sequences`` of ``patches`` + CLS."""
    return embedding(cfg, sequences * patches) + blocks_forward(cfg, sequences, patches + 1)


def decoder_forward(cfg: model_lib.ModelConfig, slots: int) -> float:
    """The CNN decoder over ``slots`` grid positions: its grouped convolutions and the
    output projection."""
    c = cfg.decoder_dim
    conv = 2 * c * (c // cfg.decoder_groups) * cfg.decoder_kernel**2
    return slots * (cfg.decoder_layers * conv + 2 * c * cfg.embed_dim)


def patches_of(cfg: model_lib.ModelConfig, frames: int) -> int:
    return frames // cfg.patch_size * cfg.freq_patches


def pretraining_step(
    cfg: model_lib.ModelConfig, mask_cfg: masking.MaskConfig, clips: int, frames: int
) -> float:
    """Teacher forward on whole clips; student forward + backward on every clone (its
    kept patches, embedded once per clip) and the decoder on every clone's grid."""
    patches = patches_of(cfg, frames)
    clones = clips * mask_cfg.clone_batch
    teacher = encoder_forward(cfg, clips, patches)
    student = 3 * (
        embedding(cfg, clips * patches)
        + blocks_forward(cfg, clones, mask_cfg.num_kept(patches) + 1)
    )
    decoder = 3 * decoder_forward(cfg, clones * patches)
    return float(teacher + student + decoder)


def finetuning_step(cfg: model_lib.ModelConfig, clips: int, frames: int, frozen: bool) -> float:
    """The classifier forward + backward (a frozen encoder: forward only)."""
    forward = encoder_forward(cfg, clips, patches_of(cfg, frames))
    return float(forward if frozen else 3 * forward)
