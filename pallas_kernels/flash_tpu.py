"""Flash attention forward for TPUs in Pallas (Mosaic TPU), position-aware, GQA, DCA in one pass.

Grid ``(B, N, T / block_q, S / block_k)``; the last axis walks the key blocks a query block can see
(``masks.block_span``) and nothing else: the K/V index maps compute each step's block from the
scalar-prefetched query offsets and kv lengths, and steps past the end repeat the last block, so
skipped tiles are never copied. Each step computes the logits of every phase whose key range
touches the block (one matmul, or two or three on a block that straddles a DCA chunk boundary) and
merges them per element, so DCA runs in one online softmax with no merge of partial outputs; a block
inside a phase's interior (``MaskSpec.interior``) skips the mask altogether. Running max, denominator and accumulator live in VMEM scratch
across steps; the output is written at the last step. Queries are heads-major [B, N, T, H] inside
(transposed by the wrapper), K/V are read in place from the [B, K, S, H] cache (kv head = query head
// G). Runs on the CPU with ``interpret=pltpu.InterpretParams()``; lowers to Mosaic for TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.masks import MASK_VALUE, MaskSpec, block_span, div, phase_touches
from pallas_kernels.shapes import attention_dims, matmul_precision, pad_queries

LANES = 128


def _block(mask, qoff_ref, kvlen_ref, b, qi, j, block_q, block_k):
    """(key block of step j, whether the step is active); idle steps repeat the last active block."""
    first = qoff_ref[b] + qi * block_q
    lo, hi = block_span(mask, first, first + block_q - 1, kvlen_ref[b], block_k)
    return jnp.maximum(jnp.minimum(lo + j, hi - 1), 0), lo + j < hi


def _kernel(qoff_ref, kvlen_ref, scale_ref, *refs, mask: MaskSpec, block_q: int, block_k: int, steps: int):
    n_phases = len(mask.phases)
    q_refs = refs[:n_phases]
    k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[n_phases:]
    b, qi, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    kv_length, scale = kvlen_ref[b], scale_ref[b]
    first = qoff_ref[b] + qi * block_q
    block, active = _block(mask, qoff_ref, kvlen_ref, b, qi, j, block_q, block_k)
    precision = matmul_precision(k_ref.dtype)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def logits(q_ref):
        return lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32) * scale

    def accumulate(s, ok):
        """One online-softmax step; ``ok`` None means every element of the tile is visible."""
        m_prev, l_prev = m_scr[...], l_scr[...]                       # [bq, LANES], lane-replicated
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new[:, :1])
        if ok is not None:
            p = jnp.where(ok, p, 0.0)
        correction = jnp.exp(m_prev - m_new)
        l_scr[...] = l_prev * correction + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new
        pv = lax.dot_general(p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
        acc_scr[...] = acc_scr[...] * correction[:, :1] + pv

    # A block inside one phase's interior is visible whole (and, phases being disjoint, to that phase only).
    last = first + block_q - 1
    interior = []
    for phase in mask.phases:
        u0, u1 = mask.interior(phase, first, last, kv_length, block_k)
        interior.append((u0 <= block) & (block < u1))
    whole = functools.reduce(jnp.logical_or, interior)

    @pl.when(active & whole)
    def _interior_step():
        s = logits(q_refs[0])
        for i in range(1, n_phases):
            s = lax.cond(interior[i], functools.partial(logits, q_refs[i]), lambda s=s: s)
        accumulate(s, None)

    @pl.when(active & jnp.logical_not(whole))
    def _edge_step():
        shape = (block_q, block_k)
        q_pos = first + lax.broadcasted_iota(jnp.int32, shape, 0)
        k_pos = block * block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
        s = jnp.full(shape, MASK_VALUE, jnp.float32)
        ok = jnp.zeros(shape, jnp.int32)       # int32, not bool: Mosaic cannot return i1 vectors from scf.if
        for phase, q_ref in zip(mask.phases, q_refs):
            def add_phase(s_ok, phase=phase, q_ref=q_ref):
                s, ok = s_ok
                vis = mask.visible(phase, q_pos, k_pos, kv_length)
                return jnp.where(vis, logits(q_ref), s), jnp.where(vis, 1, ok)

            touches = phase_touches(mask, phase, first, last, kv_length, block, block_k)
            s, ok = add_phase((s, ok)) if n_phases == 1 else lax.cond(touches, add_phase, lambda x: x, (s, ok))
        accumulate(s, ok != 0)

    @pl.when(j == steps - 1)
    def _finish():
        l, m = l_scr[...][:, :1], m_scr[...][:, :1]
        o_ref[...] = (acc_scr[...] / jnp.maximum(l, 1e-30)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("mask", "block_q", "block_k", "interpret"))
def flash_attention_tpu(queries: tuple, k, v, q_offset, kv_length, scale, *, mask: MaskSpec, block_q: int = 256,
                        block_k: int = 512, interpret=None):
    """``queries``: one q [B, T, N, H] per mask phase (already rotated); k, v [B, K, S, H];
    q_offset, kv_length [B] int32; scale [B] float32. Returns ``(out [B, T, N, H], lse [B, T, N] f32)``.
    ``interpret``: ``pltpu.InterpretParams()`` to run on the CPU."""
    d = attention_dims(queries, k, mask, block_k)
    B, T, N, H, S, G = d.B, d.T, d.N, d.H, d.S, d.G
    bq = min(block_q, -(-T // 8) * 8)
    queries, nq = pad_queries(queries, bq)
    queries = tuple(q.transpose(0, 2, 1, 3) for q in queries)   # heads-major inside the kernel
    steps = S // block_k

    def kv_index(b, n, i, j, qoff_ref, kvlen_ref, scale_ref):
        return b, div(n, G), _block(mask, qoff_ref, kvlen_ref, b, i, j, bq, block_k)[0], 0

    q_spec = pl.BlockSpec((None, None, bq, H), lambda b, n, i, j, *_: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, H), kv_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, N, nq, steps),
        in_specs=[q_spec] * len(queries) + [kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda b, n, i, j, *_: (b, n, i, 0))],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, H), jnp.float32)],
    )
    out, lse = pl.pallas_call(
        functools.partial(_kernel, mask=mask, block_q=bq, block_k=block_k, steps=steps),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((B, N, nq * bq, H), queries[0].dtype),
                   jax.ShapeDtypeStruct((B, N, nq * bq, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret or False,
        name="qwen_jax_flash_attention_tpu",
    )(q_offset.astype(jnp.int32), kv_length.astype(jnp.int32), scale.astype(jnp.float32), *queries, k, v)
    return out.transpose(0, 2, 1, 3)[:, :T], lse[..., 0].transpose(0, 2, 1)[:, :T]
