"""Rotary position embeddings: default RoPE and YaRN (Qwen2.5 128K), as HF Qwen2 computes them.

Positions are explicit int arrays, so any attention path (plain, DCA, sequence-sharded) rotates
queries and keys with whatever positions its mask rules call for.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from qwen_jax.config import QwenConfig, yarn_attention_factor


@dataclasses.dataclass(frozen=True)
class Rope:
    """Static rotary tables: ``inv_freq`` [H/2] (float64 tuple, rounded once) and the cos/sin multiplier."""

    inv_freq: tuple[float, ...]
    attention_factor: float = 1.0

    @classmethod
    def from_config(cls, config: QwenConfig) -> "Rope":
        dim, base = config.head_dim, config.rope_theta
        pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        inv_freq = 1.0 / pos_freqs
        scaling = config.rope_scaling
        if scaling is None:
            return cls(tuple(float(f) for f in np.float32(inv_freq)))
        # YaRN: blend interpolated and extrapolated frequencies with a linear ramp over dims.
        def correction_dim(rotations):
            return dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        extrapolation = 1.0 - ramp
        inv_freq = inv_freq / scaling.factor * (1.0 - extrapolation) + inv_freq * extrapolation
        return cls(tuple(float(f) for f in np.float32(inv_freq)), float(yarn_attention_factor(scaling)))

    def cos_sin(self, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """positions [...] int -> cos, sin [..., H] float32 (halves repeated, HF layout)."""
        inv = jnp.asarray(np.asarray(self.inv_freq, np.float32))
        angles = positions.astype(jnp.float32)[..., None] * inv
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles) * self.attention_factor, jnp.sin(angles) * self.attention_factor

    def apply(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        """Rotate ``x`` [B, T, heads, H] by ``positions`` [B, T]; computed in float32, returned in x.dtype."""
        cos, sin = self.cos_sin(positions)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        xf = x.astype(jnp.float32)
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
        return (xf * cos + rotated * sin).astype(x.dtype)
