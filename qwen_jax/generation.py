"""Batched generation: chunked prefill, then a jitted decode-and-sample step with the cache donated.

Prompts of different lengths are right-padded; each row's tokens sit at cache slots equal to their
positions, so every row decodes at its own position in one static-shape step.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import attention
from qwen_jax.cache import cache_length, init_cache, padded_prompt_length
from qwen_jax.config import QwenConfig
from qwen_jax.errors import QwenJaxError
from qwen_jax.model import DEFAULT_PREFILL_CHUNK, decode_logits, params_dtype, prefill, relabel, shardings_of
from qwen_jax.sampling import Sampling, sample
from qwen_jax.sharding import to_host

GREEDY = Sampling()


@functools.partial(jax.jit, static_argnames=("config", "spec", "sampling"), donate_argnames=("cache",))
def decode_and_sample(params, tokens, positions, cache, key, config: QwenConfig, spec: attention.AttentionSpec,
                      sampling: Sampling):
    """Feed ``tokens`` [B] at ``positions`` [B]; return the next tokens [B] and the cache."""
    logits, cache = decode_logits(params, tokens, positions, cache, config, spec)
    return sample(logits, key, sampling), cache


@functools.partial(jax.jit, static_argnames=("sampling",))
def _first_sample(logits, key, sampling):
    return sample(logits, key, sampling)


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; also say whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopChecker:
    """Per-row text state: detects stop strings and yields the text that is safe to stream."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: Sequence[str]):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.tokens: list[int] = []
        self.emitted = 0
        self.stopped = False

    def text(self) -> str:
        text, found = truncate_at_stop(self.decode(self.tokens) if self.decode else "", self.stop)
        self.stopped = self.stopped or found
        return text

    def push(self, token: int) -> str:
        """Add a token; return the newly streamable text."""
        self.tokens.append(token)
        if self.decode is None:
            return ""
        text = self.text()
        safe = len(text)
        if not self.stopped:
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                safe = len(text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a tail that could still become a stop string
                for n in range(min(len(s) - 1, safe), 0, -1):
                    if text[safe - n:safe] == s[:n]:
                        safe -= n
                        break
        delta = text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def flush(self) -> str:
        text = self.text()
        delta = text[self.emitted:]
        self.emitted = len(text)
        return delta


def generate_ids(params, config: QwenConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: Sampling = GREEDY, seed: int = 0, eos_ids: Sequence[int] = (),
                 stop: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 spec: attention.AttentionSpec = attention.DEFAULT_SPEC,
                 prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK, cache_dtype=None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt (token-id lists). Stops a row at an EOS id or a stop string.

    Returns the generated ids per row (EOS excluded). ``on_text(row, text)`` streams decoded text.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise QwenJaxError("every prompt must have at least one token")
    if max_new_tokens < 1:
        raise QwenJaxError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    T = padded_prompt_length(int(lengths.max()))
    tokens = np.full((B, T), config.pad_token_id or 0, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    cache = init_cache(config, B, cache_length(T, max_new_tokens), cache_dtype or params_dtype(params),
                       mesh=spec.mesh)
    logits, cache = prefill(params, tokens, lengths, cache, config, chunk_size=prefill_chunk_size, spec=spec)
    key = jax.random.key(seed)
    next_tokens = _first_sample(logits, jax.random.fold_in(key, 0), sampling)
    positions = jnp.asarray(lengths)
    carried = shardings_of((next_tokens, cache))     # each step's state spelled as the first step's (one program)
    eos = set(int(e) for e in eos_ids)
    rows = [StopChecker(decode, stop) for _ in range(B)]
    done = np.zeros(B, bool)
    for step in range(max_new_tokens):
        host = to_host(next_tokens)
        for row in np.flatnonzero(~done):
            token = int(host[row])
            if token in eos:
                done[row] = True
                continue
            delta = rows[row].push(token)
            if on_text is not None and delta:
                on_text(row, delta)
            if rows[row].stopped:
                done[row] = True
        if done.all() or step == max_new_tokens - 1:
            break
        next_tokens, cache = relabel(decode_and_sample(params, next_tokens, positions, cache,
                                                       jax.random.fold_in(key, step + 1), config, spec, sampling),
                                     carried)
        positions = positions + 1
    if on_text is not None:
        for row, state in enumerate(rows):
            tail = state.flush()
            if tail:
                on_text(row, tail)
    return [state.tokens for state in rows]
