"""Sequence-parallel attention over a device mesh: tokens split over ``seq`` outside attention, heads inside.

Outside attention every op is token-wise (norms, projections, MLP), so each device works on its
1/seq share of the chunk's tokens. Attention needs every key of a head, so around it one all-to-all
over ``seq`` trades the token split for a head split (the DeepSpeed-Ulysses exchange): each device
then holds all of the chunk's queries for N / (tensor x seq) heads, the KV cache of exactly those
heads' kv groups (the cache is sharded by heads over ``tensor`` and ``seq``, every slot of a head on
one device), and runs the single-device attention unchanged: any implementation, DCA, sparse
prefill, every mask computed from the tokens' original positions. A second all-to-all returns the
outputs to the token split.

Why heads and not a ring of K/V blocks: per layer and chunk the exchange moves the chunk's q, k, v
and output (T x (2N + 2K) x H values), independent of how long the cache already is, while a ring
moves the whole cache's K/V (a 1M cache: 1M x 2K x H) and needs causal load balancing; here every
device does the same work by construction, and decode reads a head-sharded cache with no merge.
The price: when tensor x seq exceeds the kv heads K, each kv head is stored once per device group that
needs it (``cache_kv_heads``); and where the query heads do not split evenly (Qwen2.5-7B's 28 over 8
devices), each kv group's query heads are padded with zero heads inside attention until they do
(``attention_heads``; 28 -> 32 over 8 devices: a seventh more attention work), whose outputs are
dropped before the output projection.

A chunk whose length does not split over ``seq`` (decode's single token, odd tails) skips the
exchange: every device sees the chunk's tokens and takes its heads' slice.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding

from qwen_jax.cache import CACHE_AXES
from qwen_jax.config import QwenConfig
from qwen_jax.sharding import SEQ, attention_degree, attention_shard_index, logical_to_spec


def check_mesh(config: QwenConfig, mesh) -> None:
    """Warn when the query heads must be padded to split over the mesh's ``tensor`` x ``seq``."""
    N, padded = config.num_attention_heads, attention_heads(config, mesh)
    if padded != N:
        warnings.warn(f"{N} attention heads do not split over tensor x seq = {attention_degree(mesh)} devices: "
                      f"attention runs {padded} heads, zero heads padding each kv group "
                      f"({padded / N - 1:.0%} more attention work)", stacklevel=1)   # one place: shown once


def cache_kv_heads(config: QwenConfig, mesh) -> int:
    """KV heads the cache stores: K, or with more attention shards than K, each kv head once per shard
    that needs it (lcm(K, tensor x seq))."""
    return math.lcm(config.num_key_value_heads, attention_degree(mesh))


