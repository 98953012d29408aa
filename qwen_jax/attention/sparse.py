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

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import estimate_gpu, vslash
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
SCORE_IMPLS = ("auto", "xla", "triton")
RADIX_BITS = 3     # top_indices: digit width (3: memory and compare work balance on GPUs)


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


def _lse_combine(x, y):
    """Online log-sum-exp pair (running max, sum of exp relative to it): the reducer of ``lax.reduce``."""
    (m1, l1), (m2, l2) = x, y
    m = jnp.maximum(m1, m2)
    return m, l1 * jnp.exp(m1 - m) + l2 * jnp.exp(m2 - m)


def _segment_scores(q_row, k_cache, b: int, q_off, begin, end, P, scale, *, dca: DCAConfig, rope: Rope, bk: int,
                    impl: str = "xla", interpret: bool = False):
    """Vertical and slash scores [N, S] of one segment of row ``b`` (q_row [T, N, H], k_cache [B, K, S, H];
    the other arguments are scalars).

    ``impl="triton"``: ``pallas_kernels.estimate_gpu`` computes them on chip (``interpret``: on a CPU).
    ``impl="xla"`` (the kernel's reference twin): the keys below ``end`` are walked as *pieces*: each
    phase's key range cut into ``bk`` keys (the last piece of a range is shorter), so every piece needs
    one query rotation and one matmul, and an empty segment has no piece. Pass 1 reduces each piece's
    logits to a running (max, sum) per estimate row in one read; pass 2 turns them into probabilities
    and adds them up by column and by diagonal in one reduction."""
    T, N, H = q_row.shape
    K, S = k_cache.shape[1], k_cache.shape[2]
    Gq = N // K
    C, Sl = dca.chunk_size, dca.chunk_len
    dtype = k_cache.dtype                    # bf16 caches: bf16 products, float32 accumulation
    precision = matmul_precision(dtype)
    r = jnp.arange(LAST_Q, dtype=jnp.int32)
    rows = end - LAST_Q + r                                                  # [64] query positions
    valid_row = rows >= begin
    q_est = q_row[jnp.clip(rows - q_off, 0, T - 1)]                          # [64, N, H]
    # [3, K, Gq * 64, H]: inter, successive, intra rotations, estimate rows grouped by kv head
    rotated = jnp.stack([rope.apply(q_est[None], (rows - P + shift)[None])[0] for shift in (C, Sl, 0)])
    inter_end = jnp.maximum(P - Sl, 0)
    live = end > begin
    if impl == "triton":
        W = estimate_gpu.tile_width(S, Sl)
        n_tiles = jnp.where(live, (end + W - 1) // W, 0)
        info = jnp.stack([inter_end, P, end, begin, n_tiles] + [jnp.zeros_like(P)] * 3).astype(jnp.int32)
        vertical, slash = estimate_gpu.segment_scores(rotated.transpose(0, 2, 1, 3).astype(dtype), k_cache, info,
                                                      scale.reshape(1), b=b, W=W, interpret=interpret)
        seen = live & (jnp.arange(S, dtype=jnp.int32) < end)
        return jnp.where(seen, vertical, 0.0), jnp.where(seen, slash, 0.0)
    k_row = k_cache[b]
    rotated = rotated.reshape(3, LAST_Q, K, Gq, H).transpose(0, 2, 3, 1, 4).reshape(3, K, Gq * LAST_Q, H)
    rotated = rotated.astype(dtype)
    row_pos = jnp.tile(rows, Gq)[None, :, None]                              # [1, Gq * 64, 1]
    row_ok = jnp.tile(valid_row, Gq)[None, :, None]
    # phase key ranges [lo, hi) below end, in piece order; an empty segment has none
    lo = jnp.stack([jnp.zeros_like(P), inter_end, P])
    hi = jnp.where(live, jnp.stack([inter_end, P, end]), lo)
    n_pieces = (hi - lo + bk - 1) // bk                                      # [3]
    first = jnp.concatenate([jnp.zeros((1,), n_pieces.dtype), jnp.cumsum(n_pieces)[:2]])
    total = n_pieces.sum()

    def logits(it):
        p = (it >= first[1]).astype(jnp.int32) + (it >= first[2]).astype(jnp.int32)
        start = lo[p] + (it - first[p]) * bk
        stop = jnp.minimum(start + bk, hi[p])
        at = jnp.minimum(start, S - bk)                                      # dynamic_slice would clamp too
        keys = lax.dynamic_slice_in_dim(k_row, at, bk, axis=1)               # [K, bk, H]
        s = jnp.einsum("kmh,ksh->kms", rotated[p], keys, precision=precision, preferred_element_type=jnp.float32)
        kp = (at + jnp.arange(bk, dtype=jnp.int32))[None, None, :]
        ok = (kp >= start) & (kp < stop) & (kp <= row_pos) & row_ok
        return jnp.where(ok, s * scale, MASK_VALUE), ok, at                  # [K, Gq * 64, bk]

    def pass1(it, carry):
        s, ok, _ = logits(it)
        weight = jnp.broadcast_to(ok, s.shape).astype(jnp.float32)          # masked logits add nothing
        piece = lax.reduce((s, weight), (jnp.float32(MASK_VALUE), jnp.float32(0)), _lse_combine, (2,))
        return _lse_combine(carry, piece)

    shape = (K, Gq * LAST_Q)
    m, l = lax.fori_loop(0, total, pass1, (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32)))
    lse = (m + jnp.log(jnp.maximum(l, 1e-30)))[..., None]

    def pass2(it, carry):
        vertical, slash = carry
        s, ok, at = logits(it)
        a = jnp.where(ok, jnp.exp(s - lse), 0.0).reshape(K, Gq, LAST_Q, bk)
        # slash index i = k + 63 - r: reverse the rows, then skew so row r' shifts right by r'; the
        # column sums ride in the same (two-operand) reduction, padded to the same width
        padded = jnp.pad(a[..., ::-1, :], [(0, 0)] * 3 + [(0, LAST_Q)])                 # [K, Gq, 64, bk + 64]
        flat = padded.reshape(K, Gq, LAST_Q * (bk + LAST_Q))[..., :LAST_Q * (bk + LAST_Q - 1)]
        skewed = flat.reshape(K, Gq, LAST_Q, bk + LAST_Q - 1)
        zero = jnp.float32(0)
        by_col, by_diag = lax.reduce((jnp.pad(a, [(0, 0)] * 3 + [(0, LAST_Q - 1)]), skewed), (zero, zero),
                                     lambda x, y: (x[0] + y[0], x[1] + y[1]), (2,))   # [K, Gq, bk + 63] each
        col = lax.dynamic_slice_in_dim(vertical, at, bk, axis=-1) + by_col[..., :bk].reshape(N, bk)
        diag = lax.dynamic_slice_in_dim(slash, at, bk + LAST_Q - 1, axis=-1) + by_diag.reshape(N, bk + LAST_Q - 1)
        return (lax.dynamic_update_slice_in_dim(vertical, col, at, axis=-1),
                lax.dynamic_update_slice_in_dim(slash, diag, at, axis=-1))

    vertical, slash = lax.fori_loop(0, total, pass2, (jnp.zeros((N, S), jnp.float32),
                                                      jnp.zeros((N, S + LAST_Q - 1), jnp.float32)))
    return vertical, slash[:, :S]


