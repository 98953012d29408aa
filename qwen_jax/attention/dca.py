"""Dual Chunk Attention (DCA), exactly as Qwen2.5-1M's inference code does it.

Notation: ``C = chunk_size``, ``W = local_size``, ``S = C - W`` (chunk length). Token ``p`` lives in
chunk ``p // S``. Keys are rotated once with ``p mod S`` (and stored so in the cache). A query at
``p`` attends to three disjoint key sets, each with its own rotated copy of the query:

    intra       same chunk, causal            query position  p mod S
    successive  the previous chunk, all keys  query position  min(p mod S + S, C)
    inter       chunks two or more back       query position  min(2S - 1, C)      (a constant)

which is one softmax over the union of the three key sets with three logit definitions (Qwen's code
computes three partial attentions and merges them by log-sum-exp; the result is the same). No
relative distance exceeds ``C``. Logits are scaled by ``s^2 / sqrt(d)`` with the YaRN-style
``s = max(1, 0.1 ln(L / L_orig) + 1)``: keys are multiplied by ``s`` when written (the ``s`` of the
request that wrote them) and the softmax scale is ``s / sqrt(d)`` with ``s`` from the current request
length ``L`` (prompt length at prefill, cache length at decode).

``dca_attention`` is the memory-linear op; ``dca_reference`` materialises [T, S] logits, for tests.
Shapes: q [B, T, N, H] (NOT rotated); k, v [B, K, S_cache, H] (rotated with ``p mod S`` and scaled);
q_positions [B, T]; kv_length [B]; request_lengths [B]. Returns ``(out [B, T, N, H] float32,
lse [B, T, N] float32 natural log)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.masks import MaskSpec, dca_query_positions
from pallas_kernels.reference import masked_attention
from qwen_jax.attention.blockwise import blockwise_attention
from qwen_jax.config import DCAConfig
from qwen_jax.rope import Rope


def mask_spec(dca: DCAConfig) -> MaskSpec:
    return MaskSpec(chunk_len=dca.chunk_len)


def key_positions(positions, dca: DCAConfig):
    """Rotary positions of keys: ``p mod S``."""
    return positions % dca.chunk_len


def rotated_queries(q, q_positions, dca: DCAConfig, rope: Rope) -> tuple:
    """The query rotated for each DCA phase, in ``mask_spec(dca).phases`` order."""
    by_phase = dca_query_positions(q_positions, dca.chunk_size, dca.chunk_len)
    return tuple(rope.apply(q, by_phase[phase]) for phase in mask_spec(dca).phases)


def yarn_scale(request_lengths, dca: DCAConfig):
    """``s = max(1, 0.1 ln(L / original_max_position_embeddings) + 1)`` per row, float32 (1 when the
    config sets no ``original_max_position_embeddings``)."""
    if dca.original_max_position_embeddings <= 0:
        return jnp.ones(request_lengths.shape, jnp.float32)
    ratio = request_lengths.astype(jnp.float32) / dca.original_max_position_embeddings
    return jnp.maximum(1.0, 0.1 * jnp.log(ratio) + 1.0)


def softmax_scale(request_lengths, dca: DCAConfig, head_dim: int):
    """Per-row logit multiplier ``s / sqrt(d)`` [B] float32."""
    return yarn_scale(request_lengths, dca) * head_dim ** -0.5


def attention_inputs(q, q_positions, request_lengths, dca: DCAConfig, rope: Rope):
    """What every attention implementation needs for DCA: ``(queries per phase, mask, scale [B])``."""
    return (rotated_queries(q, q_positions, dca, rope), mask_spec(dca),
            softmax_scale(request_lengths, dca, q.shape[-1]))


def dca_attention(q, k, v, q_positions, kv_length, request_lengths, *, dca: DCAConfig, rope: Rope,
                  block_q: int = 512, block_k: int = 512):
    """DCA over a cache, memory linear in the sequence length (see module docstring for shapes)."""
    queries, mask, scale = attention_inputs(q, q_positions, request_lengths, dca, rope)
    return blockwise_attention(queries, k, v, q_positions, kv_length, scale, mask=mask, block_q=block_q,
                               block_k=block_k)


def dca_reference(q, k, v, q_positions, kv_length, request_lengths, *, dca: DCAConfig, rope: Rope):
    """Dense twin of ``dca_attention``: full [T, S] logits with the three position rules, one softmax."""
    queries, mask, scale = attention_inputs(q, q_positions, request_lengths, dca, rope)
    return masked_attention(queries, k, v, q_positions, kv_length, scale, mask=mask)
