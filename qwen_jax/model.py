"""The pure functions underneath ``qwen_jax.load``: init, forward, prefill and decode step.

All take the parameters as a plain pytree (see ``qwen_jax.layers`` for its layout) and the static
``QwenConfig``; the KV cache is donated to every jitted step and comes back updated. Logits are
float32. Positions are explicit: a row's tokens sit at cache slots equal to their positions.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.shapes import known
from qwen_jax import attention
from qwen_jax.attention import parallel
from qwen_jax.cache import KVCache, cache_length, default_device, init_cache, zeroed
from qwen_jax.config import QwenConfig
from qwen_jax.errors import QwenJaxError
from qwen_jax.layers import DecoderLayer, Embed, Qwen2, RMSNorm
from qwen_jax.sharding import global_array, to_host

DEFAULT_PREFILL_CHUNK = 32768


def _module(config: QwenConfig, dtype, spec: attention.AttentionSpec = attention.DEFAULT_SPEC) -> Qwen2:
    return Qwen2(config, jnp.dtype(dtype), spec)


def params_dtype(params) -> jnp.dtype:
    return jnp.dtype(params["embed"]["embedding"].dtype)


def placed_like(params, tree):
    """``tree`` with its arrays placed on the one device the parameters are committed to (and committed there).

    A jitted step's outputs are committed where its committed inputs (the parameters) are. State carried
    from step to step (the KV cache, the last hidden state) that starts uncommitted (``jnp.zeros``)
    therefore changes placement after the first step, and jit compiles the step again (a program per
    mix of placements it is given); state committed to another device would not run at all. Placing that
    state up front makes the first compilation serve every step. Parameters sharded over a mesh, or not
    committed, leave ``tree`` as it is.
    """
    leaf = jax.tree.leaves(params)[0]
    if not (_placed(leaf) and leaf.committed and len(leaf.sharding.device_set) == 1):
        return tree
    device = next(iter(leaf.sharding.device_set))
    leaves, treedef = jax.tree.flatten(tree)
    away = [i for i, x in enumerate(leaves) if _placed(x) and not (x.committed and x.sharding.device_set == {device})]
    # one device_put for them all: one call per array costs ~0.1 ms each from Python (a cache has 2L)
    for i, x in zip(away, jax.device_put([leaves[i] for i in away], device)):
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


def _placed(x) -> bool:
    """Whether ``x`` is a jax array with a placement: not a tracer (prefill traced inside a caller's ``jax.jit``,
    where jit places the state and a tracer has no ``committed`` or ``sharding`` to ask)."""
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def shardings_of(tree) -> list:
    """The sharding of each leaf of ``tree`` (``None`` for a leaf that is not a placed jax array): for ``relabel``."""
    return [x.sharding if _placed(x) else None for x in jax.tree.leaves(tree)]


def relabel(tree, shardings: list):
    """``tree`` with each array's sharding replaced by the matching one of ``shardings`` (``shardings_of``) where
    the two lay the data out the same way: the buffers are kept, nothing is copied.

    jit keys its programs by how the arguments' shardings are spelled, and a step over a mesh hands its
    carried state back with equivalent shardings spelled differently (``P(None, 'seq')`` for the
    ``P(None, 'seq', None, None)`` it was given, ``P(None, None)`` for ``P()``): relabelled to the first
    step's spelling, the state lets that step's compilation serve every later one.
    """
    def one(x, s):
        if s is None or not _placed(x) or x.sharding == s or not x.sharding.is_equivalent_to(s, x.ndim):
            return x
        return jax.device_put(x, s, donate=True)

    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([one(x, s) for x, s in zip(leaves, shardings)])


def _init_boxed(config: QwenConfig, dtype, rng):
    # The smallest inputs that trace every layer; parameter shapes do not depend on them.
    cache = init_cache(config, 1, 1, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    # (the dense jnp attention: a one-slot cache is no shape for a kernel, and shapes do not depend on it)
    spec = attention.AttentionSpec(impl="reference")
    return _module(config, dtype, spec).init(rng, tokens, tokens, cache, jnp.ones((1,), jnp.int32),
                                       method=Qwen2.logits)["params"]


@functools.lru_cache(maxsize=8)
def _boxed_abstract(config: QwenConfig):
    # Cached per config: a load (the checkpoint's expected paths, then the placement), a load over a mesh, the
    # memory planner and ``param_shardings`` each ask for the shapes and the axes (callers map, never mutate).
    # Every parameter is created in the module's dtype (``layers._param``): float32 here, the dtype asked for set
    # by ``abstract_params``. The decoder layers all hold the same parameters, so a one-layer model is traced and
    # its layer repeated (tracing every layer took ~3.5 s of the real 0.5B's 9 s load on a CPU, 6 s the 14B's);
    # DCA creates no parameter (its per-layer budgets would not fit one layer).
    one = config.replace(num_hidden_layers=1, dual_chunk_attention_config=None)
    boxed = jax.eval_shape(functools.partial(_init_boxed, one, jnp.float32), jax.random.key(0))
    tree = {}
    for name, value in boxed.items():          # the module's order: embed, the layers, norm, lm_head
        if name == "layers_0":
            tree.update((f"layers_{i}", value) for i in range(config.num_hidden_layers))
        else:
            tree[name] = value
    return tree


def logical_axes(config: QwenConfig) -> Any:
    """Pytree (same structure as the params) of logical axis-name tuples, e.g. ("embed", "heads", "head_dim")."""
    return jax.tree.map(lambda b: tuple(b.names), _boxed_abstract(config),
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_params(config: QwenConfig, dtype=jnp.bfloat16) -> Any:
    """Pytree of ``jax.ShapeDtypeStruct``: every parameter's shape and dtype, nothing allocated."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), nn.unbox(_boxed_abstract(config)))