def scores_impl(impl: str, n_keys: int, chunk_len: int) -> str:
    """The scores implementation ``impl`` ("auto", "xla", "triton") means here: "auto" takes the Pallas
    kernel on a GPU when its key tile divides the cache and the DCA chunk length, else XLA."""
    if impl not in SCORE_IMPLS:
        raise ConfigError(f"unknown estimate implementation {impl!r}; choose one of {list(SCORE_IMPLS)}")
    fits = estimate_gpu.tile_width(n_keys, chunk_len) is not None
    if impl == "auto":
        return "triton" if fits and jax.default_backend() == "gpu" else "xla"
    if impl == "triton" and not fits:
        raise ConfigError(f"the estimate kernel needs a cache length and a DCA chunk length divisible by 64, got "
                          f"{n_keys} and {chunk_len}")
    return impl


def scores(q, k_cache, q_offset, begin, end, P, scale, *, dca: DCAConfig, rope: Rope, key_block: int = 16384,
           impl: str = "auto", interpret: bool = False):
    """Vertical and slash scores of every segment: ``(vertical [B, G, N, S], slash [B, G, N, S])``,
    slash indexed by ``i = end - 1 - d``; positions at or past ``end`` score 0.

    One segment at a time (``lax.map``; unrolled for the kernel), one row at a time (rows differ in
    their phase ranges), over the keys below the segment's end only: ``_segment_scores`` (``impl``:
    ``scores_impl``; ``key_block``: the XLA version's key piece)."""
    B = q.shape[0]
    S = k_cache.shape[2]
    bk = min(key_block, S)
    scale = scale.astype(jnp.float32)
    impl = scores_impl(impl, S, dca.chunk_len)

    def one_segment(seg):
        begin_g, end_g, P_g = seg                                            # [B] each
        out = [_segment_scores(q[b], k_cache, b, q_offset[b], begin_g[b], end_g[b], P_g[b], scale[b], dca=dca,
                               rope=rope, bk=bk, impl=impl, interpret=interpret) for b in range(B)]
        return jnp.stack([v for v, _ in out]), jnp.stack([s for _, s in out])

    if impl == "triton":
        # segments unrolled: a loop's zero-filled [G, B, N, S] outputs are buffers XLA hoisted to the start
        # of the program, every layer's at once (7B at 1M, one prefill chunk's temporaries on an H100:
        # 17.0 GiB with lax.map, 5.2 GiB unrolled)
        out = [one_segment((begin[:, g], end[:, g], P[:, g])) for g in range(begin.shape[1])]
        return jnp.stack([v for v, _ in out], 1), jnp.stack([s for _, s in out], 1)
    vertical, slash = lax.map(one_segment, (begin.T, end.T, P.T))           # [G, B, N, S]
    return vertical.transpose(1, 0, 2, 3), slash.transpose(1, 0, 2, 3)


