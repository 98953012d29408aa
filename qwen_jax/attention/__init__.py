"""The attention dispatch point: the model calls ``cached_attention`` and nothing else.

Every implementation returns ``(out, lse)`` (lse natural-log float32) so DCA, sparse, Pallas and
sequence-sharded paths compose by log-sum-exp merging. Which one runs is a static ``AttentionSpec``;
an unknown or unsupported choice raises instead of silently falling back.

Implementations (every one computes the same masks, ``pallas_kernels.masks``):
    ``blockwise``  memory-linear jnp (online softmax over key blocks; the default on CPUs)
    ``reference``  dense jnp that materialises [T, S] logits (the twin tests compare against)
    ``pallas``     the Pallas flash kernels of ``pallas_kernels`` (GPU: Mosaic GPU, Triton for what it
                   does not cover; TPU: Mosaic TPU; the default on GPUs and TPUs)

With sparse prefill enabled (``attention.sparse``), the same three run the vertical-slash mask:
blockwise and reference in jnp, pallas through ``pallas_kernels.vslash_attention``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels.masks import MaskSpec
from pallas_kernels import vslash
from pallas_kernels.reference import masked_attention
from qwen_jax.attention import dca as dca_ops
from qwen_jax.attention.blockwise import blockwise_attention
from qwen_jax.attention.merge import merge_partials
from qwen_jax.attention import sparse as sparse_ops
from qwen_jax.attention.reference import MASK_VALUE, mha_reference
from qwen_jax.cache import read
from qwen_jax.config import QwenConfig
from qwen_jax.errors import ConfigError
from qwen_jax.rope import Rope

IMPLEMENTATIONS = ("auto", "blockwise", "reference", "pallas")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static choice of attention path.

    ``impl``: ``auto`` (the default: ``pallas`` on GPUs and TPUs, ``blockwise`` elsewhere),
    ``blockwise`` (memory-linear jnp), ``reference`` (dense jnp) or ``pallas`` (the ``pallas_kernels``
    flash kernels; ``kernel`` picks one, ``auto`` by backend, and ``interpret`` emulates it on the CPU). ``block_q`` / ``block_k``: tile sizes (None: the
    implementation's default). ``window`` (plain attention only) hides keys ``window`` or more
    positions back: a sliding-window baseline, not a Qwen2.5 feature.
    """

    impl: str = "auto"
    block_q: int | None = None
    block_k: int | None = None
    window: int | None = None
    kernel: str = "auto"
    interpret: bool = False
    recall: bool = False  # sparse prefill: run dense attention and record the sparse mask's recall per head
    # Which rows' prompts pass the sparse threshold: "mixed" (decided per row inside the step), or, as
    # prefill sets it from the concrete prompt lengths, "all" (tables sized for the budgets only) or
    # "none" (dense prefill, no estimate at all).
    sparse_rows: str = "mixed"
    # Set by prefill (``with_sparse_rows``): every chunk is prefill, a one-token chunk included (the last of a
    # prompt k * chunk + 1 tokens long), so it runs sparse where the prompt passes the threshold; unset, a single
    # query is taken for a decode step, which stays dense.
    prefill: bool = False
    # A device mesh: attention runs sequence-parallel over it (``attention.parallel``); None: one device.
    mesh: Any = None

    def __post_init__(self):
        if isinstance(self.mesh, str):             # "seq=2,tensor=4", as load takes (a Mesh is taken as it is)
            from qwen_jax.sharding import as_mesh
            object.__setattr__(self, "mesh", as_mesh(self.mesh))
        if self.impl not in IMPLEMENTATIONS:
            raise ConfigError(f"unknown attention implementation {self.impl!r}; choose one of {list(IMPLEMENTATIONS)}")
        if (self.block_q is not None and self.block_q < 1) or (self.block_k is not None and self.block_k < 1):
            raise ConfigError("attention block sizes must be positive")
        if self.sparse_rows not in ("mixed", "all", "none"):
            raise ConfigError(f"sparse_rows must be 'mixed', 'all' or 'none', got {self.sparse_rows!r}")
        if self.kernel not in pallas_kernels.IMPLS:
            raise ConfigError(f"unknown attention kernel {self.kernel!r}; choose one of {list(pallas_kernels.IMPLS)}")

    def resolved(self) -> "AttentionSpec":
        """This spec with ``impl="auto"`` replaced by the path for JAX's default backend."""
        if self.impl != "auto":
            return self
        native = jax.default_backend() in ("gpu", "cuda", "tpu") or self.interpret
        return dataclasses.replace(self, impl="pallas" if native else "blockwise")

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
                     config: QwenConfig, spec: AttentionSpec = DEFAULT_SPEC, layer: int = 0,
                     sparse: bool | None = None, head_offset=0, selection: vslash.Selection | None = None):
    """Causal attention of new queries over the KV cache, with DCA when the config has it.

    q [B, T, N, H] (not yet rotated); k_cache, v_cache [B, K, S, H] as stored (an 8-bit cache is widened
    where a path needs it) with keys rotated by ``key_positions`` and scaled by ``key_scale``, stored at
    slot == position; q_positions [B, T]
    int32, contiguous per row; kv_length [B] int32 (slots >= kv_length are never read);
    request_lengths [B] int32 (the whole request's length, for DCA's scale). Returns
    ``(out [B, T, N, H] q.dtype, lse [B, T, N] f32)``.

    With ``sparse_attention_enabled`` in the DCA config, a prefill chunk (``spec.prefill``, or more than one
    query) runs the vertical-slash estimate (``attention.sparse``) with ``layer``'s budgets and attends only to
    the selected keys; decode (one query) stays dense. ``sparse=False`` forces the dense path (the
    recall measurement compares both). ``head_offset``: the global index of q's first head (a device's
    share under sequence-parallel attention; it picks the heads' sparse budgets). ``selection``: a
    sparse selection already estimated for these queries (``sparse_selection``), used instead of
    estimating again.
    """
    dca = config.dual_chunk_attention_config
    H = q.shape[-1]
    spec = spec.resolved()
    if dca is not None:
        if spec.window is not None:
            raise ConfigError("a sliding window cannot be combined with dual chunk attention")
        queries, mask, scale = dca_ops.attention_inputs(q, q_positions, request_lengths, dca, rope)
    else:
        queries = (rope.apply(q, q_positions),)
        mask, scale = MaskSpec(window=spec.window), jnp.full(q.shape[:1], H ** -0.5, jnp.float32)
    if sparse is None:
        sparse = sparse_active(config, q.shape[1], spec)
    if sparse or spec.impl != "pallas":     # the dense Pallas kernels widen an 8-bit cache themselves
        k_cache, v_cache = (read(x, q.dtype) for x in (k_cache, v_cache))
    if sparse:
        if selection is None:
            selection = sparse_selection(q, k_cache, q_positions, request_lengths, rope=rope, config=config,
                                         spec=spec, layer=layer, head_offset=head_offset)
        return _sparse(q, queries, k_cache, v_cache, q_positions, kv_length, scale, mask, spec, selection)
    if spec.impl == "reference":
        out, lse = masked_attention(queries, k_cache, v_cache, q_positions, kv_length, scale, mask=mask)
    elif spec.impl == "blockwise":
        out, lse = blockwise_attention(queries, k_cache, v_cache, q_positions, kv_length, scale, mask=mask,
                                       block_q=spec.block_q or 512, block_k=spec.block_k or 512)
    else:
        try:
            out, lse = pallas_kernels.flash_attention(
                queries, k_cache, v_cache, q_offset=q_positions[:, 0], kv_length=kv_length, scale=scale, mask=mask,
                impl=spec.kernel, block_q=spec.block_q, block_k=spec.block_k, interpret=spec.interpret)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return out.astype(q.dtype), lse


