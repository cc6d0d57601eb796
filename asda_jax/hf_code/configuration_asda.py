"""The configuration of an ASDA (or plain-attention, EAT-architecture) audio
spectrogram transformer exported by asda-jax, for Hugging Face transformers.

Written into every Hugging Face folder asda-jax exports (``launch/export.py
--format=hf``) and named by its ``config.json``'s ``auto_map``; it needs transformers
only. The fields are asda-jax's ``ModelConfig`` and the input the model was trained
on (``target_frames`` fbank frames, normalised as (x − norm_mean) / (2·norm_std)).
"""

from transformers import PretrainedConfig


class ASDAConfig(PretrainedConfig):
    model_type = "asda"

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 3.5,
        patch_size: int = 16,
        num_mel_bins: int = 128,
        max_time_patches: int = 768,
        attention: str = "asda",  # "asda": differential attention; "plain": softmax (EAT)
        diff_lambda: float = 0.1,
        attn_out_scale: float = 0.95,
        target_frames: int = 1024,
        norm_mean: float = -4.268,
        norm_std: float = 4.569,
        pooling: str = "cls",  # a classifier's: the CLS token or the mean of the patches
        **kwargs,
    ):
        if attention not in ("asda", "plain"):
            raise ValueError(f"attention must be 'asda' or 'plain', got {attention!r}")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.mlp_ratio, self.patch_size, self.num_mel_bins = mlp_ratio, patch_size, num_mel_bins
        self.max_time_patches, self.attention = max_time_patches, attention
        self.diff_lambda, self.attn_out_scale = diff_lambda, attn_out_scale
        self.target_frames, self.norm_mean, self.norm_std = target_frames, norm_mean, norm_std
        self.pooling = pooling
        self.hidden_size = embed_dim  # the name transformers' generic code reads
        super().__init__(**kwargs)
