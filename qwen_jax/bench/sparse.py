"""Sparse prefill attention benchmark: vertical-slash (estimate + index + kernel) against dense cuDNN.

    python -m qwen_jax.bench.sparse [--lengths 128k,256k,512k,1m] [--inputs local,random]
                                    [--budgets 1000,6096] [--chunk 32768] [--dca 262144,8192]
                                    [--kernels mosaic_gpu:96:3:free,mosaic_gpu:64:4:free:noprefetch,triton]
                                    [--estimate-only] [--key-blocks 16384] [--estimates auto,xla,triton]
                                    [--json out.json]

Attention only (no model), bf16, 28 query / 4 kv heads, head_dim 128, batch 1. The sparse path runs
as sparse prefill does: the T queries in chunks of ``--chunk``, each chunk estimating its own
selection from its last 64 queries and attending to the keys before it; the times add up over the
chunks. The dense baseline is one causal ``jax.nn.dot_product_attention(implementation="cudnn")``
call over all T. Reported per length: dense ms, and per sparse kernel (``--kernels``: the Mosaic GPU
``vslash_mgpu`` as ``mosaic_gpu[:block_k[:stages[:pp|free|c3[:prefetch|noprefetch]]]]``, pp = the consumers
take turns, c3 = three consumer warpgroups (query blocks per program) running free, noprefetch = each step
reads its table entries when it needs them (``vslash_attention_mgpu``), and the
Triton-lowered ``vslash_gpu`` as ``triton``, all timed in the same run on the same index) its ms and
speedup; estimate + index ms; the share of 64 x ``--block-k`` key tiles the sparse mask touches (what
the Triton kernel computes), and each kernel's TFLOP/s over those tiles (so the rates compare kernels
on the same work). The Mosaic GPU kernel's windows overhang the mask (module docstring);
"<spec> windows / tiles" is what they span (both query blocks, skipped steps included) over the tiles,
"<spec> computed / tiles" what its consumers compute (skipped steps left out).

"estimate + index ms" times exactly ``sparse.estimate`` and ``vslash.build_index`` (one jitted call
per chunk on a chunk of queries sliced beforehand), summed over the chunks; the median over
``--repeats`` passes after one untimed pass. ``--estimate-only`` times only that (no dense
baseline, no attention kernel: cheap on a GPU, and it runs on a CPU); ``--key-blocks`` lists the
XLA estimate's key block sizes to time, ``--estimates`` the scores implementations (``auto``: the
Pallas kernel on a GPU; ``xla``; ``triton``, in interpret mode with ``--interpret``), one row each, its
kernels timed on its own selection. With more than one implementation, each row after the
first also reports how its last chunk's scores and picks compare with the first's ("max score
difference", "picks equal": the share of picked columns and diagonals that are the same).

Inputs: ``random`` (normal q, k, v: no structure, so the chosen diagonals scatter: the worst case for
a band kernel) or ``local`` (q and k share a per-head direction, so attention decays with distance
like the local heads of real models: the chosen diagonals cluster near the main one).

``--selections FILE`` (from ``qwen-jax recall --save-selections``) times the kernels on the masks a
real model chose instead: one row per layer of the file (``model L<i>``) and a row summing them
(``model all``), each layer's selection replicated over the heads (``--heads`` must be a multiple of
the file's, with the same query heads per kv head), its length, prefill chunk and DCA taken from
the file; q, k, v are random (a kernel's time depends on the mask, not the values), and the
estimate is timed on ``local`` inputs of the same shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np


def _inputs(kind: str, T: int, N: int, K: int, H: int, seed: int, rope):
    import jax
    import jax.numpy as jnp
    keys = jax.random.split(jax.random.key(seed), 5)
    if kind == "random":
        q = jax.random.normal(keys[0], (1, T, N, H), jnp.bfloat16)
        k = jax.random.normal(keys[1], (1, K, T, H), jnp.bfloat16)
    elif kind == "local":
        base = jax.random.normal(keys[2], (K, H)) * 0.7
        q = (jnp.repeat(base, N // K, axis=0)[None, None] + 0.5 * jax.random.normal(keys[0], (1, T, N, H)))
        k = (base[None, :, None] + 0.5 * jax.random.normal(keys[1], (1, K, T, H)))
        # the cache holds rotated keys: q . k then depends on the distance, decaying roughly as a power law
        k = rope.apply(k.transpose(0, 2, 1, 3), jnp.arange(T, dtype=jnp.int32)[None]).transpose(0, 2, 1, 3)
        q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    else:
        raise SystemExit(f"unknown --inputs {kind!r} (local or random)")
    v = jax.random.normal(keys[3], (1, K, T, H), jnp.bfloat16)
    return q, k, v


def _two_whole_numbers(text: str) -> tuple[int, int] | None:
    """``"A,B"`` with A and B whole numbers, or None."""
    parts = text.split(",")
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        return int(parts[0]), int(parts[1])
    return None


def parse_dca_pair(text: str) -> tuple[int, int]:
    """``--dca C,W``: chunk_size and local_size, two integers with 0 <= W < C; anything else ends in one line."""
    pair = _two_whole_numbers(text)
    if pair is not None and pair[1] < pair[0]:
        return pair
    raise SystemExit(f"bad --dca {text!r}: give chunk_size,local_size as two integers with local_size < chunk_size, "
                     "e.g. --dca 262144,8192")


def parse_budgets(text: str) -> tuple[int, int]:
    """``--budgets V,S``: vertical_size and slash_size, two whole numbers; anything else ends in one line."""
    pair = _two_whole_numbers(text)
    if pair is not None:
        return pair
    raise SystemExit(f"bad --budgets {text!r}: give vertical_size,slash_size as two whole numbers, e.g. 1000,6096")


LENGTHS, INPUTS, CHUNK = "128k,256k,512k,1m", "local,random", 32768     # the defaults of those flags


def _recorded(args):
    """Load ``--selections`` and make the run match it: ``[per layer: [per chunk: Selection]]``."""
    from qwen_jax.errors import QwenJaxError
    from qwen_jax.recall import load_selections
    given = [flag for flag, value, default in (("--lengths", args.lengths, LENGTHS), ("--inputs", args.inputs, INPUTS),
                                               ("--chunk", args.chunk, CHUNK), ("--dca", args.dca, None))
             if value != default]
    if given:
        raise SystemExit(f"--selections takes the lengths, prefill chunk, DCA and inputs from its file: drop "
                         f"{', '.join(given)}")
    try:
        chunks, meta = load_selections(args.selections)
    except QwenJaxError as e:
        raise SystemExit(str(e)) from None
    n_file, k_file = meta["heads"], meta["kv_heads"]
    if args.heads % n_file or args.heads * k_file != args.kv_heads * n_file:
        raise SystemExit(f"--heads {args.heads} / --kv-heads {args.kv_heads} cannot replicate the file's "
                         f"{n_file} / {k_file} heads")
    if args.estimate_only:
        raise SystemExit("--selections times the kernels on recorded masks: it cannot go with --estimate-only")
    args.inputs = "local"
    if meta["tokens"] % 64:
        raise SystemExit(f"{args.selections}: {meta['tokens']} tokens; the kernels need a multiple of 64")
    args.lengths, args.chunk = str(meta["tokens"]), meta["chunk"]
    args.dca = f"{meta['chunk_size']},{meta['local_size']}"
    starts = [start for start, _ in chunks]
    if starts != list(range(0, meta["tokens"], meta["chunk"])):
        raise SystemExit(f"{args.selections}: every prefill chunk must have run sparse (chunk starts {starts})")
    rep = args.heads // n_file
    L = chunks[0][1].dist.shape[0]
    # a Selection field is [L, B, G, N, ...]: heads are axis 3 (after dropping the layer axis, axis 2)
    return [[sel._replace(**{f: np.concatenate([getattr(sel, f)[layer]] * rep, axis=2)
                             for f in ("dist", "dist_count", "cols", "col_count")})._replace(
                 seg_begin=sel.seg_begin[layer], seg_end=sel.seg_end[layer])
             for _, sel in chunks] for layer in range(L)]


def _model_total(layer_rows, kernels, H):
    """The ``model all`` row: every recorded layer's attention, summed (dense: once per layer)."""
    n = len(layer_rows)
    dense_ms = sum(r["dense ms"] for r in layer_rows) if "dense ms" in layer_rows[0] else None
    computed = sum(r["_computed"] for r in layer_rows)
    T = layer_rows[0]["T"]
    total = {"inputs": f"model all ({n} layers)", "T": T}
    if dense_ms is not None:
        total["dense ms"] = dense_ms
    total["estimate+index ms"] = sum(r["estimate+index ms"] for r in layer_rows)
    total["tiles computed / dense"] = computed / sum(r["_computed"] / r["tiles computed / dense"] for r in layer_rows)
    for kernel in kernels:
        ms = sum(r[f"{kernel} ms"] for r in layer_rows)
        total[f"{kernel} ms"] = ms
        total[f"{kernel} TFLOP/s (tiles)"] = 4 * computed * H / ms / 1e9
        if dense_ms is not None:
            total[f"{kernel} speedup"] = dense_ms / ms
            total[f"{kernel} speedup incl. estimate"] = dense_ms / (ms + total["estimate+index ms"])
        total[f"{kernel} estimate share"] = total["estimate+index ms"] / ms
    return {key: (f"{val:.3g}" if isinstance(val, float) else val) for key, val in total.items()}


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import vslash, vslash_mgpu
    from pallas_kernels.vslash_gpu import vslash_attention_gpu
    from qwen_jax.attention import dca as dca_ops
    from qwen_jax.attention import sparse
    from qwen_jax.bench import median_time, report
    from qwen_jax.bench import below_one, output_problem
    from qwen_jax.config import DCAConfig
    from qwen_jax.passkey import parse_length
    from qwen_jax.rope import Rope

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=LENGTHS)
    p.add_argument("--inputs", default=INPUTS)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--budgets", default="1000,6096", help="vertical_size,slash_size for every head")
    p.add_argument("--chunk", type=int, default=CHUNK, help="prefill chunk (queries per sparse call)")
    p.add_argument("--dca", default=None, help="chunk_size,local_size (default: one chunk, plain causal)")
    p.add_argument("--block-k", type=int, default=64, help="Triton kernel key tiles (and the tile count)")
    p.add_argument("--kernels", default="mosaic_gpu:96:3:free,mosaic_gpu:64:4:free,triton",
                   help="sparse kernels to time: mosaic_gpu[:block_k[:stages[:pp|free|c3[:prefetch|noprefetch]]]], "
                   "triton")
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--estimate-only", action="store_true",
                   help="time only the estimate and the index tables (no dense baseline, no attention kernel)")
    p.add_argument("--key-blocks", default="16384", help="XLA estimate key block sizes to time (comma list)")
    p.add_argument("--estimates", default="auto", help="scores implementations to time: auto, xla, triton")
    p.add_argument("--interpret", action="store_true", help="run the Triton kernel in interpret mode (CPU smoke test)")
    p.add_argument("--selections", default=None, metavar="FILE.npz",
                   help="time the kernels on a real model's selections (qwen-jax recall --save-selections)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    budget_pair = parse_budgets(args.budgets)
    if args.dca:
        parse_dca_pair(args.dca)
    if not all(part.isdigit() and int(part) > 0 for part in args.key_blocks.split(",")):
        raise SystemExit(f"bad --key-blocks {args.key_blocks!r}: comma-separated whole numbers, e.g. 8192,16384")
    for kind in args.inputs.split(","):
        if kind not in ("local", "random"):
            raise SystemExit(f"unknown --inputs {kind!r} (local or random)")
    if problem := below_one(args, "chunk", "repeats") or output_problem(args.json):
        raise SystemExit(problem)
    recorded = None
    if args.selections:
        recorded = _recorded(args)

    kernels, mgpu = args.kernels.split(","), {}
    for spec in kernels:
        name, *opts = spec.split(":")
        if (name == "mosaic_gpu" and len(opts) <= 4 and (len(opts) < 3 or opts[2] in ("pp", "free", "c3"))
                and (len(opts) < 4 or opts[3] in ("prefetch", "noprefetch"))):
            mgpu[spec] = dict(block_k=int(opts[0]) if opts else 128, stages=int(opts[1]) if len(opts) > 1 else 2,
                              pingpong=opts[2] == "pp" if len(opts) > 2 else True,
                              consumers=3 if len(opts) > 2 and opts[2] == "c3" else 2,
                              prefetch=opts[3] == "prefetch" if len(opts) > 3 else True)
        elif spec != "triton":
            raise SystemExit(f"unknown kernel {spec!r}: "
                             "mosaic_gpu[:block_k[:stages[:pp|free|c3[:prefetch|noprefetch]]]]"
                             " or triton")
    if args.interpret and mgpu:
        raise SystemExit("the mosaic_gpu kernel has no interpreter: pass --kernels triton with --interpret")
    if jax.default_backend() != "gpu" and not args.estimate_only:     # (they failed deep inside, with a traceback)
        if not args.no_dense:
            raise SystemExit(f"the dense baseline is cuDNN's, which needs an NVIDIA GPU: on {jax.default_backend()!r} "
                             "pass --no-dense (or --estimate-only)")
        if not args.interpret:
            raise SystemExit(f"the sparse kernels need a GPU: on {jax.default_backend()!r} pass --interpret "
                             "--kernels triton (a smoke test)")
    N, K, H = args.heads, args.kv_heads, args.head_dim
    vs, ss = budget_pair
    budgets = sparse.Budgets((vs,) * N, (ss,) * N)
    if args.dca:
        C, W = parse_dca_pair(args.dca)
    else:
        C, W = 1 << 22, 0
    dca = DCAConfig(chunk_size=C, local_size=W, sparse_attention_enabled=True, sparse_attention_threshold=0)
    inv = 1.0 / 1e6 ** (np.arange(0, H, 2, dtype=np.float64) / H)
    rope = Rope(tuple(float(f) for f in np.float32(inv)))
    bk = args.block_k
    mask = dca_ops.mask_spec(dca)

    impls = args.estimates.split(",")
    for impl in impls:
        if impl not in sparse.SCORE_IMPLS:
            raise SystemExit(f"unknown --estimates {impl!r}: choose from {', '.join(sparse.SCORE_IMPLS)}")

    @functools.partial(jax.jit, static_argnames=("Tc", "n_keys"))
    def index_of(sel, start, Tc, n_keys):
        lengths = jnp.full((1,), start + Tc, jnp.int32)
        return vslash.build_index(sel, jnp.full((1,), start, jnp.int32), Tc, lengths, mask, bk, n_keys)

    @functools.partial(jax.jit, static_argnames=("Tc", "key_block", "impl"))
    def estimate_index(q_chunk, k, start, Tc, key_block, impl):
        """Exactly what the timing covers: the estimate and the kernels' index tables of one chunk."""
        lengths = jnp.full((1,), start + Tc, jnp.int32)
        scale = dca_ops.softmax_scale(lengths, dca, H)
        q_offset = jnp.full((1,), start, jnp.int32)
        sel = sparse.estimate(q_chunk, k, q_offset, lengths, scale, dca=dca, rope=rope, budgets=budgets,
                              key_block=key_block, all_sparse=True, impl=impl, interpret=args.interpret)
        return sel, index_of(sel, start, Tc, k.shape[2])

    @functools.partial(jax.jit, static_argnames=("Tc", "key_block", "impl"))
    def chunk_scores(q_chunk, k, start, Tc, key_block, impl):
        """One chunk's scores alone (the agreement check)."""
        lengths = jnp.full((1,), start + Tc, jnp.int32)
        q_offset = jnp.full((1,), start, jnp.int32)
        begin, end, P = sparse.segments(q_offset, Tc, lengths, dca.chunk_len)
        return sparse.scores(q_chunk, k, q_offset, begin, end, P, dca_ops.softmax_scale(lengths, dca, H), dca=dca,
                             rope=rope, key_block=key_block, impl=impl, interpret=args.interpret)

    def agreement(first, other):
        """Max score difference (relative to the largest score) and the share of equal picks."""
        (v0, s0), sel0 = first
        (v1, s1), sel1 = other
        diff = max(float(jnp.abs(a - b).max() / jnp.abs(a).max()) for a, b in ((v0, v1), (s0, s1)))
        same = [float((getattr(sel0, f) == getattr(sel1, f)).mean()) for f in ("dist", "cols")]
        return {"max score difference": diff, "picks equal": min(same)}

    @jax.jit
    def tiles(sel, index):
        """Key tiles the kernel computes: slash tiles plus vertical tiles, over every head, block and phase."""
        return vslash.tiles_per_head(sel, index, bk).sum()

    @functools.partial(jax.jit, static_argnames=("Tc", "block_k", "consumers"))
    def mgpu_windows(index, start, Tc, block_k, consumers):     # accounting only: kept out of the timed calls
        lengths = jnp.full((1,), start + Tc, jnp.int32)
        q_offset = jnp.full((1,), start, jnp.int32)
        return (vslash_mgpu.visited_pairs(index, q_offset, lengths, mask, block_k, consumers),
                vslash_mgpu.computed_pairs(index, q_offset, lengths, mask, block_k, consumers))

    @functools.partial(jax.jit, static_argnames=("Tc", "kernel"))
    def attend(q_chunk, k, v, start, sel, index, Tc, kernel):
        lengths = jnp.full((1,), start + Tc, jnp.int32)
        positions = start + jnp.arange(Tc, dtype=jnp.int32)[None]
        queries, mask_, scale = dca_ops.attention_inputs(q_chunk, positions, lengths, dca, rope)
        q_offset = jnp.full((1,), start, jnp.int32)
        if kernel in mgpu:
            return vslash_mgpu.vslash_attention_mgpu(queries, k, v, q_offset, lengths, scale, index, sel.col_count,
                                                     mask=mask_, **mgpu[kernel])
        return vslash_attention_gpu(queries, k, v, q_offset, lengths, scale, index, sel.col_count, mask=mask_,
                                    block_k=bk, num_warps=args.num_warps, num_stages=args.num_stages,
                                    interpret=args.interpret)

    def one_pass(chunks, q_chunks, k, v, kb, impl, count_tiles=False, fixed=None):
        """One pass over the chunks: (estimate + index seconds, {kernel: attention seconds}, key tiles and
        {Mosaic GPU spec: windows' (query, key) pairs} if counted). ``fixed``: per chunk, a recorded
        selection the kernels run on instead of the estimated one (whose cost is still timed)."""
        t_est, t_att = 0.0, dict.fromkeys(kernels, 0.0)
        n_tiles, windows = 0, {spec: np.zeros(2) for spec in mgpu}
        for i, ((start, Tc), qc) in enumerate(zip(chunks, q_chunks)):
            t0 = time.perf_counter()
            sel, index = jax.block_until_ready(estimate_index(qc, k, start, Tc, kb, impl))
            t_est += time.perf_counter() - t0
            if args.estimate_only:
                continue
            if fixed is not None:
                sel = fixed[i]
                index = jax.block_until_ready(index_of(sel, start, Tc, k.shape[2]))
            for kernel in kernels:
                t1 = time.perf_counter()
                jax.block_until_ready(attend(qc, k, v, start, sel, index, Tc, kernel))
                t_att[kernel] += time.perf_counter() - t1
            if count_tiles:
                n_tiles += int(tiles(sel, index))
                for spec, opts in mgpu.items():
                    counts = mgpu_windows(index, start, Tc, opts["block_k"], opts["consumers"])
                    windows[spec] += np.asarray(counts, np.float64)
        return t_est, t_att, n_tiles, windows

    rows, layer_rows = [], []
    key_blocks = [int(x) for x in args.key_blocks.split(",")]
    for kind in args.inputs.split(","):
        for T in (parse_length(x) for x in args.lengths.split(",")):
            q, k, v = _inputs(kind, T, N, K, H, seed=T, rope=rope)
            if not (args.no_dense or args.estimate_only):
                kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
                cudnn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                                  implementation="cudnn"))
                dense = functools.partial(cudnn, q, kt, vt)
                dense_ms = median_time(lambda f=dense: jax.block_until_ready(f()), args.repeats) * 1e3
                del dense, kt, vt
            chunks = [(s, min(args.chunk, T - s)) for s in range(0, T, args.chunk)]
            q_chunks = jax.block_until_ready([q[:, s:s + Tc] for s, Tc in chunks])   # sliced before timing
            chunks = [(jax.device_put(jnp.int32(s)), Tc) for s, Tc in chunks]
            cases = [(kb, impl, None) for impl in impls for kb in (key_blocks if impl != "triton" else key_blocks[:1])]
            if recorded is not None:
                cases = [(key_blocks[0], impls[0], layer) for layer in range(len(recorded))]
            checked = None
            for kb, impl, layer in cases:
                row = {"inputs": kind if layer is None else f"model L{layer}", "T": T}
                if len(impls) > 1:
                    row["estimate"] = sparse.scores_impl(impl, k.shape[2], dca.chunk_len)
                if len(key_blocks) > 1:
                    row["key block"] = kb
                if len(impls) > 1 and layer is None:                    # the last chunk, against the first case's
                    (s, Tc), qc = chunks[-1], q_chunks[-1]
                    result = (chunk_scores(qc, k, s, Tc, kb, impl), estimate_index(qc, k, s, Tc, kb, impl)[0])
                    if checked is None:
                        checked = result
                    else:
                        row.update(agreement(checked, result))
                    del result
                fixed = None if layer is None else [jax.device_put(sel) for sel in recorded[layer]]
                if not (args.no_dense or args.estimate_only):
                    row["dense ms"] = dense_ms
                    row["dense TFLOP/s"] = 2 * 2 * T * T / 2 * N * H / dense_ms / 1e9
                # warm-up (compiles), counting the tiles and the Mosaic GPU windows on the way
                _, _, n_tiles, windows = one_pass(chunks, q_chunks, k, v, kb, impl, count_tiles=True, fixed=fixed)
                est, att = zip(*[one_pass(chunks, q_chunks, k, v, kb, impl, fixed=fixed)[:2]
                                 for _ in range(args.repeats)])
                row["estimate+index ms"] = float(np.median(est) * 1e3)
                if not args.estimate_only:
                    computed = n_tiles * 64 * bk                             # (query, key) pairs in the tiles
                    row["tiles computed / dense"] = computed / (T * T / 2 * N)
                    for spec in mgpu:
                        row[f"{spec} windows / tiles"] = windows[spec][0] / computed
                        row[f"{spec} computed / tiles"] = windows[spec][1] / computed
                    for kernel in kernels:
                        ms = float(np.median([a[kernel] for a in att]) * 1e3)
                        row[f"{kernel} ms"] = ms
                        row[f"{kernel} TFLOP/s (tiles)"] = 4 * computed * H / ms / 1e9
                        if "dense ms" in row:
                            row[f"{kernel} speedup"] = row["dense ms"] / ms
                            row[f"{kernel} speedup incl. estimate"] = row["dense ms"] / (ms + row["estimate+index ms"])
                        row[f"{kernel} estimate share"] = row["estimate+index ms"] / ms
                    if "triton" in kernels:
                        for spec in mgpu:
                            row[f"{spec} / triton time"] = row[f"{spec} ms"] / row["triton ms"]
                if layer is not None:
                    row["_computed"] = computed
                    layer_rows.append(row)
                rows.append({key: (f"{val:.3g}" if isinstance(val, float) else val) for key, val in row.items()
                             if not key.startswith("_")})
                print(json.dumps(rows[-1]), flush=True)
            if layer_rows:
                rows.append(_model_total(layer_rows, kernels, H))
                print(json.dumps(rows[-1]), flush=True)
            del q, k, v, q_chunks, checked
    report(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
