"""Sparse prefill (MInference vertical-slash) on top of DCA, as Qwen2.5-1M's inference code does it.

Per prefill chunk, per row, the chunk is cut into *segments* at DCA chunk boundaries (and at the
row's prompt end). For each segment ``[begin, end)`` in the DCA chunk starting at ``P`` and each
head, estimation looks at the segment's last ``n = min(64, end - begin)`` queries against keys
``[0, end)``, with the *critical* query rotations that keep diagonals continuous across chunks:

    key k >= P              (intra)       query rotated to  p - P
    P - S <= k < P          (successive)  query rotated to  p - P + S
    k < P - S               (inter)       query rotated to  p - P + C      (both unclamped)

``A = softmax(logits)`` (causal on the last n x n block, float32). Column sums of ``A`` score
vertical lines (the first 30 columns forced in); sums along diagonals ``d = q - k`` score slash
lines (``d < 100`` forced in). Each head keeps its top ``vertical_size`` columns and
``slash_size`` diagonals (a 30 vertical budget is bumped to 130; sizes clamped to at least 30 / 50
and at most ``end``; ties to the lower index). The picks are then split by DCA phase as Qwen's
code does (with ``i = end - 1 - d`` the key a diagonal meets on the last row, ``L = end - begin``):

    intra        columns >= P;              diagonals with i >= P
    successive   columns in [P - S, P);     diagonals with P - S <= i < P + L       (if P >= S)
    inter        columns < P - S;           diagonals with i < P - S + L            (if P >= 2S)

and a phase left with no columns (or, successive / inter, no diagonals) gets five evenly spaced
ones, as Qwen's code does. Rows whose prompt is not longer than ``sparse_attention_threshold`` keep
every key (a selection that covers all distances). The mask these selections define, and the
index tables kernels read, are in ``pallas_kernels.vslash``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from pallas_kernels.masks import MASK_VALUE
from pallas_kernels.shapes import matmul_precision
from pallas_kernels.vslash import BAND, NO_KEY, Selection
from qwen_jax.config import DCAConfig
from qwen_jax.errors import ConfigError
from qwen_jax.rope import Rope

LAST_Q = 64
FORCED_COLUMNS = 30
FORCED_DIAGONALS = 100
MIN_VERTICAL, MIN_SLASH = 30, 50
DEFAULT_BUDGET = (1000, 6096)
FALLBACK = 5


class Budgets(NamedTuple):
    vertical: tuple[int, ...]   # per query head
    slash: tuple[int, ...]


def layer_budgets(dca: DCAConfig, layer: int, num_heads: int) -> Budgets:
    """Per-head (vertical_size, slash_size) of ``layer`` from Qwen's ``sparse_attention_config``
    (per layer: head index -> [pattern, vertical_size, slash_size, score]); default (1000, 6096)."""
    cfg = dca.sparse_attention_config
    if cfg is None:
        return Budgets((DEFAULT_BUDGET[0],) * num_heads, (DEFAULT_BUDGET[1],) * num_heads)
    if layer >= len(cfg):
        raise ConfigError(f"sparse_attention_config has {len(cfg)} layers; layer {layer} has no budgets")
    entries = dict(cfg[layer]) if not isinstance(cfg[layer], dict) else cfg[layer]
    vertical, slash = [], []
    for h in range(num_heads):
        if str(h) not in entries:
            raise ConfigError(f"sparse_attention_config layer {layer} has no entry for head {h}")
        pattern, vs, ss = entries[str(h)][:3]
        if pattern != "vertical_and_slash":
            raise ConfigError(f"sparse_attention_config layer {layer} head {h}: pattern {pattern!r} is not "
                              "supported (only 'vertical_and_slash')")
        vertical.append(int(vs))
        slash.append(int(ss))
    return Budgets(tuple(vertical), tuple(slash))


def check_sparse_config(dca: DCAConfig, num_layers: int, num_heads: int) -> None:
    """Refuse a sparse setup qwen-jax cannot run, with the reason, when the model is configured."""
    if not dca.sparse_attention_enabled:
        return
    if dca.chunk_len % BAND:
        raise ConfigError(f"sparse attention needs chunk_size - local_size to be a multiple of {BAND}, got "
                          f"{dca.chunk_len}")
    if dca.sparse_attention_last_q != LAST_Q:
        raise ConfigError(f"sparse_attention_last_q must be {LAST_Q} (the estimate's query count), got "
                          f"{dca.sparse_attention_last_q}")
    if dca.sparse_attention_config is not None and len(dca.sparse_attention_config) != num_layers:
        raise ConfigError(f"sparse_attention_config has {len(dca.sparse_attention_config)} layers, the model "
                          f"{num_layers}")
    for layer in range(num_layers):
        layer_budgets(dca, layer, num_heads)


def n_segments(T: int, chunk_len: int) -> int:
    """Static bound on the DCA-chunk segments a query chunk of T tokens can span."""
    return -(-T // chunk_len) + 1


def segments(q_offset, T: int, request_lengths, chunk_len: int):
    """``(begin, end, P)`` [B, G]: the query chunk cut at DCA chunk boundaries and at the prompt end."""
    G = n_segments(T, chunk_len)
    g = jnp.arange(G, dtype=jnp.int32)[None]
    P = (q_offset[:, None] // chunk_len + g) * chunk_len
    begin = jnp.maximum(q_offset[:, None], P)
    end = jnp.minimum(jnp.minimum(q_offset[:, None] + T, P + chunk_len), request_lengths[:, None])
    return begin, jnp.maximum(end, begin), P


def scores(q, k_cache, q_offset, begin, end, P, scale, *, dca: DCAConfig, rope: Rope, key_block: int = 16384):
    """Vertical and slash scores of every segment: ``(vertical [B, G, N, S], slash [B, G, N, S])``,
    slash indexed by ``i = end - 1 - d``; positions at or past ``end`` score 0.

    One segment at a time, over the key blocks below its end only (an empty segment costs nothing):
    pass 1 finds each estimate row's log-sum-exp, pass 2 adds the probabilities up by column and, after
    a skew that turns diagonals into columns, by diagonal."""
    B, T, N, H = q.shape
    K, S = k_cache.shape[1], k_cache.shape[2]
    Gq = N // K
    C, Sl = dca.chunk_size, dca.chunk_len
    dtype = k_cache.dtype                    # bf16 caches: bf16 products, float32 accumulation
    precision = matmul_precision(dtype)
    bk = key_block
    while S % bk:
        bk //= 2
    scale = scale.astype(jnp.float32)[:, None, None, None, None]
    r = jnp.arange(LAST_Q, dtype=jnp.int32)

    def one_segment(seg):
        begin_g, end_g, P_g = seg                                            # [B] each
        rows = end_g[:, None] - LAST_Q + r                                   # [B, 64] query positions
        valid_row = rows >= begin_g[:, None]
        t_idx = jnp.clip(rows - q_offset[:, None], 0, T - 1)
        q_est = jnp.take_along_axis(q, t_idx[:, :, None, None], axis=1)     # [B, 64, N, H]
        base = rows - P_g[:, None]
        rotated = [rope.apply(q_est, base + shift).reshape(B, LAST_Q, K, Gq, H).astype(dtype)
                   for shift in (C, Sl, 0)]                                  # inter, successive, intra
        Pb = P_g[:, None, None, None, None]

        def logits(j):
            keys = lax.dynamic_slice_in_dim(k_cache, j * bk, bk, axis=2)                    # [B, K, bk, H]
            kp = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, None, None, None, :]
            s = [jnp.einsum("brkjh,bksh->bkjrs", qr, keys, precision=precision, preferred_element_type=jnp.float32)
                 for qr in rotated]
            s = jnp.where(kp >= Pb, s[2], jnp.where(kp >= Pb - Sl, s[1], s[0])) * scale
            ok = (kp <= rows[:, None, None, :, None]) & valid_row[:, None, None, :, None]
            return jnp.where(ok, s, MASK_VALUE), ok                          # [B, K, Gq, 64, bk]

        n_blocks = jnp.where(end_g > begin_g, (end_g + bk - 1) // bk, 0).max()

        def pass1(j, carry):
            m, l = carry
            s, ok = logits(j)
            m_new = jnp.maximum(m, s.max(-1))
            l = l * jnp.exp(m - m_new) + jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0).sum(-1)
            return m_new, l

        shape = (B, K, Gq, LAST_Q)
        m, l = lax.fori_loop(0, n_blocks, pass1, (jnp.full(shape, MASK_VALUE, jnp.float32),
                                                  jnp.zeros(shape, jnp.float32)))
        lse = m + jnp.log(jnp.maximum(l, 1e-30))

        def pass2(j, carry):
            slash, vertical = carry
            s, ok = logits(j)
            a = jnp.where(ok, jnp.exp(s - lse[..., None]), 0.0)             # [B, K, Gq, 64, bk]
            vertical = lax.dynamic_update_slice_in_dim(vertical, a.sum(-2), j * bk, axis=-1)
            # slash index i = k + 63 - r: reverse the rows, then skew so row r' shifts right by r'
            padded = jnp.pad(a[..., ::-1, :], [(0, 0)] * 4 + [(0, LAST_Q)])     # [..., 64, bk + 64]
            flat = padded.reshape(*padded.shape[:-2], LAST_Q * (bk + LAST_Q))[..., :LAST_Q * (bk + LAST_Q - 1)]
            diag = flat.reshape(*padded.shape[:-2], LAST_Q, bk + LAST_Q - 1).sum(-2)   # i - j*bk in [0, bk + 63)
            window = lax.dynamic_slice_in_dim(slash, j * bk, bk + LAST_Q - 1, axis=-1)
            return lax.dynamic_update_slice_in_dim(slash, window + diag, j * bk, axis=-1), vertical

        slash, vertical = lax.fori_loop(0, n_blocks, pass2, (jnp.zeros((B, K, Gq, S + LAST_Q - 1), jnp.float32),
                                                             jnp.zeros((B, K, Gq, S), jnp.float32)))
        return vertical.reshape(B, N, S), slash.reshape(B, N, S + LAST_Q - 1)[..., :S]

    vertical, slash = lax.map(one_segment, (begin.T, end.T, P.T))           # [G, B, N, S]
    return vertical.transpose(1, 0, 2, 3), slash.transpose(1, 0, 2, 3)


def _compact(values, member, big):
    """Sorted members of ``values`` [..., M] packed to the front (rest ``big``) and their count."""
    out = jnp.sort(jnp.where(member, values, big), axis=-1)
    return out, member.sum(-1).astype(jnp.int32)


def _fallback(n_keys):
    """Qwen's stand-in for an empty list: ``arange(0, n, max(1, n / 5))`` -> [..., 5] and its count."""
    j = jnp.arange(FALLBACK, dtype=jnp.int32)
    n = n_keys[..., None]
    vals = jnp.where(n >= FALLBACK, (j * n) // FALLBACK, j)
    return vals, jnp.minimum(n_keys, FALLBACK).astype(jnp.int32)


def select(vertical, slash, begin, end, P, sparse_rows, *, budgets: Budgets, chunk_len: int,
           all_sparse: bool = False, head_offset=0):
    """Top-k picks split by phase (module docstring) -> ``Selection`` (phases: inter, successive, intra).
    ``all_sparse`` (static): every row is known to pass the threshold, so no room is made for rows
    that keep every key. ``head_offset``: the budgets' index of the first of the N heads scored here."""
    B, G, N, S = vertical.shape
    Sl = chunk_len
    pos = jnp.arange(S, dtype=jnp.int32)
    end_ = end[:, :, None, None]
    bumped = tuple(130 if v == 30 else v for v in budgets.vertical)       # Qwen's code bumps 30 to 130
    vs = lax.dynamic_slice_in_dim(jnp.asarray(bumped, jnp.int32), head_offset, N)[None, None, :]
    ss = lax.dynamic_slice_in_dim(jnp.asarray(budgets.slash, jnp.int32), head_offset, N)[None, None, :]
    n_v = jnp.clip(jnp.maximum(vs, MIN_VERTICAL), None, end[:, :, None])
    n_s = jnp.clip(jnp.maximum(ss, MIN_SLASH), None, end[:, :, None])
    kv = min(max(max(bumped), MIN_VERTICAL), S)
    ks = min(max(max(budgets.slash), MIN_SLASH), S)
    inf = jnp.float32(jnp.inf)
    v_score = jnp.where(pos < end_, jnp.where(pos < FORCED_COLUMNS, inf, vertical), -inf)
    s_score = jnp.where(pos < end_, jnp.where(pos >= end_ - FORCED_DIAGONALS, inf, slash), -inf)
    _, cols = lax.top_k(v_score, kv)                                         # [B, G, N, kv]
    _, diag_i = lax.top_k(s_score, ks)
    cols_ok = jnp.arange(kv)[None, None, None] < n_v[..., None]
    diag_ok = jnp.arange(ks)[None, None, None] < n_s[..., None]
    Pb, Lb = P[:, :, None, None], (end - begin)[:, :, None, None]
    has = [Pb >= 2 * Sl, Pb >= Sl, jnp.ones_like(Pb, bool)]                 # inter, successive, intra
    col_in = [cols < Pb - Sl, (cols >= Pb - Sl) & (cols < Pb), cols >= Pb]
    diag_in = [diag_i < Pb - Sl + Lb, (diag_i >= Pb - Sl) & (diag_i < Pb + Lb), diag_i >= Pb]
    phase_len = [Pb - Sl, jnp.full_like(Pb, Sl), end[:, :, None, None] - Pb]
    col_base = [jnp.zeros_like(Pb), Pb - Sl, Pb]
    slash_shift = [begin[:, :, None, None] - Pb + Sl, begin[:, :, None, None] - Pb, None]
    d = end_ - 1 - diag_i
    big = jnp.int32(NO_KEY)
    dists, dcounts, colss, ccounts = [], [], [], []
    for p in range(3):
        c, cn = _compact(cols, cols_ok & col_in[p] & has[p], big)
        fb, fbn = _fallback(phase_len[p][..., 0])
        use_fb = has[p][..., 0] & (cn == 0)
        c = c.at[..., :FALLBACK].set(jnp.where(use_fb[..., None], col_base[p] + fb, c[..., :FALLBACK]))
        cn = jnp.where(use_fb, fbn, cn)
        dd, dn = _compact(d, diag_ok & diag_in[p] & has[p], big)
        if slash_shift[p] is not None:
            fbs = jnp.sort(fb + slash_shift[p], axis=-1)
            use_fbs = has[p][..., 0] & (dn == 0)
            dd = dd.at[..., :FALLBACK].set(jnp.where(use_fbs[..., None], fbs, dd[..., :FALLBACK]))
            dn = jnp.where(use_fbs, fbn, dn)
        dists.append(dd)
        dcounts.append(dn)
        colss.append(c)
        ccounts.append(cn)
    dist, dist_count = jnp.stack(dists, 3), jnp.stack(dcounts, 3)            # [B, G, N, P, ks]
    cols, col_count = jnp.stack(colss, 3), jnp.stack(ccounts, 3)
    if all_sparse:
        return Selection(dist, dist_count, cols, col_count, begin, end)
    # Rows that stay dense keep every key: distances 0, 64, 128, ... make one band over all of them.
    n_all = S // BAND + 1
    width = max(ks, n_all)
    dist = jnp.pad(dist, [(0, 0)] * 4 + [(0, width - ks)], constant_values=NO_KEY)
    every = jnp.broadcast_to(BAND * jnp.arange(width, dtype=jnp.int32), dist.shape)
    dense = ~sparse_rows[:, None, None, None]
    dist = jnp.where(dense[..., None], jnp.where(jnp.arange(width) < n_all, every, NO_KEY), dist)
    dist_count = jnp.where(dense, n_all, dist_count)
    col_count = jnp.where(dense, 0, col_count)
    return Selection(dist, dist_count, cols, col_count, begin, end)


def estimate(q, k_cache, q_offset, request_lengths, scale, *, dca: DCAConfig, rope: Rope, budgets: Budgets,
             key_block: int = 16384, all_sparse: bool = False, head_offset=0) -> Selection:
    """The whole estimate for a query chunk q [B, T, N, H] (not rotated) starting at ``q_offset`` [B];
    ``head_offset``: the index in ``budgets`` of q's first head."""
    T = q.shape[1]
    begin, end, P = segments(q_offset, T, request_lengths, dca.chunk_len)
    vertical, slash = scores(q, k_cache, q_offset, begin, end, P, scale, dca=dca, rope=rope, key_block=key_block)
    sparse_rows = request_lengths > dca.sparse_attention_threshold
    return select(vertical, slash, begin, end, P, sparse_rows, budgets=budgets, chunk_len=dca.chunk_len,
                  all_sparse=all_sparse, head_offset=head_offset)


__all__ = ["Budgets", "layer_budgets", "check_sparse_config", "estimate", "scores", "select", "segments"]
