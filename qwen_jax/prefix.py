"""Prefix caching: prefill a long shared prompt (a book, a codebase, a 1M-token log) once, then generate after it
as many times as needed, each time prefilling only what follows it.

A ``PrefixCache`` holds the prefix's ids and one KV cache (one row) whose slots ``[0, P)`` hold the prefix, with
room after it. A continuation is prefilled from slot ``P0``, ``P`` rounded down to a multiple of 64, with the
prefix's last ``P - P0`` tokens before its own (``prefill(..., start=P0)``: every prefill chunk then starts on the
64-token grid that the chunks of a whole prompt start on, where the sparse kernels are checked), and decoded after
that, writing only slots ``>= P0`` (the prefix's own values again below ``P``); attention reads a row's slots below
its own length only, so whatever an earlier continuation left past ``P`` is never seen. Every block of decode steps
donates the cache, so the ``PrefixCache`` takes the live buffer after each one: the prefix stays usable after a call that fails
between steps (a callback that raises, an interrupt while tokens stream). One stopped inside the continuation's
prefill, between two layers' programs, can leave it without its cache: the next call says so.

Exactness: with dense attention (DCA included) a continuation gives what the whole prompt gives (the same logits to
float rounding; chunked prefill equals one-shot). Not quite past DCA's ``original_max_position_embeddings``: keys are
stored scaled by the ``s`` of the request that wrote them (``attention.dca``; decode steps' keys likewise), the
prefix's by its own length's where the whole prompt's would have the whole length's: Q tokens after P see the
prefix's keys with attention logits s(P) / s(P + Q) of the whole prompt's, about 1 - ln((P + Q) / P) / 10 (1 - 2e-5
for 64 tokens after 300K; 90 tokens after 203 with it 128: 0.965, and the output logits 1.8e-3 of their scale
away). Sparse prefill estimates its mask per prefill chunk, so after a prefix it equals a chunked prefill whose
chunks start at ``P0``; whether a prefill runs sparse is decided by the length it knows: the prefix's own for the
prefix, prefix plus continuation for the continuation.

The cache holds what the parameters given to ``cache_prefix`` computed: continue it with the same ones (a
``Model`` refuses another model's prefix; the functions cannot tell).

Prompts given with a prefix run one after another over its one cache (a batch would need a copy of the prefix's
cache per row). Each row samples as it would in one batch of the same prompts without a prefix: with its own key
(``sampling.row_keys``: the seed and the row's number).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from qwen_jax import attention
from qwen_jax.cache import PROMPT_BUCKET, KVCache, cache_length, init_cache, padded_prompt_length
from qwen_jax.config import QwenConfig
from qwen_jax.errors import QwenJaxError
from qwen_jax.generation import check_ids, check_length, prefill_progress, prompt_seen, right_padded, warn_past_positions
from qwen_jax.model import DEFAULT_PREFILL_CHUNK, params_dtype, prefill
from qwen_jax.sharding import check_same_on_every_process

DEFAULT_RESERVE = 8192      # slots after the prefix, for a continuation and its new tokens


@dataclasses.dataclass(eq=False)
class PrefixCache:
    """A prefilled prefix: ``tokens`` (its ids) in slots ``[0, len(tokens))`` of ``cache`` (one row)."""
    tokens: tuple[int, ...]
    cache: KVCache
    config: QwenConfig
    mesh: object = None
    owner: object = dataclasses.field(default=None, repr=False)    # the ``Model`` that cached it, if one did
    _seen: object = dataclasses.field(default=None, repr=False)    # its ids as a penalty's [1, V] mask, once made

    def seen(self, spec: attention.AttentionSpec):
        """The prefix's ids as a repetition penalty's [1, V] ``seen`` mask, made at the first call that asks (over
        a 1M-token prefix, ~20 ms a call on a host)."""
        if self._seen is None:
            self._seen = prompt_seen(*right_padded([self.tokens], self.config), self.config, spec)
        return self._seen

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def room(self) -> int:
        """Slots after the prefix, where a continuation and its new tokens must fit (``needed_room``)."""
        return self.cache.max_len - self.length

    @property
    def dtype(self):
        return self.cache.k[0].dtype

    def __repr__(self) -> str:
        return f"PrefixCache({self.length} tokens, room for {self.room} more, {jnp.dtype(self.dtype).name} cache)"


def needed_room(prompt_tokens: int, max_new_tokens: int, prefix_tokens: int | None = None) -> int:
    """Slots a continuation of ``prompt_tokens`` needs after a prefix of ``prefix_tokens`` (None: the most any prefix
    needs): its prefill writes the prefix's tail past the 64-token grid and the prompt, padded to ``PROMPT_BUCKET``,
    its decode steps the new tokens (all but the last, which is never fed back)."""
    tail = PROMPT_BUCKET - 1 if prefix_tokens is None else prefix_tokens % PROMPT_BUCKET
    return max(padded_prompt_length(tail + prompt_tokens) - tail, prompt_tokens + max_new_tokens - 1)


def cache_prefix(params, config: QwenConfig, tokens: Sequence[int], *, reserve: int = DEFAULT_RESERVE,
                 spec: attention.AttentionSpec = attention.DEFAULT_SPEC,
                 prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK, cache_dtype=None,
                 progress: Callable[[int, int], None] | None = None) -> PrefixCache:
    """Prefill the ids ``tokens`` into a cache with ``reserve`` more slots; ``progress(done, total)`` hears of the
    prefill's tokens after each chunk, where it takes more than one."""
    ids = check_ids(tokens, config, "a prefix")
    check_same_on_every_process((ids, reserve), "the prefix's ids")
    if progress is not None and not callable(progress):
        raise QwenJaxError(f"progress must be a function (done, total) or None, got {progress!r}")
    if isinstance(reserve, bool) or not isinstance(reserve, numbers.Integral) or reserve < 1:
        raise QwenJaxError(f"reserve must be an integer >= 1 (slots after the prefix), got {reserve!r}")
    P = len(ids)
    array, lengths = right_padded([ids], config)
    slots, dtype = cache_length(P + max(int(reserve), array.shape[1] - P)), cache_dtype or params_dtype(params)
    check_length(config, prompt_tokens=P, max_new_tokens=int(reserve), batch=1, slots=slots, dtype=dtype,
                 params_dtype=params_dtype(params), mesh=spec.mesh, room="reserve")
    cache = init_cache(config, 1, slots, dtype, mesh=spec.mesh)
    _, cache = prefill(params, array, lengths, cache, config, chunk_size=prefill_chunk_size, spec=spec,
                       progress=prefill_progress(progress, array.shape[1], prefill_chunk_size))
    return PrefixCache(tuple(ids), cache, config, spec.mesh)


