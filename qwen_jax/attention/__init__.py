"""The attention dispatch point: the model calls ``cached_attention`` and nothing else.

Every implementation returns ``(out, lse)`` (lse natural-log float32) so DCA, sparse, Pallas and
sequence-sharded paths compose by log-sum-exp merging. Which one runs is a static ``AttentionSpec``;
an unknown or unsupported choice raises instead of silently falling back.

Implementations:
    ``blockwise``  memory-linear jnp (online softmax over key blocks; the default)
    ``reference``  dense jnp that materialises [T, S] logits (the twin tests compare against)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.masks import MaskSpec
from qwen_jax.attention import dca as dca_ops
from qwen_jax.attention.blockwise import blockwise_attention
from qwen_jax.attention.merge import merge_partials
from qwen_jax.attention.reference import MASK_VALUE, mha_reference
from qwen_jax.config import QwenConfig
from qwen_jax.errors import ConfigError
from qwen_jax.rope import Rope

IMPLEMENTATIONS = ("blockwise", "reference")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static choice of attention path. ``window`` (plain attention only) hides keys ``window`` or more
    positions back: a sliding-window baseline, not a Qwen2.5 feature."""

    impl: str = "blockwise"
    block_q: int = 512
    block_k: int = 512
    window: int | None = None

    def __post_init__(self):
        if self.impl not in IMPLEMENTATIONS:
            raise ConfigError(f"unknown attention implementation {self.impl!r}; choose one of {list(IMPLEMENTATIONS)}")
        if self.block_q < 1 or self.block_k < 1:
            raise ConfigError("attention block sizes must be positive")

    @classmethod
    def of(cls, value: "AttentionSpec | str | None") -> "AttentionSpec":
        if value is None:
            return cls()
        return value if isinstance(value, cls) else cls(impl=str(value))


DEFAULT_SPEC = AttentionSpec()


def key_positions(positions, config: QwenConfig):
    """Positions with which keys are rotated before they are written to the cache."""
    dca = config.dual_chunk_attention_config
    return positions if dca is None else dca_ops.key_positions(positions, dca)


def key_scale(request_lengths, config: QwenConfig):
    """Per-row multiplier of keys written to the cache [B] float32 (DCA's ``s``; 1 without DCA)."""
    dca = config.dual_chunk_attention_config
    if dca is None:
        return jnp.ones(request_lengths.shape, jnp.float32)
    return dca_ops.yarn_scale(request_lengths, dca)


def cached_attention(q, k_cache, v_cache, q_positions, kv_length, request_lengths, *, rope: Rope,
                     config: QwenConfig, spec: AttentionSpec = DEFAULT_SPEC):
    """Causal attention of new queries over the KV cache, with DCA when the config has it.

    q [B, T, N, H] (not yet rotated); k_cache, v_cache [B, K, S, H] with keys rotated by
    ``key_positions`` and scaled by ``key_scale``, stored at slot == position; q_positions [B, T]
    int32; kv_length [B] int32 (slots >= kv_length are never read); request_lengths [B] int32 (the
    whole request's length, for DCA's scale). Returns ``(out [B, T, N, H] q.dtype, lse [B, T, N] f32)``.
    """
    dca = config.dual_chunk_attention_config
    if dca is not None:
        if spec.window is not None:
            raise ConfigError("a sliding window cannot be combined with dual chunk attention")
        args = (q, k_cache, v_cache, q_positions, kv_length, request_lengths)
        if spec.impl == "reference":
            out, lse = dca_ops.dca_reference(*args, dca=dca, rope=rope)
        else:
            out, lse = dca_ops.dca_attention(*args, dca=dca, rope=rope, block_q=spec.block_q, block_k=spec.block_k)
        return out.astype(q.dtype), lse
    q = rope.apply(q, q_positions)
    if spec.impl == "reference":
        out, lse = mha_reference(q, k_cache, v_cache, q_positions, kv_length, causal=True, window=spec.window)
    else:
        scale = jnp.full(q.shape[:1], q.shape[-1] ** -0.5, jnp.float32)
        out, lse = blockwise_attention((q,), k_cache, v_cache, q_positions, kv_length, scale,
                                       mask=MaskSpec(window=spec.window), block_q=spec.block_q, block_k=spec.block_k)
    return out.astype(q.dtype), lse


__all__ = ["AttentionSpec", "DEFAULT_SPEC", "IMPLEMENTATIONS", "cached_attention", "key_positions", "key_scale",
           "mha_reference", "blockwise_attention", "merge_partials", "MASK_VALUE"]
