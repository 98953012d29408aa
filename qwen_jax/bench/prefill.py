"""Long-prompt prefill benchmark on an exact architecture with random weights.

    qwen-jax bench prefill --config qwen2.5-7b-1m --random-weights --tokens 1m [--modes sparse,dense]
                           [--prefill-chunk 32768] [--attention auto] [--json out.json]

For each mode the memory planner checks the run first (and refuses with the shortfall instead of
running out of memory), one prefill chunk is run to compile, then the whole prompt is prefilled
with a progress bar over the chunks. Several modes run one after another, each in a process of its
own: a device's peak memory only grows while a process lives, so one process for both would report
the larger mode's peak for the other too. Reported: time to first token (the prefill plus the first
token's logits, compile excluded: the count of compilations inside the timed prefill is reported, 0
unless the last chunk is shorter), the first chunk's time (compilation; with a warm persistent
compilation cache, ``qwen_jax.compile_cache``, loading: the row names the cache's folder or ``off``),
tokens/s, peak device memory (where the backend reports it),
the planner's estimate, and model FLOP utilisation counting the linear layers plus dense causal
attention (so a sparse run's MFU is "effective": it did less attention work than it is credited
with).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def progress_bar(total: int, label: str, stream=None):
    """A callable ``update(done)`` drawing ``label [#####.....] done/total tokens, elapsed, ETA`` on ``stream``
    (default: ``sys.stderr`` as it is at each update, not as it was when this module was imported)."""
    t0 = time.perf_counter()

    def update(done: int):
        elapsed = time.perf_counter() - t0
        frac = done / max(total, 1)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        end = "\n" if done >= total else ""
        print(f"\r{label} [{bar}] {done}/{total} tokens, {elapsed:.1f} s, ETA {eta:.0f} s", end=end,
              file=stream or sys.stderr, flush=True)

    return update


def model_flops(config, tokens: int) -> tuple[float, float]:
    """(linear-layer FLOPs, dense causal attention FLOPs) of a prefill of ``tokens`` tokens."""
    c = config
    D, N, K, H, F, L = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                        c.intermediate_size, c.num_hidden_layers)
    per_token = 2 * L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + 2 * D * c.vocab_size / tokens
    attention = L * 2 * 2 * tokens * tokens / 2 * N * H
    return per_token * tokens, attention


def parse_modes(text: str) -> list[str]:
    """``--modes``: "sparse", "dense" or both, comma-separated; anything else refused in one line."""
    from qwen_jax.errors import QwenJaxError
    modes = text.split(",")
    for mode in modes:
        if mode not in ("sparse", "dense"):
            raise QwenJaxError(f"unknown mode {mode!r} (sparse or dense)")
    return modes


def mode_config(config, mode: str):
    """``config`` with DCA's sparse prefill on for every prompt length (``sparse``) or off (``dense``)."""
    dca = dataclasses.replace(config.dual_chunk_attention_config, sparse_attention_enabled=mode == "sparse",
                              sparse_attention_threshold=0)
    return dataclasses.replace(config, dual_chunk_attention_config=dca)


def _parser() -> argparse.ArgumentParser:
    from qwen_jax.cache import CACHE_DTYPES
    from qwen_jax.cli import _size
    from qwen_jax.presets import PRESETS

    p = argparse.ArgumentParser(prog="qwen-jax bench prefill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"architecture preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--random-weights", action="store_true", help="random bf16 weights (the only source for now)")
    p.add_argument("--tokens", required=True, help="prompt length, e.g. 1m")
    p.add_argument("--modes", default="sparse,dense", help="sparse and/or dense prefill")
    p.add_argument("--prefill-chunk", type=int, default=32768)
    p.add_argument("--attention", default="auto", help="pallas (default on GPUs and TPUs), blockwise (default on CPUs) "
                                                       "or reference")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "seq=2" or "seq=4,tensor=2"')
    p.add_argument("--kv-cache-dtype", default="auto", choices=tuple(CACHE_DTYPES), help="auto (the model dtype) or fp8")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-device peak for MFU (H100 SXM bf16: 989)")
    p.add_argument("--device-memory", type=_size, default=None,
                   help="memory per device for the planner: GiB, or with a unit (80GB, 79.6GiB)")
    p.add_argument("--json", default=None)
    return p


def _child_argv(args, mode: str, json_path: str) -> list[str]:
    """The command line of one mode's own run, every other option as given."""
    argv = ["bench", "prefill", "--config", args.config, "--random-weights", "--tokens", args.tokens,
            "--modes", mode, "--prefill-chunk", str(args.prefill_chunk), "--attention", args.attention,
            "--dtype", args.dtype, "--kv-cache-dtype", args.kv_cache_dtype, "--peak-tflops", str(args.peak_tflops),
            "--json", json_path]
    if args.mesh:
        argv += ["--mesh", args.mesh]
    if args.device_memory is not None:
        argv += ["--device-memory", f"{args.device_memory}B"]
    return argv


PARENT_ENV = "QWEN_JAX_BENCH_PARENT"   # set by the parent for each mode's process: the parent's pid


def _die_with_parent(parent: int) -> None:
    """In a mode's process, first thing (Linux): the kernel sends it SIGTERM when the parent dies, however it
    dies, so a `timeout`, a scheduler's signal or a kill -9 of the parent leaves no process holding the
    accelerator. Done here rather than between fork and exec, where Python code may deadlock a threaded parent."""
    import ctypes
    import os
    import signal
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))       # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:         # the parent died before the call above: nobody to report to
        os._exit(143)