def param_shardings(config: QwenConfig, mesh) -> Any:
    """Pytree of ``NamedSharding`` from the logical axes and ``qwen_jax.sharding.LOGICAL_RULES``."""
    from qwen_jax.sharding import named_sharding
    shapes = abstract_params(config, jnp.float32)
    return jax.tree.map(lambda axes, s: named_sharding(axes, s.shape, mesh), logical_axes(config), shapes,
                        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x))


def init_params(config: QwenConfig, rng: jax.Array, dtype=jnp.float32, mesh=None) -> Any:
    """Random parameters (normal(0.02) weights, zero biases, unit norms), sharded over ``mesh`` if given."""
    dtype = jnp.dtype(dtype)

    def init(key):
        return nn.unbox(_init_boxed(config, dtype, key))

    out_shardings = None if mesh is None else param_shardings(config, mesh)
    return jax.jit(init, out_shardings=out_shardings)(rng)


# ---------------------------------------------------------------------------- forward passes


def _hidden(params, tokens, positions, cache, request_lengths, config, spec):
    return _module(config, params_dtype(params), spec).apply({"params": params}, tokens, positions, cache,
                                                             request_lengths)


def _unembed(params, hidden, config):
    """Logits of ``hidden`` (in the parameters' dtype); ``params`` may be the head's alone (``_head``)."""
    return _module(config, hidden.dtype).apply({"params": params}, hidden, method=Qwen2.unembed)


def forward(params, tokens, positions, cache: KVCache, config: QwenConfig, request_lengths=None,
            spec: attention.AttentionSpec = attention.DEFAULT_SPEC):
    """Full forward of ``tokens`` [B, T] at ``positions`` [B, T] (contiguous per row) over ``cache``.

    ``request_lengths`` [B] (default: last position + 1) is each row's whole request length, which
    sets DCA's logit scale. Writes the new keys/values at their positions and returns
    ``(logits [B, T, V] float32, cache)``. A row with a position outside the cache's slots gets NaN logits
    (``outside_the_cache``); more tokens than slots are refused, and so are token ids outside the vocabulary where
    their values are known (``check_token_ids``).
    """
    check_token_ids(tokens, config.vocab_size)
    return _forward(params, tokens, positions, cache, config, request_lengths, spec)


@functools.partial(jax.jit, static_argnames=("config", "spec"), donate_argnames=("cache",))
def _forward(params, tokens, positions, cache: KVCache, config: QwenConfig, request_lengths, spec):
    _check_fits(tokens.shape[1], cache)
    if request_lengths is None:
        request_lengths = jnp.max(positions, axis=1).astype(jnp.int32) + 1
    hidden, cache = _hidden(params, tokens, positions, cache, request_lengths, config, spec)
    return outside_the_cache(_unembed(params, hidden, config), positions, cache), cache


def decode_step(params, tokens, positions, cache: KVCache, config: QwenConfig,
                spec: attention.AttentionSpec = attention.DEFAULT_SPEC):
    """One token per row: ``tokens``, ``positions`` [B] int32 -> ``(logits [B, V] float32, cache)``. A row whose
    position is outside the cache's slots (decoding past its end) gets NaN logits (``outside_the_cache``); token ids
    outside the vocabulary are refused when they come from the host (``check_token_ids``). A device array's ids are
    not read: that would wait for the previous step on every call (a loop feeding each step's argmax back would lose
    the overlap of one step's dispatch with the last one's work), so a wrong id there gives NaN logits in its row."""
    check_token_ids(tokens, config.vocab_size, read_device=False)
    return _decode_step(params, tokens, positions, cache, config, spec)


