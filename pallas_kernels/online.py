"""One online-softmax step on register values, and the walk over one mask phase's key blocks: the inner
loops of the Triton-lowered dense kernels (prefill and decode); and the exact log-sum-exp merge of partial
attentions (the decode kernel's splits, the model's partials).

``carry = (m, l, acc)``: running row max [bq], denominator [bq] and float32 accumulator [bq, H];
``s`` the tile's scaled logits [bq, bk]; ``ok`` its visibility mask, or None for a tile every query
sees whole. Masked logits become the finite ``MASK_VALUE`` and their probabilities exactly 0, so a
row that has seen nothing yet stays at l = 0 (no NaN).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.masks import MASK_VALUE, div


def online_softmax_step(carry, s, v, ok, precision):
    m, l, acc = carry
    if ok is not None:
        s = jnp.where(ok, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    if ok is not None:
        p = jnp.where(ok, p, 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                      precision=precision, preferred_element_type=jnp.float32)
    return m_new, l, acc


def walk_phase(carry, q, k_ref, v_ref, *, mask, phase: str, first, last, q_pos, kv_length, scale, block_k: int,
               precision, dtype=None, within=None):
    """``online_softmax_step`` over the key blocks one mask phase shows rows at positions ``[first, last]``:
    the blocks every row sees whole without a mask (``mask.interior``), the ragged edges masked per element
    (``mask.visible`` at ``q_pos`` [rows, 1]). ``within``: the blocks ``[first, end)`` to stay inside (a decode
    split). K/V blocks are read from the refs, widened to ``dtype`` if given (an 8-bit cache)."""
    lo, hi = mask.key_range(phase, first, last, kv_length)
    j0, j1 = div(lo, block_k), div(hi + block_k - 1, block_k)
    if within is not None:
        j0, j1 = jnp.maximum(j0, within[0]), jnp.minimum(j1, within[1])
    j1 = jnp.maximum(j1, j0)
    u0, u1 = mask.interior(phase, first, last, kv_length, block_k)
    u0 = jnp.clip(u0, j0, j1)
    u1 = jnp.clip(u1, u0, j1)

    def body(j, carry, masked=True):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        if dtype is not None:
            k, v = k.astype(dtype), v.astype(dtype)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale
        ok = None
        if masked:
            k_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            ok = mask.visible(phase, q_pos, k_pos, kv_length)
        return online_softmax_step(carry, s, v, ok, precision)

    carry = lax.fori_loop(j0, u0, body, carry)
    carry = lax.fori_loop(u0, u1, functools.partial(body, masked=False), carry)
    return lax.fori_loop(u1, j1, body, carry)


def normalised(m, l, acc):
    """The end of an online softmax: ``(out [rows, H] f32, lse [rows])``; a row that saw no key gets 0, -inf."""
    return acc / jnp.maximum(l, 1e-30)[:, None], jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), -jnp.inf)


def merge_stacked(out, lse):
    """Partial attentions over disjoint key sets, stacked: ``out [..., P, R, H]`` (each normalised) and
    ``lse [..., P, R]``, as one softmax over the union: ``(out [..., R, H] f32, lse [..., R])``. Guarded:
    a partial with lse = -inf (no visible key) weighs nothing; a row no partial sees gets 0 and -inf."""
    top = jnp.max(lse, axis=-2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lse - top)                                   # exp(-inf) = 0 for empty partials
    total = jnp.sum(w, axis=-2)
    # an elementwise sum, not a dot: a float32 dot may run in TF32 on GPUs
    merged = jnp.sum(w[..., None] * out.astype(jnp.float32), axis=-3) / jnp.maximum(total, 1e-30)[..., None]
    return merged, jnp.where(total > 0, top[..., 0, :] + jnp.log(jnp.maximum(total, 1e-30)), -jnp.inf)
