"""One online-softmax step on register values: the inner loop of the Triton-lowered kernels.

``carry = (m, l, acc)``: running row max [bq], denominator [bq] and float32 accumulator [bq, H];
``s`` the tile's scaled logits [bq, bk]; ``ok`` its visibility mask, or None for a tile every query
sees whole. Masked logits become the finite ``MASK_VALUE`` and their probabilities exactly 0, so a
row that has seen nothing yet stays at l = 0 (no NaN).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.masks import MASK_VALUE


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
