"""Batched generation: chunked prefill, then jitted blocks of decode-and-sample steps with the cache donated.

Prompts of different lengths are right-padded; each row's tokens sit at cache slots equal to their
positions, so every row decodes at its own position in one static-shape step.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import attention
from qwen_jax.cache import cache_length, init_cache, padded_prompt_length
from qwen_jax.config import QwenConfig
from qwen_jax.errors import QwenJaxError
from qwen_jax.model import DEFAULT_PREFILL_CHUNK, decode_logits, params_dtype, prefill, relabel, shardings_of
from qwen_jax.sampling import Sampling, fold_step, mark_seen, row_keys, sample, seen_in_prompts
from qwen_jax.sharding import check_same_on_every_process, to_host

GREEDY = Sampling()


# Decode steps per program in ``generate``: the host's cost of launching a step (its arguments, the CUDA graph of
# ~500 kernels: ~2.6 ms for the 0.5B on an H200's host, twice the card's 1.3 ms of work) is paid once for this many
# tokens (the 0.5B's ``generate`` decoded 365 tokens/s one step a program, 719 in blocks of 8; 8, 16 and 32 steps
# a program measured alike). The call returns before its steps are done (an 8-step block: after 2-5 ms of its
# 12), so the next block is sent before this one's tokens are read; past the last token asked for, or past the
# block where every row stopped, up to 2 * DECODE_BLOCK - 1 steps are computed for nothing.
DECODE_BLOCK = 8


@functools.partial(jax.jit, static_argnames=("config", "spec", "sampling"), donate_argnames=("cache", "seen"))
def decode_and_sample(params, tokens, positions, cache, key, config: QwenConfig, spec: attention.AttentionSpec,
                      sampling: Sampling, seen=None):
    """Feed ``tokens`` [B] at ``positions`` [B]; return the next tokens [B], the cache and ``seen``.

    With a repetition penalty, ``seen`` [B, V] bool holds the ids so far but ``tokens``; it is marked with
    ``tokens`` and penalises the logits. Without one it is None, and the step is the plain one.
    """
    return _decode_and_sample(params, tokens, positions, cache, key, config, spec, sampling, seen)


def _decode_and_sample(params, tokens, positions, cache, key, config, spec, sampling, seen):
    logits, cache = decode_logits(params, tokens, positions, cache, config, spec)
    if seen is not None:
        seen = _replicated(mark_seen(seen, tokens), spec.mesh)
    return _replicated(sample(logits, key, sampling, seen), spec.mesh), cache, seen


@functools.partial(jax.jit, static_argnames=("config", "spec", "sampling", "steps"),
                   donate_argnames=("cache", "seen"))
def decode_block(params, tokens, positions, cache, key, first, config: QwenConfig, spec: attention.AttentionSpec,
                 sampling: Sampling, seen=None, steps: int = DECODE_BLOCK):
    """``steps`` ``decode_and_sample`` steps in one program: feed ``tokens`` [B] at ``positions`` [B], then each
    step's sample at the next position; step ``i`` samples with ``key`` (one, or one per row [B]) folded with
    ``first + i`` (``sampling.fold_step``).

    Returns ``(sampled [steps, B], the last of them [B], cache, seen)``. A step whose position is past the
    cache's last slot (only steps past the last token anyone asked for) reads and writes that last slot instead.
    """
    last_slot = cache.max_len - 1

    def step(carry, i):
        tokens, positions, cache, seen = carry
        tokens, cache, seen = _decode_and_sample(params, tokens, jnp.minimum(positions, last_slot), cache,
                                                 fold_step(key, first + i), config, spec, sampling, seen)
        return (tokens, positions + 1, cache, seen), tokens

    (tokens, _, cache, seen), sampled = jax.lax.scan(step, (tokens, positions, cache, seen), jnp.arange(steps))
    if seen is not None:
        seen = _replicated(seen, spec.mesh)
    # laid out as the first sample's, whole on every device (a scan's carry can come back split over ``data``)
    return _replicated(sampled, spec.mesh), _replicated(tokens, spec.mesh), cache, seen


def _replicated(x, mesh):
    """``x`` whole on every device of ``mesh`` (if any): the sampled tokens [B] and the penalty's ``seen`` [B, V]
    are small, and one fixed layout in and out of every step lets one compiled step serve them all (over a
    ``data`` axis the tokens otherwise came back split, unlike the first step's, and the step compiled twice)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


@functools.partial(jax.jit, static_argnames=("vocab_size", "mesh"))
def _prompt_seen(tokens, lengths, vocab_size: int, mesh):
    return _replicated(seen_in_prompts(tokens, lengths, vocab_size), mesh)


@functools.partial(jax.jit, static_argnames=("sampling", "mesh"))
def _first_sample(logits, key, sampling, seen=None, mesh=None):
    return _replicated(sample(logits, key, sampling, seen), mesh)


def stop_strings(stop) -> list[str]:
    """``stop`` as a list of strings: None, one string, or an iterable of strings."""
    if stop is None or isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, Iterable) and not isinstance(stop, (bytes, Mapping)):
        stop = list(stop)
        if all(isinstance(s, str) for s in stop):
            return stop
    raise QwenJaxError(f"stop must be a string or a list of strings, got {stop!r}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_ids(tokens, config: QwenConfig, what: str) -> list[int]:
    """``tokens`` as a list of ints, refused in one line unless a non-empty sequence of ids in the vocabulary."""
    ids = list(tokens) if isinstance(tokens, (list, tuple, np.ndarray)) else None
    if not ids or not all(_is_int(t) for t in ids):
        raise QwenJaxError(f"{what} must be a non-empty list of token ids")
    if min(ids) < 0 or max(ids) >= config.vocab_size:
        raise QwenJaxError(f"{what}: token ids must be in [0, {config.vocab_size})")
    return [int(t) for t in ids]


def check_generation_args(*, max_new_tokens, seed, on_text=None, progress=None) -> None:
    """Refuse a ``max_new_tokens``, ``seed``, ``on_text`` or ``progress`` generation cannot use, before anything
    runs."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise QwenJaxError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not _is_int(seed) or not 0 <= seed < 2 ** 32:
        raise QwenJaxError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if on_text is not None and not callable(on_text):
        raise QwenJaxError(f"on_text must be a function (row, text) or None, got {on_text!r}")
    if progress is not None and not callable(progress):
        raise QwenJaxError(f"progress must be a function (done, total) or None, got {progress!r}")


def warn_past_positions(config: QwenConfig, *, prompt_tokens: int, max_new_tokens: int, stacklevel: int = 2):
    """Warn past ``max_position_embeddings`` without DCA (only a warning: a model may still run past it; with DCA
    it is what the model is configured for, so no warning). ``stacklevel`` as ``warnings.warn``'s, from the caller."""
    used = prompt_tokens + max_new_tokens - 1           # the last new token is sampled, never fed back
    if used > config.max_position_embeddings and config.dual_chunk_attention_config is None:   # DCA: made for it
        warnings.warn(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) runs the model at {used} "
                      f"positions, more than its max_position_embeddings ({config.max_position_embeddings}); output "
                      f"quality may degrade past it", stacklevel=stacklevel + 1)


