"""Vertical-slash sparse masks (MInference), as functions of positions, and the index tables kernels read.

A sparse head is described, per query *segment* and DCA phase, by two sorted lists (an entry listed twice
counts once; a count above a list's capacity means the whole list):

    distances  selected diagonals ``d = q - k`` (d >= 0)
    columns    selected key positions (vertical lines)

Queries are cut into 64-row blocks at absolute multiples of ``BAND`` (= 64); segments start at
multiples of 64 (qwen-jax requires DCA chunk lengths and prefill chunks to be multiples of 64), so
these are also the blocks of Qwen's kernels, which count from each segment's first query. Query ``q`` in the
block starting at ``q0`` sees key ``k`` in phase ``p`` iff the dense mask allows it
(``MaskSpec.visible``) and

    k is one of the phase's columns,  or  q0 - d <= k < q0 - d + 64 for one of its distances

i.e. each diagonal becomes a 64-wide band per query block (a superset of the exact diagonal), as
MInference's kernels compute it. Because the band only depends on ``q0 - k``, the bands of one head
are the same for every query block up to a shift: consecutive distances at most 64 apart merge into
one *run* ``[D_lo, D_hi]`` = key range ``[q0 - D_hi, q0 - D_lo + 64)``, and each run is cut once into
key tiles of ``block_k`` columns (``rel_start, rel_end`` relative to ``q0``). A query block walks the
tiles that meet its phase key range (``t0, t1``, found by binary search), loading each tile at an
unaligned start, plus the phase's vertical columns, pre-gathered into contiguous tiles and minus
those its bands already cover (``keep``), so no key counts twice.

Shapes (G = segments per call, P = phases, N = query heads, nqb = T / 64 blocks):
    rel_start, rel_end  [B, G, N, P, TCAP] int32   key tiles of the runs, sorted by rel_start
    t0, t1              [B, N, nqb, P] int32        the tiles each query block visits
    block_seg           [B, nqb] int32              the segment of each query block
    vpos                [B, G, N, P, VCAP] int32    vertical columns, sorted, padded with NO_KEY
    keep                [B, N, nqb, P, VCAP] bool   column not covered by the block's bands
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.masks import MaskSpec
from pallas_kernels.shapes import known

BAND = 64
NO_KEY = 2 ** 30  # padding position: beyond any cache, so every mask rejects it


class VSIndex(NamedTuple):
    rel_start: jax.Array
    rel_end: jax.Array
    t0: jax.Array
    t1: jax.Array
    block_seg: jax.Array
    vpos: jax.Array
    keep: jax.Array


def pad_verticals(index: VSIndex, multiple: int) -> VSIndex:
    """Pad the vertical-column axis to a multiple of ``multiple`` (kernels read whole tiles)."""
    pad = -index.vpos.shape[-1] % multiple
    if not pad:
        return index
    widths = [(0, 0)] * 4 + [(0, pad)]
    return index._replace(vpos=jnp.pad(index.vpos, widths, constant_values=NO_KEY), keep=jnp.pad(index.keep, widths))


def gather_verticals(k, v, index: VSIndex):
    """The vertical columns' K/V per (row, segment, head, phase): two [B, G, N, P, VCAP, H] arrays, read
    from the [B, K, S, H] cache of each query head's kv head (padding slots read slot S - 1, masked)."""
    B, K, S, H = k.shape
    N = index.vpos.shape[2]
    pos = jnp.clip(index.vpos, 0, S - 1)                                     # [B, G, N, P, V]
    b = jnp.arange(B)[:, None, None, None, None]
    kvh = (jnp.arange(N) // (N // K))[None, None, :, None, None]
    return k[b, kvh, pos], v[b, kvh, pos]


def unroll_loops() -> bool | int:
    """How the index's binary searches are unrolled (``fori_loop``'s ``unroll``): by 4 on GPUs, where a
    loop step costs a launch and a host round trip (``build_index`` 1.55 ms as a loop against 0.53 ms
    fully unrolled for a 32K-query chunk on an H100; the top-k's search 0.57 -> 0.26 ms for [2, 28,
    65536] scores) and full unrolling cost ~3.5 s of compile per sparse layer: by 4, estimate + index at
    128K took 9.9 ms (fully unrolled 10.2, loops 17) and 4 of the 7B's sparse layers compiled in 25.2 s
    (fully unrolled 36.0; GPU_NOTES, twelfth session). Elsewhere they stay loops (compile time). The
    estimate's digit loop gained 4% unrolled for 4x the compile time: it stays a loop."""
    if UNROLL is not None:
        return UNROLL
    return GPU_UNROLL if jax.default_backend() == "gpu" else False


GPU_UNROLL = 4
UNROLL = None      # None: unroll_loops decides by backend; True / False / a count force it (benchmarks)


def search(rows, row, x, *, right: bool = False):
    """``searchsorted`` of ``x`` [...] in the sorted rows ``rows[row]`` (rows [R, D], row [...] int): how
    many entries are below ``x`` (``right``: at most ``x``). Indexes the rows in place, so callers never
    copy a row per query (``jnp.searchsorted`` under vmap would)."""
    D = rows.shape[-1]

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        v = rows[row, jnp.minimum(mid, D - 1)]
        go = ((v <= x) if right else (v < x)) & (lo < hi)
        return jnp.where(go, mid + 1, lo), jnp.where(go, hi, mid)

    shape = jnp.broadcast_shapes(jnp.shape(row), jnp.shape(x))
    bounds = (jnp.zeros(shape, jnp.int32), jnp.full(shape, D, jnp.int32))
    return jax.lax.fori_loop(0, D.bit_length(), step, bounds, unroll=unroll_loops())[0]


def _pack(values, member, fill):
    """The ``member`` entries of ``values`` [..., D] in order, packed to the front (rest ``fill``)."""
    D = values.shape[-1]
    lead = values.shape[:-1]
    filled = jnp.cumsum(member, axis=-1, dtype=jnp.int32).reshape(-1, D)   # entries packed so far
    row = jnp.arange(filled.shape[0], dtype=jnp.int32)[:, None]
    j = jnp.arange(D, dtype=jnp.int32)[None]
    at = search(filled, row, j + 1)                                          # the entry packed into slot j
    out = jnp.take_along_axis(values.reshape(-1, D), jnp.minimum(at, D - 1), axis=-1)
    return jnp.where(at < D, out, fill).reshape(*lead, D)


def runs(dist, count):
    """Merge sorted distances [..., D] (first ``count`` valid) into runs: ``(d_lo, d_hi, n_runs)``, each
    [..., D] with runs packed at the front (a run is consecutive distances at most BAND apart)."""
    D = dist.shape[-1]
    j = jnp.arange(D)
    valid = j < count[..., None]
    gap_before = jnp.diff(dist, axis=-1, prepend=dist[..., :1])
    gap_after = jnp.diff(dist, axis=-1, append=dist[..., -1:])
    starts = valid & ((j == 0) | (gap_before > BAND))
    ends = valid & ((j + 1 == count[..., None]) | (gap_after > BAND))
    big = jnp.iinfo(jnp.int32).max
    return _pack(dist, starts, big), _pack(dist, ends, big), starts.sum(-1)


def run_tiles(dist, count, block_k: int):
    """Key tiles of the bands of sorted distances [..., D]: ``(rel_start, rel_end, n_tiles)`` [..., D],
    sorted by ``rel_start`` (padding: an empty tile far to the right). With block_k >= BAND a head has
    at most as many tiles as distances."""
    if block_k < BAND:
        raise ValueError(f"sparse key tiles must be at least {BAND} wide, got {block_k}")
    D = dist.shape[-1]
    d_lo, d_hi, n_runs = runs(dist, count)
    # Runs in key order (largest distances first), then cut into tiles.
    r = jnp.arange(D)
    valid_run = r < n_runs[..., None]
    order = jnp.where(valid_run, n_runs[..., None] - 1 - r, r)
    lo = jnp.take_along_axis(d_lo, order, axis=-1)
    hi = jnp.take_along_axis(d_hi, order, axis=-1)
    start = -hi                                    # run's key range relative to q0: [-hi, -lo + BAND)
    length = jnp.where(valid_run, hi - lo + BAND, 0)
    n_per = -(-length // block_k)
    cum = jnp.cumsum(n_per, axis=-1)
    n_tiles = cum[..., -1]
    t = jnp.arange(D, dtype=jnp.int32)
    flat = cum.reshape(-1, D)
    owner = search(flat, jnp.arange(flat.shape[0], dtype=jnp.int32)[:, None], t[None], right=True).reshape(cum.shape)
    owner = jnp.minimum(owner, D - 1)
    first_tile = jnp.take_along_axis(cum - n_per, owner, axis=-1)
    run_start = jnp.take_along_axis(start, owner, axis=-1)
    run_end = run_start + jnp.take_along_axis(length, owner, axis=-1)
    rel_start = run_start + (t - first_tile) * block_k
    rel_end = jnp.minimum(rel_start + block_k, run_end)
    live = t < n_tiles[..., None]
    far = jnp.int32(NO_KEY)
    return jnp.where(live, rel_start, far), jnp.where(live, rel_end, far), n_tiles


def covered(dist, count, delta):
    """Whether key ``k`` lies in a band of query block ``q0`` for ``delta = q0 - k``:
    some selected ``d`` with ``delta <= d <= delta + 63``. dist [..., D] sorted; delta [..., M]."""
    D = dist.shape[-1]
    padded = jnp.where(jnp.arange(D) < count[..., None], dist, jnp.iinfo(jnp.int32).max)
    flat_d = padded.reshape(-1, D)
    flat_q = delta.reshape(flat_d.shape[0], -1)
    i = jax.vmap(lambda d, q: jnp.searchsorted(d, q, side="left"))(flat_d, flat_q)
    nxt = jnp.take_along_axis(flat_d, jnp.minimum(i, D - 1), axis=-1)
    return ((i < D) & (nxt <= flat_q + BAND - 1)).reshape(delta.shape)


def band_tables(dist, count, n_keys: int):
    """The smallest and the largest selected distance in each 64-aligned block of distances:
    ``(first, last)`` [R, n_keys // 64 + 3] for the R = prod(leading) lists of ``dist`` [..., D], entry
    ``j`` for the block ``[64 (j - 1), 64 j)`` (none: int32 max and int32 min). Distances past the cache
    (from ``64 (n_keys // 64 + 1)`` on) are left out: their bands meet no key of a query block inside it."""
    D = dist.shape[-1]
    nb = n_keys // BAND + 3
    flat = dist.reshape(-1, D)
    listed = (jnp.arange(D) < count.reshape(-1, 1)) & (flat >= 0) & (flat < (nb - 2) * BAND)
    at = jnp.where(listed, flat // BAND + 1, nb)                             # nb: dropped
    row = jnp.arange(flat.shape[0], dtype=jnp.int32)[:, None]
    first = jnp.full((flat.shape[0], nb), jnp.iinfo(jnp.int32).max, jnp.int32).at[row, at].min(flat, mode="drop")
    last = jnp.full((flat.shape[0], nb), jnp.iinfo(jnp.int32).min, jnp.int32).at[row, at].max(flat, mode="drop")
    return first, last


def covered_by_table(first, last, row, delta):
    """``covered`` from ``band_tables``: list ``row`` [...] has a distance in ``[delta, delta + 63]``
    (delta [...] int32, below the cache length). The window meets at most two 64-blocks of distances:
    the one holding ``delta`` (some distance >= delta there) and the next (some distance <= delta + 63)."""
    nb = first.shape[-1]
    j = jnp.clip(delta // BAND + 1, 0, nb - 2)
    return (delta > -BAND) & ((last[row, j] >= delta) | (first[row, j + 1] <= delta + BAND - 1))


def block_starts(q_offset, n_blocks: int):
    """First position of each 64-row query block [B, nqb] (``q_offset`` must be a multiple of 64)."""
    return q_offset[:, None] + BAND * jnp.arange(n_blocks, dtype=jnp.int32)[None]


def build_index(sel: "Selection", q_offset, T: int, kv_length, mask: MaskSpec, block_k: int, n_keys: int) -> VSIndex:
    """Index tables (module docstring) for T queries from ``q_offset`` [B] (a multiple of 64) over a cache
    of ``n_keys`` slots (static; the queries lie inside it). One program, also where it is called outside
    jit (op by op it would dispatch and compile some hundred small ones)."""
    return _build_index(sel, q_offset, T, kv_length, mask, block_k, n_keys, unroll_loops())


@functools.partial(jax.jit, static_argnums=(2, 4, 5, 6, 7))
def _build_index(sel, q_offset, T, kv_length, mask, block_k, n_keys, unroll) -> VSIndex:
    del unroll          # read by the binary searches while tracing: part of the program's key
    B, G, N, P, D = sel.dist.shape
    nqb = -(-T // BAND)
    rel_start, rel_end, _ = run_tiles(sel.dist, sel.dist_count, block_k)
    q0 = block_starts(q_offset, nqb)                                        # [B, nqb]
    block_seg = segment_of(sel, q0)
    # list of (row, the block's segment, head, phase): [B, N, nqb, P]
    b_ = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    n_ = jnp.arange(N, dtype=jnp.int32)[None, :, None, None]
    p_ = jnp.arange(P, dtype=jnp.int32)[None, None, None, :]
    row = ((b_ * G + block_seg[:, None, :, None]) * N + n_) * P + p_
    klo, khi = [], []
    for phase in mask.phases:
        lo_, hi_ = mask.key_range(phase, q0, q0 + BAND - 1, kv_length[:, None])   # [B, nqb]
        klo.append(lo_)
        khi.append(hi_)
    klo, khi = jnp.stack(klo, -1)[:, None], jnp.stack(khi, -1)[:, None]         # [B, 1, nqb, P]
    q0_ = q0[:, None, :, None]
    t0 = search(rel_end.reshape(-1, D), row, klo - q0_, right=True)
    t1 = search(rel_start.reshape(-1, D), row, khi - q0_)
    empty = khi <= klo
    t0, t1 = jnp.where(empty, 0, t0), jnp.where(empty, 0, jnp.maximum(t1, t0))
    V = sel.cols.shape[-1]
    vpos = jnp.where(jnp.arange(V) < sel.col_count[..., None], sel.cols, NO_KEY)
    # keep: the block's vertical columns that none of its bands covers and that are not listed twice (else
    # they would count twice)
    first, last = band_tables(sel.dist, sel.dist_count, n_keys)
    repeat = jnp.concatenate([jnp.zeros_like(vpos[..., :1], bool), vpos[..., 1:] == vpos[..., :-1]], axis=-1)
    seg_cols = vpos.reshape(-1, V)[row]                                     # [B, N, nqb, P, V]
    keep = ~covered_by_table(first, last, row[..., None], q0_[..., None] - seg_cols) & (seg_cols < NO_KEY)
    keep &= ~repeat.reshape(-1, V)[row]
    return VSIndex(rel_start, rel_end, t0, t1, block_seg, vpos, keep)


def tiles_per_head(sel: "Selection", index: VSIndex, block_k: int):
    """Key tiles a kernel computes for this mask, per query head [N] int32 (summed over rows, query
    blocks and phases): the band tiles each 64-query block visits plus its phase's vertical columns in
    tiles of ``block_k`` (the Triton kernel's work; ``index`` built with the same ``block_k``)."""
    v_tiles = -(-sel.col_count // block_k)                                          # [B, G, N, P]
    per_block = jnp.take_along_axis(v_tiles, index.block_seg[:, :, None, None], axis=1)   # [B, nqb, N, P]
    return (index.t1 - index.t0).sum((0, 2, 3)) + per_block.sum((0, 1, 3))


class Selection(NamedTuple):
    """What estimation selected, per row, segment, head and phase (see the module docstring)."""

    dist: jax.Array         # [B, G, N, P, D] sorted distances
    dist_count: jax.Array   # [B, G, N, P]
    cols: jax.Array         # [B, G, N, P, V] sorted key positions
    col_count: jax.Array    # [B, G, N, P]
    seg_begin: jax.Array    # [B, G] first position of each segment
    seg_end: jax.Array      # [B, G] one past its last (empty segments: end <= begin)


def checked(sel: Selection, B: int, N: int, P: int) -> Selection:
    """``sel`` for B rows, N query heads and P mask phases, with its counts clipped to the lists' capacity;
    one-line errors for other shapes, and, where the values are known (not under jit), for lists that are
    not sorted or hold negative entries."""
    shapes = {name: tuple(getattr(sel, name).shape) for name in Selection._fields}
    G = shapes["seg_begin"][1] if len(shapes["seg_begin"]) == 2 else None
    D, V = shapes["dist"][-1:], shapes["cols"][-1:]
    want = {"dist": (B, G, N, P, *D), "dist_count": (B, G, N, P), "cols": (B, G, N, P, *V),
            "col_count": (B, G, N, P), "seg_begin": (B, G), "seg_end": (B, G)}
    wrong = [f"{name} {shapes[name]}" for name in want if G is None or shapes[name] != want[name]]
    if wrong:
        raise ValueError(f"the selection must be dist [B, G, N, P, D], cols [B, G, N, P, V], their counts "
                         f"[B, G, N, P] and seg_begin / seg_end [B, G] for B={B} rows, N={N} query heads and P={P} "
                         f"mask phases; got {', '.join(wrong)}")
    sel = sel._replace(dist_count=jnp.clip(sel.dist_count, 0, shapes["dist"][-1]),
                       col_count=jnp.clip(sel.col_count, 0, shapes["cols"][-1]))
    for name, count in (("dist", "dist_count"), ("cols", "col_count")):
        values, n = known(getattr(sel, name)), known(getattr(sel, count))
        if values is None or n is None:
            continue
        valid = np.arange(values.shape[-1]) < n[..., None]
        if (valid & (values < 0)).any():
            raise ValueError(f"selection {name} holds a negative entry ({int(values[valid].min())})")
        if (valid[..., 1:] & (values[..., 1:] < values[..., :-1])).any():
            raise ValueError(f"selection {name} must be sorted in increasing order within its {count}")
    return sel


def segment_of(sel: Selection, positions):
    """Segment index [B, T] of query positions [B, T]: the one holding their 64-row block's first row."""
    G = sel.seg_begin.shape[1]
    q0 = (positions // BAND) * BAND
    inside = (q0[:, :, None] >= sel.seg_begin[:, None, :]) & (q0[:, :, None] < sel.seg_end[:, None, :])
    last = jnp.max(jnp.where(sel.seg_end > sel.seg_begin, jnp.arange(G)[None], 0), axis=1)
    return jnp.where(inside.any(-1), jnp.argmax(inside, -1), last[:, None]).astype(jnp.int32)


def allows(sel: Selection, p: int, positions, slots):
    """The sparse part of the mask in phase index ``p``: bool [B, N, T, S'] for query positions [B, T]
    and key slots [S'] (AND it with ``MaskSpec.visible`` for the whole mask)."""
    seg = segment_of(sel, positions)
    pick = lambda a: jnp.take_along_axis(a[:, :, :, p], seg[:, :, None, None], axis=1)  # noqa: E731
    d, c = pick(sel.dist), pick(sel.cols)                                  # [B, T, N, D|V]
    dn = jnp.take_along_axis(sel.dist_count[:, :, :, p], seg[:, :, None], axis=1)        # [B, T, N]
    cn = jnp.take_along_axis(sel.col_count[:, :, :, p], seg[:, :, None], axis=1)
    q0 = (positions // BAND) * BAND
    delta = q0[:, :, None, None] - slots[None, None, None, :]              # [B, T, 1, S']
    delta = jnp.broadcast_to(delta, d.shape[:3] + slots.shape)
    band = covered(d, dn, delta)
    V = c.shape[-1]
    cpad = jnp.where(jnp.arange(V) < cn[..., None], c, NO_KEY)
    flat_c = cpad.reshape(-1, V)
    flat_k = jnp.broadcast_to(slots, d.shape[:3] + slots.shape).reshape(flat_c.shape[0], -1)
    i = jax.vmap(lambda a, x: jnp.searchsorted(a, x, side="left"))(flat_c, flat_k)
    vert = (jnp.take_along_axis(flat_c, jnp.minimum(i, V - 1), axis=-1) == flat_k).reshape(band.shape)
    return (band | vert).transpose(0, 2, 1, 3)


def allows_in_blocks(sel: Selection, p: int, positions, slots):
    """``allows`` for rows of consecutive positions (``positions[b, t] = positions[b, 0] + t``; a row that is
    not, e.g. padding a caller masks out, gets some block's answer): a row's mask depends on it only through
    its 64-row block (``q0``), so ``allows`` runs once per block that the rows touch and each row takes its
    block's. Equal to ``allows`` for those rows, at ~1/64 of its work (a 1000-row reference mask: 2.2 -> 0.3 s)."""
    T = positions.shape[1]
    n_blocks = -(-T // BAND) + 1                          # T consecutive rows touch at most this many blocks
    first = (positions[:, :1] // BAND) * BAND
    starts = first + BAND * jnp.arange(n_blocks, dtype=jnp.int32)[None]                 # [B, n_blocks]
    which = jnp.clip((positions - first) // BAND, 0, n_blocks - 1)                       # [B, T]
    per_block = allows(sel, p, starts, slots)                                            # [B, N, n_blocks, S']
    return jax.vmap(lambda m, w: m[:, w])(per_block, which)


def dense_mask(sel: Selection, positions, n_keys: int):
    """The sparse restriction for every phase: bool [P, B, N, T, n_keys] (the reference's ``restrict``) for
    rows of consecutive positions [B, T] (``allows_in_blocks``)."""
    slots = jnp.arange(n_keys, dtype=jnp.int32)
    return jnp.stack([allows_in_blocks(sel, p, positions, slots) for p in range(sel.dist.shape[3])])


def random_selection(rng, shape, seg_begin, seg_end, *, max_dist: int, n_keys: int, empty_head: bool = True):
    """A random ``Selection`` of ``shape`` (B, G, N, P, D, V) for tests and GPU checks: sorted distinct
    distances below ``max_dist`` and columns below ``n_keys``; some (row, segment, head, phase) lists
    empty, and with ``empty_head`` row 0 / head 0 empty everywhere (its queries see nothing)."""
    import numpy as np
    B, G, N, P, D, V = shape
    dist = np.full((B, G, N, P, D), NO_KEY, np.int32)
    cols = np.full((B, G, N, P, V), NO_KEY, np.int32)
    dn = np.zeros((B, G, N, P), np.int32)
    cn = np.zeros((B, G, N, P), np.int32)
    for idx in np.ndindex(B, G, N, P):
        if rng.random() < 0.15 or (empty_head and idx[0] == 0 and idx[2] == 0):
            continue
        nd = int(rng.integers(1, D + 1))
        dist[idx][:nd], dn[idx] = np.sort(rng.choice(max_dist, nd, replace=False)), nd
        nc = int(rng.integers(0, V + 1))
        cols[idx][:nc], cn[idx] = np.sort(rng.choice(n_keys, nc, replace=False)), nc
    return Selection(*(jnp.asarray(x) for x in (dist, dn, cols, cn)), seg_begin, seg_end)


@jax.jit
def block_sparse_index(blocks, counts, q_offset, kv_length) -> tuple[VSIndex, jax.Array]:
    """The general block-sparse mask in the kernels' index format: query block ``i`` (64 rows from
    ``q_offset + 64 i``) sees, in phase ``p``, the 64-key blocks ``blocks[b, n, i, p, :counts[b, n, i, p]]``
    (duplicates count once). Each query block becomes its own segment with its own tile table, so the
    vertical-slash kernels run it unchanged. Returns ``(index, col_count)`` (no vertical columns)."""
    B, N, nqb, P, M = blocks.shape
    valid = jnp.arange(M) < counts[..., None]
    starts = jnp.sort(jnp.where(valid, blocks * BAND, NO_KEY), axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(starts[..., :1], bool), starts[..., 1:] == starts[..., :-1]], axis=-1)
    starts = jnp.sort(jnp.where(dup, NO_KEY, starts), axis=-1)
    n = (starts < NO_KEY).sum(-1).astype(jnp.int32)                      # [B, N, nqb, P]
    q0 = block_starts(q_offset, nqb)                                     # [B, nqb]
    rel = starts - q0[:, None, :, None, None]
    live = starts < NO_KEY
    rel_start = jnp.where(live, rel, NO_KEY).transpose(0, 2, 1, 3, 4)   # [B, G=nqb, N, P, M]
    rel_end = jnp.where(live, rel + BAND, NO_KEY).transpose(0, 2, 1, 3, 4)
    index = VSIndex(rel_start=rel_start, rel_end=rel_end, t0=jnp.zeros_like(n), t1=n,
                    block_seg=jnp.broadcast_to(jnp.arange(nqb, dtype=jnp.int32), (B, nqb)),
                    vpos=jnp.full((B, nqb, N, P, BAND), NO_KEY, jnp.int32),
                    keep=jnp.zeros((B, N, nqb, P, BAND), bool))
    return index, jnp.zeros((B, nqb, N, P), jnp.int32)


def block_sparse_dense_mask(blocks, counts, positions, n_keys: int):
    """Reference of ``block_sparse_index``'s mask: bool [P, B, N, T, n_keys] for query positions [B, T]
    (positions in 64-row blocks counted from the first query's block)."""
    B, N, nqb, P, M = blocks.shape
    block_of = (positions - positions[:, :1]) // BAND                    # [B, T]
    listed = jnp.take_along_axis(blocks, block_of[:, None, :, None, None], axis=2)      # [B, N, T, P, M]
    cnt = jnp.take_along_axis(counts, block_of[:, None, :, None], axis=2)              # [B, N, T, P]
    kb = jnp.arange(n_keys, dtype=jnp.int32) // BAND
    hit = (listed[..., None] == kb) & (jnp.arange(M)[:, None] < cnt[..., None, None])  # [B, N, T, P, M, S]
    return hit.any(-2).transpose(3, 0, 1, 2, 4)
