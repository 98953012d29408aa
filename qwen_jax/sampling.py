"""Next-token choice from float32 logits: greedy, or seeded sampling with temperature, top-k and top-p; both
after an optional repetition penalty (HF's ``RepetitionPenaltyLogitsProcessor``)."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.errors import QwenJaxError


# The smallest temperature or repetition penalty taken: below float32's smallest normal number a device flushes the
# divisor to 0 (x / 0: inf or nan, and the pick is no longer the largest logit's).
_TINY = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static sampling settings. ``temperature == 0`` is greedy; ``top_k == 0``, ``top_p == 1`` and
    ``repetition_penalty == 1`` disable them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        # Normalised to Python float / int: the settings are a static jit argument, hashed and compared.
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise QwenJaxError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise QwenJaxError(f"top_k must be an integer (0: off), got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.temperature < 0 or 0 < self.temperature < _TINY:
            raise QwenJaxError(f"temperature must be 0 (greedy) or at least {_TINY:.3g}, got {self.temperature}")
        if self.top_k < 0:
            raise QwenJaxError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QwenJaxError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty < _TINY:
            raise QwenJaxError(f"repetition_penalty must be at least {_TINY:.3g} (1: off), got {self.repetition_penalty}")


def penalize(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's repetition penalty: where ``seen`` [B, V] (bool) is set, a logit < 0 is multiplied by ``penalty``
    and any other divided by it. logits [B, V] float32 -> [B, V] float32."""
    logits = logits.astype(jnp.float32)
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def seen_in_prompts(tokens: jax.Array, lengths: jax.Array, vocab_size: int) -> jax.Array:
    """bool [B, V]: the ids that occur in each row's prompt; ``tokens`` [B, T] right-padded to ``lengths`` [B]
    (the padding does not count)."""
    B, T = tokens.shape
    ids = jnp.where(jnp.arange(T)[None, :] < lengths[:, None], tokens, vocab_size)    # padding: out of range
    return jnp.zeros((B, vocab_size), bool).at[jnp.arange(B)[:, None], ids].set(True, mode="drop")


def mark_seen(seen: jax.Array, tokens: jax.Array) -> jax.Array:
    """``seen`` [B, V] with each row's token of ``tokens`` [B] set."""
    return seen.at[jnp.arange(seen.shape[0]), tokens].set(True, mode="drop")


def row_keys(seed: int, rows) -> jax.Array:
    """One key per row: ``fold_in(key(seed), row)`` for each row number in ``rows``. ``generate`` samples row ``r``
    with its own key, so what a row draws depends on the seed and its place in the list of prompts, not on the
    other prompts (nor on whether they run as one batch or, after a prefix, one at a time)."""
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.asarray(rows, jnp.uint32))


def fold_step(key: jax.Array, step) -> jax.Array:
    """``key`` (one key, or one per row [B]) folded with the step number ``step``."""
    if key.ndim == 0:
        return jax.random.fold_in(key, step)
    return jax.vmap(jax.random.fold_in, (0, None))(key, step)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling, seen: jax.Array | None = None) -> jax.Array:
    """logits [B, V] float32 -> tokens [B] int32. ``key``: one key for the batch, or one per row [B] (``row_keys``:
    each row then draws from its own). ``seen`` [B, V] bool (the ids so far: prompt and generated) is needed for a
    repetition penalty, and unused without one."""
    if sampling.repetition_penalty != 1.0:
        if seen is None:
            raise QwenJaxError("a repetition penalty needs seen (bool [batch, vocab]: the ids so far)")
        logits = penalize(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # the row's largest logit moved to 0 first: a tiny temperature then sends the others to -inf, not the top
    # ones to +inf (where ties of inf, or inf / inf, would pick a token that is not the largest)
    logits = logits.astype(jnp.float32)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays), and every token whose
        # logit ties with that prefix's last: which of equal logits HF's sort keeps is an accident of its order.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.take_along_axis(ordered, jnp.sum(keep, axis=-1, keepdims=True) - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    if key.ndim == 0:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)
