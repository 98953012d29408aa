"""Decode attention kernel benchmark: one query a row over a long cache, qwen-jax kernels against XLA and cuDNN.

    python -m pallas_kernels.bench_decode [--lengths 32k,128k,1m] [--heads 28 --kv-heads 4 --head-dim 128]
                                          [--batch 1] [--kv-dtype fp8] [--dca 262144,8192]
                                          [--kernels decode,decode:64:4:3:0:q,triton] [--json out.json]

``--kernels``: ``decode[:block_k[:num_warps[:num_stages[:splits]]]][:f16|:q]`` (the split-key decode kernel,
``pallas_kernels.decode_gpu``; a setting 0 or left out: its tuned default; an fp8 cache's math in float16,
its default, or with ``q`` in the queries' dtype), ``triton`` (the prefill Triton kernel, one program per
query head), ``xla`` (dense masked attention in XLA), ``cudnn`` (``jax.nn.dot_product_attention`` with one
query, K/V in the compute dtype, plain causal only; the cache is laid out as it reads it, ``[B, L, K, H]``, before
the timing). The K/V cache is filled to each length;
an fp8 cache (``--kv-dtype fp8``) is read as stored by ``decode`` and widened first by the others (the
widening is timed with them, as the model pays it). Reported: ms per call (median after warm-up) and the
cache bytes read per second (K and V up to the length, in the stored dtype) against ``--peak-gbps``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

KV_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp8": "float8_e4m3fn"}


def _kernel(spec: str, mask):
    """(name, fn(queries, k, v, q_offset, kv_length, scale) -> (out, lse)) for one ``--kernels`` entry."""
    import jax.numpy as jnp

    from pallas_kernels import masked_attention, widened
    name, *opts = spec.split(":")
    if name == "decode":
        from pallas_kernels.decode_gpu import decode_attention_gpu
        math = opts[-1] if opts and opts[-1] in ("f16", "q") else None
        opts = opts[:-1] if math else opts
        if len(opts) > 4 or not all(o.isdigit() for o in opts):
            raise SystemExit(f"bad --kernels entry {spec!r}: "
                             "decode[:block_k[:num_warps[:num_stages[:splits]]]][:f16|:q]")
        keys = ("block_k", "num_warps", "num_stages", "splits")
        return functools.partial(decode_attention_gpu, mask=mask, fp8_f16=math != "q",
                                 **{k: int(o) or None for k, o in zip(keys, opts)})
    if opts:
        raise SystemExit(f"bad --kernels entry {spec!r}: only decode takes options")
    if name == "triton":
        from pallas_kernels.flash_gpu import flash_attention_gpu

        def run(queries, k, v, q_offset, kv_length, scale):
            k, v = widened(k, queries[0].dtype), widened(v, queries[0].dtype)
            return flash_attention_gpu(queries, k, v, q_offset, kv_length, scale, mask=mask)
        return run
    if name == "xla":
        def run(queries, k, v, q_offset, kv_length, scale):
            k, v = widened(k, queries[0].dtype), widened(v, queries[0].dtype)
            return masked_attention(queries, k, v, q_offset[:, None], kv_length, scale, mask=mask)
        return run
    if name == "cudnn":
        import jax
        if mask.chunk_len is not None:
            raise SystemExit("cudnn runs plain causal attention only: drop --dca or the cudnn entry")

        def run(queries, k, v, q_offset, kv_length, scale):
            # k, v come [B, L, K, H] (``run.layout``, outside the timed call); the one query sees the whole filled
            # cache: no mask needed past kv_length
            k, v = widened(k, queries[0].dtype), widened(v, queries[0].dtype)
            out = jax.nn.dot_product_attention(queries[0], k, v, scale=float(queries[0].shape[-1]) ** -0.5,
                                               key_value_seq_lengths=kv_length, implementation="cudnn")
            return out, jnp.zeros(out.shape[:-1], jnp.float32)
        run.layout = lambda x: x.transpose(0, 2, 1, 3)      # cuDNN's [B, L, K, H] cache: a layout, not its work
        return run
    raise SystemExit(f"unknown kernel {name!r} in --kernels (decode, triton, xla or cudnn)")


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.masks import MaskSpec
    from qwen_jax.bench import KERNEL_WARMUP_S, below_one, environment, median_time, output_problem, report
    from qwen_jax.bench.decode import PEAK_GBPS
    from qwen_jax.bench.sparse import parse_dca_pair
    from qwen_jax.passkey import parse_length

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="32k,128k,1m")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-dtype", default="fp8", choices=sorted(KV_DTYPES))
    p.add_argument("--kernels", default="decode,triton,xla")
    p.add_argument("--dca", default=None, help="chunk_size,local_size: DCA's three phases")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-gbps", type=float, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if problem := below_one(args, "repeats", "batch", "heads", "kv_heads") or output_problem(args.json):
        raise SystemExit(problem)
    mask = MaskSpec()
    if args.dca:
        C, W = parse_dca_pair(args.dca)
        mask = MaskSpec(chunk_len=C - W)
    kernels = [(spec, _kernel(spec, mask)) for spec in args.kernels.split(",")]
    env = environment()
    peak = args.peak_gbps or PEAK_GBPS.get(env["device"])
    B, N, K, H = args.batch, args.heads, args.kv_heads, args.head_dim
    kv_dtype = jnp.dtype(KV_DTYPES[args.kv_dtype])
    rows = []
    for L in (parse_length(x) for x in args.lengths.split(",")):
        kq, kk, kv = jax.random.split(jax.random.key(L), 3)
        queries = tuple(jax.random.normal(jax.random.fold_in(kq, i), (B, 1, N, H), jnp.bfloat16)
                        for i in range(len(mask.phases)))
        k = jax.random.normal(kk, (B, K, L, H), jnp.float32).astype(kv_dtype)
        v = jax.random.normal(kv, (B, K, L, H), jnp.float32).astype(kv_dtype)
        q_offset, kv_length = jnp.full((B,), L - 1, jnp.int32), jnp.full((B,), L, jnp.int32)
        scale = jnp.full((B,), H ** -0.5, jnp.float32)
        cache_bytes = 2 * B * K * L * H * kv_dtype.itemsize
        first = None
        call = (queries, k, v, q_offset, kv_length, scale)
        for spec, fn in kernels:
            jitted = jax.jit(fn)
            layout = getattr(fn, "layout", None)
            try:
                a = call if layout is None else (queries, layout(k), layout(v), q_offset, kv_length, scale)
                ms = median_time(lambda f=jitted, a=a: jax.block_until_ready(f(*a)), args.repeats, warmup=2,
                                 warmup_s=KERNEL_WARMUP_S) * 1e3
                out = jitted(*a)[0].astype(jnp.float32)
                del a
            except Exception as e:      # one kernel that cannot run must not end the sweep
                rows.append({"length": L, "kernel": spec, "ms": "-", "error": f"{type(e).__name__}: {e}"[:300]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            first = out if first is None else first
            gbps = cache_bytes / ms / 1e6
            rows.append({"length": L, "kernel": spec, "ms": round(ms, 3), "GB/s": round(gbps),
                         "of peak": None if peak is None else round(gbps / peak, 3),
                         "max diff vs first": float(jnp.abs(out - first).max())})
            print(json.dumps(rows[-1]), flush=True)
        del call, k, v                  # the next length's cache replaces this one
    report(args, rows, env, columns=["length", "kernel", "ms", "GB/s", "of peak", "max diff vs first"],
           **{"peak GB/s": peak})
    return 0


if __name__ == "__main__":
    sys.exit(main())