def _groups(config: QwenConfig, mesh) -> tuple[int, int, int]:
    """(K, G, G'): the kv heads, the config's query heads per kv group, and the query heads per group
    inside attention: G rounded up to a multiple of the shards each kv head is split over
    (``cache_kv_heads / K``), so that every shard gets whole heads of one kv head (or whole groups)."""
    K = config.num_key_value_heads
    G, r = config.num_attention_heads // K, cache_kv_heads(config, mesh) // K
    return K, G, -(-G // r) * r


def attention_heads(config: QwenConfig, mesh) -> int:
    """Query heads inside attention over ``mesh``: K x G' (``_groups``; the config's N where it splits)."""
    K, _, Gp = _groups(config, mesh)
    return K * Gp


def pad_heads(q, config: QwenConfig, mesh):
    """q [B, T, N, H] -> [B, T, attention_heads, H]: each kv group's heads, then zero heads to fill it."""
    K, G, Gp = _groups(config, mesh)
    if Gp == G:
        return q
    B, T, _, H = q.shape
    q = jnp.pad(q.reshape(B, T, K, G, H), [(0, 0), (0, 0), (0, 0), (0, Gp - G), (0, 0)])
    return q.reshape(B, T, K * Gp, H)


def unpad_heads(out, config: QwenConfig, mesh):
    """The inverse of ``pad_heads``: the padding heads' outputs dropped."""
    K, G, Gp = _groups(config, mesh)
    if Gp == G:
        return out
    B, T, _, H = out.shape
    return out.reshape(B, T, K, Gp, H)[:, :, :, :G].reshape(B, T, K * G, H)


def pad_per_head(values, config: QwenConfig, mesh, filler: int) -> tuple:
    """Per-head values (N of them) laid out as ``pad_heads`` lays out the heads; padding heads get ``filler``."""
    K, G, Gp = _groups(config, mesh)
    return tuple(v for g in range(K) for v in tuple(values[g * G:(g + 1) * G]) + (filler,) * (Gp - G))


def expand_kv(x, config: QwenConfig, mesh):
    """[B, T, K, H] -> [B, T, cache_kv_heads, H]: head j of the result is kv head j // r."""
    r = cache_kv_heads(config, mesh) // config.num_key_value_heads
    return x if r == 1 else jnp.repeat(x, r, axis=2)


def constrain_tokens(x, mesh):
    """Activations [B, T, ...] split over ``batch`` and ``seq`` (when the sizes divide)."""
    if mesh is None:
        return x
    logical = ("batch", "seq") + (None,) * (x.ndim - 2)
    return lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, x.shape, mesh)))


def attend(local, q, k, v, k_cache, v_cache, positions, request_lengths, *, mesh):
    """Run ``local`` (the single-device attention, cache write included) on every device's heads.

    ``local(q, k, v, k_cache, v_cache, positions, request_lengths, head_offset) -> (out, k_cache,
    v_cache)`` sees q [b, T, n, H], k, v [b, T, k', H], the cache shard [b, k', S, H], all positions,
    and ``head_offset``, the global index of its first query head. q [B, T, N, H] (N: ``attention_heads``,
    as ``pad_heads`` returns it); k, v [B, T, K', H] already expanded by ``expand_kv``; caches [B, K', S, H].
    Returns ``(out [B, T, N, H], k_cache, v_cache)``.
    """
    B, T, N, _ = q.shape
    seq = mesh.shape.get(SEQ, 1)
    split_tokens = T % seq == 0
    t_axis = "seq" if split_tokens else None
    q_spec = logical_to_spec(("batch", t_axis, "heads", "head_dim"), q.shape, mesh)
    kv_spec = logical_to_spec(("batch", t_axis, "heads", "head_dim"), k.shape, mesh)
    cache_spec = logical_to_spec(CACHE_AXES, k_cache.shape, mesh)
    row_spec = logical_to_spec(("batch",), (B,), mesh)
    pos_spec = logical_to_spec(("batch", None), positions.shape, mesh)
    n_local = N // attention_degree(mesh)

    def body(q, k, v, k_cache, v_cache, positions, request_lengths):
        if split_tokens:
            q, k, v = (lax.all_to_all(x, SEQ, 2, 1, tiled=True) for x in (q, k, v))
        else:
            s = lax.axis_index(SEQ)
            q, k, v = (lax.dynamic_slice_in_dim(x, s * (x.shape[2] // seq), x.shape[2] // seq, axis=2)
                       for x in (q, k, v))
        out, k_cache, v_cache = local(q, k, v, k_cache, v_cache, positions, request_lengths,
                                      attention_shard_index() * n_local)
        if split_tokens:
            out = lax.all_to_all(out, SEQ, 1, 2, tiled=True)
        else:
            out = lax.all_gather(out, SEQ, axis=2, tiled=True)
        return out, k_cache, v_cache

    return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, cache_spec, cache_spec, pos_spec,
                                                    row_spec),
                         out_specs=(q_spec, cache_spec, cache_spec), check_vma=False)(
        q, k, v, k_cache, v_cache, positions, request_lengths)