def sparse_active(config: QwenConfig, n_queries: int, spec: AttentionSpec = DEFAULT_SPEC) -> bool:
    """Whether a chunk of ``n_queries`` runs sparse prefill (sparse enabled, a prefill chunk: ``spec.prefill`` or
    more than one query, and not every row known to be under the threshold)."""
    dca = config.dual_chunk_attention_config
    return (dca is not None and dca.sparse_attention_enabled and (spec.prefill or n_queries > 1)
            and spec.sparse_rows != "none")


def with_sparse_rows(spec: AttentionSpec, config: QwenConfig, lengths) -> AttentionSpec:
    """``spec`` with ``sparse_rows`` decided from concrete prompt ``lengths`` (what prefill knows; traced
    lengths, prefill inside a caller's ``jax.jit``, leave it ``mixed``: decided per row inside the step)."""
    from pallas_kernels.shapes import known
    dca = config.dual_chunk_attention_config
    if dca is None or not dca.sparse_attention_enabled:
        return spec
    lengths = known(lengths)
    if lengths is None:
        return dataclasses.replace(spec, prefill=True)
    over = lengths > dca.sparse_attention_threshold
    return dataclasses.replace(spec, sparse_rows="all" if over.all() else "none" if not over.any() else "mixed",
                               prefill=True)


