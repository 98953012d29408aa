"""The attention dispatch point: the model calls ``cached_attention`` and nothing else.

Every implementation returns ``(out, lse)`` (lse natural-log float32) so DCA, sparse, Pallas and
sequence-sharded paths compose by log-sum-exp merging. Which one runs is a static choice
(``impl``); an unknown or unsupported choice raises instead of silently falling back.
"""

from __future__ import annotations

from typing import Callable

from qwen_jax.attention.reference import MASK_VALUE, mha_reference, visible
from qwen_jax.config import QwenConfig
from qwen_jax.errors import ConfigError
from qwen_jax.rope import Rope

# name -> fn(q_rotated, k, v, q_positions, k_positions, kv_length, *, causal, scale) -> (out, lse)
IMPLEMENTATIONS: dict[str, Callable] = {"reference": mha_reference}

DEFAULT_IMPL = "reference"


def get_impl(name: str) -> Callable:
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown attention implementation {name!r}; choose one of {sorted(IMPLEMENTATIONS)}") from None


def key_positions(positions, config: QwenConfig):
    """Positions with which keys are rotated before they are written to the cache."""
    return positions


def cached_attention(q, k_cache, v_cache, q_positions, kv_length, *, rope: Rope, config: QwenConfig,
                     impl: str = DEFAULT_IMPL):
    """Causal attention of new queries over the KV cache.

    q [B, T, N, H] (not yet rotated); k_cache, v_cache [B, S, K, H] with keys already rotated by
    ``key_positions`` and stored at slot == position; q_positions [B, T] int32; kv_length [B]
    int32 (slots >= kv_length are never read). Returns ``(out [B, T, N, H], lse [B, T, N] f32)``.
    """
    fn = get_impl(impl)
    return fn(rope.apply(q, q_positions), k_cache, v_cache, q_positions, None, kv_length, causal=True)


__all__ = ["cached_attention", "key_positions", "mha_reference", "visible", "MASK_VALUE", "IMPLEMENTATIONS",
           "DEFAULT_IMPL", "get_impl"]
