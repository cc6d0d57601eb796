"""Independent PyTorch re-implementations of the authors' release model and of EAT's
Hugging Face model.

Written from the release's description (docs/method.md) and EAT's published layout
(docs/weights.md), with their module names, so that ``state_dict()`` has their keys.
Used as the oracle for parity tests and to write fake checkpoints of both layouts.
Nothing here imports asda_jax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_positions(time_patches: int, freq_patches: int, dim: int) -> torch.Tensor:
    """(1, T·F, dim): row t·F + f = [e(f) | e(t)], e(p) = [sin(pω), cos(pω)], float32."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.float()[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    t = torch.arange(time_patches).repeat_interleave(freq_patches)
    f = torch.arange(freq_patches).repeat(time_patches)
    return torch.cat([encode(f), encode(t)], dim=1)[None]


class AltAttention(nn.Module):
    """Release differential attention: qk → [q1|q2|k1|k2], fixed λ, LN(all heads)·0.95."""

    def __init__(self, dim: int, num_heads: int, lam: float = 0.1, out_scale: float = 0.95):
        super().__init__()
        self.num_heads, self.lam, self.out_scale = num_heads, lam, out_scale
        self.scale = (dim // num_heads) ** -0.5
        self.qk = nn.Linear(dim, 4 * dim)
        self.v = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, H, N, C/H)
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def softmax_map(self, q, k, padding_mask):
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if padding_mask is not None:  # (B, N) True = padding
            logits = logits.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        return logits.float().softmax(dim=-1).type_as(q)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qk = self.qk(x).reshape(b, n, 2, 2 * c)
        q, k = qk[:, :, 0], qk[:, :, 1]
        q1, q2, k1, k2 = (self.heads(t) for t in (q[..., :c], q[..., c:], k[..., :c], k[..., c:]))
        v = self.heads(self.v(x))
        a1 = self.softmax_map(q1, k1, padding_mask)
        a2 = self.softmax_map(q2, k2, padding_mask)
        out = ((a1 - self.lam * a2) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(self.norm(out) * self.out_scale)


class PlainAttention(nn.Module):
    """EAT's attention: one qkv projection (rows [q | k | v], heads within each), softmax."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, C/H)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if padding_mask is not None:
            logits = logits.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        out = logits.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class AltBlock(nn.Module):
    """Post-norm block; forward returns (output, MLP output before the residual)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.5, attention=AltAttention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, padding_mask=None):
        x = self.norm1(x + self.attn(x, padding_mask))
        t = self.mlp(x)
        return self.norm2(x + t), t


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)


class FixedPositions(nn.Module):
    def __init__(self, max_time_patches: int, freq_patches: int, dim: int):
        super().__init__()
        table = sincos_positions(max_time_patches, freq_patches, dim)
        self.positions = nn.Parameter(table, requires_grad=False)


class ContextEncoder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)


class Decoder2d(nn.Module):
    """Release CNN decoder: [grouped conv, (same pad), LN over channels, GELU] + residual."""

    def __init__(self, dim: int, layers: int, kernel: int, groups: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=groups),
                nn.Identity(),  # SamePad2d: removes nothing for an odd kernel
                _ChannelLayerNorm(dim),
                nn.Identity(),
                nn.Identity(),
                nn.GELU(),
            )
            for _ in range(layers)
        )
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, C) -> (B, N, C)
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, *self.grid)
        for block in self.blocks:
            x = block(x) + x
        return self.proj(x.reshape(b, c, n).transpose(1, 2))


