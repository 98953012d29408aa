"""Memory-linear attention in plain jnp: online softmax over key blocks, skipping blocks no query sees.

Never materialises more than one [B, N, block_q, block_k] tile of logits, so it runs at any sequence
length the cache holds. Masks are functions of positions: ``visible(q_pos, k_slot)`` says which key
slots a query sees and ``key_range(first_q, last_q)`` bounds the slots a query block can see, so the
loop visits only those key blocks (causal attention does about half the work of dense).

Shapes: q [B, T, N, H] (already rotated); k, v [B, K, S, H]; q_positions [B, T] int32 (-1: padding);
kv_length [B]; scale [B] float32 (per-row logit multiplier). Returns ``(out [B, T, N, H] float32,
lse [B, T, N] float32)``; a query that sees no key gets ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from qwen_jax.attention.reference import MASK_VALUE

Visible = Callable[[jax.Array, jax.Array], jax.Array]      # (q_pos [B, bq], k_slot [bk]) -> bool [B, bq, bk]
KeyRange = Callable[[jax.Array, jax.Array], tuple]         # (first q pos, last q pos) -> (lo, hi) slots


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def blockwise_attention(q, k, v, q_positions, kv_length, scale, *, visible: Visible, key_range: KeyRange,
                        block_q: int = 512, block_k: int = 512):
    B, T, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    bq, bk = min(block_q, T), min(block_k, S)
    nq = -(-T // bq)
    pad = nq * bq - T
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_positions = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    q_blocks = q.reshape(B, nq, bq, K, G, H).transpose(1, 0, 2, 3, 4, 5)
    pos_blocks = q_positions.reshape(B, nq, bq).transpose(1, 0, 2)
    precision = _precision(q.dtype)
    max_len = jnp.max(kv_length)
    scale = scale.astype(jnp.float32)[:, None, None, None, None]

    def one_block(args):
        q_blk, pos = args                                    # [B, bq, K, G, H], [B, bq]
        real = pos >= 0
        first = jnp.min(jnp.where(real, pos, jnp.iinfo(jnp.int32).max))
        last = jnp.max(pos)
        lo, hi = key_range(first, last)
        lo, hi = jnp.maximum(lo, 0), jnp.minimum(hi, max_len)
        j0, j1 = lo // bk, jnp.where(hi > lo, -(-hi // bk), lo // bk)

        def body(j, carry):
            m, l, acc = carry
            # The last block may start early to stay in bounds; slots already visited are masked out.
            start = jnp.minimum(j * bk, S - bk)
            k_blk = jax.lax.dynamic_slice_in_dim(k, start, bk, axis=2)
            v_blk = jax.lax.dynamic_slice_in_dim(v, start, bk, axis=2)
            slots = start + jnp.arange(bk, dtype=jnp.int32)
            mask = visible(pos, slots) & real[:, :, None] & (slots >= j * bk)[None, None, :] \
                & (slots[None, None, :] < kv_length[:, None, None])
            mask = mask[:, None, None]                        # [B, 1, 1, bq, bk]
            s = jnp.einsum("bqkgh,bksh->bkgqs", q_blk, k_blk, precision=precision,
                           preferred_element_type=jnp.float32) * scale
            s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v_blk, precision=precision,
                            preferred_element_type=jnp.float32)
            return m_new, l, acc * correction[..., None] + pv

        init = (jnp.full((B, K, G, bq), MASK_VALUE, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, H), jnp.float32))
        m, l, acc = jax.lax.fori_loop(j0, j1, body, init)
        out = acc / jnp.maximum(l, 1e-30)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), -jnp.inf)
        return out.transpose(0, 3, 1, 2, 4).reshape(B, bq, N, H), lse.transpose(0, 3, 1, 2).reshape(B, bq, N)

    out, lse = jax.lax.map(one_block, (q_blocks, pos_blocks))
    out = out.transpose(1, 0, 2, 3, 4).reshape(B, nq * bq, N, H)[:, :T]
    lse = lse.transpose(1, 0, 2, 3).reshape(B, nq * bq, N)[:, :T]
    return out, lse


def causal_visible(window: int | None = None) -> tuple[Visible, KeyRange]:
    """Plain causal attention (optionally a sliding window of ``window`` positions) over slot == position."""
    def visible(pos, slots):
        ok = slots[None, None, :] <= pos[:, :, None]
        if window is not None:
            ok &= pos[:, :, None] - slots[None, None, :] < window
        return ok

    def key_range(first, last):
        return (0 if window is None else first - window + 1), last + 1

    return visible, key_range