def continue_prefix(prefix: PrefixCache, run: Callable, prompts: Sequence[Sequence[int]], *, config: QwenConfig,
                    max_new_tokens: int, spec: attention.AttentionSpec, penalty: bool, on_text=None,
                    progress=None) -> list[list[int]]:
    """``generate_ids(..., prefix=prefix)``: each prompt after the prefix, one after another (``run`` is
    ``generation._generate`` with the generation settings bound); ``prompts``: id lists ``generate_ids`` has
    checked. Everything else is checked here before anything runs."""
    if not isinstance(prefix, PrefixCache):
        raise QwenJaxError(f"prefix must be a PrefixCache (from cache_prefix), got {type(prefix).__name__}")
    if prefix.config != config:
        raise QwenJaxError("this prefix was cached by a model with another configuration")
    if prefix.mesh != spec.mesh:
        raise QwenJaxError("this prefix was cached on another mesh than this generation's")
    if any(a.is_deleted() for a in jax.tree.leaves(prefix.cache)):
        raise QwenJaxError("this prefix's cache is gone (a call was stopped inside its prefill, or the cache was "
                           "donated elsewhere); cache the prefix again")
    longest = max(needed_room(len(p), max_new_tokens, prefix.length) for p in prompts)
    if longest > prefix.room:
        raise QwenJaxError(
            f"the prefix's cache has room for {prefix.room} slots after its {prefix.length} tokens, and a prompt of "
            f"{max(map(len, prompts))} tokens with max_new_tokens={max_new_tokens} needs {longest}; cache the prefix "
            f"with reserve={longest} or more")
    warn_past_positions(config, prompt_tokens=prefix.length + max(map(len, prompts)), max_new_tokens=max_new_tokens,
                        stacklevel=3)
    prefix_seen = prefix.seen(spec) if penalty else None

    def keep(cache):
        prefix.cache = cache

    start = prefix.length - prefix.length % PROMPT_BUCKET           # on the grid whole prompts' chunks start on
    out = []
    for row, prompt in enumerate(prompts):
        tokens, lengths = right_padded([list(prefix.tokens[start:]) + prompt], config)
        seen = None if prefix_seen is None else prefix_seen | prompt_seen(tokens, lengths, config, spec)
        stream = None if on_text is None else (lambda _, text, row=row: on_text(row, text))
        out += run(tokens, lengths + start, prefix.cache, start=start, seen=seen, on_text=stream, progress=progress,
                   keep=keep, rows=[row])
    return out
