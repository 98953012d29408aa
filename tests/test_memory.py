"""The memory planner: exact weight and cache bytes per device, sharding by the mesh, a clear refusal."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from qwen_jax import memory
from qwen_jax.errors import QwenJaxError
from qwen_jax.model import abstract_params
from qwen_jax.presets import PRESETS, preset_config


def test_presets_are_the_published_architectures():
    c = preset_config("qwen2.5-7b-1m")
    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_params(c)))
    assert 7.6e9 < n_params < 7.7e9                      # Qwen2.5-7B: 7.61B parameters
    c14 = preset_config("qwen2.5-14b-1m")
    assert 14.7e9 < sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_params(c14))) < 14.8e9
    assert c.dual_chunk_attention_config.chunk_len == 253952 and c.dual_chunk_attention_config.sparse_attention_enabled
    with pytest.raises(Exception, match="unknown model preset"):
        preset_config("qwen9")
    assert set(PRESETS) >= {"qwen2.5-7b-1m", "qwen2.5-14b-1m"}


@pytest.mark.parametrize("tied", [False, True])
def test_abstract_params_in_each_dtype_are_what_the_model_creates_in_it(tied):
    """``abstract_params`` traces a config once (at float32, one decoder layer, repeated) and sets the dtype asked
    for: every parameter must be what tracing the whole model in that dtype creates, same paths, shapes, dtype and
    logical axes, with DCA and per-layer sparse budgets in the config too."""
    import functools

    import jax.numpy as jnp
    from flax import linen as nn

    from qwen_jax.config import DCAConfig, QwenConfig, _freeze
    from qwen_jax.model import _init_boxed, logical_axes
    budgets = _freeze([{str(h): ["vertical_and_slash", 64, 128, 0.9] for h in range(4)}] * 3)
    dca = DCAConfig(chunk_size=192, local_size=64, sparse_attention_enabled=True, sparse_attention_config=budgets)
    config = QwenConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied,
                        dual_chunk_attention_config=dca)
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        boxed = jax.eval_shape(functools.partial(_init_boxed, config, jnp.dtype(dtype)), jax.random.key(0))
        traced = nn.unbox(boxed)
        got = abstract_params(config, dtype)
        assert list(got) == list(traced) and len([name for name in got if name.startswith("layers_")]) == 3
        assert jax.tree.structure(got) == jax.tree.structure(traced)
        assert jax.tree.leaves(got) == jax.tree.leaves(traced), dtype
        assert {leaf.dtype for leaf in jax.tree.leaves(got)} == {jnp.dtype(dtype)}
    names = jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert logical_axes(config) == names


def test_plan_counts_weights_and_cache_exactly_and_shards_them():
    c = preset_config("qwen2.5-14b-1m")
    one = memory.plan(c, tokens=1 << 20)
    weights = sum(math.prod(a.shape) * 2 for a in jax.tree.leaves(abstract_params(c)))
    assert one.weights == weights
    assert one.cache == 2 * 48 * 8 * (1 << 20) * 128 * 2  # layers x (K, V) x kv heads x slots x head_dim x bf16
    eight = memory.plan(c, tokens=1 << 20, mesh="seq=4,tensor=2")
    assert eight.cache == one.cache // 8                  # seq x tensor (8 kv heads split in two)
    assert one.weights / 2.2 < eight.weights < one.weights / 1.8   # tensor parallel halves the big matrices
    assert memory.plan(c, tokens=1 << 20, mesh="seq=8").weights == one.weights    # seq does not split weights
    seq_only = memory.plan(c, tokens=1 << 20, mesh={"seq": 2})
    assert seq_only.activations < one.activations and seq_only.cache == one.cache // 2
    assert memory.plan(c, tokens=1 << 20, sparse=True).workspace > memory.plan(c, tokens=1 << 20, sparse=False).workspace
    assert memory.plan(c, tokens=1 << 20, cache_dtype="float8_e4m3fn").cache == one.cache // 2
    # 7B: 28 heads over 8 attention shards are padded to 32 (4 a device, as 32 heads would be); 4 kv heads
    # over 8 shards are each stored twice
    c7 = preset_config("qwen2.5-7b-1m")
    with pytest.warns(UserWarning, match="28 attention heads do not split over tensor x seq = 8 devices: attention "
                                         "runs 32 heads"):
        padded = memory.plan(c7, tokens=1 << 20, mesh="seq=8", sparse=True)
    c32 = dataclasses.replace(c7, num_attention_heads=32)
    as32 = memory.plan(c32, tokens=1 << 20, mesh="seq=8", sparse=True)
    assert (padded.activations, padded.workspace, padded.cache) == (as32.activations, as32.workspace, as32.cache)
    assert padded.cache == memory.plan(c7, tokens=1 << 20, mesh="seq=4").cache == memory.plan(c7, tokens=1 << 20).cache // 4


def test_sparse_workspace_follows_the_largest_per_head_budgets():
    """A sparse_attention_config.json with larger budgets (``qwen-jax budgets`` writes such files) needs more
    workspace than the default (1000, 6096); budgets equal to the default plan the same bytes."""
    from qwen_jax.config import _freeze
    c = preset_config("qwen2.5-7b-1m")
    dca = c.dual_chunk_attention_config
    heads, layers = c.num_attention_heads, c.num_hidden_layers

    def with_budgets(big_head):
        cfg = [{str(h): ["vertical_and_slash", *((4000, 24384) if (i, h) == big_head else (1000, 6096)), 0.9]
                for h in range(heads)} for i in range(layers)]
        return dataclasses.replace(c, dual_chunk_attention_config=dataclasses.replace(
            dca, sparse_attention_config=_freeze(cfg)))

    default = memory.plan(c, tokens=1 << 20, sparse=True)
    assert memory.plan(with_budgets(None), tokens=1 << 20, sparse=True) == default
    bigger = memory.plan(with_budgets((27, 5)), tokens=1 << 20, sparse=True)
    assert bigger.workspace > default.workspace
    assert (bigger.weights, bigger.cache, bigger.activations) == (default.weights, default.cache, default.activations)


def test_refusal_names_the_shortfall_and_the_options(capsys):
    c = preset_config("qwen2.5-14b-1m")
    p = memory.plan(c, tokens=1 << 20, capacity=80 * memory.GiB)
    assert not p.fits
    with pytest.raises(QwenJaxError, match=r"GiB short; options: more devices along seq .*smaller prefill chunk"):
        memory.check(p, tokens=1 << 20, mesh=None, chunk_size=32768)
    # weights alone over the device: more seq devices would hold a whole copy each, so tensor is what is named
    small = memory.plan(c, tokens=32768, capacity=20 * memory.GiB)
    with pytest.raises(QwenJaxError, match=r"options: split the weights over more devices along tensor \(now "
                                           r"tensor=1: 27.5 GiB of weights a device\)"):
        memory.check(small, tokens=32768, mesh=None, chunk_size=32768)
    from qwen_jax.cli import main
    assert main(["plan", "--config", "qwen2.5-7b-1m", "--tokens", "1m", "--mesh", "seq=2",
                 "--device-memory", "80"]) == 0
    assert "per device of 80.0 GiB" in capsys.readouterr().out
    assert main(["plan", "--config", "qwen2.5-14b-1m", "--tokens", "1m", "--device-memory", "80"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qwen-jax: error: prefill of 1048576 tokens needs") and err.count("\n") == 1
    assert np.isfinite(p.total)
    assert main(["plan", "--config", "qwen2.5-7b-1m", "--tokens", "1m", "--mesh", "seq=2",
                 "--device-memory", "80GB"]) == 0
    assert "per device of 74.5 GiB" in capsys.readouterr().out


def test_refusal_suggests_what_shrinks_the_shortfall_where_each_device_holds_one_kv_head():
    # 7B-1M has 4 kv heads: from 4 attention shards on, each device holds one kv head's cache, and more
    # devices along seq leave it as it is; an 8-bit cache halves it, tensor in place of seq splits the weights
    c = preset_config("qwen2.5-7b-1m")

    def options(mesh, cache_dtype, capacity, chunk=32768):
        p = memory.plan(c, tokens=1 << 21, mesh=mesh, cache_dtype=cache_dtype, capacity=capacity * memory.GiB,
                        chunk_size=chunk)
        with pytest.raises(QwenJaxError) as e:
            memory.check(p, tokens=1 << 21, mesh=mesh, chunk_size=chunk)
        return p, str(e.value).split("options: ")[1].split("; ")

    p, opts = options("seq=2", "bfloat16", 40)
    assert p.cache_heads == 2 and opts[0].startswith("more devices along seq (now seq=2")
    assert opts[1].startswith(f"an 8-bit KV cache (--kv-cache-dtype fp8: {p.cache / memory.GiB:.1f} GiB")
    p, opts = options("seq=4", "bfloat16", 40)
    assert p.cache_heads == 1 and not any("along seq" in o for o in opts)
    assert opts[0].startswith("an 8-bit KV cache") and opts[-1] == "a smaller prefill chunk (--prefill-chunk 16384)"
    # 8-bit already: only the weights' copy a device is left to split (14.2 GiB >= the shortfall)
    p, opts = options("seq=4", "float8_e4m3fn", 24)
    assert p.weights >= p.total - p.capacity and len(opts) == 2
    assert opts[0] == "devices along tensor instead of seq or data, which keep a whole copy of the weights (now " \
                      f"tensor=1: {p.weights / memory.GiB:.1f} GiB of weights a device)"
    p, opts = options("seq=4", "float8_e4m3fn", 16, chunk=4096)
    assert p.weights < p.total - p.capacity and opts == ["a shorter prompt"]


def test_memory_sizes_take_units_and_refuse_garbage_in_one_line(capsys):
    from qwen_jax.cli import main
    assert memory.parse_size("80") == memory.parse_size("80GiB") == memory.parse_size("80 g") == 80 * memory.GiB
    assert memory.parse_size("80GB") == 80 * 10 ** 9 and memory.parse_size("81559MiB") == 81559 * 2 ** 20
    assert memory.parse_size("79.5") == int(79.5 * memory.GiB) and memory.parse_size("1024B") == 1024
    for bad in ("", "GiB", "-3", "0", "80XB", "eighty", "8 0"):
        with pytest.raises(QwenJaxError, match="bad memory size"):
            memory.parse_size(bad)
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", "qwen2.5-7b-1m", "--tokens", "1m", "--device-memory", "80XB"])
    assert e.value.code == 2
    assert "argument --device-memory: bad memory size '80XB'" in capsys.readouterr().err


def test_decode_on_a_cpu_counts_the_float32_copies_of_narrower_weights_and_an_8bit_cache(monkeypatch):
    """XLA's CPU dots read float32, so a step's program holds float32 copies of bf16 weights (and of an fp8 cache):
    the 7B in bf16 at 32K compiled to a 42 GiB peak against 16 GiB of weights and cache, which passed a 24 GiB host's
    check and then ran out of memory."""
    import jax.numpy as jnp

    from qwen_jax.generation import check_length
    config = preset_config("qwen2.5-7b-1m")
    monkeypatch.setattr(memory, "device_capacity", lambda: None)                   # a CPU
    monkeypatch.setattr(memory, "host_memory", lambda: 24 * memory.GiB)
    run = dict(prompt_tokens=32000, max_new_tokens=768, batch=1, slots=32768)
    with pytest.raises(QwenJaxError, match=r"of float32 copies a CPU makes is more than the 24.0 GiB this host's "
                                           r"memory holds; .*or load in float32"):
        check_length(config, **run, dtype=jnp.bfloat16, params_dtype=jnp.bfloat16)
    monkeypatch.setattr(memory, "host_memory", lambda: 64 * memory.GiB)
    check_length(config, **run, dtype=jnp.float32, params_dtype=jnp.float32)          # 28 + 3.5 GiB: no copies
    check_length(config, **run, dtype=jnp.bfloat16, params_dtype=jnp.bfloat16)        # 14.2 x 3 + 1.8 GiB
    with pytest.raises(QwenJaxError, match="float32 copies"):                         # 8-bit cache widened at once
        check_length(config, **dict(run, slots=1 << 20, prompt_tokens=1 << 19), dtype=jnp.float8_e4m3fn,
                     params_dtype=jnp.float32)


@pytest.mark.parametrize("preset, attention, sparse, tokens, chunk, cache", [
    ("tiny-1m", "blockwise", False, 1 << 20, 8192, "bfloat16"),   # before: 0.55 GiB planned of the 1.14 GiB XLA holds
    # the 7B's layer: the tiny preset's sparse blockwise layer holds 0.10 GiB, of which fixed-size blocks (the
    # estimate's 64 x 16384 logits, 512 x 512 tiles; XLA reuses some) are a fifth: planned 20% over, the 7B 4%
    ("qwen2.5-7b-1m", "blockwise", True, 1 << 16, 4096, "float8_e4m3fn"),  # tiny, before: 0.07 of 0.26
    ("tiny-1m", "reference", True, 1 << 16, 2048, "bfloat16"),   # before: 0.07 of 45.3 ([T, S] masks and logits)
])
def test_plan_covers_a_cpu_prefill_chunk_as_xla_compiles_it(preset, attention, sparse, tokens, chunk, cache,
                                                            monkeypatch):
    """On a CPU the jnp attention paths hold what the GPU kernels do not: float32 copies of the layer's weights and
    of its whole K and V (XLA's CPU dots read float32), the updated K and V copied once, the reference's [T, S]
    tensors. One layer's program of a prefill chunk (compiled for the CPU from abstract shapes) runs
    with every other layer's weights and cache resident; what it holds besides, by XLA's buffer assignment, is its
    arguments, its temporaries (all allocated for the whole run) and its outputs not written over donated
    arguments. The planned bytes without the reserve (kept for what the buffer assignment does not show: the
    runtime, the process, fragmentation) cover that, by at most 15% more."""
    import jax.numpy as jnp

    from qwen_jax.attention import AttentionSpec, with_sparse_rows
    from qwen_jax.bench.prefill import mode_config
    from qwen_jax.cache import cache_length
    from qwen_jax.model import _layer_step, program_layers

    # what a CPU host picks where the paths ask the backend (on a GPU host the estimate would be its Triton kernel)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    config = mode_config(preset_config(preset), "sparse" if sparse else "dense")
    assert set(program_layers(config)) == {0}                      # every layer runs layer 0's program
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=cpu)

    def nbytes(tree):
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))

    params = abstract_params(config, jnp.bfloat16)
    layer = jax.tree.map(lambda a: sds(a.shape, a.dtype), params["layers_0"])
    kv = sds((1, config.num_key_value_heads, cache_length(tokens), config.head_dim), cache)
    spec = with_sparse_rows(AttentionSpec(impl=attention), config, [tokens])
    m = _layer_step.lower(layer, sds((1, chunk, config.hidden_size), jnp.bfloat16), sds((), jnp.int32),
                          sds((1,), jnp.int32), kv, kv, config, spec, 0).compile().memory_analysis()
    held = (nbytes(params) - nbytes(layer) + (config.num_hidden_layers - 1) * 2 * nbytes(kv)
            + m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    p = memory.plan(config, tokens=tokens, chunk_size=chunk, cache_dtype=cache, sparse=sparse, attention=attention)
    assert held <= p.total - memory.XLA_RESERVE <= 1.15 * held, (p.describe(), held / memory.GiB)
    pallas = memory.plan(config, tokens=tokens, chunk_size=chunk, cache_dtype=cache, sparse=sparse)
    assert (pallas.weights, pallas.cache) == (p.weights, p.cache)


def test_the_plan_command_plans_the_attention_path_asked(capsys):
    """``qwen-jax plan --attention blockwise`` plans a CPU's run (it planned the GPU kernels' whatever it was asked)."""
    from qwen_jax.cli import main
    run = ["plan", "--config", "qwen2.5-7b-1m", "--tokens", "1m", "--kv-cache-dtype", "fp8", "--device-memory", "56"]
    assert main(run) == 0
    assert "pallas attention" in capsys.readouterr().out
    assert main([*run, "--attention", "blockwise"]) == 1          # 7B-1M, 1M, fp8: 52.8 GiB held by XLA's CPU program
    assert "GiB short" in capsys.readouterr().err
