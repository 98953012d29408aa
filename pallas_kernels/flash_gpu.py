"""Flash attention forward for GPUs in Pallas (Triton lowering), position-aware, GQA, DCA in one pass.

Grid ``(B, N, T / block_q)``: one program per batch row, query head and query block. The program keeps
its query block in registers and walks the key blocks of each mask phase (see ``masks``) with one
online softmax, so DCA's three partial attentions need no merge. K/V are read in place from the
heads-major cache ``[B, K, S, H]`` (kv head = query head // G, never repeated in memory). Query
positions are ``q_offset[b] + t``; keys sit at slot == position, valid below ``kv_length[b]``.
Accumulation is float32 whatever the input dtype; lse is natural-log float32.

The same kernel runs on the CPU with ``interpret=True`` (the tests) and lowers to Triton for CUDA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.masks import MASK_VALUE, MaskSpec, div
from pallas_kernels.online import normalised, walk_phase
from pallas_kernels.shapes import attention_dims, matmul_precision, pad_queries


def _kernel(qoff_ref, kvlen_ref, scale_ref, *refs, mask: MaskSpec, block_q: int, block_k: int):
    n_phases = len(mask.phases)
    q_refs, (k_ref, v_ref, o_ref, lse_ref) = refs[:n_phases], refs[n_phases:]
    qi = pl.program_id(2)
    kv_length, scale = kvlen_ref[()], scale_ref[()]
    first = qoff_ref[()] + qi * block_q
    q_pos = (first + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0))
    H = o_ref.shape[-1]
    precision = matmul_precision(k_ref.dtype)
    m = jnp.full((block_q,), MASK_VALUE, jnp.float32)
    l = jnp.zeros((block_q,), jnp.float32)
    acc = jnp.zeros((block_q, H), jnp.float32)

    for phase, q_ref in zip(mask.phases, q_refs):
        m, l, acc = walk_phase((m, l, acc), q_ref[...], k_ref, v_ref, mask=mask, phase=phase, first=first,
                               last=first + block_q - 1, q_pos=q_pos, kv_length=kv_length, scale=scale,
                               block_k=block_k, precision=precision)

    out, lse = normalised(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("mask", "block_q", "block_k", "num_warps", "num_stages", "interpret"))
def flash_attention_gpu(queries: tuple, k, v, q_offset, kv_length, scale, *, mask: MaskSpec, block_q: int = 64,
                        block_k: int = 64, num_warps: int | None = None, num_stages: int = 3,
                        interpret: bool = False):
    """``queries``: one q [B, T, N, H] per mask phase (already rotated); k, v [B, K, S, H];
    q_offset, kv_length [B] int32; scale [B] float32. Returns ``(out [B, T, N, H], lse [B, T, N] f32)``."""
    from jax.experimental.pallas import triton as pl_triton

    d = attention_dims(queries, k, mask, block_k)
    B, T, N, H, S, G = d.B, d.T, d.N, d.H, d.S, d.G
    bq = min(block_q, max(16, pl.next_power_of_2(T)))  # Triton's dot needs at least 16 rows (decode pads)
    queries, nq = pad_queries(queries, bq)
    scalar = pl.BlockSpec((None,), lambda b, n, i: (b,))
    q_spec = pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, None, S, H), lambda b, n, i: (b, div(n, G), 0, 0))
    out, lse = pl.pallas_call(
        functools.partial(_kernel, mask=mask, block_q=bq, block_k=block_k),
        grid=(B, N, nq),
        in_specs=[scalar, scalar, scalar] + [q_spec] * len(queries) + [kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct((B, nq * bq, N, H), queries[0].dtype),
                   jax.ShapeDtypeStruct((B, N, nq * bq), jnp.float32)],
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps or (4 if H <= 64 else 8),
                                                 num_stages=num_stages),
        interpret=interpret,
        name="qwen_jax_flash_attention",
    )(q_offset.astype(jnp.int32), kv_length.astype(jnp.int32), scale.astype(jnp.float32), *queries, k, v)
    return out[:, :T], lse[:, :, :T].transpose(0, 2, 1)
