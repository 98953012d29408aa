"""Flax modules of the Qwen2 decoder. Parameters are declared once, with logical axis names.

Einsum letters (STYLE): B batch, T query length, S key length, D model width, N query heads,
K kv heads, H head dim, F MLP width, V vocab. Parameter tree (plain dict once unboxed):

    embed/embedding [V, D]
    layers_{i}/input_norm/scale [D], post_norm/scale [D]
    layers_{i}/attn/{q,k,v}_proj/kernel [D, N|K, H], bias [N|K, H]; o_proj/kernel [N, H, D]
    layers_{i}/mlp/{gate,up}_proj/kernel [D, F]; down_proj/kernel [F, D]
    norm/scale [D]
    lm_head/kernel [V, D]            (only when tie_word_embeddings is false)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.shapes import matmul_precision
from qwen_jax import attention
from qwen_jax.attention import parallel
from qwen_jax.cache import KVCache, write
from qwen_jax.config import QwenConfig
from qwen_jax.errors import ConfigError
from qwen_jax.rope import Rope

Dtype = Any
_normal = nn.initializers.normal(0.02)


def _param(module: nn.Module, name: str, axes: tuple, shape: tuple, init=_normal):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", ("embed",), (x.shape[-1],), nn.initializers.ones)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * xf.astype(self.dtype)  # HF order: cast, then scale


class Projection(nn.Module):
    """y = einsum(x, kernel) (+ bias): one linear layer with a declared logical layout."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    equation: str
    dtype: Dtype
    bias_dims: int = 0  # trailing kernel dims that carry a bias

    @nn.compact
    def __call__(self, x):
        kernel = _param(self, "kernel", self.axes, self.shape)
        y = jnp.einsum(self.equation, x, kernel, precision=matmul_precision(self.dtype))
        if self.bias_dims:
            y = y + _param(self, "bias", self.axes[-self.bias_dims:], self.shape[-self.bias_dims:], nn.initializers.zeros)
        return y


class Attention(nn.Module):
    config: QwenConfig
    dtype: Dtype
    spec: attention.AttentionSpec
    layer: int = 0  # index in the stack (sparse prefill budgets are per layer)

    @nn.compact
    def __call__(self, x, positions, k_cache, v_cache, request_lengths):
        c = self.config
        D, N, K, H = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = Projection((D, N, H), ("embed", "heads", "head_dim"), "btd,dnh->btnh", self.dtype, 2, name="q_proj")(x)
        k = Projection((D, K, H), ("embed", "kv_heads", "head_dim"), "btd,dkh->btkh", self.dtype, 2, name="k_proj")(x)
        v = Projection((D, K, H), ("embed", "kv_heads", "head_dim"), "btd,dkh->btkh", self.dtype, 2, name="v_proj")(x)
        rope = Rope.from_config(c)
        k = rope.apply(k, attention.key_positions(positions, c))
        k = (k.astype(jnp.float32) * attention.key_scale(request_lengths, c)[:, None, None, None]).astype(k.dtype)
        kwargs = dict(rope=rope, config=c, spec=self.spec, layer=self.layer)
        recall = self.spec.recall and attention.sparse_active(c, q.shape[1], self.spec)
        mesh = self.spec.mesh
        _check_cache(k_cache, x.shape[0], c, mesh)
        if recall and mesh is not None:
            raise ConfigError("the attention-recall measurement runs on one device; load without a mesh")

        def local(q, k, v, k_cache, v_cache, positions, request_lengths, head_offset=0):
            k_cache = write(k_cache, k, positions[:, 0])
            v_cache = write(v_cache, v, positions[:, 0])
            kv_length = jnp.max(positions, axis=1).astype(jnp.int32) + 1
            args = (q, k_cache, v_cache, positions, kv_length, request_lengths)   # as stored (fp8 too)
            out, lse = attention.cached_attention(*args, sparse=False if recall else None, head_offset=head_offset,
                                                  **kwargs)
            if recall:
                # Dense attention drives the model; recorded per head: the share of softmax mass the sparse
                # mask keeps, the key tiles a kernel computes for it, and the selection itself.
                sel = attention.sparse_selection(q, args[1], positions, request_lengths, rope=rope, config=c,
                                                 spec=self.spec, layer=self.layer)
                _, lse_sparse = attention.cached_attention(*args, sparse=True, selection=sel, **kwargs)
                valid = (positions < request_lengths[:, None])[..., None] & jnp.isfinite(lse)
                kept = jnp.where(valid, jnp.exp(jnp.minimum(lse_sparse - lse, 0.0)), 0.0)
                tiles = attention.sparse_tiles(sel, positions, kv_length, k_cache.shape[2], c)
                self.sow("intermediates", "recall", (kept.sum((0, 1)), valid.sum((0, 1)), tiles))
                self.sow("intermediates", "selection", sel)
            return out, k_cache, v_cache

        if mesh is None:
            out, k_cache, v_cache = local(q, k, v, k_cache, v_cache, positions, request_lengths)
        else:
            k, v = (parallel.expand_kv(x, c, mesh) for x in (k, v))
            out, k_cache, v_cache = parallel.attend(local, parallel.pad_heads(q, c, mesh), k, v, k_cache, v_cache,
                                                    positions, request_lengths, mesh=mesh)
            out = parallel.unpad_heads(out, c, mesh)
        y = Projection((N, H, D), ("heads", "head_dim", "embed"), "btnh,nhd->btd", self.dtype, name="o_proj")(
            out.astype(self.dtype))
        return y, k_cache, v_cache