class _ChannelLayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-5)

    def forward(self, x):  # (B, C, H, W)
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ImageEncoder(nn.Module):
    def __init__(self, dim, patch, mel_bins, max_time_patches, decoder_layers, groups, grid):
        super().__init__()
        self.local_encoder = PatchEmbed(dim, patch)
        self.extra_tokens = nn.Parameter(torch.randn(1, 1, dim))
        self.fixed_positional_encoder = FixedPositions(max_time_patches, mel_bins // patch, dim)
        self.context_encoder = ContextEncoder(dim)
        if decoder_layers:
            self.decoder = Decoder2d(dim, decoder_layers, 3, groups, grid)


class ReleaseModel(nn.Module):
    """Encoder (+ optional decoder, + optional fc_norm/head) with the release's names."""

    def __init__(
        self,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch: int = 16,
        mel_bins: int = 128,
        max_time_patches: int = 768,
        decoder_layers: int = 0,
        decoder_groups: int = 16,
        decoder_grid: tuple[int, int] = (64, 8),
        num_classes: int = 0,
    ):
        super().__init__()
        self.patch = patch
        self.modality_encoders = nn.ModuleDict(
            {
                "IMAGE": ImageEncoder(
                    dim,
                    patch,
                    mel_bins,
                    max_time_patches,
                    decoder_layers,
                    decoder_groups,
                    decoder_grid,
                )
            }
        )
        self.blocks = nn.ModuleList(AltBlock(dim, num_heads) for _ in range(depth))
        if num_classes:
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, num_classes)

    @property
    def image(self) -> ImageEncoder:
        return self.modality_encoders["IMAGE"]

    def embed(self, spec: torch.Tensor) -> torch.Tensor:  # (B, T, F) -> (B, N, D)
        x = self.image.local_encoder.proj(spec[:, None])  # (B, D, Nt, Nf)
        x = x.flatten(2).transpose(1, 2)
        return x + self.image.fixed_positional_encoder.positions[:, : x.shape[1]]

    def encode(self, patches: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """(B, N, D) patches → tokens (B, 1+N, D) and per-block MLP outputs."""
        cls = self.image.extra_tokens.expand(patches.shape[0], -1, -1)
        x = self.image.context_encoder.norm(torch.cat([cls, patches], dim=1))
        layer_results = []
        for block in self.blocks:
            x, t = block(x, padding_mask)
            layer_results.append(t)
        return x, layer_results

    def forward(self, spec: torch.Tensor, padding_mask: torch.Tensor | None = None):
        return self.encode(self.embed(spec), padding_mask)

    def logits(self, spec: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.forward(spec)
        return self.head(self.fc_norm(tokens[:, 0]))


class EatBackbone(nn.Module):
    """The modules under EAT's ``model.`` prefix (Hugging Face layout)."""

    def __init__(
        self, dim, depth, num_heads, mlp_ratio, patch, mel_bins, max_time_patches, classes
    ):
        super().__init__()
        self.local_encoder = PatchEmbed(dim, patch)
        self.extra_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.fixed_positional_encoder = FixedPositions(max_time_patches, mel_bins // patch, dim)
        self.pre_norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList(
            AltBlock(dim, num_heads, mlp_ratio, PlainAttention) for _ in range(depth)
        )
        if classes:
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, classes)


class EatModel(nn.Module):
    """EAT (and SSLAM): plain attention, MLP ratio 4, post-norm blocks, the CLS token
    first; ``num_classes`` adds the fine-tuned variant's ``fc_norm`` and ``head``."""

    def __init__(
        self, dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch=16, mel_bins=128,
        max_time_patches=768, num_classes=0,
    ):  # fmt: skip
        super().__init__()
        self.model = EatBackbone(
            dim, depth, num_heads, mlp_ratio, patch, mel_bins, max_time_patches, num_classes
        )

    def forward(self, spec: torch.Tensor) -> torch.Tensor:  # (B, T, F) -> (B, 1 + N, D)
        m = self.model
        x = m.local_encoder.proj(spec[:, None]).flatten(2).transpose(1, 2)
        x = x + m.fixed_positional_encoder.positions[:, : x.shape[1]]
        x = m.pre_norm(torch.cat([m.extra_tokens.expand(x.shape[0], -1, -1), x], dim=1))
        for block in m.blocks:
            x, _ = block(x)
        return x

    def logits(self, spec: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.fc_norm(self.forward(spec)[:, 0]))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial random values in every parameter (norms and biases included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("positions"):
                continue
            std = 1.0 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen) * std + float(is_norm_scale))
    return model


def state_dict_numpy(model: nn.Module) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def pretraining_objective(
    student: ReleaseModel,
    teacher: ReleaseModel,
    spec: torch.Tensor,  # (B, T, F)
    kept: torch.Tensor,  # (B·C, K) long
    masked: torch.Tensor,  # (B·C, L) bool
    noise: torch.Tensor,  # (B·C, L, D)
    clones: int,
    top_k: int,
    cls_loss: float = 0.5,
    utterance_rows: int = 192,
) -> torch.Tensor:
    """The release's objective for given masks and decoder noise (docs/method.md)."""
    x = student.embed(spec).repeat_interleave(clones, 0)  # (R, L, D)
    visible = torch.gather(x, 1, kept[..., None].expand(-1, -1, x.shape[-1]))
    tokens, _ = student.encode(visible)
    full = noise.clone()
    full[torch.arange(full.shape[0])[:, None], kept] = tokens[:, 1:]
    predictions = student.image.decoder(full)
    with torch.no_grad():
        _, layers = teacher(spec)
        normed = [
            F.instance_norm(f[:, 1:].transpose(1, 2)).transpose(1, 2) for f in layers[-top_k:]
        ]
        y = F.layer_norm(sum(normed) / len(normed), (x.shape[-1],))
    scale = 1 / math.sqrt(x.shape[-1])
    slot_error = ((predictions - y.repeat_interleave(clones, 0)) ** 2).sum(-1) * scale
    frame = slot_error[masked].sum() / masked.sum()
    utterance_target = y.mean(1).repeat_interleave(clones, 0)
    row_error = ((tokens[:, 0] - utterance_target) ** 2).sum(-1) * scale
    return frame + cls_loss * utterance_rows * row_error.mean()
