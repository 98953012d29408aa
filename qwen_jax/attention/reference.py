"""Dense masked attention in plain jnp: the reference twin every other attention path is tested against.

Shapes (see STYLE): q [B, T, N, H]; k, v [B, K, S, H] with N = K * G; q_positions [B, T] and
k_positions [B, S] int32; kv_length [B] int32 (keys at slots >= kv_length are invisible).
Returns ``(out [B, T, N, H] in q.dtype, lse [B, T, N] float32, natural log)``. A query that sees
no key gets ``out = 0`` and ``lse = -inf``. Materialises [B, N, T, S] logits: for tests and short
sequences only.
"""

from __future__ import annotations

import jax.numpy as jnp

# Finite: a fully masked row must not produce NaN through exp(-inf - -inf).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def visible(q_positions, k_positions, kv_length, causal: bool, window: int | None = None):
    """Mask [B, T, S]: key s is visible to query t (a function of positions, never stored)."""
    S = k_positions.shape[1]
    ok = jnp.arange(S)[None, None, :] < kv_length[:, None, None]
    if causal:
        ok = ok & (k_positions[:, None, :] <= q_positions[:, :, None])
    if window is not None:
        ok = ok & (q_positions[:, :, None] - k_positions[:, None, :] < window)
    return ok


def mha_reference(q, k, v, q_positions, k_positions=None, kv_length=None, *, causal: bool = True,
                  scale: float | None = None, window: int | None = None):
    B, T, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    G = N // K
    if k_positions is None:
        k_positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    if kv_length is None:
        kv_length = jnp.full((B,), S, jnp.int32)
    scale = H ** -0.5 if scale is None else scale
    qg = q.reshape(B, T, K, G, H).astype(jnp.float32)
    logits = jnp.einsum("btkgh,bksh->bkgts", qg, k.astype(jnp.float32), precision="highest") * scale
    mask = visible(q_positions, k_positions, kv_length, causal, window)[:, None, None]  # [B, 1, 1, T, S]
    logits = jnp.where(mask, logits, MASK_VALUE)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksh->btkgh", p / jnp.maximum(denom, 1e-30), v.astype(jnp.float32), precision="highest")
    any_visible = denom[..., 0] > 0  # [B, K, G, T]
    lse = jnp.where(any_visible, m[..., 0] + jnp.log(jnp.maximum(denom[..., 0], 1e-30)), -jnp.inf)
    lse = lse.transpose(0, 3, 1, 2).reshape(B, T, N)
    return out.reshape(B, T, N, H).astype(q.dtype), lse