@functools.partial(jax.jit, static_argnames=("config", "spec"), donate_argnames=("cache",))
def _decode_step(params, tokens, positions, cache: KVCache, config: QwenConfig, spec):
    logits, cache = decode_logits(params, tokens, positions, cache, config, spec)
    return outside_the_cache(logits, positions[:, None], cache), cache


def check_token_ids(tokens, vocab_size: int, *, read_device: bool = True):
    """Refuse token ids outside ``[0, vocab_size)`` where their values are known: the embedding gives NaN for them
    (``Embed``), which reached the logits with no error. Ids on the host (numpy, lists) cost a min and a max there, a
    concrete jax array one small reduction on its device (and a wait for it). Traced ids (a step inside a caller's
    ``jax.jit``) cannot be read: they pass, and their rows' logits come out NaN; so do device arrays with
    ``read_device=False``."""
    if isinstance(tokens, jax.core.Tracer) or (isinstance(tokens, jax.Array) and not read_device):
        return
    if isinstance(tokens, jax.Array):
        if not tokens.size:
            return
        low, high = (int(x) for x in np.asarray(_id_range(tokens)))
    else:
        # (before any cast to int32, which would wrap an id of 2**32 to 0)
        ids = np.asarray(tokens)
        if not ids.size:
            return
        low, high = ids.min(), ids.max()
    if low < 0 or high >= vocab_size:
        raise QwenJaxError(f"token ids must be in [0, {vocab_size}) (the vocabulary), got {low if low < 0 else high}")


@jax.jit
def _id_range(tokens):
    return jnp.stack([jnp.min(tokens), jnp.max(tokens)])


def outside_the_cache(logits, positions, cache: KVCache):
    """``logits`` [B, ...] with NaN in every row that has a position [B, T] outside the cache's slots ``[0, S)``.

    Positions are traced, so a jitted step cannot refuse them; the cache write (``dynamic_update_slice``) would
    clamp them into the cache instead, overwriting the row's last keys, and the step return plausible logits.
    NaN makes the mistake visible in the row it concerns (``generate`` keeps its positions inside the cache)."""
    outside = jnp.any((positions < 0) | (positions >= cache.max_len), axis=1)
    return jnp.where(outside.reshape((-1,) + (1,) * (logits.ndim - 1)), jnp.nan, logits)


def decode_logits(params, tokens, positions, cache, config, spec):
    """The body of ``decode_step``, unjitted so fused steps (decode + sample) can reuse it. The request
    length of each row is its cache length, ``positions + 1``."""
    hidden, cache = _hidden(params, tokens[:, None], positions[:, None], cache, positions + 1, config, spec)
    return _unembed(params, hidden[:, 0], config), cache


# A prefill chunk runs as separate programs: the embedding, one decoder layer per call, and the final
# norm with the rows it returns. Layers differ only in their parameters and sparse budgets, so every
# layer with the same budgets runs the same compiled program. The 7B-1M's sparse 1M chunk compiled as one
# 28-layer program (each layer compiled on its own) in 101 s on an H100; as three programs in 14 s.


@functools.lru_cache(maxsize=64)
def program_layers(config: QwenConfig) -> tuple[int, ...]:
    """For each layer, the first layer whose compiled prefill program it shares (same sparse budgets)."""
    dca = config.dual_chunk_attention_config
    L = config.num_hidden_layers
    if dca is None or not dca.sparse_attention_enabled or dca.sparse_attention_config is None:
        return (0,) * L
    budgets = [attention.sparse_ops.layer_budgets(dca, i, config.num_attention_heads) for i in range(L)]
    return tuple(budgets.index(b) for b in budgets)


def apply_layer(layer_params, x, start, request_lengths, k_cache, v_cache, config, spec, layer, **apply_kwargs):
    """Decoder layer ``layer`` over a chunk of ``x`` [B, T, D] starting at position ``start``: what the
    prefill's and the recall tool's layer programs compile (``apply_kwargs`` go to ``Module.apply``)."""
    B, T = x.shape[:2]
    positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    return DecoderLayer(config, x.dtype, spec, layer).apply({"params": layer_params}, x, positions, k_cache, v_cache,
                                                           request_lengths, **apply_kwargs)


@functools.partial(jax.jit, static_argnames=("config", "spec"))
def _embed_step(table, tokens, config, spec):
    x = Embed(config.vocab_size, config.hidden_size, table.dtype).apply({"params": {"embedding": table}}, tokens)
    return parallel.constrain_tokens(x, spec.mesh)


