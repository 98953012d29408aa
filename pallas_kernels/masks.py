"""Attention masks as functions of positions, shared by every kernel (and usable in index maps).

A query block is a run of contiguous positions ``[first, last]`` (a query chunk at an offset); keys
sit at slot == position in a cache filled up to ``kv_length``. Attention is one or three *phases*,
each a contiguous range of key slots visited with one copy of the query:

    plain causal   one phase: keys ``[first - window + 1, last]`` (no window: from 0)
    plain full     one phase: keys ``[0, kv_length)``
    DCA            inter, successive, intra: keys of chunks two or more back, of the previous
                   chunk, and of the same chunk (causal), each with its own query rotation

Phases are visited in that order inside one online softmax, so DCA needs no merge. Per element,
``visible`` decides exactly; the ranges only bound the key blocks a query block visits.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

PLAIN, INTER, SUCCESSIVE, INTRA = "plain", "inter", "successive", "intra"
# Finite: a fully masked row must not produce NaN through exp(-inf - -inf).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
DCA_PHASES = (INTER, SUCCESSIVE, INTRA)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static mask description. ``chunk_len`` (DCA's S = chunk_size - local_size) switches DCA on."""

    causal: bool = True
    window: int | None = None
    chunk_len: int | None = None

    def __post_init__(self):
        if self.chunk_len is not None and (not self.causal or self.window is not None):
            raise ValueError("dual chunk attention is causal and has no sliding window")
        for name in ("window", "chunk_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def phases(self) -> tuple[str, ...]:
        return DCA_PHASES if self.chunk_len is not None else (PLAIN,)

    def key_range(self, phase: str, first, last, kv_length):
        """Key slots ``[lo, hi)`` that queries at positions ``first..last`` may see in ``phase``."""
        zero = jnp.zeros_like(first)
        if phase == PLAIN:
            if not self.causal:
                lo, hi = zero, kv_length
            else:
                lo = zero if self.window is None else first - self.window + 1
                hi = last + 1
        else:
            S = self.chunk_len
            c_first, c_last = div(first, S), div(last, S)
            lo, hi = {INTER: (zero, (c_last - 1) * S),
                      SUCCESSIVE: ((c_first - 1) * S, c_last * S),
                      INTRA: (c_first * S, last + 1)}[phase]
        lo = jnp.maximum(lo, 0)
        hi = jnp.minimum(hi, kv_length)
        return lo, jnp.maximum(hi, lo)

    def interior(self, phase: str, first, last, kv_length, block_k: int):
        """Key blocks ``[u0, u1)`` every query at ``first..last`` sees whole in ``phase`` (no mask needed).

        Conservative: a block outside it may still be fully visible; the caller masks those."""
        hi = div(kv_length, block_k)                          # blocks wholly below kv_length
        lo = jnp.zeros_like(hi)
        if self.causal:
            hi = jnp.minimum(hi, div(first + 1, block_k))     # every key <= the first query
        if self.window is not None:
            lo = jnp.maximum(lo, div(jnp.maximum(last - self.window + block_k, 0), block_k))
        if phase != PLAIN:
            S = self.chunk_len
            c_first, c_last = div(first, S), div(last, S)
            one_chunk = c_first == c_last
            if phase == INTER:
                hi = jnp.minimum(hi, div(jnp.maximum((c_first - 1) * S, 0), block_k))
            elif phase == SUCCESSIVE:
                lo = jnp.maximum(lo, div(jnp.maximum((c_first - 1) * S + block_k - 1, 0), block_k))
                hi = jnp.where(one_chunk, jnp.minimum(hi, div(c_first * S, block_k)), 0)
            else:
                lo = jnp.maximum(lo, div(c_first * S + block_k - 1, block_k))
                hi = jnp.where(one_chunk, hi, 0)
        return lo, jnp.maximum(hi, lo)

    def visible(self, phase: str, q_pos, k_pos, kv_length):
        """bool [bq, bk] for query positions ``q_pos`` [bq, 1] and key slots ``k_pos`` [1, bk]."""
        ok = k_pos < kv_length
        if self.causal:
            ok &= k_pos <= q_pos
        if self.window is not None:
            ok &= q_pos - k_pos < self.window
        if phase != PLAIN:
            S = self.chunk_len
            gap = div(jnp.maximum(q_pos, 0), S) - div(k_pos, S)
            ok &= {INTER: gap >= 2, SUCCESSIVE: gap == 1, INTRA: gap == 0}[phase]
        return ok


def div(a, b):
    """Integer division of a non-negative ``a``: truncating ``lax.div`` lowers on every backend (jnp's
    floor division needs ``sign``, which Mosaic TPU cannot lower without a TPU attached). ``b`` takes ``a``'s
    dtype: ``lax.div(int32, 2)`` fails under ``jax_enable_x64``, where the 2 becomes int64."""
    return lax.div(a, jnp.asarray(b, jnp.asarray(a).dtype))


def rem(a, b):
    """``lax.rem`` with ``b`` in ``a``'s dtype (as ``div``)."""
    return lax.rem(a, jnp.asarray(b, jnp.asarray(a).dtype))


def block_span(mask: MaskSpec, first, last, kv_length, block_k: int):
    """Key blocks ``[lo, hi)`` (block indices) that queries at ``first..last`` see in any phase, as scalars."""
    lo_blk, hi_blk = None, None
    for phase in mask.phases:
        lo, hi = mask.key_range(phase, first, last, kv_length)
        lo_p = jnp.where(hi > lo, div(lo, block_k), jnp.iinfo(jnp.int32).max)
        hi_p = jnp.where(hi > lo, div(hi + block_k - 1, block_k), 0)
        lo_blk = lo_p if lo_blk is None else jnp.minimum(lo_blk, lo_p)
        hi_blk = hi_p if hi_blk is None else jnp.maximum(hi_blk, hi_p)
    return jnp.minimum(lo_blk, hi_blk), hi_blk


def phase_touches(mask: MaskSpec, phase: str, first, last, kv_length, block: int, block_k: int):
    """Whether key block ``block`` intersects ``phase``'s key range for queries at ``first..last``."""
    lo, hi = mask.key_range(phase, first, last, kv_length)
    return (hi > lo) & (block * block_k < hi) & ((block + 1) * block_k > lo)


def dca_query_positions(positions, chunk_size: int, chunk_len: int) -> dict[str, object]:
    """Rotary positions of queries for each DCA phase (Qwen's rules; see ``qwen_jax.attention.dca``)."""
    intra = positions % chunk_len
    return {INTRA: intra, SUCCESSIVE: jnp.minimum(intra + chunk_len, chunk_size),
            INTER: jnp.full_like(positions, min(2 * chunk_len - 1, chunk_size))}