def special_stops(stop: Sequence[str], special: Mapping[str, int]) -> list[int]:
    """The ids of the stop strings that are a special token's text (``Tokenizer.special_tokens``): decoded text
    skips special tokens, so such a stop string is the token itself, and generation stops at it as at EOS (the
    string also stays a stop string, for the text spelled in ordinary tokens). A stop string that holds a special
    token among other text could never match: refused."""
    ids = []
    for s in stop:
        if s in special:
            ids.append(special[s])
            continue
        inside = next((t for t in special if t and t in s), None)
        if inside is not None:
            raise QwenJaxError(f"stop string {s!r} holds the special token {inside!r}, which the decoded text never "
                               f"does (special tokens are skipped), so it would never match; pass {inside!r} alone to "
                               f"stop at that token")
    return ids


def check_length(config: QwenConfig, *, prompt_tokens: int, max_new_tokens: int, batch: int, slots: int, dtype,
                 params_dtype, mesh=None, room: str = "max_new_tokens") -> None:
    """Refuse a KV cache of ``slots`` slots the device (on CPU: the host) cannot hold, naming the numbers
    (``room``: what the slots past the prompt are for); ``warn_past_positions`` for a generation."""
    from qwen_jax import memory
    if room == "max_new_tokens":
        warn_past_positions(config, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, stacklevel=3)
    p = memory.plan(config, tokens=slots, batch=batch, mesh=mesh, dtype=params_dtype, cache_dtype=dtype, sparse=False)
    cache, weights = p.cache, p.weights           # per device; the weights are resident already
    capacity, holder, copies = memory.device_capacity(), "the device holds", 0
    narrow = np.dtype(params_dtype).itemsize < 4
    if capacity is None:                 # CPU: every (simulated) device's share lives in the host's memory
        devices = max(1, int(np.prod(list(memory.mesh_sizes(mesh).values()))))
        cache, weights = cache * devices, weights * devices
        capacity, holder = memory.host_memory(), "this host's memory holds"
        # XLA's CPU dots read float32: a step's program holds a float32 copy of narrower weights, and of an 8-bit
        # cache (every layer's, widened at once): compiled decode steps of the 7B at 32K (bf16) and 1M (fp8 cache)
        # peaked at 2.7x and 3.3x weights + cache
        copies = (weights * 4 // np.dtype(params_dtype).itemsize if narrow else 0) + \
            (cache * 4 if np.dtype(dtype).itemsize == 1 else 0)
    if capacity is not None and cache + weights + copies > capacity:
        extra = f" and {copies / memory.GiB:.1f} GiB of float32 copies a CPU makes" if copies else ""
        raise QwenJaxError(
            f"prompt ({prompt_tokens} tokens) + {room} ({max_new_tokens}) needs a KV cache of {slots} slots "
            f"x {batch} row(s) = {cache / memory.GiB:.1f} GiB, which with the {weights / memory.GiB:.1f} GiB of "
            f"weights{extra} is more than the {capacity / memory.GiB:.1f} GiB {holder}; lower {room} (or shorten "
            f"the prompt{', or load in float32' if copies and narrow else ''})")


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; also say whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def streamable_end(text: str, stop: Sequence[str]) -> int:
    """How much of a row's text, no stop string in it yet, may be streamed: not an incomplete multi-byte
    character at its end (U+FFFD until the rest comes), nor a tail that could still begin a stop string."""
    safe = len(text.rstrip("\ufffd"))
    for s in stop:
        for n in range(min(len(s) - 1, safe), 0, -1):
            if text[safe - n:safe] == s[:n]:
                safe -= n
                break
    return safe


class StopChecker:
    """Per-row text state: detects stop strings and yields the text that is safe to stream.

    The text grows as vLLM's incremental detokenizer grows it: each token decodes only the tokens since the
    last whole character, after the few before them for context (a byte-level decoder's text of a token list
    is its pieces' bytes decoded in turn, so the text so far never changes), and stop strings are looked for
    only where the new text could complete one. A row's cost per token stays flat (~0.004 ms); decoding the
    whole row at every token cost 1.4 ms a token at 8192 tokens and 6.2 ms at 32768 with Qwen's tokenizer
    (``qwen-jax bench stream``), as much as the 7B's whole decode step on an H100.
    """

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: Sequence[str]):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.tokens: list[int] = []
        self.emitted = 0
        self.stopped = False
        self._whole = ""          # the text of tokens[:_read], which ends on a whole character
        self._context = self._read = 0     # the window decoded next starts at _context
        self._clear = 0           # _whole[:_clear] holds no stop string
        self._longest = max(map(len, self.stop), default=0)

    def _grow(self) -> str:
        """Decode the tokens after ``_read``; return their text (it may end in U+FFFD, a partial character)."""
        if self._read == len(self.tokens):
            return ""
        head = self.decode(self.tokens[self._context:self._read])
        window = self.decode(self.tokens[self._context:])
        new = window[len(head):]
        if new and not new.endswith("\ufffd"):
            self._whole += new
            self._context, self._read = self._read, len(self.tokens)
            return ""
        return new

    def text(self) -> str:
        """The row's text so far, cut before the first stop string (``stopped`` says whether one was found)."""
        if self.decode is None:
            return ""
        pending = self._grow()
        text = self._whole + pending if pending else self._whole
        start = max(0, self._clear - self._longest + 1)    # a stop string starting earlier would have been found
        found = [k for k in (text.find(s, start) for s in self.stop) if k >= 0]
        if found:
            self.stopped = True
            return text[:min(found)]
        self._clear = len(self._whole)
        return text

    def push(self, token: int) -> str:
        """Add a token; return the newly streamable text."""
        self.tokens.append(token)
        if self.decode is None:
            return ""
        text = self.text()
        safe = len(text) if self.stopped else streamable_end(text, self.stop)
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
                 prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK, cache_dtype=None,
                 progress: Callable[[int, int], None] | None = None, prefix=None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt (token-id lists). Stops a row at an EOS id or a stop string.

    Returns the generated ids per row (EOS excluded). ``on_text(row, text)`` streams decoded text;
    ``progress(done, total)`` hears of the prefill's tokens after each chunk, where it takes more than one.
    ``prefix``: a ``qwen_jax.prefix.PrefixCache``; each prompt then continues it (one row after another over
    the prefix's one cache, see ``qwen_jax.prefix``) and ``cache_dtype`` is the prefix's.
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise QwenJaxError("prompts must be a non-empty list of token-id lists")
    if any(isinstance(p, (list, tuple, np.ndarray)) and len(p) == 0 for p in prompts):
        raise QwenJaxError("every prompt must have at least one token")
    prompts = [check_ids(p, config, f"prompt {i}") for i, p in enumerate(prompts)]
    check_generation_args(max_new_tokens=max_new_tokens, seed=seed, on_text=on_text, progress=progress)
    stop = stop_strings(stop)
    check_same_on_every_process((prompts, max_new_tokens, sampling, seed, sorted(int(e) for e in eos_ids), stop),
                                "the prompts or generation settings")
    if stop and decode is None:
        raise QwenJaxError("stop strings are looked for in the decoded text: pass decode= (the tokenizer's decode) "
                           "with stop=")
    run = functools.partial(_generate, params, config, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                            eos_ids=eos_ids, stop=stop, decode=decode, spec=spec, chunk_size=prefill_chunk_size)
    if prefix is not None:
        from qwen_jax.prefix import continue_prefix
        return continue_prefix(prefix, run, prompts, config=config, max_new_tokens=max_new_tokens, spec=spec,
                               penalty=sampling.repetition_penalty != 1.0, on_text=on_text, progress=progress)
    B = len(prompts)
    tokens, lengths = right_padded(prompts, config)
    slots, dtype = cache_length(tokens.shape[1], max_new_tokens), cache_dtype or params_dtype(params)
    check_length(config, prompt_tokens=int(lengths.max()), max_new_tokens=max_new_tokens, batch=B, slots=slots,
                 dtype=dtype, params_dtype=params_dtype(params), mesh=spec.mesh)
    cache = init_cache(config, B, slots, dtype, mesh=spec.mesh)
    # a repetition penalty counts the ids of each row so far, prompt padding excluded; none: no state at all
    seen = None if sampling.repetition_penalty == 1.0 else prompt_seen(tokens, lengths, config, spec)
    return run(tokens, lengths, cache, seen=seen, on_text=on_text, progress=progress)


def prompt_seen(tokens, lengths, config: QwenConfig, spec: attention.AttentionSpec):
    """[B, V] bool: the ids in each row's first ``lengths`` tokens (a repetition penalty's starting state)."""
    return _prompt_seen(tokens, lengths, config.vocab_size, spec.mesh)


def right_padded(prompts: Sequence[Sequence[int]], config: QwenConfig) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as one right-padded int32 array [B, T] (T a multiple of ``PROMPT_BUCKET``), and their lengths."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.full((len(prompts), padded_prompt_length(int(lengths.max()))), config.pad_token_id or 0, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    return tokens, lengths


def prefill_progress(progress: Callable[[int, int], None] | None, total: int, chunk_size: int):
    """``prefill``'s ``progress(done)`` for a ``progress(done, total)`` that hears only of prompts longer than one
    chunk (None otherwise)."""
    return None if progress is None or total <= chunk_size else (lambda done: progress(done, total))


def _generate(params, config: QwenConfig, tokens, lengths, cache, *, max_new_tokens: int, sampling: Sampling,
              seed: int, eos_ids, stop, decode, spec, chunk_size: int, on_text, progress, seen, start: int = 0,
              keep: Callable | None = None, rows: Sequence[int] | None = None) -> list[list[int]]:
    """Prefill ``tokens`` [B, T] at positions ``[start, start + T)`` (rows ``lengths`` long, counting the ``start``
    slots already filled), then decode. ``seen``: a repetition penalty's ids so far (``prompt_seen``), or None
    without one. ``keep(cache)`` hears of the live cache after the prefill and after each block of decode steps
    (every block donates the one before). ``rows``: the rows' numbers among the prompts of the call (their keys,
    ``sampling.row_keys``; default ``0 .. B - 1``)."""
    B, T = tokens.shape
    logits, cache = prefill(params, tokens, lengths, cache, config, chunk_size=chunk_size, spec=spec,
                            progress=prefill_progress(progress, T, chunk_size), start=start)
    keep = keep or (lambda _: None)
    keep(cache)
    key = row_keys(seed, range(B) if rows is None else rows)
    next_tokens = _first_sample(logits, fold_step(key, 0), sampling, seen, spec.mesh)
    lengths = np.asarray(lengths)
    carried = shardings_of((next_tokens, cache, seen))   # each block's state spelled as the first's (one program)
    eos = set(int(e) for e in eos_ids)
    rows = [StopChecker(decode, stop) for _ in range(B)]
    done = np.zeros(B, bool)
    block, taken, fed = next_tokens[None], 0, 1    # tokens to read [n, B]; tokens read; tokens fed back (or to be)
    while True:
        current = block
        if fed < max_new_tokens:
            # The next block goes to the device before this one's tokens are read: the host's read, stop checks
            # and next dispatch overlap the device's steps instead of adding to them. When every row stops in
            # this block, the next was computed for nothing; nothing of it is returned.
            block, next_tokens, cache, seen = decode_block(params, next_tokens, jnp.asarray(lengths + fed - 1),
                                                           cache, key, np.int32(fed), config, spec, sampling, seen,
                                                           steps=DECODE_BLOCK)
            next_tokens, cache, seen = relabel((next_tokens, cache, seen), carried)
            keep(cache)
            fed += DECODE_BLOCK
        for tokens_now in to_host(current)[:max_new_tokens - taken]:
            taken += 1
            for row in np.flatnonzero(~done):
                token = int(tokens_now[row])
                if token in eos:
                    done[row] = True
                    continue
                delta = rows[row].push(token)
                if on_text is not None and delta:
                    on_text(int(row), delta)
                if rows[row].stopped:
                    done[row] = True
        if done.all() or taken == max_new_tokens:
            break
    if on_text is not None:
        for row, state in enumerate(rows):
            tail = state.flush()
            if tail:
                on_text(row, tail)
    return [state.tokens for state in rows]
