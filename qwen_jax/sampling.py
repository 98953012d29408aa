"""Next-token choice from float32 logits: greedy, or seeded sampling with temperature, top-k and top-p; both
after an optional repetition penalty (HF's ``RepetitionPenaltyLogitsProcessor``)."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from qwen_jax.errors import QwenJaxError


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
        if self.temperature < 0:
            raise QwenJaxError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise QwenJaxError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QwenJaxError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise QwenJaxError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}")


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


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling, seen: jax.Array | None = None) -> jax.Array:
    """logits [B, V] float32 -> tokens [B] int32. ``seen`` [B, V] bool (the ids so far: prompt and generated)
    is needed for a repetition penalty, and unused without one."""
    if sampling.repetition_penalty != 1.0:
        if seen is None:
            raise QwenJaxError("a repetition penalty needs seen (bool [batch, vocab]: the ids so far)")
        logits = penalize(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.take_along_axis(ordered, jnp.sum(keep, axis=-1, keepdims=True) - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
