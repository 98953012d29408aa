"""Pallas flash-attention kernels on the CPU: interpret mode against the masked dense reference,
lowering to TPU and CUDA proved with jax.export, and the dispatch rules."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pallas_kernels
from pallas_kernels import MaskSpec, flash_attention, masked_attention, resolve_impl

KERNELS = ["triton", "mosaic_tpu"]
MASKS = {
    "causal": MaskSpec(),
    "full": MaskSpec(causal=False),
    "window": MaskSpec(window=20),
    "dca": MaskSpec(chunk_len=24),  # 24 is not a multiple of the 32-key tiles: tiles straddle chunks
}
CASES = [("causal", 1), ("causal", 4), ("causal", 7), ("full", 4), ("window", 7), ("dca", 1), ("dca", 4), ("dca", 7)]


def inputs(seed, G, phases, dtype=jnp.float32, T=37, S=128, H=32):
    rng = np.random.default_rng(seed)
    K = 1 if G == 7 else 2
    B = 3
    qs = tuple(jnp.asarray(rng.normal(size=(B, T, K * G, H)), dtype) for _ in range(phases))
    k = jnp.asarray(rng.normal(size=(B, K, S, H)), dtype)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), dtype)
    # row 0: a chunk of queries at offset 75 (DCA chunks 3 and 4); row 1: kv shorter than the queries;
    # row 2: an empty cache, so no query sees anything.
    q_offset = jnp.array([75, 0, 10], jnp.int32)
    kv_length = jnp.array([112, 20, 0], jnp.int32)
    scale = jnp.asarray(rng.uniform(0.1, 0.3, B), jnp.float32)
    return qs, k, v, q_offset, kv_length, scale


def expected(qs, k, v, q_offset, kv_length, scale, mask):
    T = qs[0].shape[1]
    positions = q_offset[:, None] + jnp.arange(T)[None]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return masked_attention(tuple(map(f32, qs)), f32(k), f32(v), positions, kv_length, scale, mask=mask)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask_name,G", CASES)
def test_kernel_matches_masked_dense_reference(kernel, mask_name, G):
    mask = MASKS[mask_name]
    args = inputs(zlib.crc32(f"{mask_name}{G}".encode()), G, len(mask.phases))
    out, lse = flash_attention(*args[:3], q_offset=args[3], kv_length=args[4], scale=args[5], mask=mask,
                               impl=kernel, block_q=16, block_k=32, interpret=True)
    ref_out, ref_lse = expected(*args, mask)
    out, lse, ref_out, ref_lse = map(np.asarray, (out, lse, ref_out, ref_lse))
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not np.isnan(out).any() and not np.isnan(lse).any()  # every element written
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=1e-5)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert np.isneginf(ref_lse[2]).all() and (out[2] == 0).all()  # the empty cache
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=2e-6, rtol=1e-6)
    if mask_name in ("window", "dca"):  # rows whose first tiles see nothing: the window / chunk starts later
        assert ref_lse[0].min() > -np.inf


DECODE_CASES = [("causal", 7, 1, 5), ("causal", 1, 1, 1), ("full", 4, 2, 3), ("window", 7, 1, 4), ("dca", 1, 1, 2),
                ("dca", 4, 1, 4), ("dca", 7, 1, 3), ("dca", 4, 3, 4), ("causal", 4, 16, 2)]


@pytest.mark.parametrize("mask_name,G,T,splits", DECODE_CASES)
def test_decode_kernel_matches_masked_dense_reference(mask_name, G, T, splits):
    """The split-key decode kernel: T queries x G heads a program, the keys in ``splits`` parts merged by lse;
    rows at an offset inside a later DCA chunk, a short cache, an empty one (T x G = 64: no padding rows)."""
    from pallas_kernels.decode_gpu import decode_attention_gpu
    mask = MASKS[mask_name]
    qs, k, v, _, _, scale = inputs(zlib.crc32(f"decode{mask_name}{G}{T}".encode()), G, len(mask.phases), T=T)
    q_offset = jnp.array([100 - T, 30, 0], jnp.int32)
    kv_length = jnp.array([100, 30 + T, 0], jnp.int32)
    out, lse = decode_attention_gpu(qs, k, v, q_offset, kv_length, scale, mask=mask, block_k=16, splits=splits,
                                    interpret=True)
    ref_out, ref_lse = map(np.asarray, expected(qs, k, v, q_offset, kv_length, scale, mask))
    out, lse = np.asarray(out), np.asarray(lse)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=1e-5)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)) and np.isneginf(ref_lse[2]).all()
    assert (out[2] == 0).all()
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=2e-6, rtol=1e-6)
    if mask_name == "dca":
        assert ref_lse[0].min() > -np.inf and 100 > 2 * 24      # row 0 sees all three phases


def test_decode_kernel_reads_an_fp8_cache_as_stored():
    """fp8 K/V go into the kernel as stored (no widened copy) and give what their widened values give; the
    dispatch sends decode-sized chunks there under ``auto`` and keeps ``triton`` on the prefill kernel."""
    from pallas_kernels import decode_gpu
    mask = MASKS["dca"]
    qs, k, v, _, _, scale = inputs(5, 7, 3, dtype=jnp.bfloat16, T=1)
    k8, v8 = k.astype(jnp.float8_e4m3fn), v.astype(jnp.float8_e4m3fn)
    q_offset, kv_length = jnp.array([99, 29, 0], jnp.int32), jnp.array([100, 30, 0], jnp.int32)
    args = dict(q_offset=q_offset, kv_length=kv_length, scale=scale, mask=mask, interpret=True)
    out, lse = flash_attention(qs, k8, v8, **args)
    ref_out, ref_lse = expected(qs, k8.astype(jnp.float32), v8.astype(jnp.float32), q_offset, kv_length, scale, mask)
    scale_out = np.abs(np.asarray(ref_out)).max()
    assert np.abs(np.asarray(out, np.float32) - np.asarray(ref_out)).max() < 1e-2 * scale_out
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=2e-2)
    # float32 queries over an fp8 cache keep float32 math (the float16 path is for 16-bit queries)
    q32 = tuple(q.astype(jnp.float32) for q in qs)
    out32, _ = flash_attention(q32, k8, v8, **args)
    ref32, _ = expected(q32, k8, v8, q_offset, kv_length, scale, mask)
    np.testing.assert_allclose(np.asarray(out32), np.asarray(ref32), atol=2e-6, rtol=1e-5)
    calls = []
    real = decode_gpu.decode_attention_gpu
    try:
        decode_gpu.decode_attention_gpu = lambda *a, **kw: calls.append(a[1].dtype) or real(*a, **kw)
        flash_attention(qs, k8, v8, **args)                                  # auto: the decode kernel, fp8 in
        flash_attention(qs, k8, v8, impl="triton", **args)                   # named: the prefill kernel
        flash_attention(tuple(jnp.tile(q, (1, 10, 1, 1)) for q in qs), k8, v8, **args)   # 10 x 7 rows: prefill
    finally:
        decode_gpu.decode_attention_gpu = real
    assert calls == [jnp.float8_e4m3fn]


@pytest.mark.parametrize("kernel", KERNELS)
def test_dca_through_the_kernel_in_bfloat16_is_within_bf16_noise(kernel):
    mask = MASKS["dca"]
    args = inputs(11, 4, 3, dtype=jnp.bfloat16)
    out, lse = flash_attention(*args[:3], q_offset=args[3], kv_length=args[4], scale=args[5], mask=mask,
                               impl=kernel, block_q=16, block_k=32, interpret=True)
    ref_out, ref_lse = expected(*args, mask)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref_out))[:2].max() / np.abs(np.asarray(ref_out)).max()
    assert err < 2e-2
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=2e-2)


def test_dca_model_through_the_kernels_equals_the_blockwise_op(tiny_checkpoint):
    import qwen_jax
    from qwen_jax.attention import AttentionSpec
    dca = {"chunk_size": 48, "local_size": 16, "original_max_position_embeddings": 32}  # S = 32, s > 1 at 150
    tokens = np.random.default_rng(0).integers(0, 1000, (2, 150))
    blockwise = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=dca)
    ref = blockwise.logits(tokens)
    from qwen_jax.generation import generate_ids
    prompts = [tokens[0, :70].tolist(), tokens[1, :45].tolist()]
    expected_ids = generate_ids(blockwise.params, blockwise.config, prompts, max_new_tokens=6)
    # auto: decode steps through the split-key decode kernel. The TPU kernel's interpreter costs about 0.2 s a grid
    # step: its tiles are twice as tall and wide (71 -> 36 s), and they still straddle the 48-token chunks
    blocks = {"mosaic_tpu": (32, 64)}
    for kernel in KERNELS + ["auto"]:
        block_q, block_k = blocks.get(kernel, (16, 32))
        spec = AttentionSpec(impl="pallas", kernel=kernel, interpret=True, block_q=block_q, block_k=block_k)
        via_kernel = qwen_jax.Model(blockwise.config, blockwise.params, attn_implementation=spec,
                                    prefill_chunk_size=64).logits(tokens)
        assert np.abs(via_kernel - ref).max() <= 1e-5 * np.abs(ref).max(), kernel
        # decode steps (one query row per sequence) through the kernel too
        assert generate_ids(blockwise.params, blockwise.config, prompts, max_new_tokens=6, spec=spec) == expected_ids
    # the README's CPU recipe: the backend's kernel left to choose, emulated
    emulated = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=dca,
                             attn_implementation=AttentionSpec(impl="pallas", interpret=True), prefill_chunk_size=64)
    assert np.abs(emulated.logits(tokens) - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("kernel,platform", [("mosaic_gpu", "cuda"), ("mosaic_gpu_free", "cuda"),
                                             ("mosaic_gpu_c3", "cuda"), ("dispatch", "cuda"), ("triton", "cuda"),
                                             ("decode", "cuda"), ("mosaic_tpu", "tpu")])
@pytest.mark.parametrize("mask_name", ["causal", "dca"])
def test_kernels_lower_for_their_hardware(kernel, platform, mask_name, monkeypatch):
    """Lowering proved without the hardware: Qwen2.5-7B heads (28 / 4, head_dim 128), bf16."""
    mask = MaskSpec(chunk_len=1024) if mask_name == "dca" else MaskSpec()
    sd = jax.ShapeDtypeStruct
    B, T, N, K, H, S = 1, 1024, 28, 4, 128, 4096
    kv_dtype = jnp.bfloat16
    if kernel.startswith("mosaic_gpu"):       # "_free": the consumers do not take turns; "_c3": three, free
        from pallas_kernels.flash_mgpu import flash_attention_mgpu as fn
        fn = functools.partial(fn, mask=mask, block_q=64, block_k=64 if kernel == "mosaic_gpu_c3" else 128,
                               stages=4 if kernel == "mosaic_gpu_c3" else 2, pingpong=kernel == "mosaic_gpu",
                               consumers=3 if kernel == "mosaic_gpu_c3" else 2)
        checks, marker = [], "mosaic_gpu"
    elif kernel == "dispatch":                 # pallas_kernels.flash_attention's own Mosaic GPU defaults
        monkeypatch.setattr(pallas_kernels, "resolve_impl", lambda impl, interpret=False: impl)   # as on a GPU

        def fn(qs, k, v, q_offset, kv_length, scale):
            return flash_attention(qs, k, v, q_offset=q_offset, kv_length=kv_length, scale=scale, mask=mask,
                                   impl="mosaic_gpu")
        checks, marker = [], "mosaic_gpu"
    elif kernel == "triton":
        from pallas_kernels.flash_gpu import flash_attention_gpu as fn
        fn = functools.partial(fn, mask=mask, block_q=128, block_k=64)
        checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        marker = "triton"
    elif kernel == "decode":                    # one query a row over a 1M-slot fp8 cache
        from pallas_kernels.decode_gpu import decode_attention_gpu as fn
        fn = functools.partial(fn, mask=mask)
        checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        marker, T, S, kv_dtype = "triton", 1, 1 << 20, jnp.float8_e4m3fn
    else:
        from pallas_kernels.flash_tpu import flash_attention_tpu as fn
        fn = functools.partial(fn, mask=mask, block_q=256, block_k=512)
        checks, marker = [], "tpu_custom_call"
    exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
        tuple(sd((B, T, N, H), jnp.bfloat16) for _ in mask.phases), sd((B, K, S, H), kv_dtype),
        sd((B, K, S, H), kv_dtype), sd((B,), jnp.int32), sd((B,), jnp.int32), sd((B,), jnp.float32))
    assert exported.platforms == (platform,) and marker in exported.mlir_module()


def test_the_kernels_run_and_lower_with_jax_enable_x64():
    """With 64-bit ints on, ``lax.div(int32, 2)`` inside a kernel made the 2 int64 and failed to trace (``lax.div
    requires arguments to have the same dtypes``): every decode step on a GPU failed in a program that had turned
    x64 on. Interpret mode against the reference, and lowering for the kernels' own hardware, both with x64."""
    from pallas_kernels.decode_gpu import decode_attention_gpu
    from pallas_kernels.flash_mgpu import flash_attention_mgpu
    mask = MASKS["dca"]
    args = inputs(31, 4, len(mask.phases))
    ref_out = np.asarray(expected(*args, mask)[0])
    runs = {kernel: functools.partial(flash_attention, mask=mask, impl=kernel, block_q=16, block_k=32, interpret=True)
            for kernel in KERNELS}
    runs["decode"] = functools.partial(decode_attention_gpu, mask=mask, block_k=16, splits=2, interpret=True)
    with jax.enable_x64(True):
        for kernel, run in runs.items():
            out, _ = run(*args[:3], q_offset=args[3], kv_length=args[4], scale=args[5])
            np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-6, rtol=1e-5, err_msg=kernel)
        sd = jax.ShapeDtypeStruct
        B, T, N, K, H, S = 1, 256, 28, 4, 128, 1024
        shapes = (tuple(sd((B, T, N, H), jnp.bfloat16) for _ in mask.phases), sd((B, K, S, H), jnp.bfloat16),
                  sd((B, K, S, H), jnp.bfloat16), sd((B,), jnp.int32), sd((B,), jnp.int32), sd((B,), jnp.float32))
        triton = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        for fn, platform, checks in [
                (functools.partial(flash_attention_mgpu, mask=mask, block_q=64, block_k=128), "cuda", []),
                (functools.partial(pallas_kernels.flash_gpu.flash_attention_gpu, mask=mask, block_q=64, block_k=64),
                 "cuda", triton),
                (functools.partial(decode_attention_gpu, mask=mask), "cuda", triton),
                (functools.partial(pallas_kernels.flash_tpu.flash_attention_tpu, mask=mask, block_q=128, block_k=256),
                 "tpu", [])]:
            export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*shapes)


