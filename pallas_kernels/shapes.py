"""Shape checks, query padding and matmul precision shared by the kernels, the reference and the model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.masks import MaskSpec


def matmul_precision(dtype) -> lax.Precision:
    """float32 means float32: without HIGHEST, GPUs (XLA and Triton) run float32 dots in TF32."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def known(x):
    """``x`` as numpy where its value is known now; None under a trace (jit), where it is not."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


@dataclasses.dataclass(frozen=True)
class Dims:
    B: int
    T: int
    N: int
    H: int
    K: int
    S: int

    @property
    def G(self) -> int:
        return self.N // self.K


def attention_dims(queries: tuple, k, mask: MaskSpec, block_k: int | None = None, v=None) -> Dims:
    """Validate ``queries`` (one [B, T, N, H] per mask phase) against k (and v) [B, K, S, H]; a clear error
    otherwise."""
    if len(queries) != len(mask.phases):
        raise ValueError(f"{len(mask.phases)} query copies needed for {mask}, got {len(queries)}")
    shape = tuple(queries[0].shape)
    if len(shape) != 4 or k.ndim != 4 or any(tuple(q.shape) != shape for q in queries):
        raise ValueError(f"q must be [B, T, N, H] (every copy alike) and k [B, K, S, H]; got q "
                         f"{[tuple(q.shape) for q in queries]}, k {tuple(k.shape)}")
    B, T, N, H = shape
    K, S = k.shape[1], k.shape[2]
    if (k.shape[0], k.shape[3]) != (B, H):
        raise ValueError(f"k {tuple(k.shape)} does not match q {shape}: it must be [B={B}, K, S, H={H}]")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    if block_k is not None and S % block_k:
        raise ValueError(f"cache length {S} must be a multiple of block_k {block_k}")
    return Dims(B, T, N, H, K, S)


def pad_queries(queries: tuple, block_q: int) -> tuple[tuple, int]:
    """Right-pad the query axis to a multiple of ``block_q``; returns the padded copies and the block count."""
    T = queries[0].shape[1]
    nq = -(-T // block_q)
    pad = nq * block_q - T
    return tuple(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) for q in queries), nq
