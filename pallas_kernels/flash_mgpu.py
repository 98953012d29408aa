"""Flash attention forward for Hopper GPUs in Pallas Mosaic GPU: TMA loads, wgmma, warp specialisation.

The FlashAttention-3 structure, made position-aware: each program (grid ``(N, T / 2 block_q, B)``) has
three warpgroups. Warpgroup 2 is the producer: it streams the K/V blocks the two query blocks need,
phase after phase (see ``masks``), into a ring of ``stages`` shared-memory slots with TMA. Warpgroups
0 and 1 each own ``block_q`` query rows, run QK^T and PV on the tensor cores (wgmma) and the online
softmax in registers, taking turns on the tensor cores (a schedule barrier) so one's softmax hides
behind the other's matmuls. With ``consumers=3`` a program has three consumer warpgroups (three query
blocks, warpgroup 3 the producer) running free: 1.02-1.26x cuDNN against the two consumers' 0.97-1.16x
on an H100 at 32K-512K (GPU_NOTES, fourteenth session), the default of ``pallas_kernels.flash_attention``.

The consumers walk the same step list (the producer's), so every barrier sees the same arrivals; a
step outside a consumer's own key range only waits for its data and hands the slot back. The mask is
applied only on edge blocks (``MaskSpec.interior`` tells which blocks every query sees whole). DCA
needs one query copy per phase: a consumer reloads its query tile between phases, and the phases run
in one online softmax with no merge.

Queries [B, T, N, H] (padded to 2 block_q rows), K/V heads-major [B, K, S, H] read in place (kv head =
query head // G), bf16 or f16, float32 accumulation, lse natural-log float32. GPUs only: Mosaic GPU
has no CPU interpreter here; ``jax.export(..., platforms=["cuda"])`` proves the lowering on a CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.masks import MASK_VALUE, MaskSpec, div
from pallas_kernels.shapes import attention_dims, pad_queries

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SMEM_BYTES = 232448 - 4096   # Hopper's 227 KiB per block, less room for barriers and alignment
CONSUMERS = (2, 3)  # consumer warpgroups a program may run (query blocks per program); 3 run without turns


def check_consumers(consumers: int, pingpong: bool) -> None:
    """A clear error for a consumer count the kernels (this one and the sparse one) cannot run."""
    if consumers not in CONSUMERS or (consumers == 3 and pingpong):
        raise ValueError(f"the mosaic_gpu kernels run 2 consumer warpgroups, or 3 without turns (pingpong=False); "
                         f"got consumers={consumers}, pingpong={pingpong}")


def smem_bytes(block_q: int, block_k: int, stages: int, H: int, item: int = 2, consumers: int = 2) -> int:
    """Shared memory of one program (``launch``'s scratch): the consumers' query tiles, the K/V ring and the
    lse rows."""
    return (consumers * block_q + 2 * stages * block_k) * H * item + consumers * block_q * 4


def registers(consumers: int) -> tuple[int, int]:
    """Registers per thread (consumers, producer): 65536 per SM over consumers + 1 warpgroups of 128
    threads (three consumers: 3 x 160 + 24)."""
    return (232, 40) if consumers == 2 else (160, 24)


def check_supported(queries: tuple, k, v, block_q: int, block_k: int, stages: int, consumers: int = 2) -> None:
    """A clear error for what this kernel cannot do (callers may fall back to the Triton kernel)."""
    dtype = queries[0].dtype
    if dtype not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
        raise ValueError(f"the mosaic_gpu kernel takes bfloat16 or float16 inputs, got {dtype}; use impl='triton'")
    if any(x.dtype != dtype for x in (*queries, k, v)):
        raise ValueError("the mosaic_gpu kernel needs queries, keys and values of one dtype")
    H = queries[0].shape[-1]
    if H % 64:
        raise ValueError(f"the mosaic_gpu kernel needs head_dim a multiple of 64, got {H}")
    if block_q % 64 or block_k % 64:
        raise ValueError(f"mosaic_gpu blocks must be multiples of 64, got block_q={block_q} block_k={block_k}")
    if stages < 2:
        raise ValueError(f"mosaic_gpu needs at least 2 pipeline stages, got {stages}")
    smem = smem_bytes(block_q, block_k, stages, H, jnp.dtype(dtype).itemsize, consumers)
    if smem > SMEM_BYTES:
        raise ValueError(f"mosaic_gpu: {consumers} query tiles and {stages} stages of {block_k}-key blocks need "
                         f"{smem} bytes of shared memory, more than {SMEM_BYTES}; lower stages or block_k")


def _blocks(lo, hi, block_k: int):
    """Block indices ``[j0, j1)`` covering key slots ``[lo, hi)`` (empty when the range is)."""
    j0 = div(lo, block_k)
    return j0, jnp.where(hi > lo, div(hi + block_k - 1, block_k), j0)


def _kernel(meta_ref, scale_ref, *refs, mask: MaskSpec, G: int, block_q: int, block_k: int, stages: int,
            n_pairs: int, heavy_first: bool, pingpong: bool = True, consumers: int = 2):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    n_phases = len(mask.phases)
    q_refs = refs[:n_phases]
    k_ref, v_ref, out_ref, lse_ref, scoped = refs[n_phases:]
    (qo_smem2, k_smem, v_smem, lse_smem2), (k_bar, v_bar, q_bar), (k_free, v_free), turn = scoped
    b, n, qi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
    if heavy_first:  # causal: the last query blocks have the most keys; launching them first shortens the tail
        qi = n_pairs - 1 - qi
    wg = lax.axis_index("wg")
    kvh = lax.div(n, jnp.int32(G))
    q_offset, kv_length = meta_ref[b, 0], meta_ref[b, 1]
    C = consumers
    pair_first = q_offset + qi * (C * block_q)          # the program's C query blocks (a pair by default)
    pair_last = pair_first + C * block_q - 1

    # The step list the consumers and the producer walk: per phase, the key blocks any query block needs.
    schedule, total = [], jnp.int32(0)
    for phase in mask.phases:
        U0, U1 = _blocks(*mask.key_range(phase, pair_first, pair_last, kv_length), block_k)
        schedule.append((phase, U0, U1, total - U0))     # step = j + offset
        total = total + (U1 - U0)

    def take_turns():
        if pingpong:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    regs, producer_regs = registers(C)

    @pl.when(wg < C)
    def _consumer():
        plgpu.set_max_registers(regs, action="increase")
        qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
        row0 = qi * (C * block_q) + wg * block_q
        first = pair_first + wg * block_q
        last = first + block_q - 1
        scale2 = scale_ref[b] * LOG2E                     # logits in base 2: exp2 is one instruction
        H = qo_smem.shape[-1]
        steps = WindowSteps(qo_smem, k_smem, v_smem, k_bar, k_free, v_bar, v_free, stages=stages, total=total,
                            scale2=scale2, take_turns=take_turns, turn=turn if pingpong else None)

        def compute(j, carry, *, phase, offset, masked):
            def masking(s):
                if not masked:
                    return s, None
                q_pos = first + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                k_pos = j * block_k + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                ok = mask.visible(phase, q_pos, k_pos, kv_length)
                return jnp.where(ok, s, MASK_VALUE), ok

            return steps.compute(carry, j + offset, (block_q, block_k), masking)

        def skip(j, carry, *, offset):
            return steps.skip(carry, j + offset)

        m = plgpu.layout_cast(jnp.full((block_q,), MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((block_q, H), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        carry = (acc, m, l)
        steps.wait_keys(jnp.int32(0))
        pl.when(wg == 1)(take_turns)
        for q_ref, (phase, U0, U1, offset) in zip(q_refs, schedule):
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, block_q), n], qo_smem, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            j0, j1 = _blocks(*mask.key_range(phase, first, last, kv_length), block_k)
            j0 = jnp.clip(j0, U0, U1)
            j1 = jnp.clip(j1, j0, U1)
            u0, u1 = mask.interior(phase, first, last, kv_length, block_k)
            u0 = jnp.clip(u0, j0, j1)
            u1 = jnp.clip(u1, u0, j1)
            masked = functools.partial(compute, phase=phase, offset=offset, masked=True)
            whole = functools.partial(compute, phase=phase, offset=offset, masked=False)
            idle = functools.partial(skip, offset=offset)
            carry = lax.fori_loop(U0, j0, idle, carry)
            carry = lax.fori_loop(j0, u0, masked, carry)
            carry = lax.fori_loop(u0, u1, whole, carry)
            carry = lax.fori_loop(u1, j1, masked, carry)
            carry = lax.fori_loop(j1, U1, idle, carry)
        pl.when(wg == 0)(take_turns)

        store_rows(carry, qo_smem, lse_smem, out_ref.at[b, pl.ds(row0, block_q), n], lse_ref.at[b, n, pl.ds(row0, block_q)])

    @pl.when(wg == C)
    def _producer():
        plgpu.set_max_registers(producer_regs, action="decrease")
        for _, U0, U1, offset in schedule:
            def load(j, carry, offset=offset):
                step = j + offset
                slot = lax.rem(step, jnp.int32(stages))
                blk = (b, kvh, pl.ds(j * block_k, block_k))

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[blk], k_smem.at[slot], k_bar.at[slot])

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[blk], v_smem.at[slot], v_bar.at[slot])
                return carry

            lax.fori_loop(U0, U1, load, None)


@functools.partial(jax.jit, static_argnames=("mask", "block_q", "block_k", "stages", "heavy_first", "pingpong",
                                             "consumers"))
def flash_attention_mgpu(queries: tuple, k, v, q_offset, kv_length, scale, *, mask: MaskSpec, block_q: int = 64,
                         block_k: int = 128, stages: int = 2, heavy_first: bool = True, pingpong: bool | None = None,
                         consumers: int = 2):
    """``queries``: one q [B, T, N, H] per mask phase (already rotated); k, v [B, K, S, H];
    q_offset, kv_length [B] int32; scale [B] float32. Returns ``(out [B, T, N, H], lse [B, T, N] f32)``.

    ``block_q`` is each consumer warpgroup's query rows (a program covers ``consumers`` block_q: 2, or 3
    running free); ``pingpong``: the consumers take turns on the tensor cores (default: where there are two;
    False: they run free)."""

    pingpong = consumers == 2 if pingpong is None else pingpong
    check_consumers(consumers, pingpong)
    check_supported(queries, k, v, block_q, block_k, stages, consumers)
    d = attention_dims(queries, k, mask, block_k)
    B, T, N, H = d.B, d.T, d.N, d.H
    dtype = queries[0].dtype
    queries, nq = pad_queries(queries, consumers * block_q)
    Tp = nq * consumers * block_q
    meta = jnp.stack([q_offset, kv_length], axis=1).astype(jnp.int32)

    body = functools.partial(_kernel, mask=mask, G=d.G, block_q=block_q, block_k=block_k, stages=stages,
                             n_pairs=nq, heavy_first=heavy_first, pingpong=pingpong, consumers=consumers)
    out, lse = launch(body, (meta, scale.astype(jnp.float32), *queries, k, v), B=B, Tp=Tp, N=N, H=H, dtype=dtype,
                      n_pairs=nq, block_q=block_q, block_k=block_k, stages=stages, consumers=consumers)
    return out[:, :T], lse[:, :, :T].transpose(0, 2, 1)


def launch(body, inputs, *, B, Tp, N, H, dtype, n_pairs, block_q, block_k, stages, consumers: int = 2):
    """Run a kernel of this file's shape (also the sparse kernel's): a producer warpgroup and ``consumers``
    consumer warpgroups per program on grid (heads, groups of ``consumers`` query blocks, batch), with the
    scratch and barriers ``_kernel`` expects. ``body(*input_refs, out_ref, lse_ref, scoped)``; returns
    ``(out [B, Tp, N, H], lse [B, N, Tp] float32)``."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def entry(*refs):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        # V is P V's right operand with the window's keys as its K: wgmma wants K a multiple of the
        # swizzle's width, so windows that are not a multiple of 64 keys take a narrower swizzle
        swizzle = v_swizzle(block_k, jnp.dtype(dtype).itemsize)
        v_tiled = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
        scratch = (
            plgpu.SMEM((consumers, block_q, H), dtype, transforms=tiled),
            plgpu.SMEM((stages, block_k, H), dtype, transforms=tiled),
            plgpu.SMEM((stages, block_k, H), dtype, transforms=v_tiled),
            plgpu.SMEM((consumers, block_q), jnp.float32),
        )
        pl.run_scoped(
            lambda *scoped: body(*refs, scoped),
            scratch,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=consumers)),
            (plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=[jax.ShapeDtypeStruct((B, Tp, N, H), dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
        grid=(N, n_pairs, B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=consumers + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*inputs)


def v_swizzle(block_k: int, item: int = 2) -> int:
    """The widest shared-memory swizzle (bytes) whose row of elements divides ``block_k``."""
    for swizzle in (128, 64, 32):
        if block_k % (swizzle // item) == 0:
            return swizzle
    raise ValueError(f"block_k={block_k} is not a multiple of {32 // item} keys")


class WindowSteps:
    """A consumer warpgroup's steps over the key windows, shared by the dense and the sparse Mosaic GPU
    kernels: ``wait_keys(step)`` for the producer's keys, ``compute(carry, step, shape, masking)`` (QK^T,
    ``masking(s)`` -> ``(s, ok or None)`` on the base-2 logits, online softmax, PV) and ``skip(carry,
    step)``, which keeps the barriers' phases in step without computing. ``turn``: the consumers' turn
    barrier, or None where they do not take turns around the softmax; ``take_turns`` is called inside
    the QK^T matmul and twice on a skip, as the kernels' turn order needs."""

    def __init__(self, qo_smem, k_smem, v_smem, k_bar, k_free, v_bar, v_free, *, stages: int, total, scale2,
                 take_turns, turn):
        self.qo_smem, self.k_smem, self.v_smem = qo_smem, k_smem, v_smem
        self.k_bar, self.k_free, self.v_bar, self.v_free = k_bar, k_free, v_bar, v_free
        self.stages, self.total, self.scale2, self.take_turns, self.turn = stages, total, scale2, take_turns, turn

    def wait_keys(self, step):
        import jax.experimental.pallas as pl
        import jax.experimental.pallas.mosaic_gpu as plgpu

        @pl.when(step < self.total)
        def _():
            plgpu.barrier_wait(self.k_bar.at[lax.rem(step, jnp.int32(self.stages))])

    def compute(self, carry, step, shape, masking):
        """One window of ``shape`` (query rows, keys). Masked logits become MASK_VALUE; where ``masking``
        also returns ``ok``, their probabilities are zeroed as well."""
        import jax.experimental.pallas as pl
        import jax.experimental.pallas.mosaic_gpu as plgpu

        acc, m, l = carry
        slot = lax.rem(step, jnp.int32(self.stages))

        def qk_scope(acc_ref):
            plgpu.wgmma(acc_ref, self.qo_smem, plgpu.transpose_ref(self.k_smem.at[slot], (1, 0)))
            self.take_turns()
            return acc_ref[...]

        s = pl.run_scoped(qk_scope, plgpu.ACC(shape, jnp.float32))
        plgpu.barrier_arrive(self.k_free.at[slot])
        s, ok = masking(s * self.scale2)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        if ok is not None:
            p = jnp.where(ok, p, 0.0)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l = l * alpha + p.sum(axis=1)
        p16 = p.astype(self.qo_smem.dtype)
        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
        if self.turn is not None:
            plgpu.barrier_arrive(self.turn)               # softmax done: the other consumer may matmul
        plgpu.barrier_wait(self.v_bar.at[slot])
        if self.turn is not None:
            plgpu.barrier_wait(self.turn)

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, self.v_smem.at[slot])
            self.wait_keys(step + 1)                      # overlaps the next window's wait with this matmul

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(self.v_free.at[slot])
        return acc, m_new, l

    def skip(self, carry, step):
        import jax.experimental.pallas.mosaic_gpu as plgpu

        slot = lax.rem(step, jnp.int32(self.stages))
        plgpu.barrier_wait(self.v_bar.at[slot])           # keeps this consumer's barrier phases in step
        self.wait_keys(step + 1)
        plgpu.barrier_arrive(self.k_free.at[slot])
        plgpu.barrier_arrive(self.v_free.at[slot])
        self.take_turns()
        self.take_turns()
        return carry


def store_rows(carry, qo_smem, lse_smem, out_dst, lse_dst):
    """A consumer's epilogue: normalise its online-softmax ``carry`` (acc, m, l; m in log2 units) and
    copy out and lse (natural log; -inf for rows that saw no key) through shared memory to ``out_dst``
    [rows, H] and ``lse_dst`` [rows] in global memory."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    acc, m, l = carry
    acc = acc / lax.broadcast_in_dim(jnp.maximum(l, 1e-30), acc.shape, [0])
    qo_smem[...] = acc.astype(qo_smem.dtype)
    lse_smem[...] = jnp.where(l > 0, (m + jnp.log(jnp.maximum(l, 1e-30)) * LOG2E) * LN2, -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, out_dst)
    plgpu.copy_smem_to_gmem(lse_smem, lse_dst)
    plgpu.wait_smem_to_gmem(0)