def test_dispatch_picks_or_refuses_loudly():
    assert resolve_impl("auto", backend="gpu") == "mosaic_gpu"
    assert resolve_impl("triton", backend="gpu") == "triton"
    with pytest.raises(ValueError, match="mosaic_gpu kernel has no CPU interpreter"):
        resolve_impl("mosaic_gpu", interpret=True, backend="cpu")
    with pytest.raises(ValueError, match="does not run on 'cpu'"):
        resolve_impl("mosaic_gpu", backend="cpu")
    assert resolve_impl("auto", backend="tpu") == "mosaic_tpu"
    with pytest.raises(ValueError, match="no Pallas attention kernel runs natively on 'cpu'"):
        resolve_impl("auto", backend="cpu")
    # interpret=True emulates the kernel that has an interpreter for the chip (the docs' CPU recipe)
    assert resolve_impl("auto", interpret=True, backend="cpu") == "triton"
    assert resolve_impl("auto", interpret=True, backend="gpu") == "triton"
    assert resolve_impl("auto", interpret=True, backend="tpu") == "mosaic_tpu"
    with pytest.raises(ValueError, match="does not run on 'tpu'"):
        resolve_impl("triton", backend="tpu")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        resolve_impl("cutlass")
    assert resolve_impl("mosaic_tpu", interpret=True, backend="cpu") == "mosaic_tpu"
    qs, k, v, q_offset, kv_length, scale = inputs(0, 1, 1)
    out, lse = flash_attention(qs[0], k, v, q_offset=q_offset, kv_length=kv_length, scale=scale, impl="reference")
    ref = expected(qs, k, v, q_offset, kv_length, scale, MaskSpec())
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref[0]), atol=1e-6)
    out, lse = flash_attention(qs[0], k, v, q_offset=q_offset, kv_length=kv_length, scale=scale, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref[0]), atol=1e-5)        # auto, emulated: Triton
    with pytest.raises(ValueError, match="no key block of at least 16 divides"):
        flash_attention(qs[0], k[:, :, :100], v[:, :, :100], q_offset=q_offset, kv_length=jnp.minimum(kv_length, 100),
                        impl="triton", interpret=True)
    assert pallas_kernels.DEFAULT_BLOCKS["triton"] == (128, 64)
    from qwen_jax.attention import AttentionSpec
    assert AttentionSpec().impl == "auto" and AttentionSpec().resolved().impl == "blockwise"      # CPU default
    assert AttentionSpec(interpret=True).resolved().impl == "pallas"
    with pytest.raises(ValueError, match="mosaic_gpu kernel takes bfloat16 or float16"):
        from pallas_kernels.flash_mgpu import check_supported
        check_supported((qs[0],), k, v, 64, 128, 2)                    # float32: Triton's job


