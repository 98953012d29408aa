"""Dual Chunk Attention (DCA), exactly as Qwen2.5-1M's inference code does it.

Notation: ``C = chunk_size``, ``W = local_size``, ``S = C - W`` (chunk length). Token ``p`` lives in
chunk ``p // S``. Keys are rotated once with ``p mod S`` (and stored so in the cache). A query at
``p`` attends to three disjoint key sets, each with its own rotated copy of the query:

    intra       same chunk, causal            query position  p mod S
    successive  the previous chunk, all keys  query position  min(p mod S + S, C)
    inter       chunks two or more back       query position  min(2S - 1, C)      (a constant)

and the three partial results are merged exactly by log-sum-exp. No relative distance exceeds ``C``.
Logits are scaled by ``s^2 / sqrt(d)`` with the YaRN-style ``s = max(1, 0.1 ln(L / L_orig) + 1)``:
keys are multiplied by ``s`` when written (the ``s`` of the request that wrote them) and the softmax
scale is ``s / sqrt(d)`` with ``s`` from the current request length ``L`` (prompt length at prefill,
cache length at decode).

``dca_attention`` is the memory-linear op (three blockwise passes over disjoint key ranges, merged);
``dca_reference`` materialises [T, S] logits with the three position rules in one softmax, for tests.
Shapes: q [B, T, N, H] (NOT rotated); k, v [B, K, S_cache, H] (rotated with ``p mod S`` and scaled);
q_positions [B, T]; kv_length [B]; request_lengths [B]. Returns ``(out [B, T, N, H] float32,
lse [B, T, N] float32 natural log)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from qwen_jax.attention.blockwise import blockwise_attention
from qwen_jax.attention.merge import merge_partials
from qwen_jax.attention.reference import MASK_VALUE
from qwen_jax.config import DCAConfig
from qwen_jax.rope import Rope

INTRA, SUCCESSIVE, INTER = 0, 1, 2


def key_positions(positions, dca: DCAConfig):
    """Rotary positions of keys: ``p mod S``."""
    return positions % dca.chunk_len


def query_positions(positions, dca: DCAConfig):
    """``(intra, successive, inter)`` rotary positions of queries at ``positions``."""
    S, C = dca.chunk_len, dca.chunk_size
    intra = positions % S
    succ = jnp.minimum(intra + S, C)
    inter = jnp.full_like(positions, min(2 * S - 1, C))
    return intra, succ, inter


def yarn_scale(request_lengths, dca: DCAConfig):
    """``s = max(1, 0.1 ln(L / original_max_position_embeddings) + 1)`` per row, float32 (1 when the
    config sets no ``original_max_position_embeddings``)."""
    if dca.original_max_position_embeddings <= 0:
        return jnp.ones(request_lengths.shape, jnp.float32)
    ratio = request_lengths.astype(jnp.float32) / dca.original_max_position_embeddings
    return jnp.maximum(1.0, 0.1 * jnp.log(ratio) + 1.0)


def relation(q_pos, k_slot, dca: DCAConfig):
    """INTRA / SUCCESSIVE / INTER for each (query, key) pair, or -1 when the key is invisible (later in time)."""
    S = dca.chunk_len
    qc, kc = q_pos[..., :, None] // S, k_slot[..., None, :] // S
    rel = jnp.where(qc == kc, INTRA, jnp.where(qc - kc == 1, SUCCESSIVE, INTER))
    return jnp.where(k_slot[..., None, :] <= q_pos[..., :, None], rel, -1)


def _ranges(dca: DCAConfig):
    """Per relation: visible(q_pos, k_slot) and key_range(first, last) for a block of queries."""
    S = dca.chunk_len

    def visible_for(r):
        return lambda pos, slots: relation(pos, slots, dca) == r

    ranges = {
        INTRA: lambda first, last: ((first // S) * S, last + 1),
        SUCCESSIVE: lambda first, last: ((first // S - 1) * S, (last // S) * S),
        INTER: lambda first, last: (0, (last // S - 1) * S),
    }
    return [(visible_for(r), ranges[r]) for r in (INTRA, SUCCESSIVE, INTER)]


def dca_attention(q, k, v, q_positions, kv_length, request_lengths, *, dca: DCAConfig, rope: Rope,
                  block_q: int = 512, block_k: int = 512):
    """DCA over a cache, memory linear in the sequence length (see module docstring for shapes)."""
    scale = yarn_scale(request_lengths, dca) * q.shape[-1] ** -0.5
    partials = []
    for q_pos, (visible, key_range) in zip(query_positions(q_positions, dca), _ranges(dca)):
        partials.append(blockwise_attention(rope.apply(q, q_pos), k, v, q_positions, kv_length, scale,
                                            visible=visible, key_range=key_range, block_q=block_q, block_k=block_k))
    return merge_partials(partials)


def dca_reference(q, k, v, q_positions, kv_length, request_lengths, *, dca: DCAConfig, rope: Rope):
    """Dense twin of ``dca_attention``: full [T, S] logits with the three position rules, one softmax."""
    B, T, N, H = q.shape
    K, S_cache = k.shape[1], k.shape[2]
    G = N // K
    scale = (yarn_scale(request_lengths, dca) * H ** -0.5)[:, None, None, None, None]
    kf = k.astype(jnp.float32)
    logits = [jnp.einsum("btkgh,bksh->bkgts", rope.apply(q, p).reshape(B, T, K, G, H).astype(jnp.float32), kf,
                         precision="highest") * scale for p in query_positions(q_positions, dca)]
    slots = jnp.broadcast_to(jnp.arange(S_cache, dtype=jnp.int32), (B, S_cache))
    rel = relation(q_positions, slots, dca)
    rel = jnp.where(slots[:, None, :] < kv_length[:, None, None], rel, -1)[:, None, None]  # [B, 1, 1, T, S]
    s = jnp.where(rel == INTRA, logits[0], jnp.where(rel == SUCCESSIVE, logits[1], logits[2]))
    s = jnp.where(rel >= 0, s, MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(rel >= 0, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksh->btkgh", p / jnp.maximum(denom, 1e-30), v.astype(jnp.float32), precision="highest")
    lse = jnp.where(denom[..., 0] > 0, m[..., 0] + jnp.log(jnp.maximum(denom[..., 0], 1e-30)), -jnp.inf)
    return out.reshape(B, T, N, H), lse.transpose(0, 3, 1, 2).reshape(B, T, N)
