"""Inverse block masking on the patch grid (data2vec 2.0 / EAT / the release).

For each clone of a clip: draw ``n = ⌊L·(keep + adjust) / length²⌋`` block centres
uniformly (with replacement) on the flattened (time, freq) grid, set the
``length × length`` block around each (clamped at the edges, never wrapped), then trim
or fill at random so exactly ``⌊L·keep⌋`` patches are kept; everything else is masked.
With the release's numbers (64×8 grid, mask_prob 0.8, adjust 0.07, length 5):
5 centres, 102 kept patches, 410 masked.

Pure functions of a PRNG key, so the same key gives the same mask on any device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from asda_jax import sharding


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """The release's masking knobs (its names): share masked, block shape, clones."""

    mask_prob: float = 0.8  # share of a clip's patches masked
    mask_prob_adjust: float = 0.07  # extra block centres, as a share of the patches
    mask_length: int = 5  # block side, in patches
    clone_batch: int = 16  # masked clones of each clip

    def num_kept(self, num_patches: int) -> int:
        return int(num_patches * (1.0 - self.mask_prob))

    def num_centres(self, num_patches: int) -> int:
        keep = 1.0 - self.mask_prob
        return int(num_patches * (keep + self.mask_prob_adjust) / self.mask_length**2)


def kept_patches(key: jax.Array, grid: tuple[int, int], cfg: MaskConfig) -> jax.Array:
    """Sorted indices (K,) of the patches one clone keeps, on a (time, freq) grid."""
    time_patches, freq_patches = grid
    num_patches = time_patches * freq_patches
    centre_key, order_key = jax.random.split(key)
    centres = jax.random.randint(centre_key, (cfg.num_centres(num_patches),), 0, num_patches)
    t, f = centres // freq_patches, centres % freq_patches
    offsets = jnp.arange(cfg.mask_length) - cfg.mask_length // 2
    tt = jnp.clip(t[:, None, None] + offsets[None, :, None], 0, time_patches - 1)
    ff = jnp.clip(f[:, None, None] + offsets[None, None, :], 0, freq_patches - 1)
    in_blocks = jnp.zeros(num_patches, bool).at[(tt * freq_patches + ff).ravel()].set(True)
    # Block patches rank above the rest, ties broken at random: the top K are the block
    # patches less a random surplus, or all of them plus random others.
    score = jax.random.uniform(order_key, (num_patches,)) + in_blocks
    kept = jax.lax.top_k(score, cfg.num_kept(num_patches))[1]
    return jnp.sort(kept)


def clone_masks(
    key: jax.Array, batch: int, grid: tuple[int, int], cfg: MaskConfig
) -> tuple[jax.Array, jax.Array]:
    """Masks for ``batch`` clips × ``clone_batch`` clones, clip-major, clone-minor.

    Returns kept indices (B·C, K) int32 and the mask (B·C, L) bool, True = masked.
    """
    rows = batch * cfg.clone_batch
    kept = jax.vmap(lambda k: kept_patches(k, grid, cfg))(jax.random.split(key, rows))
    kept = kept.astype(jnp.int32)
    # per device over its own rows: the partitioner may otherwise gather every row's
    # indices to scatter them whole on each device
    unkept = functools.partial(_masked_of, num_patches=grid[0] * grid[1])
    by_row = sharding.split("batch")
    return kept, sharding.per_device(unkept, (by_row,), by_row)(kept)


def _masked_of(kept: jax.Array, num_patches: int) -> jax.Array:  # (R, K) -> (R, L) bool
    rows = kept.shape[0]
    return jnp.ones((rows, num_patches), bool).at[jnp.arange(rows)[:, None], kept].set(False)
