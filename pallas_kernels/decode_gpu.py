"""Split-key attention for decode-sized query chunks on GPUs (Pallas, Triton lowering): flash decoding.

The prefill kernels' grid ``(B, N, T / block_q)`` gives a decode step (one query a row) B x N programs,
each walking the whole cache for one query head, and the G query heads of a kv group each read that
group's K/V again: at a 1M-token cache a few dozen programs stream gigabytes one block at a time.
Here the grid is ``(B, K, splits)``: one program per batch row, kv head and split of the key slots.
Its rows are every query of the chunk for every query head of the kv group (``T x G`` rows, padded to
16 for Triton's dot), so a K/V block is read once for the whole group, and the splits spread the cache
over the chip (each row's filled slots ``[0, kv_length)`` cut into equal runs of whole blocks, so a
short cache in a long buffer keeps every split busy). Each split returns its normalised partial and
lse; ``online.merge_stacked`` joins them by log-sum-exp.

Masks are the prefill kernels' (``masks``: DCA's three phases in one online softmax per split, exact
per element on edge blocks). An 8-bit cache (fp8) is read as stored and widened block by block, so no
widened copy of the cache is written.

The same kernel runs on the CPU with ``interpret=True`` (the tests) and lowers to Triton for CUDA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.masks import MASK_VALUE, MaskSpec, div
from pallas_kernels.online import merge_stacked, normalised, walk_phase
from pallas_kernels.shapes import attention_dims, matmul_precision

MIN_ROWS = 16          # Triton's dot needs at least 16 rows
# Programs a call aims for (B x K x splits): enough to fill an H100's 132 SMs several times over.
TARGET_PROGRAMS = 512
MIN_SPLIT_BLOCKS = 4   # a split walks at least this many key blocks
F16_MAX = float(jnp.finfo(jnp.float16).max)
# Triton settings (block_k, num_warps, num_stages) by the cache's bytes per value, the fastest measured on an
# H100 (qwen_jax/bench/GPU_NOTES.md, twenty-third session; 28 / 4 heads, DCA, 1M slots): an fp8 cache with
# float16 math 0.52 ms against 0.68-0.74 for (64, 4, 3) with bfloat16 math; a bf16 cache 0.98 ms against 1.03-1.18
TUNED = {1: (32, 2, 4), 2: (32, 4, 4), 4: (32, 4, 3)}


def tuned(kv_dtype) -> tuple[int, int, int]:
    return TUNED[jnp.dtype(kv_dtype).itemsize]


def rows_of(T: int, G: int) -> int:
    """Rows of one program: T queries x G heads, rounded up to a power of two of at least ``MIN_ROWS``."""
    return max(MIN_ROWS, pl.next_power_of_2(T * G))


def num_splits(B: int, K: int, S: int, block_k: int, splits: int | None = None) -> int:
    """Splits of the key slots per (row, kv head): ``splits``, or enough for ``TARGET_PROGRAMS`` programs with
    at least ``MIN_SPLIT_BLOCKS`` blocks each in a full cache of ``S`` slots; never more than the blocks."""
    blocks = -(-S // block_k)
    if splits is None:
        splits = min(-(-TARGET_PROGRAMS // (B * K)), max(1, blocks // MIN_SPLIT_BLOCKS))
    return max(1, min(splits, blocks))


def _kernel(qoff_ref, kvlen_ref, scale_ref, *refs, mask: MaskSpec, T: int, G: int, block_k: int, splits: int,
            compute):
    n_phases = len(mask.phases)
    q_refs, (k_ref, v_ref, o_ref, lse_ref) = refs[:n_phases], refs[n_phases:]
    rows, H = o_ref.shape
    kv_length, scale = kvlen_ref[()], scale_ref[()]
    first = qoff_ref[()]
    last = first + T - 1
    # row r is query r // G (padding rows repeat the last query's position; their outputs are dropped)
    q_pos = first + jnp.minimum(div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), G), T - 1)
    # this row's keys [0, kv_length) in ``splits`` runs of whole blocks, so each split has work however
    # much of the cache is filled
    split = (div(div(kv_length + splits - 1, splits) + block_k - 1, block_k)) * block_k
    s_lo = pl.program_id(2) * split
    s_hi = s_lo + split
    dtype = compute or q_refs[0].dtype
    precision = matmul_precision(dtype)
    m = jnp.full((rows,), MASK_VALUE, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    acc = jnp.zeros((rows, H), jnp.float32)

    for phase, q_ref in zip(mask.phases, q_refs):
        q = q_ref[...]
        if compute is not None:       # float16 math on an 8-bit cache: q within float16's range
            q = jnp.clip(q.astype(jnp.float32), -F16_MAX, F16_MAX).astype(compute)
        # the phase's blocks inside this split (splits are whole blocks, so none is visited twice)
        m, l, acc = walk_phase((m, l, acc), q, k_ref, v_ref, mask=mask, phase=phase, first=first, last=last,
                               q_pos=q_pos, kv_length=kv_length, scale=scale, block_k=block_k, precision=precision,
                               dtype=dtype, within=(div(s_lo, block_k), div(s_hi, block_k)))

    o_ref[...], lse_ref[...] = normalised(m, l, acc)


@functools.partial(jax.jit, static_argnames=("mask", "block_k", "splits", "num_warps", "num_stages", "fp8_f16",
                                             "interpret"))
def decode_attention_gpu(queries: tuple, k, v, q_offset, kv_length, scale, *, mask: MaskSpec,
                         block_k: int | None = None, splits: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None, fp8_f16: bool = True, interpret: bool = False):
    """``queries``: one q [B, T, N, H] per mask phase (already rotated), T small (decode: 1); k, v
    [B, K, S, H] in any float dtype; q_offset, kv_length [B] int32; scale [B] float32. Returns
    ``(out [B, T, N, H] q.dtype, lse [B, T, N] f32)``. Unset Triton settings take ``tuned(k.dtype)``;
    ``fp8_f16``: with an 8-bit cache and 16-bit queries, widen K/V to float16 and do the math there (exact
    products, a finer P than bfloat16's; queries clipped to float16's range, beyond which no real query
    goes) instead of in q's dtype."""
    from jax.experimental.pallas import triton as pl_triton

    tuned_k, tuned_warps, tuned_stages = tuned(k.dtype)
    block_k = block_k or tuned_k
    d = attention_dims(queries, k, mask, block_k)
    B, T, N, H, K, S, G = d.B, d.T, d.N, d.H, d.K, d.S, d.G
    R = rows_of(T, G)
    d_item = queries[0].dtype.itemsize       # float16 math serves 16-bit queries; float32 ones keep theirs
    n_splits = num_splits(B, K, S, block_k, splits)

    def group_rows(q):   # [B, T, N, H] -> [B, K, R, H]: row t * G + g is query t of the group's head g
        q = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
        return jnp.pad(q, ((0, 0), (0, 0), (0, R - T * G), (0, 0)))

    scalar = pl.BlockSpec((None,), lambda b, h, s: (b,))
    q_spec = pl.BlockSpec((None, None, R, H), lambda b, h, s: (b, h, 0, 0))
    kv_spec = pl.BlockSpec((None, None, S, H), lambda b, h, s: (b, h, 0, 0))
    out, lse = pl.pallas_call(
        functools.partial(_kernel, mask=mask, T=T, G=G, block_k=block_k, splits=n_splits,
                          compute=jnp.float16 if fp8_f16 and k.dtype.itemsize == 1 and d_item == 2 else None),
        grid=(B, K, n_splits),
        in_specs=[scalar, scalar, scalar] + [q_spec] * len(queries) + [kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((None, None, None, R, H), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, R), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, K, n_splits, R, H), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, n_splits, R), jnp.float32)],
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps or tuned_warps,
                                                 num_stages=num_stages or tuned_stages),
        interpret=interpret,
        name="qwen_jax_decode_attention",
    )(q_offset.astype(jnp.int32), kv_length.astype(jnp.int32), scale.astype(jnp.float32),
      *(group_rows(q) for q in queries), k, v)
    out, lse = merge_stacked(out, lse)                # [B, K, R, H], [B, K, R]
    out = out[:, :, :T * G].reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
    lse = lse[:, :, :T * G].reshape(B, K, T, G).transpose(0, 2, 1, 3).reshape(B, T, N)
    return out.astype(queries[0].dtype), lse