@pytest.mark.parametrize("impl", ["reference", "triton", "mosaic_tpu"])
def test_kernels_refuse_mismatched_inputs_in_one_line(impl):
    qs, k, v, q_offset, kv_length, scale = inputs(5, 4, 1, T=8, S=64)
    run = functools.partial(flash_attention, q_offset=q_offset, scale=scale, impl=impl, block_q=8, block_k=32,
                            interpret=True)
    with pytest.raises(ValueError, match=r"k \(1, 2, 64, 32\) does not match q"):
        run(qs[0], k[:1], v[:1], kv_length=kv_length)                       # one cache row for three query rows
    with pytest.raises(ValueError, match="it must be"):
        run(qs[0], k[..., :16], v[..., :16], kv_length=kv_length)           # another head_dim
    with pytest.raises(ValueError, match="must have k's shape"):
        run(qs[0], k, v[:, :, :32], kv_length=kv_length)
    with pytest.raises(ValueError, match="every copy alike"):
        run((qs[0], qs[0][:, :4], qs[0]), k, v, kv_length=kv_length, mask=MASKS["dca"])
    with pytest.raises(ValueError, match=r"kv_length must lie in \[0, 64\]"):
        run(qs[0], k, v, kv_length=jnp.array([65, 3, 0]))
    with pytest.raises(ValueError, match="q_offset must be >= 0"):
        flash_attention(qs[0], k, v, q_offset=-8, kv_length=kv_length, impl=impl, interpret=True)
    with pytest.raises(ValueError, match="block_q must be a positive number"):
        run(qs[0], k, v, kv_length=kv_length, block_q=-8)
    with pytest.raises(ValueError, match="block_k must be a positive number"):
        run(qs[0], k, v, kv_length=kv_length, block_k=-32)
    with pytest.raises(ValueError, match="kv_length must be integers, got float"):
        run(qs[0], k, v, kv_length=10.7)                                    # it was cut to 10
    with pytest.raises(ValueError, match="at least one query and one key slot; got q with 0 queries"):
        run(qs[0][:, :0], k, v, kv_length=kv_length)
    # a block that does not divide the cache: the largest power of two below it that does (48 halved to 24, 12)
    assert (pallas_kernels._fit(48, 128, 16), pallas_kernels._fit(96, 192, 64), pallas_kernels._fit(96, 128, 64)) \
        == (32, 96, 64)
    with pytest.raises(ValueError, match="no key block of at least 16 divides the cache length 60; .* multiples of 48"):
        pallas_kernels._fit(48, 60, 16)
    with pytest.raises(ValueError, match="chunk_len must be at least 1"):
        MaskSpec(chunk_len=0)
    with pytest.raises(ValueError, match="window must be at least 1"):
        MaskSpec(window=-3)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_traced_kv_length_past_the_cache_sees_the_cache_only(kernel):
    """Under jit kv_length cannot be checked: a value past the cache reads the cache's keys, as the reference does,
    not blocks beyond it."""
    qs, k, v, q_offset, _, scale = inputs(6, 4, 1, T=8, S=64)
    kv_length = jnp.array([80, 64, 100], jnp.int32)
    fn = jax.jit(lambda q, kv: flash_attention(q, k, v, q_offset=jnp.array([60, 40, 56]), kv_length=kv, scale=scale,
                                               mask=MaskSpec(causal=False), impl=kernel, block_q=8, block_k=32,
                                               interpret=True))
    out, lse = fn(qs[0], kv_length)
    ref_out, ref_lse = expected(qs, k, v, jnp.array([60, 40, 56]), jnp.full(3, 64), scale, MaskSpec(causal=False))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS + ["auto"])
