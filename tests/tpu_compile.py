"""Compile the TPU kernels and the model's TPU steps for a TPU, without one: libtpu's deviceless compiler (a
v5e 2x2 topology) on this CPU host, so Mosaic TPU really compiles them (``jax.export`` only proves they lower).
The model's steps compile on one chip and over meshes of the 4 chips (the decode step on seq, tensor and both, the
prefill layer on seq and both); generate's decode block on one.

Run by ``tests/test_tpu_compile.py`` in a process of its own, with libtpu on ``PYTHONPATH`` and
``JAX_PLATFORMS=cpu``; prints one line per case, ``OK name`` or ``FAIL name: error``.
"""

import functools
import sys

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

jax.default_backend = lambda: "tpu"      # what a TPU host answers: the dispatch picks what a TPU run picks

from pallas_kernels import MaskSpec, flash_attention, vslash, vslash_attention  # noqa: E402
from qwen_jax import generation, model  # noqa: E402
from qwen_jax.attention import AttentionSpec, with_sparse_rows  # noqa: E402
from qwen_jax.attention.parallel import cache_kv_heads  # noqa: E402
from qwen_jax.cache import CACHE_AXES, KVCache  # noqa: E402
from qwen_jax.config import DCAConfig, QwenConfig, _freeze  # noqa: E402
from qwen_jax.sampling import Sampling, row_keys  # noqa: E402
from qwen_jax.sharding import make_mesh, named_sharding  # noqa: E402

DEVICES = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
ONE = SingleDeviceSharding(DEVICES[0])
MASKS = {"causal": MaskSpec(), "window": MaskSpec(window=700), "dca": MaskSpec(chunk_len=1024)}
failed = 0


def sd(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=ONE)


def compile_case(name, fn, *args, jitted=False, **static):
    """``fn`` jitted here, or (``jitted``) a jitted function of the project's, lowered with ``static`` as it is."""
    global failed
    try:
        (fn if jitted else jax.jit(fn)).lower(*args, **static).compile()
        print("OK", name, flush=True)
    except Exception as e:  # noqa: BLE001 - every case reports, the test names the failures
        failed += 1
        print("FAIL", name + ":", " ".join(str(e).split())[:300], flush=True)


i32, f32, bf16 = jnp.int32, jnp.float32, jnp.bfloat16
# The dense kernel (prefill chunks and decode), Qwen2.5-7B heads (28 / 4) and the 0.5B's head_dim 64.
for mask_name, mask in MASKS.items():
    for T, H, kv in [(1024, 128, bf16), (1, 128, bf16), (1024, 64, jnp.float8_e4m3fn), (1, 64, jnp.float8_e4m3fn)]:
        B, N, K, S = 1, 28, 4, 4096
        fn = functools.partial(flash_attention, mask=mask, impl="auto")
        compile_case(f"flash_attention {mask_name} T={T} H={H} {jnp.dtype(kv).name}",
                     lambda qs, k, v, qo, kl, sc, fn=fn: fn(qs, k, v, q_offset=qo, kv_length=kl, scale=sc),
                     tuple(sd((B, T, N, H), bf16) for _ in mask.phases), sd((B, K, S, H), kv), sd((B, K, S, H), kv),
                     sd((B,), i32), sd((B,), i32), sd((B,), f32))

# The sparse attention with Qwen's default budgets (6096 diagonals, 1000 columns), Qwen2.5-7B heads: the kernel
# given its index tables (their shapes from ``build_index``); and the whole entry point (index tables built, then
# the kernel) with small budgets and head_dim 64. Building the tables for the default budgets compiles for a TPU in
# ~50 s on 2 CPU cores (XLA's gathers and scans over 6096-entry lists, no Mosaic) and lowers in test_sparse.py.
from pallas_kernels.vslash_tpu import vslash_attention_tpu  # noqa: E402

for mask_name in ("causal", "dca"):
    mask = MASKS[mask_name]
    for N, K, H, D, V in [(28, 4, 128, 6096, 1000), (4, 2, 64, 128, 64)]:
        B, T, S, G, P = 1, 1024, 4096, 2, len(mask.phases)
        attention = (tuple(sd((B, T, N, H), bf16) for _ in range(P)), sd((B, K, S, H), bf16), sd((B, K, S, H), bf16),
                     sd((B,), i32), sd((B,), i32), sd((B,), f32))
        selection = vslash.Selection(sd((B, G, N, P, D), i32), sd((B, G, N, P), i32), sd((B, G, N, P, V), i32),
                                     sd((B, G, N, P), i32), sd((B, G), i32), sd((B, G), i32))
        name = f"{mask_name} N={N} H={H} D={D} V={V}"
        if D == 6096:
            index = jax.eval_shape(functools.partial(vslash.build_index, T=T, mask=mask, block_k=vslash.BAND,
                                                     n_keys=S), selection, attention[3], kv_length=attention[4])
            compile_case(f"vslash_attention_tpu (the kernel) {name}",
                         functools.partial(vslash_attention_tpu, mask=mask, interpret=None), *attention,
                         jax.tree.map(lambda s: sd(s.shape, s.dtype), index), selection.col_count)
            continue

        def sparse(qs, k, v, qo, kl, sc, sel, mask=mask):
            return vslash_attention(qs, k, v, sel, q_offset=qo, kv_length=kl, scale=sc, mask=mask, impl="auto")
        compile_case(f"vslash_attention {name}", sparse, *attention, selection)

