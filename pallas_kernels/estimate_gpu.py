"""The vertical-slash estimate's scores for GPUs in Pallas (Triton lowering): the logits stay on chip.

What ``qwen_jax.attention.sparse.scores`` computes for one row and one segment, without writing a
logit to memory: 64 estimate queries per head (``LAST_Q``), one rotated copy per DCA phase
(inter, successive, intra), against the keys ``[0, end)``; key ``k`` takes the copy of its phase
(``k < inter_end``: inter, ``k < P``: successive, else intra) and row ``r`` (position
``end - 64 + r``) sees the keys up to its position, if the row is in the segment (``>= begin``).

Key tiles ``[t W, t W + W)`` below ``end`` (``W`` = 64), split evenly among a grid's programs. The
phase bounds are multiples of the DCA chunk length, which ``W`` divides, so a tile has one phase: one
matmul per tile and query head.

    pass 1 (``row_lse``)   grid ``(K, splits)``: a program owns one kv head's query heads (one key load
                           for all of them) and keeps each row's running (max, sum of exp) over its
                           tiles; XLA merges the programs' into each row's log-sum-exp
    pass 2 (``scores``)    grid ``(N / group, splits2)``: probabilities ``exp(s - lse)``; column sums
                           are the vertical scores of the tile's keys; diagonal sums (slash index
                           ``i = k + 63 - r``) need the tile sheared: it goes to a two-slot ring in the
                           program's own region of global memory (L2-resident, written and read back by
                           the same program) and is read back with row ``r`` shifted by ``r``, so
                           diagonal ``i = t W + c`` sums row ``r``'s probability of key ``i - 63 + r``,
                           in this tile or the one before (a program starts one tile early to fill it)

Both write complete sums for their own keys and diagonals only, so no output is shared; entries at
or past ``end`` are left unwritten (the caller masks them). Inputs: estimate queries [3, N, 64, H]
(rotated, the cache's dtype), k [B, K, S, H] read in place (row ``b`` static), ``info`` int32
[inter_end, P, end, begin, live tiles, 0, 0, 0], the softmax scale. Pass 2 runs unpipelined
(``num_stages=1``): the ring's reads must stay behind the barriers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.masks import MASK_VALUE, div, rem
from pallas_kernels.shapes import matmul_precision

LAST_Q = 64
INFO = 8         # int32 fields of ``info`` (a power of two: Triton blocks)


def tile_width(n_keys: int, chunk_len: int) -> int | None:
    """The key tile: 64 (faster than 128 on an H100), if it divides the cache and the DCA chunk length."""
    return 64 if n_keys % 64 == 0 and chunk_len % 64 == 0 else None


def _share(info_ref, splits: int):
    """Program ``j``'s tiles ``[lo, hi)``: an even share of the live tiles."""
    live, j = info_ref[4], pl.program_id(1)
    return div(live * j, splits), div(live * (j + 1), splits)