@functools.partial(jax.jit, static_argnames=("config", "spec", "layer"), donate_argnames=("x", "k_cache", "v_cache"))
def _layer_step(layer_params, x, start, request_lengths, k_cache, v_cache, config, spec, layer):
    return apply_layer(layer_params, x, start, request_lengths, k_cache, v_cache, config, spec, layer)


@functools.partial(jax.jit, static_argnames=("config", "all_logits"))
def _final_step(params, x, start, request_lengths, last_hidden, config, all_logits):
    """Final norm, then logits at every row (``all_logits``) or the hidden state at each row's last prompt
    token where this chunk holds it (``last_hidden`` elsewhere). ``params``: norm (and head) only."""
    hidden = RMSNorm(config.rms_norm_eps, x.dtype).apply({"params": params["norm"]}, x)
    if all_logits:
        return _unembed(params, hidden, config)
    B, T = x.shape[:2]
    last_positions = request_lengths - 1
    in_chunk = (last_positions >= start) & (last_positions < start + T)
    at = hidden[jnp.arange(B), jnp.clip(last_positions - start, 0, T - 1)]
    return jnp.where(in_chunk[:, None], at, last_hidden)


_STEPS = (_embed_step, _layer_step, _final_step)


def prefill_programs() -> int:
    """How many programs the prefill steps have compiled in this process (to check nothing recompiles)."""
    return sum(step._cache_size() for step in _STEPS)


def _head(params, config: QwenConfig) -> dict:
    keys = ("norm", "embed") if config.tie_word_embeddings else ("norm", "lm_head")
    return {k: params[k] for k in keys}


def through_layers(params, x, cache: KVCache, config: QwenConfig, step):
    """``x`` through every decoder layer, one call each: ``step(layer_params, x, k_cache, v_cache, layer)`` ->
    ``(x, k_cache, v_cache, *extra)``, where ``layer`` is the layer whose program it shares (``program_layers``).
    Returns ``(x, cache, [extra per layer])``; the cache's arrays go to ``step`` one layer at a time."""
    ks, vs, extras = [], [], []
    for i, shared in enumerate(program_layers(config)):
        x, k, v, *extra = step(params[f"layers_{i}"], x, cache.k[i], cache.v[i], shared)
        ks.append(k)
        vs.append(v)
        extras.append(extra)
    return x, KVCache(tuple(ks), tuple(vs)), extras


def _prefill_chunk(params, tokens, start, request_lengths, last_hidden, cache, config, spec, all_logits):
    """One prefill chunk: ``(logits [B, T, V] | last hidden [B, D], cache)``; the cache is donated and comes
    back spelled as it was given (``relabel``)."""
    x = _embed_step(params["embed"]["embedding"], tokens, config, spec)
    # over a mesh a step hands back equivalent shardings spelled differently: relabelled (``relabel``) so
    # one compiled program serves every layer and every chunk
    carried = shardings_of((x, cache.k[0], cache.v[0]))

    def step(layer_params, x, k, v, layer):
        return relabel(_layer_step(layer_params, x, start, request_lengths, k, v, config, spec, layer), carried)

    x, cache, _ = through_layers(params, x, cache, config, step)
    head = _head(params, config) if all_logits else {"norm": params["norm"]}
    return _final_step(head, x, start, request_lengths, last_hidden, config, all_logits), cache


def _chunks(total: int, chunk_size: int):
    if chunk_size < 1:
        raise QwenJaxError(f"prefill chunk size must be positive, got {chunk_size}")
    for begin in range(0, total, chunk_size):
        yield begin, min(begin + chunk_size, total)


