"""The kernels on a real GPU against the masked dense float32 reference (the GPU twin of tests/test_kernels.py).

    python -m pallas_kernels.gpu_check [--impls mosaic_gpu,triton] [--json out.json]

Mosaic GPU kernels have no CPU interpreter, so this is where they are checked: fresh random bf16 inputs,
causal / full / sliding window / DCA (chunks that tiles straddle), GQA group sizes 1, 4 and 7, a query
chunk at an offset, a cache shorter than the queries reach, an empty cache. Every output element is
compared (out within bf16 noise, lse within 1e-2 absolute, -inf exactly where the reference has it).
Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
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
    out, lse = flash_attention(qs, k, v, q_offset=q_offset, kv_length=kv_length, scale=scale, mask=mask, impl=impl)
    positions = q_offset[:, None] + jnp.arange(T)[None]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_out, ref_lse = masked_attention(tuple(map(f32, qs)), f32(k), f32(v), positions, kv_length, scale, mask=mask)
    return _compare(impl, mask_name, G, out, lse, ref_out, ref_lse)


def run_sparse_case(mask_name: str, G: int, seed: int, T: int = 700, S: int = 2048, H: int = 128):
    """The vertical-slash kernel against masked dense attention built from the same random selection."""
    import jax.numpy as jnp

    from pallas_kernels import MaskSpec, masked_attention, vslash, vslash_attention

    mask = MaskSpec(chunk_len=512) if mask_name == "dca" else MaskSpec()
    rng = np.random.default_rng(seed)
    K = 1 if G == 7 else 2
    B, N = 2, K * G
    q_offset = jnp.array([1024, 256], jnp.int32)
    kv_length = jnp.array([1724, 800], jnp.int32)
    from qwen_jax.attention.sparse import segments
    begin, end, _ = segments(q_offset, T, q_offset + T, 512 if mask_name == "dca" else 10 ** 6)
    sel = vslash.random_selection(rng, (B, begin.shape[1], N, len(mask.phases), 300, 200), begin, end, max_dist=2000, n_keys=S)
    qs = tuple(jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.bfloat16) for _ in mask.phases)
    k = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.05, 0.12, B), jnp.float32)
    out, lse = vslash_attention(qs, k, v, sel, q_offset=q_offset, kv_length=kv_length, scale=scale, mask=mask,
                                impl="triton")
    positions = q_offset[:, None] + jnp.arange(T)[None]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_out, ref_lse = masked_attention(tuple(map(f32, qs)), f32(k), f32(v), positions, kv_length, scale, mask=mask,
                                        restrict=vslash.dense_mask(sel, positions, S))
    return _compare("vslash-triton", mask_name, G, out, lse, ref_out, ref_lse)


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


def main(argv=None) -> int:
    from qwen_jax.bench import environment, write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="mosaic_gpu,triton", help="dense kernels; 'vslash' adds the sparse kernel")
    p.add_argument("--head-dims", default="128", help="comma-separated head dims to check (dense kernels)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results = []
    for impl in args.impls.split(","):
        cases = [("causal", 1, 128), ("dca", 4, 128), ("dca", 7, 128)] if impl == "vslash" else \
            [(m, G, int(h)) for h in args.head_dims.split(",") for m, G in CASES]
        for i, (mask_name, G, H) in enumerate(cases):
            try:
                res = run_sparse_case(mask_name, G, seed=i) if impl == "vslash" else \
                    run_case(impl, mask_name, G, seed=i, H=H)
                res["H"] = H
            except Exception as e:  # report and go on: one failing case must not hide the others
                res = {"impl": impl, "mask": mask_name, "G": G, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
            results.append(res)
            print(json.dumps(res), flush=True)
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)}/{len(results)} cases OK")
    write_json(args.json, {"env": environment(), "results": results})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
