"""Compile-time benchmark: how long one prefill chunk step of an exact architecture takes to compile.

    qwen-jax bench compile --config qwen2.5-7b-1m --tokens 1m [--prefill-chunk 32768] [--modes sparse,dense]
                           [--layers 1,4,all] [--attention auto] [--kv-cache-dtype fp8] [--json out.json]

The programs ``qwen_jax.prefill`` runs per chunk, for a cache of ``--tokens`` slots (the embedding, one
program per distinct decoder layer, the final rows), are lowered and compiled from abstract inputs (no
weights or cache are allocated, so the 7B-1M at 1M runs on any machine that can compile for it);
``--layers`` cuts the model to that many layers (``all``: every layer): layers with the same sparse
budgets share one program, so depth adds programs only where budgets differ. Reported per mode and
depth: programs, seconds to trace and lower, seconds to compile, and the persistent compilation
cache in use (``qwen_jax.compile_cache``: the folder, or ``off``). With a cache, a program compiled
before is loaded instead, also one an earlier row of the same run compiled (a layer program is the same at
every depth): for cold figures in every row set ``QWEN_JAX_COMPILE_CACHE=off`` (an empty folder makes only
the first row cold); for warm ones run the same command again with the cache on. A depth listed twice is
traced once (its second row shows 0 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def _parser() -> argparse.ArgumentParser:
    from qwen_jax.cache import CACHE_DTYPES
    from qwen_jax.presets import PRESETS
    p = argparse.ArgumentParser(prog="qwen-jax bench compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"architecture preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--tokens", required=True, help="KV cache slots (the prompt length), e.g. 1m")
    p.add_argument("--prefill-chunk", type=int, default=32768)
    p.add_argument("--modes", default="sparse,dense", help="sparse and/or dense prefill")
    p.add_argument("--layers", default="all", help="comma-separated layer counts, or all")
    p.add_argument("--attention", default="auto", help="pallas (default on GPUs and TPUs), blockwise (default on CPUs) "
                                                       "or reference")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--kv-cache-dtype", default="auto", choices=tuple(CACHE_DTYPES), help="auto (the model dtype) or fp8")
    p.add_argument("--json", default=None)
    return p


def step_times(config, tokens: int, chunk: int, dtype, kv_dtype, spec) -> tuple[float, float, int]:
    """(seconds to trace and lower, seconds to compile, programs) of one prefill chunk on abstract inputs:
    the embedding step, each distinct layer program (``model.program_layers``) and the final step."""
    import jax
    import jax.numpy as jnp

    from qwen_jax.cache import cache_length
    from qwen_jax.model import _embed_step, _final_step, _layer_step, abstract_params, program_layers

    sd = jax.ShapeDtypeStruct
    params = abstract_params(config, dtype)
    kv = sd((1, config.num_key_value_heads, cache_length(tokens), config.head_dim), kv_dtype)
    x = sd((1, chunk, config.hidden_size), dtype)
    start, lengths = sd((), jnp.int32), sd((1,), jnp.int32)
    t0 = time.perf_counter()
    traced = [_embed_step.trace(params["embed"]["embedding"], sd((1, chunk), jnp.int32), config=config, spec=spec)]
    traced += [_layer_step.trace(params[f"layers_{i}"], x, start, lengths, kv, kv, config=config, spec=spec, layer=i)
               for i in sorted(set(program_layers(config)))]
    traced.append(_final_step.trace({"norm": params["norm"]}, x, start, lengths, sd((1, config.hidden_size), dtype),
                                    config=config, all_logits=False))
    lowered = [t.lower() for t in traced]
    t1 = time.perf_counter()
    for low in lowered:
        low.compile()
    return t1 - t0, time.perf_counter() - t1, len(lowered)


def main(argv=None) -> int:
    import jax.numpy as jnp

    from qwen_jax import attention, compile_cache
    from qwen_jax.bench import report
    from qwen_jax.bench import below_one, output_problem
    from qwen_jax.bench.prefill import mode_config, parse_modes
    from qwen_jax.cache import cache_dtype
    from qwen_jax.errors import QwenJaxError
    from qwen_jax.model import _check_sparse_chunks
    from qwen_jax.passkey import parse_length
    from qwen_jax.presets import preset_config

    args = _parser().parse_args(argv)
    tokens = parse_length(args.tokens)
    if problem := below_one(args, "prefill_chunk") or output_problem(args.json):
        raise QwenJaxError(problem)
    base = preset_config(args.config)
    modes = parse_modes(args.modes)
    if "sparse" in modes:
        if base.dual_chunk_attention_config is None:
            raise QwenJaxError(f"{args.config} has no dual_chunk_attention_config: sparse prefill runs on DCA")
        _check_sparse_chunks(mode_config(base, "sparse"), args.prefill_chunk)   # as prefill refuses it
    depths = []
    for part in args.layers.split(","):
        if part == "all":
            depths.append(base.num_hidden_layers)
        elif part.isdigit() and 1 <= int(part) <= base.num_hidden_layers:
            depths.append(int(part))
        else:
            raise QwenJaxError(f"bad --layers {args.layers!r}: layer counts from 1 to {base.num_hidden_layers}, or all")
    dtype = jnp.dtype(args.dtype)
    kv_dtype = cache_dtype(args.kv_cache_dtype, dtype)
    chunk = min(args.prefill_chunk, tokens)
    rows = []
    for mode in modes:
        for layers in depths:
            config = dataclasses.replace(base, num_hidden_layers=layers)
            if config.dual_chunk_attention_config is not None:
                config = mode_config(config, mode)
            spec = attention.with_sparse_rows(attention.AttentionSpec.of(args.attention), config, [tokens])
            lower_s, compile_s, programs = step_times(config, tokens, chunk, dtype, kv_dtype, spec)
            rows.append({"mode": mode, "layers": layers, "tokens": tokens, "prefill chunk": chunk,
                         "programs": programs, "lower s": round(lower_s, 2), "compile s": round(compile_s, 2),
                         "compile cache": compile_cache.state()})
            print(json.dumps(rows[-1]), flush=True)
    report(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
