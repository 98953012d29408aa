"""Exact log-sum-exp merge of partial attentions over disjoint key sets."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.online import merge_stacked


def merge_partials(partials):
    """``[(out_i [..., N, H], lse_i [..., N])]`` -> ``(out, lse)`` as one softmax over the union of the key sets.

    Guarded: partials with ``lse = -inf`` (no visible key) weigh nothing, and a row no partial sees
    gets ``out = 0``, ``lse = -inf``. Outputs are float32.
    """
    return merge_stacked(jnp.stack([o.astype(jnp.float32) for o, _ in partials], axis=-3),
                         jnp.stack([lse for _, lse in partials], axis=-2))
