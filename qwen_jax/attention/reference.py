"""Dense masked attention, the reference twin the model's attention paths are tested against.

Shapes (see STYLE): q [B, T, N, H]; k, v [B, K, S, H] with N = K * G; q_positions [B, T] int32
(keys sit at slot == position); kv_length [B] int32 (keys at slots >= kv_length are invisible).
Returns ``(out [B, T, N, H] in q.dtype, lse [B, T, N] float32, natural log)``. A query that sees no
key gets ``out = 0`` and ``lse = -inf``. Materialises [B, N, T, S] logits: for tests and short
sequences only.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.masks import MASK_VALUE, MaskSpec
from pallas_kernels.reference import masked_attention

__all__ = ["MASK_VALUE", "mha_reference"]


def mha_reference(q, k, v, q_positions, kv_length=None, *, causal: bool = True, scale: float | None = None,
                  window: int | None = None):
    B, H = q.shape[0], q.shape[-1]
    if kv_length is None:
        kv_length = jnp.full((B,), k.shape[2], jnp.int32)
    scale = jnp.full((B,), H ** -0.5 if scale is None else scale, jnp.float32)
    out, lse = masked_attention((q,), k, v, q_positions, kv_length, scale, mask=MaskSpec(causal=causal, window=window))
    return out.astype(q.dtype), lse
