"""qwen-jax's Pallas kernels: flash attention with position masks, GQA and DCA, for GPU and TPU.

One public op, ``flash_attention``, picks the backend's kernel (``impl="auto"``) or the one named:

    ``mosaic_gpu``  Pallas Mosaic GPU (Hopper: TMA, wgmma, warp specialisation); bf16/f16, head_dim % 64 == 0;
                    no CPU interpreter (its lowering is proved with ``jax.export``)
    ``triton``      Pallas with the Triton lowering: any dtype, decode-sized query blocks (and the CPU in
                    interpret mode)
    ``mosaic_tpu``  Pallas Mosaic TPU with scalar-prefetched block schedules (CPU: interpret mode)
    ``reference``   dense masked attention in jnp (any backend; materialises [T, S] logits)

On a GPU, ``auto`` runs decode-sized chunks (at most ``DECODE_MAX_ROWS`` query rows per kv group) through
the split-key decode kernel ``decode_gpu`` (flash decoding; an fp8 cache read as stored).

The sparse ops ``vslash_attention`` and ``block_sparse_attention`` take the same names (``mosaic_gpu``
runs ``vslash_mgpu``, ``triton`` ``vslash_gpu``, ``mosaic_tpu`` ``vslash_tpu``); ``auto`` on a GPU takes
``mosaic_gpu`` where it applies (bf16/f16, head_dim % 64 == 0, at least 128 queries), else ``triton``.

Every kernel returns ``(out, lse)``: out [B, T, N, H] in the input dtype, lse [B, T, N] float32
natural log; a query that sees no key gets out 0 and lse -inf. Unsupported combinations raise.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.masks import MASK_VALUE, MaskSpec
from pallas_kernels.reference import masked_attention
from pallas_kernels.shapes import attention_dims, known

IMPLS = ("auto", "mosaic_gpu", "triton", "mosaic_tpu", "reference")
_NATIVE = {"gpu": ("mosaic_gpu", "triton"), "cuda": ("mosaic_gpu", "triton"), "tpu": ("mosaic_tpu",)}
# (block_q, block_k); mosaic_gpu's block_q is per consumer warpgroup (a program covers MGPU_CONSUMERS)
DEFAULT_BLOCKS = {"mosaic_gpu": (64, 128), "triton": (128, 64), "mosaic_tpu": (256, 512)}
MGPU_MIN_QUERIES = 128  # below this (decode, short chunks) auto takes the Triton kernels: little row padding
# auto on a GPU: a chunk of at most this many query rows per kv group (T x G; decode: G) takes the
# split-key decode kernel (``decode_gpu``), which reads each K/V block once for the group, spreads the
# cache over the chip and reads an 8-bit cache as stored
DECODE_MAX_ROWS = 64
# The dense Mosaic GPU kernel's consumer warpgroups: three running free, measured on an H100 against two
# taking turns (qwen_jax/bench/GPU_NOTES.md, fourteenth session): 642 / 652 / 639 TFLOP/s at 32K / 128K /
# 512K against 612 / 596 / 588 (cuDNN 630 / 569 / 509); DCA at 512K 615 against 575
MGPU_CONSUMERS = 3


def resolve_impl(impl: str, interpret: bool = False, backend: str | None = None) -> str:
    """The kernel that ``impl`` means on ``backend`` (default: JAX's), or a clear error."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention kernel {impl!r}; choose one of {list(IMPLS)}")
    backend = backend or jax.default_backend()
    if impl == "auto":
        if interpret:                       # emulate the kernel that has an interpreter for this kind of chip
            return "mosaic_tpu" if backend == "tpu" else "triton"
        if backend not in _NATIVE:
            raise ValueError(f"no Pallas attention kernel runs natively on {backend!r}; pass impl='reference', "
                             "interpret=True (the Triton kernel, emulated), or impl='triton' / 'mosaic_tpu' with it")
        impl = _NATIVE[backend][0]
    if impl == "mosaic_gpu" and interpret:
        raise ValueError("the mosaic_gpu kernel has no CPU interpreter; use impl='triton' with interpret=True")
    if impl != "reference" and not interpret and impl not in _NATIVE.get(backend, ()):
        raise ValueError(f"the {impl} kernel does not run on {backend!r} (use interpret=True to emulate it)")
    return impl


def _fit(block: int, length: int, minimum: int) -> int:
    """``block`` where it divides ``length``, else the largest power of two below it that does."""
    b = block
    if length % b:
        b = 1 << ((block - 1).bit_length() - 1)
        while b >= minimum and length % b:
            b //= 2
    if b < minimum:
        raise ValueError(f"no key block of at least {minimum} divides the cache length {length}; "
                         f"allocate the cache in multiples of {block if block % minimum == 0 else minimum}")
    return b


CAUSAL = MaskSpec()


def widened(x, dtype):
    """An 8-bit K or V (an fp8 cache) in the compute ``dtype``, as the kernels other than decode read it."""
    return x.astype(dtype) if x.dtype.itemsize == 1 else x


def _check_blocks(**blocks):
    for name, size in blocks.items():
        if size is not None and (not isinstance(size, numbers.Integral) or size < 1):
            raise ValueError(f"{name} must be a positive number of rows, got {size!r}")


def _inputs(q, k, v, mask, q_offset, kv_length, scale, q_multiple: int = 1):
    """Queries as a tuple (one per phase), checked against k and v; q_offset (a multiple of ``q_multiple`` where
    known), kv_length (at most the cache length: a traced one is clipped to it) and scale broadcast to [B]."""
    queries = tuple(q) if isinstance(q, (tuple, list)) else (q,)
    d = attention_dims(queries, k, mask, v=v)
    if d.T < 1 or d.S < 1:
        raise ValueError(f"attention needs at least one query and one key slot; got q with {d.T} queries, "
                         f"k with {d.S} slots")
    for name, x in (("q_offset", q_offset), ("kv_length", kv_length)):
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"{name} must be integers, got {jnp.result_type(x)}")
    q_offset, kv_length = (jnp.asarray(x, jnp.int32) for x in (q_offset, kv_length))
    offsets, lengths = known(q_offset), known(kv_length)
    if offsets is not None and (offsets < 0).any():
        raise ValueError(f"q_offset must be >= 0, got {offsets.tolist()}")
    if offsets is not None and (offsets % q_multiple).any():      # the sparse kernels' 64-row query blocks
        raise ValueError(f"sparse attention needs q_offset a multiple of {q_multiple} (its query blocks), got "
                         f"{offsets.reshape(-1).tolist()}")
    if lengths is not None and ((lengths < 0) | (lengths > d.S)).any():
        raise ValueError(f"kv_length must lie in [0, {d.S}] (the cache length), got {lengths.tolist()}")
    return (queries, jnp.broadcast_to(q_offset, (d.B,)), jnp.broadcast_to(jnp.minimum(kv_length, d.S), (d.B,)),
            jnp.broadcast_to(jnp.asarray(d.H ** -0.5 if scale is None else scale, jnp.float32), (d.B,)))


