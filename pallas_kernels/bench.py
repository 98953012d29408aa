"""Attention kernel benchmark: qwen-jax kernels against cuDNN, same run, same card.

    python -m pallas_kernels.bench [--lengths 8k,32k,128k] [--heads 28 --kv-heads 4 --head-dim 128]
                                   [--kernels mosaic_gpu:64:128:2:c3,triton:128:64:3] [--dca 262144,8192]
                                   [--json out.json]

``--kernels`` lists ``impl:block_q:block_k:stages`` (Triton: stages = num_stages, with 8 warps at
head_dim 128; Mosaic GPU: further fields ``lf`` launch light query blocks first, ``free`` lets the
consumers run without taking turns, ``c3`` runs three consumer warpgroups, free); each is timed
causal, and with ``--dca`` also through DCA.

Causal prefill of T queries over T keys, batch 1, bf16. FLOPs counted as 2 * 2 * T^2 / 2 * N * H
(the causal half). Times are medians of GPU-synchronised runs after warm-up. "vs first": the first case's time
(cuDNN's, or the first kernel's with ``--no-cudnn``) over each case's; "-" where the first case failed.
"""

from __future__ import annotations

import argparse
import functools
import sys


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.flash_gpu import flash_attention_gpu
    from pallas_kernels.flash_mgpu import flash_attention_mgpu
    from pallas_kernels.masks import MaskSpec
    from qwen_jax.bench import KERNEL_WARMUP_S, median_time, report
    from qwen_jax.bench import below_one, output_problem
    from qwen_jax.bench.sparse import parse_dca_pair
    from qwen_jax.passkey import parse_length

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8k,32k,128k")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kernels", default="mosaic_gpu:64:128:2:c3,triton:128:64:3")
    p.add_argument("--dca", default=None, help="chunk_size,local_size: also time DCA through the kernel")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-cudnn", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dca = parse_dca_pair(args.dca) if args.dca else None
    if problem := below_one(args, "repeats") or output_problem(args.json):
        raise SystemExit(problem)

    N, K, H = args.heads, args.kv_heads, args.head_dim
    rows = []
    for T in (parse_length(x) for x in args.lengths.split(",")):
        key = jax.random.key(T)
        kq, kk, kv = jax.random.split(key, 3)
        q = jax.random.normal(kq, (1, T, N, H), jnp.bfloat16)
        k = jax.random.normal(kk, (1, K, T, H), jnp.bfloat16)
        v = jax.random.normal(kv, (1, K, T, H), jnp.bfloat16)
        flops = 2 * 2 * T * T / 2 * N * H
        zero, length, scale = jnp.zeros((1,), jnp.int32), jnp.full((1,), T, jnp.int32), jnp.full((1,), H ** -0.5)
        cases = []
        if not args.no_cudnn:
            kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            cudnn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"))
            cases.append(("cudnn", cudnn, (q, kt, vt), flops))
        for spec in args.kernels.split(","):
            impl, bq, bk, stages, *extra = spec.split(":")
            if impl == "mosaic_gpu":  # "lf": light query blocks first (default heavy first); "free": no turns
                if set(extra) - {"lf", "free", "c3"}:
                    raise SystemExit(f"unknown option in {spec!r}: mosaic_gpu:block_q:block_k:stages[:lf][:free][:c3]")
                kernel = functools.partial(flash_attention_mgpu, block_q=int(bq), block_k=int(bk), stages=int(stages),
                                           heavy_first="lf" not in extra, pingpong=False if "free" in extra else None,
                                           consumers=3 if "c3" in extra else 2)
            elif impl == "triton":
                kernel = functools.partial(flash_attention_gpu, block_q=int(bq), block_k=int(bk),
                                           num_stages=int(stages))
            else:
                raise SystemExit(f"unknown kernel {impl!r} in --kernels (mosaic_gpu or triton)")
            cases.append((f"{spec} causal", functools.partial(kernel, mask=MaskSpec()),
                          ((q,), k, v, zero, length, scale), flops))
            if dca:
                C, W = dca
                cases.append((f"{spec} DCA {C}/{W}", functools.partial(kernel, mask=MaskSpec(chunk_len=C - W)),
                              ((q, q, q), k, v, zero, length, scale), flops))
        base = None                     # the first case's time (cuDNN's unless --no-cudnn): no other stands in for it
        for i, (name, fn, fargs, fl) in enumerate(cases):
            try:
                jitted = jax.jit(fn)
                ms = median_time(lambda f=jitted, a=fargs: jax.block_until_ready(f(*a)), args.repeats, warmup=2,
                                 warmup_s=KERNEL_WARMUP_S) * 1e3
            except Exception as e:  # a config that does not fit (shared memory) must not end the sweep
                rows.append({"T": T, "impl": name, "ms": "-", "TFLOP/s": "-", "vs first": f"error: {e}"[:300]})
                print(rows[-1], flush=True)
                continue
            base = ms if i == 0 else base
            rows.append({"T": T, "impl": name, "ms": f"{ms:.2f}", "TFLOP/s": f"{fl / ms / 1e9:.0f}",
                         "vs first": f"{base / ms:.2f}x" if base else "-"})
            print(rows[-1], flush=True)
    report(args, rows, columns=["T", "impl", "ms", "TFLOP/s", "vs first"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
