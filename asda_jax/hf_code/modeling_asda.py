"""An ASDA (or plain-attention, EAT-architecture) audio spectrogram transformer in
PyTorch, for Hugging Face transformers: the encoder (``ASDAModel``) and the classifier
(``ASDAForAudioClassification``) of a model trained with asda-jax.

Written into every Hugging Face folder asda-jax exports (``launch/export.py
--format=hf``) and named by its ``config.json``'s ``auto_map``; it needs torch and
transformers only. The computation is asda-jax's, written again in PyTorch:

    fbank (B, T, M), normalised → 16×16 patches + fixed 2-D sin-cos positions
    → prepend the CLS token → LayerNorm → ``depth`` post-norm blocks
    (attention: the release's differential form, softmax(q1 k1ᵀ) − λ·softmax(q2 k2ᵀ)
    over shared values, LayerNorm over all heads, × ``attn_out_scale``; or plain
    softmax attention) → tokens (B, 1 + N, D), the CLS token first, then the patches
    time-major (N = T/16 · M/16).

The classifier pools the CLS token (or the mean of the real patches), applies
``fc_norm`` and ``head``: logits (B, num_labels). The tensor names are EAT's Hugging
Face layout (``model.blocks.N.attn.qkv`` for the plain form; ``qk``, ``v``, ``norm``
and ``proj`` for the differential one).
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from .configuration_asda import ASDAConfig


def sincos_positions(time_patches: int, freq_patches: int, dim: int) -> torch.Tensor:
    """(1, T·F, dim): row t·F + f holds [e(f) | e(t)], e(p) = [sin(p·ω), cos(p·ω)],
    ω_i = 10000^(−i/(dim/4))."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.double()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    t = torch.arange(time_patches).repeat_interleave(freq_patches)
    f = torch.arange(freq_patches).repeat(time_patches)
    return torch.cat([encode(f), encode(t)], dim=1)[None].float()


def attention_map(q, k, scale: float, padding: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ·scale) over keys, padding keys excluded; (B, H, N, N)."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if padding is not None:  # (B, N) True at padding
        logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))
    return logits.float().softmax(dim=-1).type_as(q)