def _reference(queries, k, v, q_offset, kv_length, scale, mask, restrict=None):
    """Dense masked attention at positions ``q_offset + t``; ``restrict(positions)`` narrows the mask."""
    positions = q_offset[:, None] + jnp.arange(queries[0].shape[1], dtype=jnp.int32)[None]
    out, lse = masked_attention(queries, k, v, positions, kv_length, scale, mask=mask,
                                restrict=None if restrict is None else restrict(positions))
    return out.astype(queries[0].dtype), lse


def flash_attention(q, k, v, *, q_offset, kv_length, scale=None, mask: MaskSpec = CAUSAL, impl: str = "auto",
                    block_q: int | None = None, block_k: int | None = None, interpret: bool = False):
    """Attention of queries at positions ``q_offset[b] + t`` over keys at slots ``0..kv_length[b]-1``.

    q: [B, T, N, H], or a tuple with one (differently rotated) copy per ``mask.phases`` (DCA: inter,
    successive, intra); k, v: [B, K, S, H] with N a multiple of K (an 8-bit cache, e.g. fp8, is widened
    to q's dtype, or read as stored by the decode kernel); q_offset, kv_length: [B] int32; scale: [B]
    float32 logit multiplier (default 1/sqrt(H)). Returns ``(out, lse)``.

    On a GPU, ``auto`` runs decode-sized chunks (at most ``DECODE_MAX_ROWS`` query rows per kv group) through
    the split-key decode kernel (``decode_gpu``); naming ``triton`` keeps them on the prefill kernel.
    """
    _check_blocks(block_q=block_q, block_k=block_k)
    queries, q_offset, kv_length, scale = _inputs(q, k, v, mask, q_offset, kv_length, scale)
    T = queries[0].shape[1]
    requested, impl = impl, resolve_impl(impl, interpret)
    group = queries[0].shape[2] // k.shape[1]
    if requested == "auto" and impl in ("mosaic_gpu", "triton") and T * group <= DECODE_MAX_ROWS:
        from pallas_kernels.decode_gpu import decode_attention_gpu, tuned
        return decode_attention_gpu(queries, k, v, q_offset, kv_length, scale, mask=mask,
                                    block_k=_fit(block_k or tuned(k.dtype)[0], k.shape[2], 16), interpret=interpret)
    k, v = (widened(x, queries[0].dtype) for x in (k, v))
    if impl == "reference":
        return _reference(queries, k, v, q_offset, kv_length, scale, mask)
    if impl == "mosaic_gpu":
        from pallas_kernels.flash_mgpu import check_supported, flash_attention_mgpu
        bq = block_q or DEFAULT_BLOCKS[impl][0]
        try:
            bk = _fit(block_k or DEFAULT_BLOCKS[impl][1], k.shape[2], 64)
            check_supported(queries, k, v, bq, bk, 2, MGPU_CONSUMERS)
        except ValueError:
            if requested != "auto":
                raise
            bk = None                    # auto: what Mosaic GPU does not cover (float32, ...) goes to Triton
        if bk is not None and (requested != "auto" or T >= MGPU_MIN_QUERIES):
            return flash_attention_mgpu(queries, k, v, q_offset, kv_length, scale, mask=mask, block_q=bq, block_k=bk,
                                        consumers=MGPU_CONSUMERS)
        impl = "triton"                  # ... and so do decode-sized chunks
    default_q, default_k = DEFAULT_BLOCKS[impl]
    if impl == "triton":
        from pallas_kernels.flash_gpu import flash_attention_gpu
        bk = _fit(block_k or default_k, k.shape[2], 16)
        return flash_attention_gpu(queries, k, v, q_offset, kv_length, scale, mask=mask, block_q=block_q or default_q,
                                   block_k=bk, interpret=interpret)
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels.flash_tpu import flash_attention_tpu
    bk = _fit(block_k or default_k, k.shape[2], 8)
    return flash_attention_tpu(queries, k, v, q_offset, kv_length, scale, mask=mask, block_q=block_q or default_q,
                               block_k=bk, interpret=pltpu.InterpretParams() if interpret else None)


