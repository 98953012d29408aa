"""Vertical-slash sparse attention for TPUs in Pallas (Mosaic TPU), DCA-aware, with (out, lse).

Grid ``(B, N, T / 64)``: one program per row, query head and 64-row query block, reading the same
index tables as the GPU kernel (``vslash.build_index`` with 64-column key tiles). K/V stay in HBM and
are copied by hand, double-buffered, so only the selected tiles are ever read:

    slash tiles     a tile ``[lo, hi)`` (at most 64 keys at any offset) is fetched as the 128-row
                    window starting at the 64-aligned slot below ``lo`` (the TPU's sublane tiling wants
                    aligned copies and 128-lane logits) and masked to ``[lo, hi)``
    vertical tiles  128 gathered columns at a time, masked by the block's ``keep`` row

The program's tile range, and per phase the tile table of its (segment, head), are copied into SMEM
(8 bytes per tile: 49 KB for Qwen's 6096 diagonals), each table as a ``[1, TCAP]`` row (a copy may squeeze only
untiled dimensions, so the phase axis is not squeezed out of the tables' last two). One
online softmax over every phase's tiles, the dense mask (causal, DCA phase, cache length) on top.
Runs on the CPU with ``interpret=pltpu.InterpretParams()``; lowers to Mosaic for TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.masks import MASK_VALUE, MaskSpec, div, rem
from pallas_kernels.shapes import attention_dims, matmul_precision, pad_queries
from pallas_kernels.vslash import BAND, VSIndex, gather_verticals, pad_verticals

LANES = 128
WINDOW = 128     # rows fetched per slash tile
V_TILE = 128     # gathered vertical columns per tile


def _kernel(qoff_ref, kvlen_ref, scale_ref, seg_ref, *refs, mask: MaskSpec, G: int, n_keys: int):
    n_phases = len(mask.phases)
    q_refs = refs[:n_phases]
    (k_hbm, v_hbm, rs_hbm, re_hbm, t_hbm, kg_hbm, vg_hbm, vcnt_hbm, vpos_ref, keep_ref, o_ref, lse_ref,
     rs_smem, re_smem, t_smem, vcnt_smem, kbuf, vbuf, sem, m_scr, l_scr, acc_scr) = refs[n_phases:]
    b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = seg_ref[b, i]
    kvh = div(n, G)
    kv_length, scale = kvlen_ref[b], scale_ref[b]
    q0 = qoff_ref[b] + i * BAND
    precision = matmul_precision(k_hbm.dtype)
    pltpu.sync_copy(t_hbm.at[b, n, i], t_smem)            # [2, P]: this block's tile range per phase
    pltpu.sync_copy(vcnt_hbm.at[b, g, n], vcnt_smem)      # [1, P] vertical columns per phase
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def accumulate(q, k, v, ok):
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale
        s = jnp.where(ok, s, MASK_VALUE)
        m_prev, l_prev = m_scr[...], l_scr[...]                 # [64, LANES], lane-replicated
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(ok, jnp.exp(s - m_new[:, :1]), 0.0)
        correction = jnp.exp(m_prev - m_new)
        l_scr[...] = l_prev * correction + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
        acc_scr[...] = acc_scr[...] * correction[:, :1] + pv

    def window_start(lo):
        r = rem(lo, BAND)
        return jnp.clip(lo - jnp.where(r < 0, r + BAND, r), 0, n_keys - WINDOW)

    def copies(src_k, src_v, slot):
        return (pltpu.make_async_copy(src_k, kbuf.at[slot], sem.at[0, slot]),
                pltpu.make_async_copy(src_v, vbuf.at[slot], sem.at[1, slot]))

    def pipelined(first, last, sources, compute):
        """Tiles ``first .. last - 1``: each one's copy overlaps the previous one's compute."""
        @pl.when(first < last)
        def _():
            for c in copies(*sources(first), 0):
                c.start()

        def body(t, carry):
            slot = rem(t - first, 2)
            for c in copies(*sources(t), slot):
                c.wait()

            @pl.when(t + 1 < last)
            def _():
                for c in copies(*sources(t + 1), 1 - slot):
                    c.start()

            compute(t, slot)
            return carry

        lax.fori_loop(first, last, body, 0)

    q_pos = q0 + lax.broadcasted_iota(jnp.int32, (BAND, WINDOW), 0)
    iota_k = lax.broadcasted_iota(jnp.int32, (BAND, WINDOW), 1)
    for p, (phase, q_ref) in enumerate(zip(mask.phases, q_refs)):
        pltpu.sync_copy(rs_hbm.at[b, g, n, p], rs_smem)    # [1, TCAP] this phase's tile bounds (relative to q0)
        pltpu.sync_copy(re_hbm.at[b, g, n, p], re_smem)

        def slash_sources(t):
            # BAND-aligned, or n_keys - WINDOW (S % 8 == 0): Mosaic copies only on the 8-row tile
            start = pl.multiple_of(window_start(q0 + rs_smem[0, t]), 8)
            return k_hbm.at[b, kvh, pl.ds(start, WINDOW)], v_hbm.at[b, kvh, pl.ds(start, WINDOW)]

        def slash_compute(t, slot, phase=phase, q_ref=q_ref):
            lo, hi = q0 + rs_smem[0, t], q0 + re_smem[0, t]
            k_pos = window_start(lo) + iota_k
            ok = (k_pos >= lo) & (k_pos < hi) & mask.visible(phase, q_pos, k_pos, kv_length)
            accumulate(q_ref[...], kbuf[slot], vbuf[slot], ok)

        def vertical_sources(j, p=p):
            at = pl.ds(pl.multiple_of(j * V_TILE, V_TILE), V_TILE)
            return kg_hbm.at[b, g, n, p, at], vg_hbm.at[b, g, n, p, at]

        def vertical_compute(j, slot, p=p, phase=phase, q_ref=q_ref):
            at = pl.ds(pl.multiple_of(j * V_TILE, V_TILE), V_TILE)
            pos = jnp.broadcast_to(vpos_ref[pl.ds(p, 1), at], (BAND, V_TILE))
            keep = jnp.broadcast_to(keep_ref[pl.ds(p, 1), at], (BAND, V_TILE)) != 0
            ok = keep & mask.visible(phase, q_pos, pos, kv_length)
            accumulate(q_ref[...], kbuf[slot], vbuf[slot], ok)

        pipelined(t_smem[0, p], t_smem[1, p], slash_sources, slash_compute)
        pipelined(0, div(vcnt_smem[0, p] + V_TILE - 1, V_TILE), vertical_sources, vertical_compute)

    l, m = l_scr[...][:, :1], m_scr[...][:, :1]
    o_ref[...] = (acc_scr[...] / jnp.maximum(l, 1e-30)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("mask", "interpret"))
def vslash_attention_tpu(queries: tuple, k, v, q_offset, kv_length, scale, index: VSIndex, col_count, *,
                         mask: MaskSpec, interpret=None):
    """Same contract as ``vslash_gpu.vslash_attention_gpu`` (index built with block_k 64).
    ``interpret``: ``pltpu.InterpretParams()`` to run on the CPU."""
    d = attention_dims(queries, k, mask)
    B, T, N, H, S, G = d.B, d.T, d.N, d.H, d.S, d.G
    if S < WINDOW or S % 8:
        raise ValueError(f"the TPU sparse kernel needs a cache of at least {WINDOW} slots, a multiple of 8 (its "
                         f"copies start on the 8-row tile), got {S}")
    index = pad_verticals(index, V_TILE)
    queries, nqb = pad_queries(queries, BAND)
    queries = tuple(q.transpose(0, 2, 1, 3) for q in queries)               # heads-major inside
    kg, vg = gather_verticals(k, v, index)
    P, TC = index.rel_start.shape[3], index.rel_start.shape[4]
    VC = index.vpos.shape[-1]
    t_range = jnp.stack([index.t0, index.t1], axis=-2)                       # [B, N, nqb, 2, P]
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    q_spec = pl.BlockSpec((None, None, BAND, H), lambda b, n, i, *_: (b, n, i, 0))
    vpos_spec = pl.BlockSpec((None, None, None, P, VC), lambda b, n, i, qo, kl, sc, seg: (b, seg[b, i], n, 0, 0))
    keep_spec = pl.BlockSpec((None, None, None, P, VC), lambda b, n, i, *_: (b, n, i, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(B, N, nqb),
        in_specs=[q_spec] * len(queries) + [hbm] * 8 + [vpos_spec, keep_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, BAND, 1), lambda b, n, i, *_: (b, n, i, 0))],
        scratch_shapes=[pltpu.SMEM((1, TC), jnp.int32), pltpu.SMEM((1, TC), jnp.int32),
                        pltpu.SMEM((2, P), jnp.int32), pltpu.SMEM((1, P), jnp.int32),
                        pltpu.VMEM((2, WINDOW, H), k.dtype), pltpu.VMEM((2, WINDOW, H), v.dtype),
                        pltpu.SemaphoreType.DMA((2, 2)),
                        pltpu.VMEM((BAND, LANES), jnp.float32), pltpu.VMEM((BAND, LANES), jnp.float32),
                        pltpu.VMEM((BAND, H), jnp.float32)],
    )
    out, lse = pl.pallas_call(
        functools.partial(_kernel, mask=mask, G=G, n_keys=S),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((B, N, nqb * BAND, H), queries[0].dtype),
                   jax.ShapeDtypeStruct((B, N, nqb * BAND, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret or False,
        name="qwen_jax_vslash_attention_tpu",
    )(q_offset.astype(jnp.int32), kv_length.astype(jnp.int32), scale.astype(jnp.float32), index.block_seg,
      *queries, k, v, index.rel_start[..., None, :], index.rel_end[..., None, :], t_range, kg, vg,
      col_count[..., None, :], index.vpos,
      index.keep.astype(jnp.int32))
    return out.transpose(0, 2, 1, 3)[:, :T], lse[..., 0].transpose(0, 2, 1)[:, :T]
