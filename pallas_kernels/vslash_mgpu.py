"""Vertical-slash sparse attention for Hopper GPUs in Pallas Mosaic GPU: TMA, wgmma, warp specialisation.

``flash_mgpu``'s structure over a sparse key list. A program (grid ``(N, T / 128, B)``) owns a *pair* of
64-row query blocks starting at ``q0`` and ``q0 + 64`` (``consumers=3``: three blocks, grid ``(N, T /
192, B)``, each rule below for C blocks); consumer warpgroup ``c`` computes block ``c``,
the producer warpgroup streams ``block_k``-key windows into a ring of ``stages`` slots by TMA, and the
consumers compute their windows on the tensor cores (optionally taking turns, as in the dense kernel).

Block ``c``'s band runs are the key ranges ``[q0 + 64 c + lo, q0 + 64 c + hi)`` (``lo, hi`` the run's
bounds relative to the block start, ``vslash.run_tiles``). A run is cut into windows of ``block_k``
keys starting on the 8-row grid (TMA into wgmma-tiled shared memory needs it) either *shared*, over
``[q0 + lo, q0 + hi + 64)`` for both blocks, each consumer masking a window to its own run range, or
*per consumer*, each block's keys in its own windows that the other consumer skips, whichever costs
less, a skipped step counting ``SKIP_COST`` of a computed window (``pair_windows``). Vertical columns
come pre-gathered into contiguous tiles (``vslash.gather_verticals``), masked per column by position and by the block's
``keep`` row (columns its bands already cover). Per window and consumer the step is one of

    SKIP     nothing visible (or the block is not in this part): wait for the data, hand the slot back
    WHOLE    every row sees every key of the window: no mask
    COLUMNS  every row sees the keys in ``[lo, hi)``, the run's part of the window (no row's phase range
             cuts it): a mask of the window's columns, the same for every row
    MASKED   rows see the keys in ``[max(a_r, lo), min(b_r, hi))``, ``[a_r, b_r)`` the row's phase range
             (``MaskSpec.key_range`` of one row is an interval, and it grows with the row)

so only edge windows are masked, and most of them (a run's ends away from the diagonal and the phase
bounds) by a compare per column rather than two per logit. DCA: one query copy per phase,
reloaded between phases, all phases in one online softmax. The two blocks of a pair usually share a
segment (their tables); a pair cut by a segment boundary walks two *parts*, one per block's segment,
the other consumer skipping.

Knobs. ``block_k``: any multiple of 16 keys from 64 (wgmma's K for P V is a multiple of the swizzle's
width, so V takes a 128-, 64- or 32-byte swizzle, ``flash_mgpu.v_swizzle``). A band of 64 keys at an
unaligned start needs two 64-key windows but fits one of 80 or more, cut per consumer; on measured
masks most keys lie in long runs, and the width matters through the steps' fixed costs: 96 keys (3
stages) measured fastest on an H100 (``pallas_kernels.MGPU_SPARSE_BLOCK_K``). ``pingpong`` (the dense
kernel's schedule barrier) overlaps one consumer's softmax with the other's matmuls, but a consumer
that skips a window still waits for its partner's turn; without it a skipping consumer runs ahead
(up to ``stages`` windows) instead. ``prefetch`` reads each step's table entries a step ahead.

The schedule is computed before the kernel, in XLA (``pair_windows``, ``pair_schedule``): per
(row, head, pair, phase, part) the windows and vertical tiles that meet the consumers' key ranges.
In the kernel every warpgroup reads the same scalars from GMEM, so they all walk one step list
and every barrier sees the same arrivals.

Shapes: queries [B, T, N, H] per phase (bf16 / f16, H % 64 == 0), k, v [B, K, S, H] read in place,
index from ``vslash.build_index`` (any tile width: runs are recovered from it). out [B, T, N, H],
lse [B, T, N] float32 natural log; a row that sees no key gets out 0, lse -inf. GPUs only (no CPU
interpreter): ``jax.export(..., platforms=["cuda"])`` proves the lowering on a CPU, and
tests/test_sparse.py replays the schedule, the masks and the arithmetic in numpy.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_mgpu import (SMEM_BYTES, WindowSteps, check_consumers, launch, registers, smem_bytes,
                                       store_rows)
from pallas_kernels.masks import MASK_VALUE, MaskSpec
from pallas_kernels.shapes import attention_dims, pad_queries
from pallas_kernels.vslash import BAND, NO_KEY, VSIndex, gather_verticals, pad_verticals

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
SKIP, WHOLE, MASKED, COLUMNS = 0, 1, 2, 3
BOTH = -1         # a slash window every consumer uses (``pair_windows``; else ``who`` is the one consumer's index)
SKIP_COST = 0.25  # a skipped window's cost against a computed one, when choosing how to cut a run (measured:
                  # 0.25 / 0.1 2% faster than 0.5 at 128K and 1M on an H100, 1.0 12% slower; GPU_NOTES, 9th session)
BIG = 2 ** 30
ROW_ALIGN = 8     # TMA into wgmma-tiled shared memory starts at a multiple of the 8-row tile
M_FLOOR = -1e30   # the running max's start: above MASK_VALUE, below any real logit


# A schedule row (``pair_schedule``): t0, t1, v0, v1, segment, an active flag per consumer, the first step.
ACTIVE = 5        # consumer 0's active flag; consumer c's at ACTIVE + c, the first step at ACTIVE + C


def check_supported(queries: tuple, k, v, block_k: int, stages: int, consumers: int = 2,
                    pingpong: bool = False) -> None:
    """A clear error for what this kernel cannot do (``impl='triton'`` can)."""
    from pallas_kernels.flash_mgpu import check_supported as check_dense
    check_dense(queries, k, v, BAND, BAND, stages)          # dtypes, head_dim, stages
    if block_k < BAND or block_k % 16:
        raise ValueError(f"the mosaic_gpu sparse kernel's windows must be multiples of 16 keys, at least {BAND} "
                         f"(wgmma's K for P V), got block_k={block_k}")
    if k.shape[2] % ROW_ALIGN:
        raise ValueError(f"the mosaic_gpu sparse kernel needs a cache length that is a multiple of {ROW_ALIGN}, "
                         f"got {k.shape[2]}")
    if k.shape[2] < block_k:
        raise ValueError(f"the mosaic_gpu sparse kernel needs a cache of at least block_k={block_k} slots, "
                         f"got {k.shape[2]}")
    check_consumers(consumers, pingpong)
    H, item = k.shape[-1], k.dtype.itemsize
    smem = smem_bytes(BAND, block_k, stages, H, item, consumers)
    if smem > SMEM_BYTES:
        raise ValueError(f"mosaic_gpu sparse kernel: block_k={block_k}, stages={stages}, {consumers} consumers and "
                         f"head_dim {H} need {smem} bytes of shared memory, more than {SMEM_BYTES}; lower block_k "
                         f"or stages")


def max_stages(block_k: int, H: int = 128, item: int = 2, most: int = 4, consumers: int = 2) -> int:
    """The deepest K/V ring (at most ``most``) that fits in shared memory."""
    stages = most
    while stages > 2 and smem_bytes(BAND, block_k, stages, H, item, consumers) > SMEM_BYTES:
        stages -= 1
    return stages


# ----------------------------------------------------------------------------------------------
# The schedule (XLA, before the kernel)


def pair_windows(rel_start, rel_end, block_k: int, consumers: int = 2):
    """The windows of a program's C = ``consumers`` blocks (a pair by default): ``(ws, lo, hi, who)``
    [..., cap] int32 from the tiles [..., TC] of ``vslash.run_tiles`` (or ``block_sparse_index``), all
    relative to the first block's start.

    Window ``w`` loads keys ``[ws, ws + block_k)`` for the run ``[lo, hi)`` (block 0's keys; block c's
    are ``[lo + 64 c, hi + 64 c)``) and serves the consumers ``who`` says (``BOTH``: all of them, or
    consumer ``who`` alone: 0, 1 or 2); padding windows have ``ws = lo = hi = NO_KEY``.
    Windows start on the 8-row grid (``ROW_ALIGN``: TMA into wgmma-tiled shared memory needs it). A run
    is cut one of two ways:

    shared  windows from the run's 8-aligned start over ``[lo, hi + 64 (C - 1))``, every consumer masking
            each to its own keys: a run of m distances (at most 64 m keys) takes at most
            ceil((64 m + 64 (C - 1) + 7) / block_k) <= m ceil((64 C + 7) / block_k) windows
    split   each consumer its own windows over its own keys (block c's from the 8-aligned start + 64 c),
            the others skipping them: with windows wider than 71 keys a lone diagonal's band fits one
            window per consumer (C computed windows, not C + 1)

    whichever costs less, counting a computed window 1 and a skipped step ``SKIP_COST`` (and split only
    where its windows fit the run's rows of the table). The table has TC ceil((64 C + 7) / block_k) rows."""
    C = consumers
    TC = rel_start.shape[-1]
    per_tile = -(-(C * BAND + ROW_ALIGN - 1) // block_k)
    cap = TC * per_tile
    valid = rel_start < NO_KEY
    prev_end = jnp.concatenate([jnp.full_like(rel_end[..., :1], -BIG), rel_end[..., :-1]], axis=-1)
    first = valid & (rel_start != prev_end)                 # runs are >= 1 key apart: touching tiles are one run
    next_first = jnp.concatenate([first[..., 1:], jnp.ones_like(first[..., :1])], axis=-1)
    next_valid = jnp.concatenate([valid[..., 1:], jnp.zeros_like(valid[..., :1])], axis=-1)
    last = valid & (next_first | ~next_valid)
    axis = rel_start.ndim - 1
    run_lo = lax.cummax(jnp.where(first, rel_start, -BIG), axis=axis)
    run_hi = lax.cummin(jnp.where(last, rel_end, BIG), axis=axis, reverse=True)
    idx = lax.broadcasted_iota(jnp.int32, rel_start.shape, axis)
    run_tiles = lax.cummin(jnp.where(last, idx, BIG), axis=axis, reverse=True) - idx + 1   # at a run's first tile
    run_lo8 = run_lo // ROW_ALIGN * ROW_ALIGN            # windows start on the 8-row grid (q0 is on it too)
    ceil = lambda x: -(-x // block_k)  # noqa: E731
    shared = ceil(run_hi + BAND * (C - 1) - run_lo8)
    own = ceil(run_hi - run_lo8)                           # one consumer's windows over its own keys
    # shared windows consumer c computes: those meeting its keys [lo + 64 c, hi + 64 c)
    computed = sum(ceil(run_hi + BAND * c - run_lo8) - (BAND * c + run_lo - run_lo8) // block_k for c in range(C))
    cost_shared = computed + SKIP_COST * (C * shared - computed)
    cost_split = C * own * (1 + (C - 1) * SKIP_COST)
    split = (cost_split < cost_shared) & (C * own <= run_tiles * per_tile)
    n_win = jnp.where(first, jnp.where(split, C * own, shared), 0)
    cum = jnp.cumsum(n_win, axis=-1)
    w = jnp.arange(cap, dtype=jnp.int32)
    flat = cum.reshape(-1, TC)
    owner = jax.vmap(lambda c: jnp.searchsorted(c, w, side="right"))(flat).reshape(cum.shape[:-1] + (cap,))
    owner = jnp.minimum(owner, TC - 1)
    take = lambda a: jnp.take_along_axis(a, owner, axis=-1)  # noqa: E731
    lo, hi = take(run_lo), take(run_hi)
    i = w - take(cum - n_win)                               # the window's place in its run
    n_own, is_split = take(own), take(split)
    mine = i // jnp.maximum(n_own, 1)                       # split: the consumer whose window it is
    ws = take(run_lo8) + jnp.where(is_split, BAND * mine + (i - mine * n_own) * block_k, i * block_k)
    who = jnp.where(is_split, mine, BOTH)
    live = w < cum[..., -1:]
    far = jnp.int32(NO_KEY)
    return (jnp.where(live, ws, far), jnp.where(live, lo, far), jnp.where(live, hi, far),
            jnp.where(live, who, BOTH).astype(jnp.int32))      # [..., cap]


def useful(ws, lo, hi, who, block_k: int, consumers: int = 2):
    """The keys of window ``(ws, lo, hi, who)`` its consumers use, relative to the first block's start:
    ``[max(ws, lo + 64 c_first), min(ws + block_k, hi + 64 c_last))`` over the consumers it serves."""
    alone = who != BOTH
    return (jnp.maximum(ws, lo + BAND * jnp.where(alone, who, 0)),
            jnp.minimum(ws + block_k, hi + BAND * jnp.where(alone, who, consumers - 1)))


def pair_schedule(index: VSIndex, ws, lo, hi, who, q_offset, kv_length, mask: MaskSpec, block_k: int, n_pairs: int,
                  consumers: int = 2):
    """``sched`` [B, N, n_pairs, P, C, ACTIVE + C + 1] int32: per program (C = ``consumers`` blocks), phase and
    part (the segment of block 0, then each later block's if no earlier block has it) the windows ``[t0,
    t1)`` and vertical tiles ``[v0, v1)`` that meet the key range of a consumer in that part, the part's
    segment, which consumers are in it, and the index of its first step in the program's step list
    (windows then vertical tiles, part after part)."""
    C = consumers
    B, Gs, N, P, TC = ws.shape
    nqb = index.block_seg.shape[1]
    seg = jnp.pad(index.block_seg, ((0, 0), (0, C * n_pairs - nqb)), constant_values=-1).reshape(B, n_pairs, C)
    valid = seg >= 0                                                           # [B, n_pairs, c]
    earlier = jnp.tril(jnp.ones((C, C), bool), -1)                             # [part, c]: c < part
    new = ~jnp.any(earlier & (seg[..., :, None] == seg[..., None, :]), axis=-1)
    live = valid & new                                                         # parts: each segment once
    act = live[..., :, None] & valid[..., None, :] & (seg[..., :, None] == seg[..., None, :])  # [B, pairs, part, c]
    part_seg = jnp.maximum(seg, 0)
    q0 = q_offset[:, None] + C * BAND * jnp.arange(n_pairs, dtype=jnp.int32)[None]           # [B, n_pairs]
    # Windows overlap where one run's tail window reaches past the next run's start, so neither starts
    # nor ends are sorted: search the running max of the ends (windows before t0 all end by the range
    # start) and the suffix min of the useful starts (windows from t1 on all start past its end).
    live = ws < NO_KEY
    u_lo, u_hi = useful(ws, lo, hi, who, block_k, C)
    end = lax.cummax(jnp.where(live, u_hi, NO_KEY), axis=4)
    start = lax.cummin(jnp.where(live, u_lo, NO_KEY), axis=4, reverse=True)
    vpos = index.vpos

    def search(table, x, side):          # table [B, Gs, N, L], x [B, Q] -> [B, Q, N] at the part's segment
        f = jax.vmap(jax.vmap(jax.vmap(lambda row, xs: jnp.searchsorted(row, xs, side=side), (0, None)),
                              (0, None)), (0, 0))
        found = f(table, x.reshape(B, -1))                                     # [B, Gs, N, Q]
        at = part_seg.reshape(B, 1, 1, -1)
        return jnp.take_along_axis(found, at, axis=1)[:, 0].transpose(0, 2, 1)

    per_phase = []
    for p, phase in enumerate(mask.phases):
        first = q0[..., None] + BAND * jnp.arange(C, dtype=jnp.int32)                        # [B, pairs, c]
        klo, khi = mask.key_range(phase, first, first + BAND - 1, kv_length[:, None, None])
        k_lo = jnp.min(jnp.where(act, klo[:, :, None, :], BIG), axis=-1)                    # [B, pairs, part]
        k_hi = jnp.max(jnp.where(act, khi[:, :, None, :], -BIG), axis=-1)
        some = k_hi > k_lo
        t0 = search(end[:, :, :, p], k_lo - q0[..., None], "right")
        t1 = jnp.maximum(search(start[:, :, :, p], k_hi - q0[..., None], "left"), t0)
        v0 = search(vpos[:, :, :, p], k_lo, "left") // block_k
        v1 = jnp.maximum(-(-search(vpos[:, :, :, p], k_hi, "left") // block_k), v0)
        ranges = jnp.where(some.reshape(B, -1, 1, 1), jnp.stack([t0, t1, v0, v1], -1), 0)   # [B, Q, N, 4]
        part = jnp.concatenate([part_seg[..., None], act], -1).astype(jnp.int32)          # [B, pairs, part, 1 + C]
        part = jnp.broadcast_to(part.reshape(B, -1, 1, 1 + C), ranges.shape[:-1] + (1 + C,))
        per_phase.append(jnp.concatenate([ranges, part], -1).astype(jnp.int32))           # [B, Q, N, 5 + C]
    F = ACTIVE + C
    sched = jnp.stack(per_phase, axis=2)                                       # [B, Q, P, N, F]
    sched = sched.reshape(B, n_pairs, C, P, N, F).transpose(0, 4, 1, 3, 2, 5)  # [B, N, n_pairs, P, C, F]
    steps = (sched[..., 1] - sched[..., 0] + sched[..., 3] - sched[..., 2]).reshape(B, N, n_pairs, C * P)
    first_step = (jnp.cumsum(steps, axis=-1) - steps).reshape(B, N, n_pairs, P, C, 1)
    return jnp.concatenate([sched, first_step.astype(jnp.int32)], axis=-1)


# ----------------------------------------------------------------------------------------------
# Per-step decisions, shared by the kernel and the numpy replay in tests/test_sparse.py (any backend)


def slash_bounds(ws, lo, hi, who, q0, c, block_k: int, n_keys: int):
    """Window ``(ws, lo, hi, who)`` for consumer ``c``: ``(start, klo, khi)``, the loaded keys ``[start,
    start + block_k)`` (clipped into the cache) and the consumer's run keys ``[klo, khi)`` inside the
    window (empty where the window serves another consumer only)."""
    start = jnp.clip(q0 + ws, 0, n_keys - block_k)
    klo = q0 + jnp.maximum(ws, lo + BAND * c)
    khi = q0 + jnp.minimum(ws + block_k, hi + BAND * c)
    mine = (who == BOTH) | (who == c)
    return start, klo, jnp.where(mine, khi, klo)


def row_span(mask: MaskSpec, phase: str, first, kv_length):
    """``(a_first, a_last, b_first, b_last)``: the phase key range ``[a_r, b_r)`` of a block's first and
    last rows. Both bounds grow with the row, so these bound every row's."""
    last = first + BAND - 1
    a_first, b_first = mask.key_range(phase, first, first, kv_length)
    a_last, b_last = mask.key_range(phase, last, last, kv_length)
    return a_first, a_last, b_first, b_last


def slash_kind(start, klo, khi, span, block_k: int, active):
    """SKIP, WHOLE, COLUMNS or MASKED for a consumer's window (``span`` from ``row_span``)."""
    a_first, a_last, b_first, b_last = span
    empty = jnp.logical_not(active) | (jnp.maximum(klo, a_first) >= jnp.minimum(khi, b_last))
    rows_free = (klo >= a_last) & (khi <= b_first)          # every row's range holds [klo, khi)
    whole = rows_free & (start >= klo) & (start + block_k <= khi)
    return jnp.where(empty, SKIP, jnp.where(whole, WHOLE, jnp.where(rows_free, COLUMNS, MASKED))).astype(jnp.int32)


def vertical_kind(first_col, last_col, span, active):
    """SKIP or MASKED for a vertical tile whose (sorted) columns run from ``first_col`` to ``last_col``."""
    a_first, _, _, b_last = span
    seen = jnp.logical_and(active, first_col < b_last) & (last_col >= a_first)
    return jnp.where(seen, MASKED, SKIP).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# The kernel


def _load_cols(ref, layout):
    """``plgpu.load`` of a whole GMEM ref into registers (jax 0.10 takes the index positionally, 0.11
    deprecates it; the bank-conflict-free "optimized" plan exists only for SMEM)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


def _kernel(meta_ref, scale_ref, sched_ref, win_ref, vpos_ref, keep_ref, *refs, mask: MaskSpec, G: int,
            block_k: int, stages: int, n_pairs: int, heavy_first: bool, pingpong: bool, prefetch: bool,
            consumers: int = 2):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    W = block_k
    n_phases = len(mask.phases)
    q_refs = refs[:n_phases]
    k_ref, v_ref, kg_ref, vg_ref, out_ref, lse_ref, scoped = refs[n_phases:]
    (qo_smem2, k_smem, v_smem, lse_smem2), (k_bar, v_bar, q_bar), (k_free, v_free), turn = scoped
    b, n, qi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
    if heavy_first:                       # causal: later pairs see more keys; launching them first shortens the tail
        qi = n_pairs - 1 - qi
    wg = lax.axis_index("wg")
    kvh = lax.div(n, jnp.int32(G))
    q_offset, kv_length = meta_ref[b, 0], meta_ref[b, 1]
    C = consumers
    q0 = q_offset + qi * (C * BAND)
    Gs, N, P = vpos_ref.shape[1:4]
    n_keys = k_ref.shape[2]
    last_win, last_vtile = max(win_ref.shape[4] - 1, 0), max(vpos_ref.shape[4] // W - 1, 0)   # prefetch clamps


    def part(p: int, part: int):
        """Phase ``p``'s part ``part`` of the step list every warpgroup walks: its windows, then its
        vertical tiles. Read where it is used, so few scalars stay live (the producer has 40 registers, 24
        beside three consumers)."""
        t0, t1, v0, v1, g = (sched_ref[b, n, qi, p, part, f] for f in range(ACTIVE))
        first_step = sched_ref[b, n, qi, p, part, ACTIVE + C]
        return dict(p=p, part=part, g=g, t0=t0, t1=t1, v0=v0, v1=v1, slash_off=first_step - t0,
                    vert_off=first_step + (t1 - t0) - v0, end=first_step + (t1 - t0) + (v1 - v0))

    parts = [(p, q) for p in range(n_phases) for q in range(C)]
    regs, producer_regs = registers(C)

    def take_turns():
        if pingpong:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    def tile_row(e):                      # the gathered vertical tiles of (row, segment, head, phase)
        return ((b * Gs + e["g"]) * N + n) * P + e["p"]

    @pl.when(wg < C)
    def _consumer():
        plgpu.set_max_registers(regs, action="increase")
        qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
        row0 = qi * (C * BAND) + wg * BAND
        first = q0 + wg * BAND
        scale2 = scale_ref[b] * LOG2E                     # logits in base 2: exp2 is one instruction
        total = part(*parts[-1])["end"]
        H = qo_smem.shape[-1]
        steps = WindowSteps(qo_smem, k_smem, v_smem, k_bar, k_free, v_bar, v_free, stages=stages, total=total,
                            scale2=scale2, take_turns=take_turns, turn=turn if pingpong else None)
        row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

        def compute(carry, step, masks):
            """One window, masked by the first ``visible()`` -> bool [64, W] of ``masks``, a list of ``(when,
            visible)`` whose ``when`` (a bool, or a traced one) holds; by none where none does. Masked logits
            become MASK_VALUE and the running max starts at M_FLOOR above it, so their probabilities
            underflow to exactly 0 with no second select."""
            def masking(s, masks=masks):
                if not masks:
                    return s
                (when, visible), rest = masks[0], masks[1:]
                apply = lambda s: jnp.where(visible(), s, MASK_VALUE)  # noqa: E731
                # elementwise work only under the conditions: the wgmma stay in straight-line code
                return apply(s) if when is True else lax.cond(when, apply, lambda s: masking(s, rest), s)

            return steps.compute(carry, step, (BAND, W), lambda s: (masking(s), None))

        skip = steps.skip

        def between(lo_rows, hi_rows, pos):
            """bool [64, W]: ``lo_r <= pos < hi_r`` for row bounds [64] and key positions [64, W]."""
            shape = (BAND, W)
            # a bound that is the same for every row (causal: a_r = 0) is a splat: give it the row layout
            lo_rows, hi_rows = (plgpu.layout_cast(x, row_layout) for x in (lo_rows, hi_rows))
            return ((pos >= lax.broadcast_in_dim(lo_rows, shape, [0]))
                    & (pos < lax.broadcast_in_dim(hi_rows, shape, [0])))

        m = plgpu.layout_cast(jnp.full((BAND,), M_FLOOR, jnp.float32), row_layout)
        l = plgpu.layout_cast(jnp.full((BAND,), 0.0, jnp.float32), row_layout)
        acc = plgpu.layout_cast(jnp.full((BAND, H), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        carry = (acc, m, l)
        steps.wait_keys(jnp.int32(0))
        pl.when(wg == 1)(take_turns)
        for p, (phase, q_ref) in enumerate(zip(mask.phases, q_refs)):
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, BAND), n], qo_smem, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            rows = first + plgpu.broadcasted_iota(jnp.int32, (BAND,), 0, layout=row_layout)
            a_rows, b_rows = mask.key_range(phase, rows, rows, kv_length)      # [64]: row r sees [a_r, b_r)
            span = row_span(mask, phase, first, kv_length)
            for e in (part(p_, q) for p_, q in parts if p_ == p):
                active = sched_ref[b, n, qi, e["p"], e["part"], ACTIVE + wg] != 0

                def slash_fields(w, e=e):
                    return tuple(win_ref[b, e["g"], n, e["p"], w, f] for f in range(4))

                def slash(w, state, e=e, active=active, a_rows=a_rows, b_rows=b_rows, span=span):
                    carry, fields = state
                    step = w + e["slash_off"]
                    if prefetch:           # the next window's fields load while this window computes
                        ahead = slash_fields(jnp.minimum(w + 1, last_win))
                    else:
                        fields = ahead = slash_fields(w)
                    start, klo, khi = slash_bounds(*fields, q0, wg, W, n_keys)
                    kind = slash_kind(start, klo, khi, span, W, active)

                    def rows_and_columns():
                        pos = start + plgpu.broadcasted_iota(jnp.int32, (BAND, W), 1, layout=plgpu.Layout.WGMMA)
                        return between(jnp.maximum(a_rows, klo), jnp.minimum(b_rows, khi), pos)

                    def columns():
                        pos = start + plgpu.broadcasted_iota(jnp.int32, (W,), 0, layout=col_layout)
                        return lax.broadcast_in_dim((pos >= klo) & (pos < khi), (BAND, W), [1])

                    masks = [(kind == COLUMNS, columns), (kind == MASKED, rows_and_columns)]
                    carry = lax.cond(kind == SKIP, lambda c: skip(c, step), lambda c: compute(c, step, masks), carry)
                    return carry, ahead

                def tile_ends(j, e=e):
                    return vpos_ref[b, e["g"], n, e["p"], j * W], vpos_ref[b, e["g"], n, e["p"], j * W + W - 1]

                def vertical(j, state, e=e, active=active, a_rows=a_rows, b_rows=b_rows, span=span):
                    carry, ends = state
                    step = j + e["vert_off"]
                    g, p_ = e["g"], e["p"]
                    if prefetch:
                        ahead = tile_ends(jnp.minimum(j + 1, last_vtile))
                    else:
                        ends = ahead = tile_ends(j)
                    kind = vertical_kind(*ends, span, active)

                    def masked(carry):
                        # Issued before the matmul so the loads' latency hides behind it.
                        pos = _load_cols(vpos_ref.at[b, g, n, p_, pl.ds(j * W, W)], col_layout)
                        keep = _load_cols(keep_ref.at[b, n, C * qi + wg, p_, pl.ds(j * W, W)], col_layout)
                        pos = jnp.where(keep != 0, pos, NO_KEY)
                        pos = lax.broadcast_in_dim(pos, (BAND, W), [1])
                        return compute(carry, step, [(True, lambda: between(a_rows, b_rows, pos))])

                    carry = lax.cond(kind == MASKED, masked, lambda c: skip(c, step), carry)
                    return carry, ahead

                zero = jnp.int32(0)
                first_win = slash_fields(jnp.minimum(e["t0"], last_win)) if prefetch else (zero,) * 4
                carry, _ = lax.fori_loop(e["t0"], e["t1"], slash, (carry, first_win))
                first_tile = tile_ends(jnp.minimum(e["v0"], last_vtile)) if prefetch else (zero,) * 2
                carry, _ = lax.fori_loop(e["v0"], e["v1"], vertical, (carry, first_tile))
        pl.when(wg == 0)(take_turns)

        store_rows(carry, qo_smem, lse_smem, out_ref.at[b, pl.ds(row0, BAND), n], lse_ref.at[b, n, pl.ds(row0, BAND)])

    @pl.when(wg == C)
    def _producer():
        plgpu.set_max_registers(producer_regs, action="decrease")

        def load(step, src_k, src_v):
            slot = lax.rem(step, jnp.int32(stages))

            @pl.when(step >= stages)
            def _():
                plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(src_k, k_smem.at[slot], k_bar.at[slot])

            @pl.when(step >= stages)
            def _():
                plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(src_v, v_smem.at[slot], v_bar.at[slot])

        for e in (part(p, q) for p, q in parts):
            def window_start(w, e=e):
                return jnp.clip(q0 + win_ref[b, e["g"], n, e["p"], w, 0], 0, n_keys - W)

            def slash(w, start, e=e):
                if prefetch:
                    ahead = window_start(jnp.minimum(w + 1, last_win))
                else:
                    start = ahead = window_start(w)
                # start is on the 8-row grid; written as a product so Mosaic GPU can see it
                at = (b, kvh, pl.ds(lax.div(start, jnp.int32(ROW_ALIGN)) * ROW_ALIGN, W))
                load(w + e["slash_off"], k_ref.at[at], v_ref.at[at])
                return ahead

            def vertical(j, carry, e=e):
                at = (tile_row(e), pl.ds(j * W, W))
                load(j + e["vert_off"], kg_ref.at[at], vg_ref.at[at])
                return carry

            lax.fori_loop(e["t0"], e["t1"], slash, window_start(jnp.minimum(e["t0"], last_win)) if prefetch
                          else jnp.int32(0))
            lax.fori_loop(e["v0"], e["v1"], vertical, None)


def _tables(index: VSIndex, q_offset, kv_length, mask: MaskSpec, block_k: int, n_pairs: int, consumers: int = 2):
    """Everything the kernel reads besides q, k, v: ``(sched, win, vpos, keep)`` (see ``_kernel``)."""
    index = pad_verticals(index, block_k)
    ws, lo, hi, who = pair_windows(index.rel_start, index.rel_end, block_k, consumers)
    sched = pair_schedule(index, ws, lo, hi, who, q_offset, kv_length, mask, block_k, n_pairs, consumers)
    win = jnp.stack([ws, lo, hi, who], axis=-1)                              # [B, Gs, N, P, cap, 4]
    nqb = index.keep.shape[2]
    keep = jnp.pad(index.keep, ((0, 0), (0, 0), (0, consumers * n_pairs - nqb), (0, 0), (0, 0))).astype(jnp.int8)
    return index, sched, win, index.vpos, keep


@functools.partial(jax.jit, static_argnames=("mask", "block_k", "stages", "heavy_first", "pingpong", "prefetch",
                                             "consumers"))
def vslash_attention_mgpu(queries: tuple, k, v, q_offset, kv_length, scale, index: VSIndex, col_count=None, *,
                          mask: MaskSpec, block_k: int = 128, stages: int = 2, heavy_first: bool = True,
                          pingpong: bool | None = None, prefetch: bool = True, consumers: int = 2):
    """``queries``: one q [B, T, N, H] per mask phase (rotated); k, v [B, K, S, H]; q_offset [B] (multiple
    of 64), kv_length [B] int32; scale [B] float32; ``index`` from ``vslash.build_index`` (any tile
    width); ``col_count`` is unused (the padded ``index.vpos`` says it), kept for the common signature.
    ``block_k``: keys per window (a multiple of 16, at least 64; see ``pair_windows``); ``pingpong``: the
    consumers take turns on the tensor cores (module docstring; default: where there are two); ``prefetch``:
    each step's table entries (a window's bounds, a vertical tile's first and last column) are read from
    GMEM one step ahead, so their latency hides behind the previous step's matmuls; ``consumers``: query
    blocks per program, one consumer warpgroup each (2, or 3 not taking turns). Returns ``(out [B, T, N,
    H], lse [B, T, N] float32)``."""

    del col_count
    pingpong = consumers == 2 if pingpong is None else pingpong
    check_supported(queries, k, v, block_k, stages, consumers, pingpong)
    d = attention_dims(queries, k, mask)
    B, T, N, H = d.B, d.T, d.N, d.H
    dtype = queries[0].dtype
    queries, n_pairs = pad_queries(queries, consumers * BAND)
    Tp = n_pairs * consumers * BAND
    index, sched, win, vpos, keep = _tables(index, q_offset, kv_length, mask, block_k, n_pairs, consumers)
    kg, vg = gather_verticals(k, v, index)                                   # [B, Gs, N, P, VC, H]
    kg, vg = (x.reshape(-1, *x.shape[-2:]) for x in (kg, vg))
    meta = jnp.stack([q_offset, kv_length], axis=1).astype(jnp.int32)

    body = functools.partial(_kernel, mask=mask, G=d.G, block_k=block_k, stages=stages, n_pairs=n_pairs,
                             heavy_first=heavy_first, pingpong=pingpong, prefetch=prefetch, consumers=consumers)
    out, lse = launch(body, (meta, scale.astype(jnp.float32), sched, win, vpos, keep, *queries, k, v, kg, vg), B=B,
                      Tp=Tp, N=N, H=H, dtype=dtype, n_pairs=n_pairs, block_q=BAND, block_k=block_k, stages=stages,
                      consumers=consumers)
    return out[:, :T], lse[:, :, :T].transpose(0, 2, 1)


def visited_pairs(index: VSIndex, q_offset, kv_length, mask: MaskSpec, block_k: int = 128, consumers: int = 2):
    """(query, key) pairs the kernel's windows span, all consumers, SKIP steps included: an upper
    bound of what it computes, for benchmarks (int, traced)."""
    n_pairs = -(-index.block_seg.shape[1] // consumers)
    _, sched, _, _, _ = _tables(index, q_offset, kv_length, mask, block_k, n_pairs, consumers)
    steps = (sched[..., 1] - sched[..., 0] + sched[..., 3] - sched[..., 2]).astype(jnp.float32).sum()
    return steps * (consumers * BAND * block_k)


def computed_pairs(index: VSIndex, q_offset, kv_length, mask: MaskSpec, block_k: int = 128, consumers: int = 2):
    """(query, key) pairs in the windows and vertical tiles the consumers compute (SKIP steps left out),
    decided as the kernel decides them, for benchmarks (float, traced). One head at a time."""
    C = consumers
    n_pairs = -(-index.block_seg.shape[1] // C)
    _, sched, win, vpos, _ = _tables(index, q_offset, kv_length, mask, block_k, n_pairs, C)
    B = sched.shape[0]
    W, cap, n_tiles = block_k, win.shape[4], vpos.shape[-1] // block_k
    q0 = (q_offset[:, None] + C * BAND * jnp.arange(n_pairs, dtype=jnp.int32)[None])[:, :, None, None, None]
    c = jnp.arange(C, dtype=jnp.int32)[None, None, None, :, None]             # [B, pairs, part, c, step]
    b = jnp.arange(B)[:, None, None]

    def head(n):
        total = jnp.float32(0)
        for p, phase in enumerate(mask.phases):
            f = sched[:, n, :, p]                                                 # [B, pairs, part, ACTIVE + C + 1]
            t0, t1, v0, v1, g = (f[..., i] for i in range(ACTIVE))              # [B, pairs, part]
            t0, t1, v0, v1 = (x[..., None, None] for x in (t0, t1, v0, v1))
            act = f[..., ACTIVE:ACTIVE + C][..., None] != 0                       # [B, pairs, part, c, 1]
            span = row_span(mask, phase, q0 + BAND * c, kv_length[:, None, None, None, None])
            rows = win[b, g, n, p]                                               # [B, pairs, part, cap, 4]
            ws, lo, hi, who = (rows[..., i][:, :, :, None] for i in range(4))
            _, klo, khi = slash_bounds(ws, lo, hi, who, q0, c, W, BIG)
            w = jnp.arange(cap, dtype=jnp.int32)
            kind = slash_kind(jnp.zeros_like(klo), klo, khi, span, W, act)     # SKIP does not depend on start
            total += jnp.sum(((w >= t0) & (w < t1) & (kind != SKIP)).astype(jnp.float32))
            cols = vpos[b, g, n, p].reshape(*f.shape[:3], n_tiles, W)            # [B, pairs, part, tiles, W]
            j = jnp.arange(n_tiles, dtype=jnp.int32)
            vkind = vertical_kind(cols[..., 0][:, :, :, None], cols[..., -1][:, :, :, None], span, act)
            total += jnp.sum(((j >= v0) & (j < v1) & (vkind != SKIP)).astype(jnp.float32))
        return total

    steps = lax.map(head, jnp.arange(sched.shape[1]))
    return steps.sum() * (BAND * block_k)