def _order_keys(score):
    """uint32 keys ordered as the float32 ``score`` (no NaN; -0 counts as 0, as in ``lax.top_k``)."""
    bits = lax.bitcast_convert_type(jnp.where(score == 0, 0.0, score), jnp.int32)
    signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)                             # negative floats in reverse
    return lax.bitcast_convert_type(signed, jnp.uint32) ^ jnp.uint32(0x80000000)


def top_indices(score, n, k: int):
    """The ``n`` [...] largest entries of ``score`` [..., S] (ties to the lower index, as ``lax.top_k``),
    as their indices sorted ascending [..., k] (``k`` >= every n; slots from n on hold S).

    No sort (``lax.top_k`` sorts the whole row on GPUs): the n-th largest value ``t`` is found
    ``RADIX_BITS`` bits at a time, each digit by counting the entries at or above its candidate values
    in one pass over the scores; the picks are the entries above ``t`` and the first ``n - count(> t)``
    equal to it, and slot ``j`` finds the first entry with ``j + 1`` picks up to it by binary search
    (a scatter of every entry costs more on GPUs)."""
    S = score.shape[-1]
    B = next((b for b in (4096, 2048, 1024, 512) if S % b == 0), S)      # rows cut in blocks: a GPU reduces
    u = _order_keys(score).reshape(*score.shape[:-1], S // B, B)          # many short rows faster than few long
    n = n.astype(jnp.int32)
    top = (32 - 1) // RADIX_BITS * RADIX_BITS                                 # the first digit's shift

    def digit(i, t):                                 # largest t with count(u >= t) >= n, digit by digit
        shift = (top - i * RADIX_BITS).astype(jnp.uint32)
        room = (jnp.uint32(0xFFFFFFFF) - t) >> shift                         # candidates that do not wrap
        cands = [t + (jnp.uint32(d) << shift) for d in range(1, 1 << RADIX_BITS)]
        counts = lax.reduce(tuple((u >= c[..., None, None]).astype(jnp.int32) for c in cands),
                            (jnp.int32(0),) * len(cands), lambda x, y: tuple(a + b for a, b in zip(x, y)),
                            (u.ndim - 1,))
        up = sum(((c.sum(-1) >= n) & (d + 1 <= room)).astype(jnp.uint32) for d, c in enumerate(counts))
        return t + (up << shift)

    def cumsum(x):                                                          # over the blocks of the last axes
        inner = jnp.cumsum(x, -1, dtype=jnp.int32)
        total = inner[..., -1]
        return (inner + (jnp.cumsum(total, -1) - total)[..., None]).reshape(*score.shape[:-1], S)

    t = lax.fori_loop(0, top // RADIX_BITS + 1, digit, jnp.zeros(n.shape, jnp.uint32))[..., None, None]
    above = u > t
    ties_taken = n - above.sum((-2, -1), dtype=jnp.int32)
    # picks at or before each entry: the entries above t, and the ties up to the ties_taken-th
    rank = cumsum(above) + jnp.minimum(cumsum(u == t), ties_taken[..., None])
    # pick j is the first entry whose rank reaches j + 1: a binary search per slot (S where none does)
    want = jnp.arange(1, k + 1, dtype=jnp.int32)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        short = (lo < hi) & (jnp.take_along_axis(rank, jnp.minimum(mid, S - 1), -1) < want)
        return jnp.where(short, mid + 1, lo), jnp.where(short, hi, mid)

    bounds = (jnp.zeros(n.shape + (k,), jnp.int32), jnp.full(n.shape + (k,), S, jnp.int32))
    # unrolled (by 4) on GPUs, as vslash.search: a loop step costs more than its work there (0.57 -> 0.26 ms)
    return lax.fori_loop(0, S.bit_length(), halve, bounds, unroll=vslash.unroll_loops())[0]


def _top_by_segment(vertical, slash, end, n_v, kv: int, n_s, ks: int):
    """The picked columns and diagonals ([B, G, N, kv | ks], ascending; ``top_indices`` with the forced
    lines in and the positions from ``end`` out), one segment at a time: a segment with no picks (an
    empty one: most query chunks have one) costs nothing."""
    S = vertical.shape[-1]
    pos = jnp.arange(S, dtype=jnp.int32)
    inf = jnp.float32(jnp.inf)

    def picks(v, s, e, nv, ns):                                              # one segment: [B, N, S], [B]
        e = e[:, None, None]
        v_score = jnp.where(pos < e, jnp.where(pos < FORCED_COLUMNS, inf, v), -inf)
        # the forced diagonals as the largest finite floats, descending with the distance: under a budget of
        # fewer than FORCED_DIAGONALS the nearest ones win (d = 0 first: every query sees its own key); ties of
        # inf went to the lower index, the farthest
        nearest_first = lax.bitcast_convert_type(jnp.int32(0x7F7FFFFF) - (e - 1 - pos), jnp.float32)
        s_score = jnp.where(pos < e, jnp.where(pos >= e - FORCED_DIAGONALS, nearest_first, s), -inf)
        # one top-k for both (half the launches: on GPUs the top-k of a 32K chunk is launch-bound)
        both = top_indices(jnp.stack([v_score, s_score]), jnp.stack([nv, ns]), max(kv, ks))
        return both[0, ..., :kv], both[1, ..., :ks]

    def one(args):
        nv, ns = args[3], args[4]
        none = (jnp.full(nv.shape + (kv,), S, jnp.int32), jnp.full(ns.shape + (ks,), S, jnp.int32))
        return lax.cond(jnp.maximum(nv.max(), ns.max()) > 0, lambda: picks(*args), lambda: none)

    cols, diag_i = lax.map(one, tuple(jnp.swapaxes(x, 0, 1) for x in (vertical, slash, end, n_v, n_s)))
    return jnp.swapaxes(cols, 0, 1), jnp.swapaxes(diag_i, 0, 1)


def _fallback(n_keys):
    """Qwen's stand-in for an empty list: ``arange(0, n, max(1, n / 5))`` -> [..., 5] and its count."""
    j = jnp.arange(FALLBACK, dtype=jnp.int32)
    n = n_keys[..., None]
    vals = jnp.where(n >= FALLBACK, (j * n) // FALLBACK, j)
    return vals, jnp.minimum(n_keys, FALLBACK).astype(jnp.int32)


def _run(sorted_idx, count, lo, hi):
    """The members of ``[lo, hi)`` among the first ``count`` of ascending ``sorted_idx`` [..., k]: ``(first,
    number)``, a contiguous stretch of the list."""
    k = sorted_idx.shape[-1]
    listed = jnp.arange(k) < count[..., None]
    first = ((sorted_idx < jnp.asarray(lo)[..., None]) & listed).sum(-1, dtype=jnp.int32)
    return first, ((sorted_idx < jnp.asarray(hi)[..., None]) & listed).sum(-1, dtype=jnp.int32) - first


def _take_run(sorted_idx, first, number, big, *, reverse=False):
    """``sorted_idx[first:first + number]`` packed to the front (reversed if ``reverse``), rest ``big``."""
    k = sorted_idx.shape[-1]
    j = jnp.arange(k, dtype=jnp.int32)
    at = first[..., None] + (number[..., None] - 1 - j if reverse else j)
    vals = jnp.take_along_axis(sorted_idx, jnp.clip(at, 0, k - 1), -1)
    return jnp.where(j < number[..., None], vals, big)


def bumped_vertical(budgets: Budgets) -> tuple[int, ...]:
    """Each head's vertical budget as used: Qwen's code bumps a budget of 30 to 130."""
    return tuple(130 if v == 30 else v for v in budgets.vertical)


def list_widths(budgets: Budgets, S: int) -> tuple[int, int]:
    """(vertical, slash) widths of a selection's lists over ``S`` keys: the largest budgets as used, at least
    ``MIN_VERTICAL`` / ``MIN_SLASH``, at most ``S``."""
    return min(max(max(bumped_vertical(budgets)), MIN_VERTICAL), S), min(max(max(budgets.slash), MIN_SLASH), S)


def select(vertical, slash, begin, end, P, sparse_rows, *, budgets: Budgets, chunk_len: int,
           all_sparse: bool = False, head_offset=0):
    """Top-k picks split by phase (module docstring) -> ``Selection`` (phases: inter, successive, intra).
    ``all_sparse`` (static): every row is known to pass the threshold, so no room is made for rows
    that keep every key. ``head_offset``: the budgets' index of the first of the N heads scored here."""
    B, G, N, S = vertical.shape
    Sl = chunk_len
    vs = lax.dynamic_slice_in_dim(jnp.asarray(bumped_vertical(budgets), jnp.int32), head_offset, N)[None, None, :]
    ss = lax.dynamic_slice_in_dim(jnp.asarray(budgets.slash, jnp.int32), head_offset, N)[None, None, :]
    live = (end > begin)[:, :, None]                                        # an empty segment picks nothing
    n_v = jnp.where(live, jnp.clip(jnp.maximum(vs, MIN_VERTICAL), None, end[:, :, None]), 0)
    n_s = jnp.where(live, jnp.clip(jnp.maximum(ss, MIN_SLASH), None, end[:, :, None]), 0)
    kv, ks = list_widths(budgets, S)
    cols, diag_i = _top_by_segment(vertical, slash, end, n_v, kv, n_s, ks)  # [B, G, N, kv | ks] ascending
    # the three phases (inter, successive, intra) on a new axis before the lists': [B, G, 1, 3]
    Pb, Lb, Eb, Bb = (x[:, :, None, None] for x in (P, end - begin, end, begin))
    low, high = jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max

    def phases(*xs):
        return jnp.concatenate([jnp.broadcast_to(x, Pb.shape) for x in xs], -1)

    has = phases(Pb >= 2 * Sl, Pb >= Sl, True)
    phase_len = phases(Pb - Sl, Sl, Eb - Pb)
    big = jnp.int32(NO_KEY)
    fb, fbn = _fallback(phase_len)                                          # [B, G, 1, 3, 5], [B, G, 1, 3]
    first, cn = _run(cols[..., None, :], n_v[..., None], phases(low, Pb - Sl, Pb), phases(Pb - Sl, Pb, high))
    cn = jnp.where(has, cn, 0)                                              # [B, G, N, 3]
    c = _take_run(cols[..., None, :], first, cn, big)
    use_fb = has & (cn == 0)
    col_fb = phases(0, Pb - Sl, Pb)[..., None] + fb
    cols = c.at[..., :FALLBACK].set(jnp.where(use_fb[..., None], col_fb, c[..., :FALLBACK]))
    col_count = jnp.where(use_fb, fbn, cn)
    # diagonals by i = end - 1 - d; an empty intra list has no stand-in
    first, dn = _run(diag_i[..., None, :], n_s[..., None], phases(low, Pb - Sl, Pb),
                     phases(Pb - Sl + Lb, Pb + Lb, high))
    dn = jnp.where(has, dn, 0)
    d = jnp.where(jnp.arange(ks) < dn[..., None],
                  Eb[..., None] - 1 - _take_run(diag_i[..., None, :], first, dn, 0, reverse=True), big)
    use_fbs = has & (dn == 0) & (jnp.arange(3) < 2)
    dist_fb = phases(Bb - Pb + Sl, Bb - Pb, 0)[..., None] + fb              # ascending, as fb is
    dist = d.at[..., :FALLBACK].set(jnp.where(use_fbs[..., None], dist_fb, d[..., :FALLBACK]))
    dist_count = jnp.where(use_fbs, fbn, dn)                                # [B, G, N, 3(, ks)]
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
             key_block: int = 16384, all_sparse: bool = False, head_offset=0, impl: str = "auto",
             interpret: bool = False) -> Selection:
    """The whole estimate for a query chunk q [B, T, N, H] (not rotated) starting at ``q_offset`` [B];
    ``head_offset``: the index in ``budgets`` of q's first head; ``impl``, ``interpret``: the scores'
    implementation (``scores``)."""
    T = q.shape[1]
    begin, end, P = segments(q_offset, T, request_lengths, dca.chunk_len)
    vertical, slash = scores(q, k_cache, q_offset, begin, end, P, scale, dca=dca, rope=rope, key_block=key_block,
                             impl=impl, interpret=interpret)
    sparse_rows = request_lengths > dca.sparse_attention_threshold
    return select(vertical, slash, begin, end, P, sparse_rows, budgets=budgets, chunk_len=dca.chunk_len,
                  all_sparse=all_sparse, head_offset=head_offset)


__all__ = ["Budgets", "layer_budgets", "check_sparse_config", "estimate", "scores", "scores_impl", "select",
           "segments", "SCORE_IMPLS"]