def prefill(params, tokens, lengths, cache: KVCache, config: QwenConfig, *, chunk_size: int = DEFAULT_PREFILL_CHUNK,
            spec: attention.AttentionSpec = attention.DEFAULT_SPEC, progress=None, start: int = 0):
    """Prefill right-padded prompts ``tokens`` [B, T] with ``lengths`` [B] in chunks of ``chunk_size`` tokens.

    Each chunk's queries attend to the cache so far; the result equals a one-shot prefill.
    Returns ``(logits [B, V] float32 at each row's last prompt token, cache)``. ``progress`` is
    an optional callable receiving the number of tokens done after each chunk.
    ``start``: the tokens go to positions (and slots) ``[start, start + T)`` after a prefix already in the cache
    (``qwen_jax.prefix``); ``lengths`` count the prefix too. The chunks then begin at ``start``. Token ids outside
    the vocabulary are refused where their values are known (``check_token_ids``).
    """
    check_token_ids(tokens, config.vocab_size)
    tokens = jnp.asarray(tokens, jnp.int32)
    B, T = tokens.shape
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
        raise QwenJaxError(f"start must be an integer >= 0 (the prefix's length), got {start!r}")
    start = int(start)
    _check_fits(start + T, cache)
    _check_lengths(lengths, B, start, T)
    _check_sparse_chunks(config, chunk_size)
    spec = attention.with_sparse_rows(spec, config, lengths)
    lengths = jnp.asarray(lengths, jnp.int32)
    if spec.mesh is not None:   # one global, replicated array over the mesh (every process holds it)
        last_hidden = global_array(np.zeros((B, config.hidden_size), params_dtype(params)),
                                   jax.sharding.NamedSharding(spec.mesh, jax.sharding.PartitionSpec()))
    else:
        last_hidden = zeroed(1, (B, config.hidden_size), params_dtype(params),
                             jax.sharding.SingleDeviceSharding(default_device()))[0]
    cache, last_hidden = placed_like(params, (cache, last_hidden))
    carried = shardings_of(last_hidden)     # (the cache comes back from each chunk spelled as it went in)
    for begin, end in _chunks(T, chunk_size):
        chunk = tokens if end - begin == T else tokens[:, begin:end]   # (a slice is one more dispatch)
        last_hidden, cache = _prefill_chunk(params, chunk, np.int32(start + begin), lengths,
                                            last_hidden, cache, config, spec, False)
        last_hidden = relabel(last_hidden, carried)
        if progress is not None:
            if _placed(last_hidden):
                jax.block_until_ready(last_hidden)   # report work done, not work dispatched
            progress(end)
    return _jit_unembed(_head(params, config), last_hidden, config), cache


@functools.partial(jax.jit, static_argnames=("config",))
def _jit_unembed(head, hidden, config):
    """``_unembed`` of ``hidden`` [B, D] given ``_head``'s parameters only (the whole tree costs its flattening at
    every call)."""
    return _unembed(head, hidden, config)


def prefill_logits(params, tokens, config: QwenConfig, *, chunk_size: int = DEFAULT_PREFILL_CHUNK,
                   spec: attention.AttentionSpec = attention.DEFAULT_SPEC, cache_dtype=None) -> np.ndarray:
    """Logits at every position, computed chunk by chunk through the prefill path: [B, T, V] float32
    (``cache_dtype``: the KV cache's storage, default the parameters' dtype)."""
    check_token_ids(tokens, config.vocab_size)
    tokens = jnp.asarray(tokens, jnp.int32)
    B, T = tokens.shape
    _check_sparse_chunks(config, chunk_size)
    spec = attention.with_sparse_rows(spec, config, [T] * B)
    cache = placed_like(params, init_cache(config, B, cache_length(T), cache_dtype or params_dtype(params),
                                           mesh=spec.mesh))
    out = np.empty((B, T, config.vocab_size), np.float32)
    request_lengths = jnp.full((B,), T, jnp.int32)
    for begin, end in _chunks(T, chunk_size):
        logits, cache = _prefill_chunk(params, tokens[:, begin:end], np.int32(begin), request_lengths, None, cache,
                                       config, spec, True)
        out[:, begin:end] = to_host(logits)
    return out


def _check_sparse_chunks(config: QwenConfig, chunk_size: int):
    dca = config.dual_chunk_attention_config
    if dca is not None and dca.sparse_attention_enabled and chunk_size % 64:
        raise QwenJaxError(f"sparse prefill needs a prefill chunk size that is a multiple of 64, got {chunk_size}")


def _check_lengths(lengths, B: int, start: int, T: int):
    """Refuse prompt lengths that end before the ``T`` tokens after ``start`` begin: such a row got the logits of a
    zero hidden state (all zero), with no error. A length past ``start + T`` is a prompt prefilled in parts (its
    logits come from the part holding its last token; ``bench prefill`` compiles on its first chunk so). Traced
    lengths (prefill inside a caller's ``jax.jit``) cannot be read and pass."""
    known_lengths = known(lengths)
    if known_lengths is None:
        return
    if known_lengths.shape != (B,):
        raise QwenJaxError(f"lengths must be [B] = [{B}], one per row of tokens, got shape {known_lengths.shape}")
    if (known_lengths <= start).any():
        raise QwenJaxError(f"prompt lengths must be at least {start + 1} (each row's last token at or after the first "
                           f"of the {T} tokens given{f', at {start}' if start else ''}), got {known_lengths.tolist()}")


def _check_fits(total: int, cache: KVCache):
    if total > cache.max_len:
        raise QwenJaxError(f"{total} tokens do not fit a KV cache of {cache.max_len} slots")