SPARSE_IMPLS = ("auto", "mosaic_gpu", "triton", "mosaic_tpu", "reference")
_SPARSE_NATIVE = {"gpu": "mosaic_gpu", "cuda": "mosaic_gpu", "tpu": "mosaic_tpu"}
# The Mosaic GPU sparse kernel's defaults, the fastest measured on an H100 (qwen_jax/bench/GPU_NOTES.md, eighth
# session): 96-key windows (3 stages fit in shared memory; fewer, larger steps than 64-key windows for about 5%
# more keys: 128 ms against 136 at 128K, 1.34 s against 1.48 at 1M), consumers not taking turns.
MGPU_SPARSE_BLOCK_K, MGPU_SPARSE_PINGPONG = 96, False


def _mgpu_sparse_stages(block_k: int) -> int:
    from pallas_kernels.vslash_mgpu import max_stages
    return max_stages(block_k)


def _sparse_impl(impl: str, interpret: bool) -> str:
    if impl not in SPARSE_IMPLS:
        raise ValueError(f"sparse attention kernel {impl!r} is not available; choose one of {list(SPARSE_IMPLS)}")
    if impl == "auto":
        if interpret or jax.default_backend() not in _SPARSE_NATIVE:
            return resolve_impl("auto", interpret)      # emulated; or, with no native kernel, refused as dense is
        impl = _SPARSE_NATIVE[jax.default_backend()]
    return impl if impl == "reference" else resolve_impl(impl, interpret)