def _modes_apart(args, modes: list[str]) -> int:
    """Each mode in a child process (``python -m qwen_jax.cli bench prefill --modes MODE``), its rows
    gathered into one report; the first failing mode's exit status ends the run. A SIGTERM to this
    process ends the mode's process too (``subprocess.call`` kills its child when the wait is interrupted)."""
    import os
    import signal
    import subprocess
    import tempfile
    import threading

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    rows, env, flops = [], None, None
    main_thread = threading.current_thread() is threading.main_thread()    # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, terminated) if main_thread else None
    try:
        with tempfile.TemporaryDirectory(prefix="qwen_jax_bench_") as tmp:
            for mode in modes:
                path = os.path.join(tmp, f"{mode}.json")
                sys.stdout.flush()
                sys.stderr.flush()
                code = subprocess.call([sys.executable, "-m", "qwen_jax.cli", *_child_argv(args, mode, path)],
                                       env={**os.environ, PARENT_ENV: str(os.getpid())})
                if code:
                    return code
                with open(path) as f:
                    part = json.load(f)
                rows += part["rows"]
                env, flops = env or part["env"], part["flops"]
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    _report(args, rows, env, flops)
    return 0


def _report(args, rows: list[dict], env: dict, flops: dict) -> None:
    from qwen_jax.bench import report
    if len(rows) == 2:
        speed = {r["mode"]: r["TTFT s"] for r in rows}
        print(f"sparse over dense: {speed['dense'] / speed['sparse']:.2f}x", flush=True)
    report(args, rows, env, flops=flops)