def sparse_selection(q, k_cache, q_positions, request_lengths, *, rope: Rope, config: QwenConfig,
                     spec: AttentionSpec = DEFAULT_SPEC, layer: int = 0, head_offset=0) -> vslash.Selection:
    """The vertical-slash estimate sparse prefill runs for q [B, T, N, H] (not rotated) over the cache
    (``attention.sparse``), with ``layer``'s budgets."""
    dca = config.dual_chunk_attention_config
    k_cache = read(k_cache, q.dtype)
    budgets = sparse_ops.layer_budgets(dca, layer, config.num_attention_heads)
    if spec.mesh is not None:        # heads padded to split over the mesh (parallel.pad_heads): the least budgets
        from qwen_jax.attention.parallel import pad_per_head
        budgets = sparse_ops.Budgets(pad_per_head(budgets.vertical, config, spec.mesh, sparse_ops.MIN_VERTICAL),
                                     pad_per_head(budgets.slash, config, spec.mesh, sparse_ops.MIN_SLASH))
    scale = dca_ops.softmax_scale(request_lengths, dca, q.shape[-1])
    return sparse_ops.estimate(q, k_cache, q_positions[:, 0], request_lengths, scale, dca=dca, rope=rope,
                               budgets=budgets, all_sparse=spec.sparse_rows == "all",
                               head_offset=head_offset)


def sparse_tiles(selection: vslash.Selection, q_positions, kv_length, n_keys: int, config: QwenConfig):
    """Key tiles (64 x 64) a sparse kernel computes for ``selection``, per query head [N] int32."""
    mask = dca_ops.mask_spec(config.dual_chunk_attention_config)
    index = vslash.build_index(selection, q_positions[:, 0], q_positions.shape[1], kv_length, mask, vslash.BAND,
                               n_keys)
    return vslash.tiles_per_head(selection, index, vslash.BAND)


def _sparse(q, queries, k_cache, v_cache, q_positions, kv_length, scale, mask, spec, selection):
    if spec.impl == "blockwise":
        restrict = lambda p, pos, slots: vslash.allows_in_blocks(selection, p, pos, slots)  # noqa: E731
        out, lse = blockwise_attention(queries, k_cache, v_cache, q_positions, kv_length, scale, mask=mask,
                                       block_q=spec.block_q or 512, block_k=spec.block_k or 512, restrict=restrict)
    else:
        impl = "reference" if spec.impl == "reference" else spec.kernel
        if impl == "auto" and spec.interpret:
            impl = "triton"
        try:
            out, lse = pallas_kernels.vslash_attention(
                queries, k_cache, v_cache, selection, q_offset=q_positions[:, 0], kv_length=kv_length, scale=scale,
                mask=mask, impl=impl, block_k=spec.block_k if spec.impl == "pallas" else None,
                interpret=spec.interpret)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return out.astype(q.dtype), lse


__all__ = ["sparse_active", "with_sparse_rows", "sparse_selection", "sparse_tiles", "AttentionSpec", "DEFAULT_SPEC", "IMPLEMENTATIONS", "cached_attention", "key_positions", "key_scale",
           "mha_reference", "blockwise_attention", "merge_partials", "MASK_VALUE"]