def _sparse_mgpu_block(requested: str, queries, k, v, block_k):
    """The Mosaic GPU sparse kernel's window width, or None where ``auto`` should take the Triton kernel
    (float32, head_dim not a multiple of 64, decode-sized chunks); an explicit request that it cannot
    serve raises."""
    from pallas_kernels.vslash_mgpu import check_supported
    bk = block_k or MGPU_SPARSE_BLOCK_K
    try:
        check_supported(queries, k, v, bk, _mgpu_sparse_stages(bk))
    except ValueError:
        if requested != "auto":
            raise
        return None
    return bk if requested != "auto" or queries[0].shape[1] >= MGPU_MIN_QUERIES else None


def _sparse_kernel(impl, queries, k, v, q_offset, kv_length, scale, index, col_count, mask, block_k, interpret):
    """Run a vertical-slash index table through the backend's sparse kernel."""
    if impl == "mosaic_gpu":
        from pallas_kernels.vslash_mgpu import vslash_attention_mgpu
        return vslash_attention_mgpu(queries, k, v, q_offset, kv_length, scale, index, col_count, mask=mask,
                                     block_k=block_k, stages=_mgpu_sparse_stages(block_k),
                                     pingpong=MGPU_SPARSE_PINGPONG)
    if impl == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu

        from pallas_kernels.vslash_tpu import vslash_attention_tpu
        return vslash_attention_tpu(queries, k, v, q_offset, kv_length, scale, index, col_count, mask=mask,
                                    interpret=pltpu.InterpretParams() if interpret else None)
    from pallas_kernels.vslash_gpu import vslash_attention_gpu
    return vslash_attention_gpu(queries, k, v, q_offset, kv_length, scale, index, col_count, mask=mask,
                                block_k=block_k, interpret=interpret)