def _check_cache(k_cache, batch: int, config: QwenConfig, mesh) -> None:
    """Refuse a cache made for another batch (an XLA vmap error otherwise) or another mesh (or none): with other kv
    heads each device would read and write other heads' slots than its queries' (wrong logits, no error)."""
    if k_cache.shape[0] != batch:
        raise ConfigError(f"the KV cache holds {k_cache.shape[0]} rows, the tokens {batch}: make it with "
                          f"init_cache(config, batch={batch}, ...)")
    want = parallel.cache_kv_heads(config, mesh)
    if k_cache.shape[1] != want:
        where = "over this mesh" if mesh is not None else "without a mesh"
        raise ConfigError(f"the KV cache holds {k_cache.shape[1]} kv heads, attention {where} needs {want}: make it "
                          f"with init_cache(config, batch, max_len, dtype, mesh=) given the attention spec's mesh")


class MLP(nn.Module):
    config: QwenConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        D, F = self.config.hidden_size, self.config.intermediate_size
        gate = Projection((D, F), ("embed", "mlp"), "btd,df->btf", self.dtype, name="gate_proj")(x)
        up = Projection((D, F), ("embed", "mlp"), "btd,df->btf", self.dtype, name="up_proj")(x)
        return Projection((F, D), ("mlp", "embed"), "btf,fd->btd", self.dtype, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: QwenConfig
    dtype: Dtype
    spec: attention.AttentionSpec
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, k_cache, v_cache, request_lengths):
        eps = self.config.rms_norm_eps
        h, k_cache, v_cache = Attention(self.config, self.dtype, self.spec, self.layer, name="attn")(
            RMSNorm(eps, self.dtype, name="input_norm")(x), positions, k_cache, v_cache, request_lengths)
        x = x + h
        x = x + MLP(self.config, self.dtype, name="mlp")(RMSNorm(eps, self.dtype, name="post_norm")(x))
        return x, k_cache, v_cache


class Qwen2(nn.Module):
    """Qwen2 causal LM. ``__call__`` returns final hidden states and the updated cache; ``unembed``
    turns hidden states into float32 logits (kept apart so prefill unembeds only the rows it needs)."""

    config: QwenConfig
    dtype: Dtype = jnp.bfloat16
    spec: attention.AttentionSpec = attention.DEFAULT_SPEC

    def setup(self):
        c = self.config
        self.embed = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embed")
        self.layers = [DecoderLayer(c, self.dtype, self.spec, i, name=f"layers_{i}")
                       for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")
        if not c.tie_word_embeddings:
            self.lm_head = Embed(c.vocab_size, c.hidden_size, self.dtype, name="lm_head", param_name="kernel")

    def __call__(self, tokens, positions, cache: KVCache, request_lengths):
        """tokens, positions [B, T] int32 (positions contiguous per row); request_lengths [B] int32: each
        row's whole request length (prompt length at prefill, cache length at decode; DCA's scale uses it).
        Returns (hidden [B, T, D], cache)."""
        x = parallel.constrain_tokens(self.embed(tokens), self.spec.mesh)
        ks, vs = [], []
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            x, k_cache, v_cache = layer(x, positions, k_cache, v_cache, request_lengths)
            ks.append(k_cache)
            vs.append(v_cache)
        return self.norm(x), KVCache(tuple(ks), tuple(vs))

    def logits(self, tokens, positions, cache: KVCache, request_lengths):
        """Hidden states through ``unembed``: used to initialise every parameter, the head included."""
        hidden, cache = self(tokens, positions, cache, request_lengths)
        return self.unembed(hidden), cache

    def unembed(self, hidden):
        """hidden [..., D] -> logits [..., V] float32."""
        head = self.embed if self.config.tie_word_embeddings else self.lm_head
        return head.attend(hidden)


class Embed(nn.Module):
    num_embeddings: int
    features: int
    dtype: Dtype
    param_name: str = "embedding"

    def setup(self):
        self.table = _param(self, self.param_name, ("vocab", "embed"), (self.num_embeddings, self.features))

    def __call__(self, tokens):
        # an id outside [0, V) gets a NaN row (``take`` wrapped -1 .. -V to the table's end, a plausible token): traced
        # ids cannot be refused, so a wrong one shows as NaN logits in its row (``model.check_token_ids``)
        return self.table.at[tokens].get(mode="fill", wrap_negative_indices=False)

    def attend(self, hidden):
        return jnp.einsum("...d,vd->...v", hidden, self.table, precision=matmul_precision(self.dtype),
                          preferred_element_type=jnp.float32)
