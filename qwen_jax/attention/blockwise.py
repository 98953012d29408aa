"""Memory-linear attention in plain jnp: online softmax over key blocks, skipping blocks no query sees.

The jnp twin of the Pallas kernels, with the same masks (``pallas_kernels.masks``): one online
softmax runs through the mask's phases (one for plain attention; inter, successive and intra for
DCA, each with its own copy of the query), visiting only the key blocks each phase's range allows,
so DCA needs no merge. At most one [B, N, block_q, block_k] tile of logits exists at a time.

Shapes: ``queries`` one q [B, T, N, H] per phase (already rotated); k, v [B, K, S, H]; q_positions
[B, T] int32 (-1: padding); kv_length [B]; scale [B] float32 (per-row logit multiplier). Returns
``(out [B, T, N, H] float32, lse [B, T, N] float32)``; a query that sees no key gets ``out = 0``,
``lse = -inf``.

``restrict`` (optional) narrows the mask further: ``restrict(phase_index, positions [B, bq], slots [bk])
-> bool [B, N, bq, bk]`` (sparse prefill passes ``pallas_kernels.vslash.allows_in_blocks``; positions are consecutive
per row).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.masks import MASK_VALUE, MaskSpec
from pallas_kernels.reference import masked_attention
from pallas_kernels.shapes import attention_dims, matmul_precision, pad_queries


def blockwise_attention(queries: tuple, k, v, q_positions, kv_length, scale, *, mask: MaskSpec,
                        block_q: int = 512, block_k: int = 512, restrict=None):
    if restrict is None:
        return _differentiable(mask, block_q, block_k, tuple(queries), k, v, q_positions, kv_length, scale)
    return _blockwise(queries, k, v, q_positions, kv_length, scale, mask=mask, block_q=block_q, block_k=block_k,
                      restrict=restrict)


# Reverse mode cannot go through the key loop (a fori_loop with traced bounds: JAX refuses it with "Reverse-mode
# differentiation does not work for lax.while_loop"), so the gradient is the dense reference twin's: the forward
# stays memory-linear, the backward materialises [B, N, T, S] logits as impl="reference" does. (Sparse prefill's
# ``restrict`` closes over traced selections, which a custom_vjp cannot take as a static argument: not covered.)
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _differentiable(mask, block_q, block_k, queries, k, v, q_positions, kv_length, scale):
    return _blockwise(queries, k, v, q_positions, kv_length, scale, mask=mask, block_q=block_q, block_k=block_k)


def _differentiable_fwd(mask, block_q, block_k, queries, k, v, q_positions, kv_length, scale):
    out = _differentiable(mask, block_q, block_k, queries, k, v, q_positions, kv_length, scale)
    return out, (queries, k, v, q_positions, kv_length, scale)


def _differentiable_bwd(mask, block_q, block_k, saved, cotangents):
    queries, k, v, q_positions, kv_length, scale = saved

    def reference(queries, k, v, scale):
        return masked_attention(queries, k, v, q_positions, kv_length, scale, mask=mask)

    d_queries, dk, dv, d_scale = jax.vjp(reference, queries, k, v, scale)[1](cotangents)
    return d_queries, dk, dv, None, None, d_scale


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)


def _blockwise(queries: tuple, k, v, q_positions, kv_length, scale, *, mask: MaskSpec, block_q: int, block_k: int,
               restrict=None):
    d = attention_dims(queries, k, mask)
    B, T, N, H, K, S, G = d.B, d.T, d.N, d.H, d.K, d.S, d.G
    bq, bk = min(block_q, T), min(block_k, S)
    queries, nq = pad_queries(queries, bq)
    pad = nq * bq - T
    q_blocks = jnp.stack([q.reshape(B, nq, bq, K, G, H) for q in queries],
                         axis=2).transpose(1, 2, 0, 3, 4, 5, 6)  # [nq, phases, B, bq, K, G, H]
    q_positions = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    pos_blocks = q_positions.reshape(B, nq, bq).transpose(1, 0, 2)
    precision = matmul_precision(queries[0].dtype)
    kv_length = kv_length.astype(jnp.int32)
    max_len = jnp.max(kv_length)
    scale = scale.astype(jnp.float32)[:, None, None, None, None]

    def one_block(args):
        q_phases, pos = args                                  # [phases, B, bq, K, G, H], [B, bq]
        real = pos >= 0
        first = jnp.min(jnp.where(real, pos, jnp.iinfo(jnp.int32).max))
        last = jnp.max(pos)
        carry = (jnp.full((B, K, G, bq), MASK_VALUE, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                 jnp.zeros((B, K, G, bq, H), jnp.float32))
        for i, phase in enumerate(mask.phases):
            q_blk = q_phases[i]
            lo, hi = mask.key_range(phase, first, last, max_len)

            def body(j, carry, q_blk=q_blk, phase=phase, i=i):
                m, l, acc = carry
                # The last block may start early to stay in bounds; slots already visited are masked out.
                start = jnp.minimum(j * bk, S - bk)
                k_blk = jax.lax.dynamic_slice_in_dim(k, start, bk, axis=2)
                v_blk = jax.lax.dynamic_slice_in_dim(v, start, bk, axis=2)
                slots = start + jnp.arange(bk, dtype=jnp.int32)
                ok = mask.visible(phase, pos[:, :, None], slots[None, None, :], kv_length[:, None, None])
                ok = ok & real[:, :, None] & (slots >= j * bk)[None, None, :]
                ok = ok[:, None, None]                        # [B, 1, 1, bq, bk]
                if restrict is not None:
                    ok = ok & restrict(i, pos, slots).reshape(B, K, G, bq, bk)
                s = jnp.einsum("bqkgh,bksh->bkgqs", q_blk, k_blk, precision=precision,
                               preferred_element_type=jnp.float32) * scale
                s = jnp.where(ok, s, MASK_VALUE)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
                correction = jnp.exp(m - m_new)
                l = l * correction + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v_blk, precision=precision,
                                preferred_element_type=jnp.float32)
                return m_new, l, acc * correction[..., None] + pv

            carry = jax.lax.fori_loop(lo // bk, jnp.where(hi > lo, -(-hi // bk), lo // bk), body, carry)
        m, l, acc = carry
        out = acc / jnp.maximum(l, 1e-30)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), -jnp.inf)
        return out.transpose(0, 3, 1, 2, 4).reshape(B, bq, N, H), lse.transpose(0, 3, 1, 2).reshape(B, bq, N)

    out, lse = jax.lax.map(one_block, (q_blocks, pos_blocks))
    out = out.transpose(1, 0, 2, 3, 4).reshape(B, nq * bq, N, H)[:, :T]
    lse = lse.transpose(1, 0, 2, 3).reshape(B, nq * bq, N)[:, :T]
    return out, lse
