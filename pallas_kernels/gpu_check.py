"""The kernels on a real GPU against the masked dense float32 reference (the GPU twin of tests/test_kernels.py).

    python -m pallas_kernels.gpu_check [--impls mosaic_gpu,triton,vslash,vslash_mgpu] [--json out.json]

Mosaic GPU kernels have no CPU interpreter, so this is where they are checked: fresh random bf16 inputs,
causal / full / sliding window / DCA (chunks that tiles straddle), GQA group sizes 1, 4 and 7, a query
chunk at an offset, a cache shorter than the queries reach, an empty cache. Every output element is
compared (out within bf16 noise, lse within 1e-2 absolute, -inf exactly where the reference has it).
Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import numpy as np

MASKS = {"causal": {}, "full": {"causal": False}, "window": {"window": 300}, "dca": {"chunk_len": 320}}
CASES = [("causal", 1), ("causal", 4), ("causal", 7), ("full", 4), ("window", 7), ("dca", 1), ("dca", 4),
         ("dca", 7)]


def run_case(impl: str, mask_name: str, G: int, seed: int, T: int = 700, S: int = 1536, H: int = 128):
    import jax.numpy as jnp

    from pallas_kernels import MaskSpec, flash_attention, masked_attention

    mask = MaskSpec(**MASKS[mask_name])
    rng = np.random.default_rng(seed)
    K = 1 if G == 7 else 2
    B = 3
    qs = tuple(jnp.asarray(rng.normal(size=(B, T, K * G, H)), jnp.bfloat16) for _ in mask.phases)
    k = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.bfloat16)
    # row 0: a chunk at offset 803 (DCA chunks 2..4); row 1: the cache ends before the queries do; row 2: empty
    q_offset = jnp.array([803, 0, 10], jnp.int32)
    kv_length = jnp.array([1503, 450, 0], jnp.int32)
    scale = jnp.asarray(rng.uniform(0.05, 0.12, B), jnp.float32)
    if impl == "mosaic_gpu_c3":    # flash_mgpu's option: three consumer warpgroups, running free
        from pallas_kernels.flash_mgpu import flash_attention_mgpu
        out, lse = flash_attention_mgpu(qs, k, v, q_offset, kv_length, scale, mask=mask, block_q=64, block_k=128,
                                        stages=2, consumers=3)
    else:
        out, lse = flash_attention(qs, k, v, q_offset=q_offset, kv_length=kv_length, scale=scale, mask=mask,
                                   impl=impl)
    positions = q_offset[:, None] + jnp.arange(T)[None]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_out, ref_lse = masked_attention(tuple(map(f32, qs)), f32(k), f32(v), positions, kv_length, scale, mask=mask)
    return _compare(impl, mask_name, G, out, lse, ref_out, ref_lse)


# the split-key decode kernel: (mask, G, T, K/V dtype); each under ``auto``, as the model's decode steps run it
DECODE_CASES = [("causal", 1, 1, "bfloat16"), ("causal", 7, 1, "bfloat16"), ("full", 4, 1, "bfloat16"),
                ("window", 7, 1, "bfloat16"), ("dca", 4, 1, "bfloat16"), ("dca", 7, 1, "bfloat16"),
                ("causal", 7, 1, "float8_e4m3fn"), ("dca", 4, 1, "float8_e4m3fn"), ("dca", 7, 1, "float8_e4m3fn"),
                ("dca", 4, 16, "bfloat16"), ("causal", 7, 9, "float8_e4m3fn")]


def run_decode_case(mask_name: str, G: int, T: int, kv_dtype: str, seed: int, S: int = 4096, H: int = 128):
    """``flash_attention(impl="auto")`` on a decode-sized chunk (the decode kernel) against masked dense f32:
    row 0 at the end of a cache inside a later DCA chunk, row 1 a short cache, row 2 an empty one."""
    import jax.numpy as jnp

    from pallas_kernels import MaskSpec, decode_gpu, flash_attention, masked_attention

    mask = MaskSpec(**MASKS[mask_name])
    rng = np.random.default_rng(seed)
    K, B = 1 if G == 7 else 2, 3
    qs = tuple(jnp.asarray(rng.normal(size=(B, T, K * G, H)), jnp.bfloat16) for _ in mask.phases)
    k, v = (jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32).astype(kv_dtype) for _ in range(2))
    kv_length = jnp.array([S - 5, 450, 0], jnp.int32)
    q_offset = kv_length - T
    q_offset = q_offset.at[2].set(0)
    scale = jnp.asarray(rng.uniform(0.05, 0.12, B), jnp.float32)
    calls = []
    real = decode_gpu.decode_attention_gpu
    decode_gpu.decode_attention_gpu = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        out, lse = flash_attention(qs, k, v, q_offset=q_offset, kv_length=kv_length, scale=scale, mask=mask)
    finally:
        decode_gpu.decode_attention_gpu = real
    positions = q_offset[:, None] + jnp.arange(T)[None]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_out, ref_lse = masked_attention(tuple(map(f32, qs)), f32(k), f32(v), positions, kv_length, scale, mask=mask)
    res = _compare(f"decode-{kv_dtype}", mask_name, G, out, lse, ref_out, ref_lse)
    res.update(T=T, decode_kernel=bool(calls))
    res["ok"] = res["ok"] and res["decode_kernel"]
    return res


SPARSE_KERNELS = {"vslash": "triton", "vslash_mgpu": "mosaic_gpu"}
# (mask, G, H, query offsets, Mosaic GPU options): offsets that are odd multiples of 64 put DCA chunk
# starts inside a pair of query blocks (the Mosaic GPU kernel's two-part path); "block" is the
# block-sparse primitive; options (block_k, stages, pingpong[, prefetch[, consumers]]) call vslash_mgpu directly
SPARSE_CASES = {
    "vslash": [("causal", 1, 128, (1024, 256), None), ("dca", 4, 128, (1024, 256), None),
               ("dca", 7, 128, (1024, 256), None)],
    "vslash_mgpu": [("causal", 1, 128, (1024, 256), None), ("dca", 4, 128, (1024, 256), None),
                    ("dca", 7, 128, (1024, 256), None), ("dca", 4, 128, (1088, 320), None),
                    ("causal", 4, 64, (1088, 320), None), ("block", 4, 128, (1024, 256), None),
                    ("dca", 4, 128, (1088, 320), (64, 4, False)), ("causal", 1, 128, (1024, 256), (64, 2, True)),
                    ("dca", 7, 128, (1024, 256), (128, 2, False)), ("dca", 4, 128, (1088, 320), (80, 4, False)),
                    ("causal", 7, 128, (1024, 256), (80, 4, False)), ("dca", 7, 128, (1024, 256), (96, 3, True)),
                    ("dca", 4, 128, (1088, 320), (64, 4, False, False)),
                    ("causal", 4, 64, (1088, 320), (80, 4, False, False)),
                    ("dca", 4, 128, (1088, 320), (96, 3, False, True, 3)),
                    ("causal", 7, 128, (1024, 256), (128, 2, False, True, 3)),
                    ("block", 4, 128, (1024, 256), (96, 3, False, True, 3)),
                    ("dca", 7, 128, (1024, 256), (80, 4, False, True, 3)),
                    ("causal", 4, 64, (1088, 320), (96, 3, False, True, 3)),
                    ("dca", 1, 128, (1024, 256), (64, 4, False, True, 3))],
}


def run_sparse_case(mask_name: str, G: int, seed: int, T: int = 700, S: int = 2048, H: int = 128,
                    kernel: str = "triton", q_offset=(1024, 256), options=None):
    """A sparse kernel against masked dense attention built from the same random selection; ``options``
    ``(block_k, stages, pingpong)`` run ``vslash_mgpu`` with them (the public ops take its defaults)."""
    import jax.numpy as jnp

    from pallas_kernels import MaskSpec, block_sparse_attention, masked_attention, vslash, vslash_attention

    mask = MaskSpec(chunk_len=512) if mask_name in ("dca", "block") else MaskSpec()
    rng = np.random.default_rng(seed)
    K = 1 if G == 7 else 2
    B, N = 2, K * G
    q_offset = jnp.array(q_offset, jnp.int32)
    kv_length = q_offset + jnp.array([700, 544], jnp.int32)      # row 1: the cache ends before its last queries
    if mask_name == "block":
        nqb, P, M = -(-T // 64), len(mask.phases), 12
        blocks = jnp.asarray(rng.integers(0, S // 64, (B, N, nqb, P, M)), jnp.int32)
        counts = jnp.asarray(rng.integers(0, M + 1, (B, N, nqb, P)), jnp.int32).at[0, 0].set(0)
    else:
        from qwen_jax.attention.sparse import segments
        begin, end, _ = segments(q_offset, T, q_offset + T, 512 if mask_name == "dca" else 10 ** 6)
        sel = vslash.random_selection(rng, (B, begin.shape[1], N, len(mask.phases), 300, 200), begin, end,
                                      max_dist=2000, n_keys=S)
    qs = tuple(jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.bfloat16) for _ in mask.phases)
    k = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.05, 0.12, B), jnp.float32)
    positions = q_offset[:, None] + jnp.arange(T)[None]
    args = dict(q_offset=q_offset, kv_length=kv_length, scale=scale, mask=mask, impl=kernel)
    if options is not None:
        from pallas_kernels.vslash_mgpu import vslash_attention_mgpu
        # prefetch on, two consumers unless given
        block_k, stages, pingpong, prefetch, consumers = (*options, *(True, 2)[len(options) - 3:])
        index = vslash.block_sparse_index(blocks, counts, q_offset, kv_length)[0] if mask_name == "block" else \
            vslash.build_index(sel, q_offset, T, kv_length, mask, vslash.BAND, k.shape[2])
        out, lse = vslash_attention_mgpu(qs, k, v, q_offset, kv_length, scale, index, None, mask=mask,
                                         block_k=block_k, stages=stages, pingpong=pingpong,
                                         prefetch=prefetch, consumers=consumers)
    elif mask_name == "block":
        out, lse = block_sparse_attention(qs, k, v, blocks, counts, **args)
    else:
        out, lse = vslash_attention(qs, k, v, sel, **args)
    if mask_name == "block":
        restrict = vslash.block_sparse_dense_mask(blocks, counts, positions, S)
    else:
        restrict = vslash.dense_mask(sel, positions, S)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_out, ref_lse = masked_attention(tuple(map(f32, qs)), f32(k), f32(v), positions, kv_length, scale, mask=mask,
                                        restrict=restrict)
    res = _compare(f"vslash-{kernel}", mask_name, G, out, lse, ref_out, ref_lse)
    if options is not None:
        res.update(block_k=block_k, stages=stages, pingpong=pingpong, prefetch=prefetch, consumers=consumers)
    return res


def _compare(impl, mask_name, G, out, lse, ref_out, ref_lse):
    out, lse, ref_out, ref_lse = (np.asarray(x, np.float32) for x in (out, lse, ref_out, ref_lse))
    finite = np.isfinite(ref_lse)
    res = {
        "impl": impl, "mask": mask_name, "G": G,
        "out_err": float(np.abs(out - ref_out).max() / np.abs(ref_out).max()),
        "lse_err": float(np.abs(lse[finite] - ref_lse[finite]).max()),
        "nan": bool(np.isnan(out).any() or np.isnan(lse).any()),
        "inf_pattern_ok": bool(np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))),
        "empty_rows_zero": bool((out[~finite] == 0).all()),
    }
    res["ok"] = (res["out_err"] < 2e-2 and res["lse_err"] < 1e-2 and not res["nan"] and res["inf_pattern_ok"]
                 and res["empty_rows_zero"])
    return res


def _cases(impl: str, head_dims: str) -> list:
    """``impl``'s cases as ``(run(seed=...) -> result, what a failure report names)``."""
    if impl == "decode":
        return [(functools.partial(run_decode_case, *case), {"case": case}) for case in DECODE_CASES]
    if impl in SPARSE_KERNELS:
        cases = SPARSE_CASES[impl]
    else:
        cases = [(m, G, int(h), None, None) for h in head_dims.split(",") for m, G in CASES]

    def run(mask_name, G, H, q_offset, options, seed):
        res = run_sparse_case(mask_name, G, seed=seed, H=H, kernel=SPARSE_KERNELS[impl], q_offset=q_offset,
                              options=options) if impl in SPARSE_KERNELS else run_case(impl, mask_name, G, seed=seed, H=H)
        return dict(res, H=H)

    return [(functools.partial(run, *case), {"mask": case[0], "G": case[1], "H": case[2]}) for case in cases]


def main(argv=None) -> int:
    from qwen_jax.bench import environment, write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="mosaic_gpu,triton",
                   help="dense kernels (mosaic_gpu_c3: three consumer warpgroups); 'vslash' / 'vslash_mgpu' add "
                   "the sparse Triton / Mosaic GPU kernel, 'decode' the split-key decode kernel")
    p.add_argument("--head-dims", default="128", help="comma-separated head dims to check (dense kernels)")
    p.add_argument("--cases", default=None, help="comma-separated case numbers to run (default: all)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    only = None if args.cases is None else {int(c) for c in args.cases.split(",")}
    results = []
    for impl in args.impls.split(","):
        for i, (run, about) in enumerate(_cases(impl, args.head_dims)):
            if only is not None and i not in only:
                continue
            try:
                res = run(seed=i)
            except Exception as e:  # report and go on: one failing case must not hide the others
                res = {"impl": impl, **about, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
            results.append(res)
            print(json.dumps(res), flush=True)
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)}/{len(results)} cases OK")
    write_json(args.json, {"env": environment(), "results": results})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