def _tile(info_ref, scale_ref, qe_ref, k_ref, t, W: int, precision):
    """Tile ``t``'s mask [64, W] and a function of g: query head g's scaled logits (masked to MASK_VALUE),
    one key load for the program's Gq heads (called one head at a time: one tile of logits live)."""
    inter_end, P, end, begin = info_ref[0], info_ref[1], info_ref[2], info_ref[3]
    k0 = t * W
    phase = (k0 >= inter_end).astype(jnp.int32) + (k0 >= P).astype(jnp.int32)
    k = k_ref[pl.ds(k0, W), :]                                               # [W, H]
    rows = end - LAST_Q + lax.broadcasted_iota(jnp.int32, (LAST_Q, 1), 0)
    keys = k0 + lax.broadcasted_iota(jnp.int32, (1, W), 1)
    ok = (keys <= rows) & (rows >= begin)

    def logits(g):
        s = lax.dot_general(qe_ref[phase, g], k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale_ref[0]
        return jnp.where(ok, s, MASK_VALUE)

    return ok, logits


def _lse_kernel(info_ref, scale_ref, qe_ref, k_ref, m_ref, l_ref, *, W: int, splits: int, precision):
    lo, hi = _share(info_ref, splits)
    Gq = qe_ref.shape[1]
    Gp = pl.next_power_of_2(Gq)
    head = lax.broadcasted_iota(jnp.int32, (Gp, 1), 0)

    def tile(t, carry):
        ok, logits = _tile(info_ref, scale_ref, qe_ref, k_ref, t, W, precision)

        def one_head(g, carry):              # a loop, not unrolled: one head's operands in shared memory
            ms, ls = carry
            this = head == g
            m, l = jnp.where(this, ms, 0.0).sum(axis=0), jnp.where(this, ls, 0.0).sum(axis=0)
            s = logits(g)
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
            l_new = l * jnp.exp(m - m_new) + p.sum(axis=1)
            return jnp.where(this, m_new[None], ms), jnp.where(this, l_new[None], ls)

        return lax.fori_loop(0, Gq, one_head, carry)

    ms, ls = lax.fori_loop(lo, hi, tile, (jnp.full((Gp, LAST_Q), MASK_VALUE, jnp.float32),
                                          jnp.zeros((Gp, LAST_Q), jnp.float32)))
    for g in range(Gq):
        this = head == g
        m_ref[g, :] = jnp.where(this, ms, 0.0).sum(axis=0)
        l_ref[g, :] = jnp.where(this, ls, 0.0).sum(axis=0)


def _scores_kernel(info_ref, scale_ref, qe_ref, k_ref, lse_ref, vert_ref, slash_ref, ring_ref, *, W: int,
                   splits: int, precision, interpret: bool):
    from jax.experimental.pallas import triton as plgpu
    lo, hi = _share(info_ref, splits)
    Gq = qe_ref.shape[1]
    r = lax.broadcasted_iota(jnp.int32, (LAST_Q, W), 0)
    c = lax.broadcasted_iota(jnp.int32, (LAST_Q, W), 1)
    barrier = (lambda: None) if interpret else plgpu.debug_barrier

    def put_probs(t, columns: bool):
        """Each head's probabilities of tile t into its ring slot (and their column sums out)."""
        ok, logits = _tile(info_ref, scale_ref, qe_ref, k_ref, t, W, precision)

        @pl.loop(0, Gq)
        def _(g):
            p = jnp.where(ok, jnp.exp(logits(g) - lse_ref[g, :][:, None]), 0.0)
            if columns:
                vert_ref[g, pl.ds(t * W, W)] = p.sum(axis=0)
            ring_ref[g, :, pl.ds(rem(t + 2, 2) * W, W)] = p

    @pl.when((hi > lo) & (lo > 0))
    def _():
        put_probs(lo - 1, columns=False)

    @pl.when((hi > lo) & (lo == 0))
    def _():
        for g in range(Gq):
            ring_ref[g, :, pl.ds(W, W)] = jnp.zeros((LAST_Q, W), jnp.float32)

    def tile(t, carry):
        barrier()                            # every thread is done reading this slot (tile t - 2's)
        put_probs(t, columns=True)
        barrier()                            # ... and sees what the others wrote
        col = rem(t, 2) * W + c - (LAST_Q - 1) + r                       # key (i - 63 + r) in the ring
        col = jnp.where(col < 0, col + 2 * W, col)

        @pl.loop(0, Gq)
        def _(g):
            sheared = ring_ref[g, r, col] if interpret else plgpu.load(ring_ref.at[g, r, col], volatile=True)
            slash_ref[g, pl.ds(t * W, W)] = sheared.sum(axis=0)
        return carry

    lax.fori_loop(lo, hi, tile, 0)


def _specs(b: int, group: int, Gq: int, S: int, H: int):
    """Grid (N / group, splits): program (h, j) owns query heads [h group, h group + group), a share of
    one kv head's (``group`` divides Gq)."""
    info = pl.BlockSpec((INFO,), lambda h, j: (0,))
    scale = pl.BlockSpec((1,), lambda h, j: (0,))
    qe = pl.BlockSpec((3, group, LAST_Q, H), lambda h, j: (0, h, 0, 0))
    k = pl.BlockSpec((None, None, S, H), lambda h, j: (b, div(h * group, Gq), 0, 0))
    return [info, scale, qe, k]


@functools.partial(jax.jit, static_argnames=("b", "W", "splits", "num_warps", "interpret"))
def row_lse(qe, k_cache, info, scale, *, b: int, W: int, splits: int = 128, num_warps: int = 4,
            interpret: bool = False):
    """Pass 1: each estimate row's log-sum-exp over its keys [N, 64] (arguments as ``segment_scores``)."""
    from jax.experimental.pallas import triton as plgpu
    _, N, _, H = qe.shape
    K, S = k_cache.shape[1], k_cache.shape[2]
    Gq = N // K
    row = pl.BlockSpec((Gq, None, LAST_Q), lambda h, j: (h, j, 0))
    m, l = pl.pallas_call(
        functools.partial(_lse_kernel, W=W, splits=splits, precision=matmul_precision(k_cache.dtype)),
        grid=(K, splits), in_specs=_specs(b, Gq, Gq, S, H), out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((N, splits, LAST_Q), jnp.float32)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret, name="qwen_jax_estimate_lse",
    )(info, scale, qe, k_cache)
    top = m.max(axis=1)
    return top + jnp.log(jnp.maximum((l * jnp.exp(m - top[:, None])).sum(axis=1), 1e-30))


@functools.partial(jax.jit, static_argnames=("b", "W", "splits", "num_warps", "group", "splits2", "interpret"))
def segment_scores(qe, k_cache, info, scale, *, b: int, W: int, splits: int = 128, num_warps: int = 4,
                   group: int = 1, splits2: int = 64, interpret: bool = False):
    """Vertical and slash scores [N, S] (float32) of one segment of row ``b``; entries from ``end`` on are
    undefined. ``qe`` [3, N, 64, H]: the estimate queries rotated per phase (inter, successive, intra);
    ``info`` int32 [8] (module docstring); ``scale`` float32 [1]."""
    from jax.experimental.pallas import triton as plgpu
    _, N, _, H = qe.shape
    K, S = k_cache.shape[1], k_cache.shape[2]
    if S % W:
        raise ValueError(f"cache length {S} must be a multiple of the estimate's tile width {W}")
    lse = row_lse(qe, k_cache, info, scale, b=b, W=W, splits=splits, num_warps=num_warps, interpret=interpret)
    whole = pl.BlockSpec((group, S), lambda h, j: (h, 0))
    vert, slash, _ = pl.pallas_call(
        functools.partial(_scores_kernel, W=W, splits=splits2, precision=matmul_precision(k_cache.dtype),
                          interpret=interpret),
        grid=(N // group, splits2),
        in_specs=_specs(b, group, N // K, S, H) + [pl.BlockSpec((group, LAST_Q), lambda h, j: (h, 0))],
        out_specs=[whole, whole, pl.BlockSpec((group, None, LAST_Q, 2 * W), lambda h, j: (h, j, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((N, S), jnp.float32)] * 2
        + [jax.ShapeDtypeStruct((N, splits2, LAST_Q, 2 * W), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="qwen_jax_estimate_scores",
    )(info, scale, qe, k_cache, lse)
    return vert, slash


__all__ = ["row_lse", "segment_scores", "tile_width", "LAST_Q"]