def vslash_attention(q, k, v, selection, *, q_offset, kv_length, scale=None, mask: MaskSpec = CAUSAL,
                     impl: str = "auto", block_k: int | None = None, interpret: bool = False):
    """Attention restricted to a vertical-slash sparse mask (``pallas_kernels.vslash``), ``(out, lse)``.

    Same arguments as ``flash_attention`` plus ``selection`` (a ``vslash.Selection`` for q's rows, heads and
    the mask's phases: checked, and where its values are known, its lists too); ``q_offset`` must be a
    multiple of 64 (the band height). ``impl``: ``mosaic_gpu`` (Hopper; bf16/f16, head_dim %
    64 == 0; ``block_k`` keys per window, a multiple of 16 from 64, default 96), ``triton`` (GPUs),
    ``mosaic_tpu`` (TPUs; Triton and TPU on the CPU with ``interpret``), ``reference`` (dense masked
    jnp) or ``auto`` (GPU: mosaic_gpu where it applies, else triton)."""
    from pallas_kernels import vslash
    _check_blocks(block_k=block_k)
    queries, q_offset, kv_length, scale = _inputs(q, k, v, mask, q_offset, kv_length, scale, vslash.BAND)
    B, _, N, _ = queries[0].shape
    selection = vslash.checked(selection, B, N, len(mask.phases))
    requested, impl = impl, _sparse_impl(impl, interpret)
    if impl == "reference":
        return _reference(queries, k, v, q_offset, kv_length, scale, mask,
                          lambda positions: vslash.dense_mask(selection, positions, k.shape[2]))
    if impl == "mosaic_gpu":
        bk = _sparse_mgpu_block(requested, queries, k, v, block_k)
        if bk is not None:               # the index's tile width does not matter to it: build the cheapest
            index = vslash.build_index(selection, q_offset, queries[0].shape[1], kv_length, mask, vslash.BAND,
                                       k.shape[2])
            return _sparse_kernel(impl, queries, k, v, q_offset, kv_length, scale, index, selection.col_count, mask,
                                  bk, interpret)
        impl, block_k = "triton", None
    if impl == "mosaic_tpu":
        if block_k not in (None, vslash.BAND):
            raise ValueError(f"the TPU sparse kernel reads {vslash.BAND}-key tiles; got block_k={block_k}")
        bk = vslash.BAND
    else:
        bk = _fit(block_k or vslash.BAND, k.shape[2], vslash.BAND)
    index = vslash.build_index(selection, q_offset, queries[0].shape[1], kv_length, mask, bk, k.shape[2])
    return _sparse_kernel(impl, queries, k, v, q_offset, kv_length, scale, index, selection.col_count, mask, bk,
                          interpret)


def block_sparse_attention(q, k, v, blocks, counts, *, q_offset, kv_length, scale=None, mask: MaskSpec = CAUSAL,
                           impl: str = "auto", interpret: bool = False):
    """Attention restricted to a block-sparse mask: each 64-row query block sees, per phase, a list of
    64-key blocks (``blocks`` [B, N, T/64, P, M] int32, first ``counts`` [B, N, T/64, P] valid), within the
    dense mask. The shared primitive under the vertical-slash kernels (``vslash.block_sparse_index``).
    ``mosaic_gpu`` runs it correctly but not fast: every query block is its own segment, so the two
    blocks of a program never share a window."""
    from pallas_kernels import vslash
    queries, q_offset, kv_length, scale = _inputs(q, k, v, mask, q_offset, kv_length, scale)
    B, T, N, _ = queries[0].shape
    want = (B, N, -(-T // vslash.BAND), len(mask.phases))
    if tuple(blocks.shape[:4]) != want or blocks.ndim != 5 or tuple(counts.shape) != want:
        raise ValueError(f"blocks must be [B, N, T/64, P, M] = {list(want) + ['M']} and counts {list(want)} for q "
                         f"{tuple(queries[0].shape)} and {len(mask.phases)} mask phase(s); got blocks "
                         f"{tuple(blocks.shape)}, counts {tuple(counts.shape)}")
    requested, impl = impl, _sparse_impl(impl, interpret)
    if impl == "reference":
        return _reference(queries, k, v, q_offset, kv_length, scale, mask,
                          lambda positions: vslash.block_sparse_dense_mask(blocks, counts, positions, k.shape[2]))
    bk = vslash.BAND
    if impl == "mosaic_gpu":
        bk = _sparse_mgpu_block(requested, queries, k, v, None)
        impl, bk = ("mosaic_gpu", bk) if bk is not None else ("triton", vslash.BAND)
    index, col_count = vslash.block_sparse_index(blocks, counts, q_offset, kv_length)
    return _sparse_kernel(impl, queries, k, v, q_offset, kv_length, scale, index, col_count, mask, bk, interpret)


__all__ = ["flash_attention", "vslash_attention", "block_sparse_attention", "resolve_impl", "MaskSpec", "MASK_VALUE", "masked_attention",
           "IMPLS", "SPARSE_IMPLS"]
