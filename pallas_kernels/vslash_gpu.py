"""Vertical-slash sparse attention for GPUs in Pallas (Triton lowering), DCA-aware, with (out, lse).

Grid ``(B, N, T / 64)``: one program per row, query head and 64-row query block (MInference's band
height, ``vslash.BAND``). For each mask phase the program walks

    slash tiles     key tiles of the head's merged bands (``rel_start, rel_end`` shifted by the block's
                    first position), loaded from the cache at unaligned starts, masked to the tile's
                    columns; only the tiles that meet the phase's key range (``t0 .. t1``)
    vertical tiles  the phase's columns, gathered beforehand into contiguous [VCAP, H] tiles, minus
                    those the block's bands already cover (``keep``)

in one online softmax with the dense mask (causal, DCA phase, cache length) applied on top, so the
result is exactly masked dense attention restricted to the sparse mask (``vslash.dense_mask``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.masks import MASK_VALUE, MaskSpec, div
from pallas_kernels.online import normalised, online_softmax_step
from pallas_kernels.shapes import attention_dims, matmul_precision, pad_queries
from pallas_kernels.vslash import BAND, VSIndex, gather_verticals, pad_verticals


def _kernel(qoff_ref, kvlen_ref, scale_ref, seg_ref, *refs, mask: MaskSpec, block_k: int, n_keys: int):
    n_phases = len(mask.phases)
    q_refs = refs[:n_phases]
    (k_ref, v_ref, rs_ref, re_ref, t0_ref, t1_ref, kg_ref, vg_ref, vpos_ref, keep_ref, vcnt_ref,
     o_ref, lse_ref) = refs[n_phases:]
    qi = pl.program_id(2)
    kv_length, scale = kvlen_ref[()], scale_ref[()]
    q0 = qoff_ref[()] + qi * BAND
    q_pos = q0 + lax.broadcasted_iota(jnp.int32, (BAND, 1), 0)
    g = seg_ref[()]
    H = o_ref.shape[-1]
    precision = matmul_precision(k_ref.dtype)
    iota_k = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)

    def update(carry, q, k, v, ok):
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale
        return online_softmax_step(carry, s, v, ok, precision)

    carry = (jnp.full((BAND,), MASK_VALUE, jnp.float32), jnp.zeros((BAND,), jnp.float32),
             jnp.zeros((BAND, H), jnp.float32))
    for p, (phase, q_ref) in enumerate(zip(mask.phases, q_refs)):
        q = q_ref[...]

        def slash_tile(t, carry, q=q, p=p, phase=phase):
            lo = q0 + rs_ref[g, p, t]
            hi = q0 + re_ref[g, p, t]
            start = jnp.clip(lo, 0, n_keys - block_k)
            k = k_ref[pl.ds(start, block_k), :]
            v = v_ref[pl.ds(start, block_k), :]
            last_q, last_k = q0 + BAND - 1, lo + block_k - 1
            # a whole tile every query sees needs no mask: its four corners decide (the mask is convex there)
            whole = (start == lo) & (hi - lo == block_k)
            for qq, kk in ((q0, lo), (q0, last_k), (last_q, lo), (last_q, last_k)):
                whole &= mask.visible(phase, qq, kk, kv_length)

            def masked(carry):
                k_pos = start + iota_k
                ok = (k_pos >= lo) & (k_pos < hi) & mask.visible(phase, q_pos, k_pos, kv_length)
                return update(carry, q, k, v, ok)

            return lax.cond(whole, lambda c: update(c, q, k, v, None), masked, carry)

        def vertical_tile(j, carry, q=q, p=p, phase=phase):
            at = pl.ds(j * block_k, block_k)
            pos = vpos_ref[g, p, at][None, :]
            ok = (keep_ref[p, at][None, :] != 0) & mask.visible(phase, q_pos, pos, kv_length)
            return update(carry, q, kg_ref[g, p, at, :], vg_ref[g, p, at, :], ok)

        carry = lax.fori_loop(t0_ref[p], t1_ref[p], slash_tile, carry)
        carry = lax.fori_loop(0, div(vcnt_ref[g, p] + block_k - 1, block_k), vertical_tile, carry)

    out, lse = normalised(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("mask", "block_k", "num_warps", "num_stages", "interpret"))
def vslash_attention_gpu(queries: tuple, k, v, q_offset, kv_length, scale, index: VSIndex, col_count, *,
                         mask: MaskSpec, block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                         interpret: bool = False):
    """``queries``: one q [B, T, N, H] per mask phase (rotated); k, v [B, K, S, H]; q_offset [B] (multiple
    of 64), kv_length [B] int32; scale [B] float32; ``index`` from ``vslash.build_index`` with the same
    ``block_k``; col_count [B, G, N, P]. Returns ``(out [B, T, N, H], lse [B, T, N] float32)``."""
    from jax.experimental.pallas import triton as pl_triton

    d = attention_dims(queries, k, mask, block_k)
    B, T, N, H, S, G = d.B, d.T, d.N, d.H, d.S, d.G
    index = pad_verticals(index, block_k)
    queries, nqb = pad_queries(queries, BAND)
    kg, vg = gather_verticals(k, v, index)
    Gs, P, TC = index.rel_start.shape[1], index.rel_start.shape[3], index.rel_start.shape[4]
    VC = index.vpos.shape[-1]
    scalar = pl.BlockSpec((None,), lambda b, n, i: (b,))
    q_spec = pl.BlockSpec((None, BAND, None, H), lambda b, n, i: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, None, S, H), lambda b, n, i: (b, div(n, G), 0, 0))
    per_head = lambda *shape: pl.BlockSpec((None, Gs, None) + shape, lambda b, n, i: (b, 0, n) + (0,) * len(shape))  # noqa: E731
    per_block = lambda *shape: pl.BlockSpec((None, None, None) + shape, lambda b, n, i: (b, n, i) + (0,) * len(shape))  # noqa: E731
    out, lse = pl.pallas_call(
        functools.partial(_kernel, mask=mask, block_k=block_k, n_keys=S),
        grid=(B, N, nqb),
        in_specs=[scalar, scalar, scalar, pl.BlockSpec((None, None), lambda b, n, i: (b, i))]
        + [q_spec] * len(queries) + [kv_spec, kv_spec, per_head(P, TC), per_head(P, TC), per_block(P), per_block(P),
                                     per_head(P, VC, H), per_head(P, VC, H), per_head(P, VC), per_block(P, VC),
                                     per_head(P)],
        out_specs=[q_spec, pl.BlockSpec((None, None, BAND), lambda b, n, i: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct((B, nqb * BAND, N, H), queries[0].dtype),
                   jax.ShapeDtypeStruct((B, N, nqb * BAND), jnp.float32)],
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="qwen_jax_vslash_attention",
    )(q_offset.astype(jnp.int32), kv_length.astype(jnp.int32), scale.astype(jnp.float32), index.block_seg,
      *queries, k, v, index.rel_start, index.rel_end, index.t0, index.t1, kg, vg, index.vpos,
      index.keep.astype(jnp.int8), col_count)
    return out[:, :T], lse[:, :, :T].transpose(0, 2, 1)
