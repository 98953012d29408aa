"""Long-context decode benchmark: time per output token over a filled KV cache, by attention kernel.

    qwen-jax bench decode --config qwen2.5-7b-1m --random-weights --context 32k,128k,1m
                          [--kernels auto,triton,xla] [--kv-cache-dtype fp8] [--batch 1] [--steps 16]
                          [--mesh seq=2] [--json out.json]

For each context length L the cache is filled up to L with random keys and values (a decode step's
time depends on how many slots it reads, not on what they hold, so no prefill is run), then greedy
decode steps (``generation.decode_and_sample``: the model, the logits and the pick, one step per program;
``generate`` runs the same step in blocks of ``DECODE_BLOCK``, one program each) feed one token a row at positions L, L + 1, ...; the first step compiles, then the median time a
token is taken over ``--steps`` steps run as ``generate`` runs them (each step dispatched before the previous
one's tokens are read, so the host's dispatch overlaps the device: ``ms/token``) and over ``--steps`` more run one
at a time (``synced ms/token``: the device's step plus the host's dispatch). Kernels, all in the same process on the
same cache: ``auto`` (the default path: on a GPU the split-key decode kernel ``pallas_kernels.decode_gpu``),
``triton`` (the prefill Triton kernel: one program per query head, the whole cache each), ``xla``
(dense masked attention in XLA, ``AttentionSpec(impl="reference")``), ``blockwise`` (the jnp online
softmax; ``--interpret`` emulates the Pallas ones on a CPU). Reported per length and kernel: ms per token,
tokens/s over the batch, the bytes one device must read per step (its share of the weights once, of an untied
embedding table only the batch's rows, and of every layer's K and V up to L) over the step's time, as GB/s and as
a share of ``--peak-gbps`` (the card's memory bandwidth), and the first step's greedy tokens (the same for every
kernel unless they disagree). A run whose weights and cache do not fit a device is refused before anything is
allocated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

KERNELS = {"auto": dict(impl="pallas"), "triton": dict(impl="pallas", kernel="triton"),
           "xla": dict(impl="reference"), "blockwise": dict(impl="blockwise")}
FILL_SLOTS = 16384   # cache slots filled with random values per step
# HBM bandwidth (GB/s) by device kind, for the share of peak: H100 SXM 3.35 TB/s, H200 4.8 TB/s
PEAK_GBPS = {"NVIDIA H100 80GB HBM3": 3350.0, "NVIDIA H200": 4800.0}


def _parser() -> argparse.ArgumentParser:
    from qwen_jax.cache import CACHE_DTYPES
    p = argparse.ArgumentParser(prog="qwen-jax bench decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="architecture preset, e.g. qwen2.5-7b-1m")
    p.add_argument("--random-weights", action="store_true", help="required: the weights are random")
    p.add_argument("--context", default="32k,128k,1m", help="cache lengths to decode after, comma-separated")
    p.add_argument("--kernels", default="auto,triton", help=f"comma-separated, of {sorted(KERNELS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per length and kernel")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-dtype", default="auto", choices=sorted(CACHE_DTYPES))
    p.add_argument("--mesh", help="e.g. seq=2 or tensor=2")
    p.add_argument("--interpret", action="store_true", help="emulate the Pallas kernels (a CPU smoke run)")
    p.add_argument("--peak-gbps", type=float, help="the card's memory bandwidth (default: known H100 / H200 figures)")
    p.add_argument("--json", help="write the results here")
    return p


def parse_kernels(text: str) -> list[str]:
    """``--kernels``: names from ``KERNELS``, comma-separated; anything else refused in one line."""
    from qwen_jax.errors import QwenJaxError
    names = text.split(",")
    for name in names:
        if name not in KERNELS:
            raise QwenJaxError(f"unknown --kernels entry {name!r}; choose from {sorted(KERNELS)}")
    return names


def _filled_cache(config, batch: int, slots: int, dtype, mesh, seed: int):
    """A cache of ``slots`` slots, every one holding random values (unit normal, stored in ``dtype``)."""
    import jax
    import jax.numpy as jnp

    from qwen_jax.cache import KVCache, init_cache
    empty = init_cache(config, batch, slots, dtype, mesh)
    sharding = empty.k[0].sharding                # laid out as the model's cache is (over a mesh too)
    # drawn in bfloat16 (an 8-bit cache: then narrowed) a slice of slots at a time, so a nearly full card
    # (the 7B's bf16 cache at 1M) needs no room for a layer's random bits beside it
    draw = jnp.bfloat16 if dtype.itemsize <= 2 else dtype
    piece = FILL_SLOTS if slots % FILL_SLOTS == 0 else slots

    def fill_layer(buffer, key):
        def body(i, buf):
            shape = buf.shape[:2] + (piece,) + buf.shape[3:]
            values = jax.random.normal(jax.random.fold_in(key, i), shape, draw).astype(buf.dtype)
            return jax.lax.dynamic_update_slice(buf, values, (0, 0, i * piece, 0))
        return jax.lax.fori_loop(0, slots // piece, body, buffer)

    fill = jax.jit(fill_layer, out_shardings=sharding, donate_argnums=0)
    keys = iter(jax.random.split(jax.random.key(seed), 2 * config.num_hidden_layers))
    return KVCache(*(tuple(fill(b, next(keys)) for b in buffers) for buffers in (empty.k, empty.v)))


def timed_steps(step, tokens, steps: int) -> tuple[float, float]:
    """Median ms per step of ``step(tokens, i) -> tokens``: first as ``generate`` runs it (step i + 1 dispatched
    before step i's tokens are read on the host; the gaps between ``steps + 1`` reads), then ``steps`` more one at
    a time (each read before the next is dispatched: the device's step plus the host's dispatch). Runs
    ``2 * steps + 2`` steps, numbered from 0."""
    marks, pending = [], step(tokens, 0)
    for i in range(1, steps + 2):
        current, pending = pending, step(pending, i)
        np.asarray(current)
        marks.append(time.perf_counter())
    tokens, synced = np.asarray(pending), []
    for i in range(steps + 2, 2 * steps + 2):
        t0 = time.perf_counter()
        tokens = np.asarray(step(tokens, i))
        synced.append(time.perf_counter() - t0)
    return statistics.median(np.diff(marks)) * 1e3, statistics.median(synced) * 1e3


def main(argv=None) -> int:
    from qwen_jax.bench import below_one, output_problem
    from qwen_jax.errors import QwenJaxError
    from qwen_jax.passkey import parse_length

    args = _parser().parse_args(argv)
    if not args.random_weights:
        raise QwenJaxError("bench decode runs an architecture with random weights: pass --random-weights")
    kernels = parse_kernels(args.kernels)
    contexts = [parse_length(x) for x in args.context.split(",")]
    if problem := below_one(args, "batch", "steps") or output_problem(args.json):
        raise QwenJaxError(problem)

    import dataclasses

    import jax
    import jax.numpy as jnp

    from qwen_jax import memory
    from qwen_jax.attention import AttentionSpec
    from qwen_jax.bench import environment, report
    from qwen_jax.cache import cache_dtype, cache_length
    from qwen_jax.generation import GREEDY, decode_and_sample
    from qwen_jax.model import init_params
    from qwen_jax.presets import preset_config
    from qwen_jax.sharding import make_mesh

    config = preset_config(args.config)
    mesh = make_mesh(args.mesh) if args.mesh else None
    dtype = jnp.dtype(args.dtype)
    kv_dtype = cache_dtype(args.kv_cache_dtype, dtype)
    env = environment()
    peak = args.peak_gbps or PEAK_GBPS.get(env["device"])
    capacity = memory.device_capacity()
    for L in contexts:      # per device, as the planner counts them (over a mesh: each device's shards)
        p = memory.plan(config, tokens=cache_length(L, 2 * args.steps + 4), batch=args.batch, mesh=mesh, dtype=dtype,
                        cache_dtype=kv_dtype)
        if capacity is not None and p.weights + p.cache > capacity:
            raise QwenJaxError(f"decode after {L} tokens needs at least {(p.weights + p.cache) / memory.GiB:.1f} GiB "
                               f"per device (weights and cache) of {capacity / memory.GiB:.1f}: use a shorter "
                               f"--context, --kv-cache-dtype fp8 or a mesh")
    params = init_params(config, jax.random.key(0), dtype=dtype, mesh=mesh)
    leaves = jax.tree.leaves(params)
    params_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    device_params = sum(x.addressable_shards[0].data.nbytes for x in leaves)     # what one device holds
    if not config.tie_word_embeddings:    # a step gathers `batch` rows of the [V, D] table (tied: it is the lm_head)
        table = params["embed"]["embedding"].addressable_shards[0].data
        device_params -= table.nbytes - min(args.batch, table.shape[0]) * table.nbytes // table.shape[0]
    rows = []
    for L in contexts:
        slots = cache_length(L, 2 * args.steps + 4)
        cache = _filled_cache(config, args.batch, slots, kv_dtype, mesh, seed=L)
        tokens = jax.random.randint(jax.random.key(L), (args.batch,), 0, config.vocab_size, jnp.int32)
        device_cache = sum(b.addressable_shards[0].data.nbytes for b in cache.k + cache.v)
        reads = device_params + device_cache * L // slots          # one device's weights read, and its cache up to L
        for name in kernels:
            spec = dataclasses.replace(AttentionSpec(**KERNELS[name]), mesh=mesh,
                                       interpret=args.interpret and KERNELS[name]["impl"] == "pallas")
            positions = jnp.full((args.batch,), L, jnp.int32)
            key = jax.random.key(0)
            first, cache, _ = decode_and_sample(params, tokens, positions, cache, key, config, spec, GREEDY)
            first = [int(t) for t in jax.device_get(first)]             # compiles; its tokens are the check

            def step(tokens, i, positions=positions, key=key, spec=spec):     # run at once, in this loop
                nonlocal cache
                tokens, cache, _ = decode_and_sample(params, tokens, positions + 1 + i, cache, key, config, spec,
                                                     GREEDY)
                return tokens

            ms, synced = timed_steps(step, tokens, args.steps)
            row = {"context": L, "kernel": name, "batch": args.batch, "kv cache": str(kv_dtype),
                   "mesh": args.mesh or "one device", "ms/token": round(ms, 2),
                   "tokens/s": round(args.batch * 1e3 / ms, 1), "synced ms/token": round(synced, 2),
                   "bytes read per device": reads, "GB/s read": round(reads / ms / 1e6, 1),
                   "of peak": None if peak is None else round(reads / ms / 1e6 / peak, 3), "first tokens": first}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del cache
    for L in contexts:
        firsts = {json.dumps(r["first tokens"]) for r in rows if r["context"] == L}
        if len(firsts) > 1:
            print(f"kernels disagree on the first tokens after {L}: {sorted(firsts)}", file=sys.stderr)
    report(args, rows, env, **{"peak GB/s": peak, "params bytes": params_bytes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