# The model's own steps: a DCA + sparse prefill layer and a decode step, fp8 cache, head_dim 64 (as the 0.5B).
L, N, K, H, S, T = 2, 4, 2, 64, 512, 256
budgets = _freeze([{str(h): ["vertical_and_slash", 64, 128, 0.9] for h in range(N)}] * L)
config = QwenConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=L, num_attention_heads=N,
                    num_key_value_heads=K, head_dim=H, max_position_embeddings=4096,
                    dual_chunk_attention_config=DCAConfig(chunk_size=192, local_size=64,
                                                          original_max_position_embeddings=64,
                                                          sparse_attention_enabled=True, sparse_attention_threshold=0,
                                                          sparse_attention_config=budgets))
params = jax.tree.map(lambda s: sd(s.shape, s.dtype), model.abstract_params(config, bf16))
kc = sd((1, K, S, H), jnp.float8_e4m3fn)
spec = AttentionSpec()
prefill_spec = with_sparse_rows(spec, config, [T])
compile_case("model prefill layer (DCA, sparse, fp8 cache)",
             lambda lp, x, start, rl, k, v: model.apply_layer(lp, x, start, rl, k, v, config, prefill_spec, 0),
             params["layers_0"], sd((1, T, config.hidden_size), bf16), sd((), i32), sd((1,), i32), kc, kc)
compile_case("model decode step (DCA, fp8 cache)",
             lambda p, tokens, positions, cache: model.decode_logits(p, tokens, positions, cache, config, spec),
             params, sd((1,), i32), sd((1,), i32), KVCache((kc,) * L, (kc,) * L))

# generate's jitted block of decode-and-sample steps (its own program: a scan of DECODE_BLOCK steps, the cache and
# the penalty's ``seen`` donated), sampling as Qwen's generation_config does (temperature, top-k/p, penalty).
B = 2
sampling = Sampling(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
keys = jax.eval_shape(lambda: row_keys(0, range(B)))
kc2 = sd((B, K, S, H), jnp.float8_e4m3fn)
compile_case(f"generation decode_block (steps={generation.DECODE_BLOCK}, sampling, penalty, fp8 cache)",
             generation.decode_block, params, sd((B,), i32), sd((B,), i32), KVCache((kc2,) * L, (kc2,) * L),
             sd(keys.shape, keys.dtype), sd((), i32), jitted=True, config=config, spec=spec, sampling=sampling,
             seen=sd((B, config.vocab_size), jnp.bool_), steps=generation.DECODE_BLOCK)

# The same layer and decode step over meshes of the 4 chips, laid out as a run over that mesh lays them out:
# parameters by ``param_shardings``, the cache by ``CACHE_AXES`` with ``cache_kv_heads`` kv heads (``init_cache``),
# the prefill's activations split over batch and seq (``_embed_step``'s ``constrain_tokens``), the small host
# inputs (start, lengths, tokens, positions) whole on every chip. The prefill layer on "tensor=2" alone is left out
# (13 s of the file's ~100): "seq=2,tensor=2" splits the heads the same way and the sequence as well.
for mesh_spec in ("seq=2", "tensor=2", "seq=2,tensor=2"):
    mesh = make_mesh(mesh_spec, devices=DEVICES)
    whole = NamedSharding(mesh, PartitionSpec())

    def on(shape, dtype, logical=None, mesh=mesh, whole=whole):
        sharding = whole if logical is None else named_sharding(logical, shape, mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    mparams = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                           model.abstract_params(config, bf16), model.param_shardings(config, mesh))
    mspec = AttentionSpec(mesh=mesh)
    mprefill = with_sparse_rows(mspec, config, [T])
    mkc = on((1, cache_kv_heads(config, mesh), S, H), jnp.float8_e4m3fn, CACHE_AXES)
    if mesh_spec != "tensor=2":
        compile_case(f"model prefill layer over mesh {mesh_spec} (DCA, sparse, fp8 cache)",
                     lambda lp, x, start, rl, k, v, sp=mprefill: model.apply_layer(lp, x, start, rl, k, v, config,
                                                                                   sp, 0),
                     mparams["layers_0"], on((1, T, config.hidden_size), bf16, ("batch", "seq", None)), on((), i32),
                     on((1,), i32), mkc, mkc)
    compile_case(f"model decode step over mesh {mesh_spec} (DCA, fp8 cache)",
                 lambda p, tokens, positions, cache, sp=mspec: model.decode_logits(p, tokens, positions, cache,
                                                                                  config, sp),
                 mparams, on((1,), i32), on((1,), i32), KVCache((mkc,) * L, (mkc,) * L))
sys.exit(1 if failed else 0)
