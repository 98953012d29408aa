"""Dense masked attention in plain jnp: the reference twin of every kernel (and of the blockwise op).

Materialises [B, N, T, S] logits: for tests and short sequences. One softmax over the union of the
mask's phases, each phase with its own copy of the query, exactly what the kernels compute with
their online softmax. Shapes: ``queries`` one q [B, T, N, H] per phase; k, v [B, K, S, H];
q_positions [B, T] int32; kv_length [B]; scale [B] float32. Returns ``(out [B, T, N, H] float32,
lse [B, T, N] float32)``; a query that sees no key gets ``out = 0``, ``lse = -inf``.

``restrict`` (optional, bool [P, B, N, T, S], one per phase) narrows the mask further: the sparse
(vertical-slash) reference is this op with the mask of ``pallas_kernels.vslash.dense_mask``.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.masks import MASK_VALUE, MaskSpec
from pallas_kernels.shapes import attention_dims


def masked_attention(queries: tuple, k, v, q_positions, kv_length, scale, *, mask: MaskSpec, restrict=None):
    d = attention_dims(queries, k, mask, v=v)
    B, T, N, H, K, S, G = d.B, d.T, d.N, d.H, d.K, d.S, d.G
    scale = scale.astype(jnp.float32)[:, None, None, None, None]
    slots = jnp.arange(S, dtype=jnp.int32)[None, None, :]
    s = jnp.full((B, K, G, T, S), MASK_VALUE, jnp.float32)
    seen = jnp.zeros((B, K, G, T, S), bool)
    for p, (phase, q) in enumerate(zip(mask.phases, queries)):
        logits = jnp.einsum("btkgh,bksh->bkgts", q.reshape(B, T, K, G, H).astype(jnp.float32),
                            k.astype(jnp.float32), precision="highest") * scale
        ok = mask.visible(phase, q_positions[:, :, None], slots, kv_length[:, None, None])[:, None, None]
        if restrict is not None:
            ok = ok & restrict[p].reshape(B, K, G, T, S)
        s = jnp.where(ok, logits, s)
        seen = seen | ok
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(seen, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksh->btkgh", p / jnp.maximum(denom, 1e-30), v.astype(jnp.float32), precision="highest")
    lse = jnp.where(denom[..., 0] > 0, m[..., 0] + jnp.log(jnp.maximum(denom[..., 0], 1e-30)), -jnp.inf)
    return out.reshape(B, T, N, H), lse.transpose(0, 3, 1, 2).reshape(B, T, N)