class DifferentialAttention(nn.Module):
    def __init__(self, config: ASDAConfig):
        super().__init__()
        dim = config.embed_dim
        self.heads, self.lam, self.out_scale = (
            config.num_heads,
            config.diff_lambda,
            config.attn_out_scale,
        )
        self.scale = (dim // config.num_heads) ** -0.5
        self.qk = nn.Linear(dim, 4 * dim)  # rows: q1, q2, k1, k2
        self.v = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)  # over every head together
        self.proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, D/H)
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q1, q2, k1, k2 = (self.split(part) for part in self.qk(x).split(d, dim=-1))
        v = self.split(self.v(x))
        a1 = attention_map(q1, k1, self.scale, padding)
        a2 = attention_map(q2, k2, self.scale, padding)
        out = ((a1 - self.lam * a2) @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(self.norm(out) * self.out_scale)


class PlainAttention(nn.Module):
    def __init__(self, config: ASDAConfig):
        super().__init__()
        dim = config.embed_dim
        self.heads = config.num_heads
        self.scale = (dim // config.num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)  # rows: q, k, v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention_map(q, k, self.scale, padding) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, config: ASDAConfig):
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.act = nn.GELU()  # the exact (erf) form
        self.fc2 = nn.Linear(hidden, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Post-norm: x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, config: ASDAConfig):
        super().__init__()
        attention = DifferentialAttention if config.attention == "asda" else PlainAttention
        self.attn = attention(config)
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = Mlp(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, padding))
        return self.norm2(x + self.mlp(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: ASDAConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(1, config.embed_dim, kernel_size=p, stride=p)


class FixedPositions(nn.Module):
    def __init__(self, config: ASDAConfig):
        super().__init__()
        freq_patches = config.num_mel_bins // config.patch_size
        table = sincos_positions(config.max_time_patches, freq_patches, config.embed_dim)
        self.register_buffer("positions", table)  # saved with the weights, as EAT's layout


class Backbone(nn.Module):
    """Everything under the ``model.`` prefix: the encoder and a classifier's head."""

    def __init__(self, config: ASDAConfig, num_labels: int = 0):
        super().__init__()
        self.config = config
        self.local_encoder = PatchEmbed(config)
        self.extra_tokens = nn.Parameter(torch.zeros(1, 1, config.embed_dim))  # CLS
        self.fixed_positional_encoder = FixedPositions(config)
        self.pre_norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        if num_labels:
            self.fc_norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
            self.head = nn.Linear(config.embed_dim, num_labels)

    def padding(self, attention_mask, time_patches: int) -> torch.Tensor | None:
        """(B, 1 + N) True at the tokens of padded frames: ``attention_mask`` (B, T) marks
        real frames; a patch is real when all its frames are (as asda-jax masks)."""
        if attention_mask is None:
            return None
        c = self.config
        real = attention_mask.long().sum(-1) // c.patch_size * (c.num_mel_bins // c.patch_size)
        tokens = torch.arange(time_patches * (c.num_mel_bins // c.patch_size), device=real.device)
        patches = tokens[None, :] >= real[:, None]
        return torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)

    def forward(self, input_values: torch.Tensor, attention_mask=None, hidden_states=None):
        x = self.local_encoder.proj(input_values[:, None])  # (B, D, T/p, M/p)
        time_patches = x.shape[2]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), time-major
        if time_patches > self.config.max_time_patches:
            raise ValueError(
                f"{time_patches} time patches: the positional table holds "
                f"{self.config.max_time_patches}"
            )
        x = x + self.fixed_positional_encoder.positions[:, : x.shape[1]].to(x.dtype)
        cls = self.extra_tokens.expand(x.shape[0], -1, -1)
        x = self.pre_norm(torch.cat([cls, x], dim=1))
        padding = self.padding(attention_mask, time_patches)
        for block in self.blocks:
            if hidden_states is not None:
                hidden_states.append(x)
            x = block(x, padding)
        return x, padding


class ASDAPreTrainedModel(PreTrainedModel):
    config_class = ASDAConfig
    base_model_prefix = "model"
    main_input_name = "input_values"

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ASDAModel(ASDAPreTrainedModel):
    """The encoder: ``last_hidden_state`` (B, 1 + N, D), the CLS token first."""

    def __init__(self, config: ASDAConfig):
        super().__init__(config)
        self.model = Backbone(config)
        self.post_init()

    def forward(
        self,
        input_values,
        attention_mask=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        hidden = [] if output_hidden_states else None
        x, _ = self.model(input_values, attention_mask, hidden)
        states = (*hidden, x) if hidden is not None else None
        if return_dict is False:
            return (x,) if states is None else (x, states)
        return BaseModelOutput(last_hidden_state=x, hidden_states=states)


class ASDAForAudioClassification(ASDAPreTrainedModel):
    """The classifier: logits (B, num_labels); scores are their softmax (one label a
    clip) or sigmoid (several: ``problem_type`` "multi_label_classification")."""

    def __init__(self, config: ASDAConfig):
        super().__init__(config)
        self.model = Backbone(config, config.num_labels)
        self.post_init()

    def forward(self, input_values, attention_mask=None, labels=None, return_dict=None, **kwargs):
        x, padding = self.model(input_values, attention_mask)
        if self.config.pooling == "cls":
            pooled = x[:, 0]
        else:
            real = (
                (~padding[:, 1:, None]).to(x.dtype)
                if padding is not None
                else torch.ones_like(x[:, 1:, :1])
            )
            pooled = (x[:, 1:] * real).sum(1) / real.sum(1).clamp(min=1.0)
        logits = self.model.head(self.model.fc_norm(pooled))
        loss = None
        if labels is not None:
            if self.config.problem_type == "multi_label_classification":
                loss = nn.functional.binary_cross_entropy_with_logits(
                    logits, labels.to(logits.dtype)
                )
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return SequenceClassifierOutput(loss=loss, logits=logits)