def main(argv=None) -> int:
    import os

    from qwen_jax.errors import QwenJaxError
    from qwen_jax.passkey import parse_length

    parent = os.environ.pop(PARENT_ENV, None)
    if parent is not None:                   # one mode's process of a run over several modes
        _die_with_parent(int(parent))
    args = _parser().parse_args(argv)
    if not args.random_weights:
        raise QwenJaxError("bench prefill runs an architecture with random weights: pass --random-weights")
    modes = parse_modes(args.modes)
    T = parse_length(args.tokens)
    from qwen_jax.bench import below_one, output_problem
    if problem := below_one(args, "prefill_chunk") or output_problem(args.json):
        raise QwenJaxError(problem)
    if not args.peak_tflops > 0:
        raise QwenJaxError(f"bad --peak-tflops {args.peak_tflops}: a device's peak is above 0")
    if len(modes) > 1:
        return _modes_apart(args, modes)

    import jax
    import jax.numpy as jnp

    import qwen_jax
    from qwen_jax import compile_cache, memory
    from qwen_jax.attention import AttentionSpec
    from qwen_jax.bench import environment
    from qwen_jax.cache import cache_length, init_cache
    from qwen_jax.model import init_params, prefill_programs
    from qwen_jax.presets import preset_config

    (mode,) = modes
    base = preset_config(args.config)
    if base.dual_chunk_attention_config is None:
        raise QwenJaxError(f"{args.config} has no dual_chunk_attention_config; this benchmark runs DCA prefill")
    from qwen_jax.sharding import make_mesh
    from qwen_jax.cache import cache_dtype
    mesh = make_mesh(args.mesh) if args.mesh else None
    dtype = jnp.dtype(args.dtype)
    kv_dtype = cache_dtype(args.kv_cache_dtype, dtype)
    capacity = args.device_memory or memory.device_capacity()
    params = init_params(base, jax.random.key(0), dtype=dtype, mesh=mesh)
    tokens = jax.random.randint(jax.random.key(1), (1, T), 0, base.vocab_size, jnp.int32)
    linear, attn = model_flops(base, T)
    n_dev = 1 if mesh is None else mesh.devices.size
    config = mode_config(base, mode)
    spec = dataclasses.replace(AttentionSpec.of(args.attention).resolved(), mesh=mesh)
    plan = memory.plan(config, tokens=T, mesh=mesh, chunk_size=args.prefill_chunk, dtype=dtype,
                       cache_dtype=kv_dtype, sparse=mode == "sparse", attention=spec.impl, capacity=capacity)
    memory.check(plan, tokens=T, mesh=mesh, chunk_size=args.prefill_chunk)
    cache = init_cache(config, 1, cache_length(T), kv_dtype, mesh)
    lengths = jnp.full((1,), T, jnp.int32)
    # compile: one chunk of the full-size cache (the cache is donated and handed back)
    first = min(args.prefill_chunk, T)
    t0 = time.perf_counter()
    out, cache = qwen_jax.prefill(params, tokens[:, :first], lengths, cache, config,
                                  chunk_size=args.prefill_chunk, spec=spec)
    int(jnp.argmax(out[0]))             # the first token's pick, compiled here too (outside the timed prefill)
    compile_s = time.perf_counter() - t0
    compiled = prefill_programs()
    t0 = time.perf_counter()
    logits, cache = qwen_jax.prefill(params, tokens, lengths, cache, config, chunk_size=args.prefill_chunk,
                                     spec=spec, progress=progress_bar(T, f"{mode} prefill"))
    next_token = int(jnp.argmax(logits[0]))
    ttft = time.perf_counter() - t0
    recompiled = prefill_programs() - compiled      # a ragged last chunk compiles once more
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peak = None if None in peaks else max(peaks)
    row = {"mode": mode, "tokens": T, "mesh": args.mesh or "one device", "kv cache": str(kv_dtype),
           "TTFT s": round(ttft, 2), "tokens/s": round(T / ttft),
           "peak GiB per device": None if peak is None else round(peak / memory.GiB, 1),
           "planned GiB": round(plan.total / memory.GiB, 1),
           "MFU": round((linear + attn) / ttft / (args.peak_tflops * 1e12 * n_dev), 3),
           "first chunk s (compile)": round(compile_s, 1), "compile cache": compile_cache.state(),
           "compilations in the timed prefill": recompiled,
           "next token": next_token}
    print(json.dumps(row), flush=True)
    _report(args, [row], environment(), {"linear": linear, "dense attention": attn})
    return 0


if __name__ == "__main__":
    sys.exit(main())
