"""Exact log-sum-exp merge of partial attentions over disjoint key sets."""

from __future__ import annotations

import jax.numpy as jnp


def merge_partials(partials):
    """``[(out_i [..., N, H], lse_i [..., N])]`` -> ``(out, lse)`` as one softmax over the union of the key sets.

    Guarded: partials with ``lse = -inf`` (no visible key) weigh nothing, and a row no partial sees
    gets ``out = 0``, ``lse = -inf``. Outputs are float32.
    """
    lses = jnp.stack([lse for _, lse in partials])
    m = jnp.max(lses, axis=0)
    m0 = jnp.where(jnp.isfinite(m), m, 0.0)
    weights = jnp.exp(lses - m0)  # exp(-inf) = 0 for empty partials
    total = jnp.sum(weights, axis=0)
    out = sum(w[..., None] * o.astype(jnp.float32) for w, (o, _) in zip(weights, partials))
    out = out / jnp.maximum(total, 1e-30)[..., None]
    lse = jnp.where(total > 0, m0 + jnp.log(jnp.maximum(total, 1e-30)), -jnp.inf)
    return out, lse