@pytest.mark.parametrize("mask_name,G", [("causal", 7), ("dca", 1), ("window", 7), ("full", 1)])
def test_kernels_on_ragged_shapes(kernel, mask_name, G):
    """T = 13 (not a multiple of block_q 8), kv_length short of the 64-slot cache, two rows; ``auto`` (emulated)
    takes the decode kernel where T x G <= 64."""
    mask = MASKS[mask_name]
    qs, k, v, _, _, scale = inputs(zlib.crc32(f"ragged{mask_name}{G}".encode()), G, len(mask.phases), T=13, S=64, H=16)
    q_offset, kv_length = jnp.array([30, 0, 45], jnp.int32), jnp.array([43, 9, 58], jnp.int32)
    out, lse = flash_attention(qs, k, v, q_offset=q_offset, kv_length=kv_length, scale=scale, mask=mask, impl=kernel,
                               block_q=8, block_k=16, interpret=True)
    ref_out, ref_lse = expected(qs, k, v, q_offset, kv_length, scale, mask)
    out, lse, ref_out, ref_lse = map(np.asarray, (out, lse, ref_out, ref_lse))
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=1e-5)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_interior_blocks_are_wholly_visible(mask_name):
    """MaskSpec.interior (where kernels skip the mask) never claims a block with an invisible element: 300
    random query spans (up to 41 rows) and cache lengths, every key of every claimed block checked."""
    mask, bk, n_keys = MASKS[mask_name], 8, 512
    rng = np.random.default_rng(0)
    first = rng.integers(0, 200, 300).astype(np.int32)
    last = first + rng.integers(0, 40, 300).astype(np.int32)
    kv_length = rng.integers(0, 260, 300).astype(np.int32)
    rows, keys = jnp.arange(41, dtype=jnp.int32)[:, None], jnp.arange(n_keys, dtype=jnp.int32)[None]

    def one(phase, first, last, kv_length):          # one span: (blocks claimed, end of the last, all visible)
        u0, u1 = mask.interior(phase, first, last, kv_length, bk)
        q_pos = first + rows
        claimed = (q_pos <= last) & (keys // bk >= u0) & (keys // bk < u1)
        return u1 - u0, u1, ~(claimed & ~mask.visible(phase, q_pos, keys, kv_length)).any()

    for phase in mask.phases:
        count, end, ok = map(np.asarray, jax.jit(jax.vmap(functools.partial(one, phase)))(first, last, kv_length))
        assert np.all((count == 0) | (end * bk <= n_keys))                  # every claimed key was checked
        bad = np.flatnonzero(~ok)
        assert bad.size == 0, (phase, first[bad[:1]], last[bad[:1]], kv_length[bad[:1]])
        assert count.sum() > 0, phase                                          # the shortcut is really taken


def test_kernel_benchmark_refuses_unknown_mosaic_gpu_options():
    """``pallas_kernels.bench --kernels mosaic_gpu:bq:bk:stages[:lf][:free][:c3]``: anything else is one line."""
    from pallas_kernels import bench
    with pytest.raises(SystemExit, match="unknown option in 'mosaic_gpu:64:128:2:fast'"):
        bench.main(["--lengths", "1k", "--no-cudnn", "--kernels", "mosaic_gpu:64:128:2:fast"])
    with pytest.raises(SystemExit, match="unknown kernel 'cutlass'"):
        bench.main(["--lengths", "1k", "--no-cudnn", "--kernels", "cutlass:64:128:2"])


def test_kernel_benchmark_compares_with_the_first_case_only(monkeypatch, tmp_path):
    """``pallas_kernels.bench``'s "vs first" is each time against the first case's (cuDNN's); where that failed, the
    column said "1.00x" for the next case that ran, as if it were the baseline. Now "-". The Triton kernel runs in
    interpret mode here; cuDNN fails on a CPU by itself."""
    import json
    import pallas_kernels.flash_gpu
    from pallas_kernels import bench
    kernel = pallas_kernels.flash_gpu.flash_attention_gpu
    monkeypatch.setattr(pallas_kernels.flash_gpu, "flash_attention_gpu", functools.partial(kernel, interpret=True))
    out = tmp_path / "bench.json"
    assert bench.main(["--lengths", "128", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--repeats", "1",
                       "--kernels", "triton:64:64:1,triton:32:32:1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["cudnn", "triton:64:64:1 causal", "triton:32:32:1 causal"]
    assert rows[0]["ms"] == "-" and rows[0]["vs first"].startswith("error")
    assert [r["vs first"] for r in rows[1:]] == ["-", "-"] and all(float(r["ms"]) > 0 for r in rows[1:])
    assert bench.main(["--lengths", "128", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--repeats", "1",
                       "--no-cudnn", "--kernels", "triton:64:64:1,triton:32:32:1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["vs first"] == "1.00x" and rows[1]["vs first"].endswith("x")


def test_gpu_check_reports_a_failing_case_and_runs_the_rest(monkeypatch, capsys):
    """``pallas_kernels.gpu_check`` (GPU-only cases, stubbed here): a case that raises is reported with what it
    was, the others still run, and the exit status says one failed."""
    import json

    from pallas_kernels import gpu_check
    ran = []

    def dense(impl, mask_name, G, seed, H):
        ran.append((impl, seed))
        if seed == 1:
            raise RuntimeError("boom")
        return {"impl": impl, "mask": mask_name, "G": G, "ok": True}

    monkeypatch.setattr(gpu_check, "run_case", dense)
    monkeypatch.setattr(gpu_check, "run_decode_case", lambda *case, seed: ran.append(("decode", seed)) or
                        {"impl": "decode", "case": case, "ok": True})
    assert gpu_check.main(["--impls", "triton,decode", "--cases", "0,1,3"]) == 1
    out = capsys.readouterr().out
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert ran == [("triton", 0), ("triton", 1), ("triton", 3), ("decode", 0), ("decode", 1), ("decode", 3)]
    assert [r["ok"] for r in results] == [True, False, True, True, True, True]
    mask, G = gpu_check.CASES[1]
    assert results[1] == {"impl": "triton", "mask": mask, "G": G, "H": 128, "ok": False, "error": "RuntimeError: boom"}
    assert results[0]["H"] == 128 and results[4]["case"] == list(gpu_check.DECODE_CASES[1])
    assert "5/6 cases OK" in out

def test_mosaic_gpu_kernel_refuses_what_it_cannot_run():
    """One-line errors (the dispatch falls back to Triton on them): shared memory over Hopper's 227 KiB,
    three consumers taking turns."""
    from pallas_kernels.flash_mgpu import check_supported, flash_attention_mgpu
    q, k = jnp.zeros((1, 256, 4, 128), jnp.bfloat16), jnp.zeros((1, 1, 512, 128), jnp.bfloat16)
    check_supported((q,), k, k, 64, 128, 2, consumers=3)          # 3 x 64 + 2 x 2 x 128 rows of 256 B + lse rows
    with pytest.raises(ValueError, match="3 query tiles and 3 stages of 128-key blocks need 246528 bytes"):
        check_supported((q,), k, k, 64, 128, 3, consumers=3)
    with pytest.raises(ValueError, match="3 without turns"):
        flash_attention_mgpu((q,), k, k, jnp.zeros((1,), jnp.int32), jnp.full((1,), 512, jnp.int32),
                             jnp.ones((1,)), mask=MaskSpec(), consumers=3, pingpong=True)
