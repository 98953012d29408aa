"""Sparse prefill (MInference vertical-slash with DCA): estimate vs a numpy oracle, index tables vs the
mask's definition, kernels vs masked dense attention, and sparse prefill vs dense DCA prefill."""

import functools

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from pallas_kernels import vslash
from qwen_jax.attention import sparse
from qwen_jax.config import DCAConfig
from qwen_jax.rope import Rope
from tests import sparse_spec

DCA = DCAConfig(chunk_size=320, local_size=64, sparse_attention_enabled=True, sparse_attention_threshold=0)  # S = 256


def rope_for(H, theta=10000.0):
    inv = 1.0 / theta ** (np.arange(0, H, 2, dtype=np.float64) / H)
    return Rope(tuple(float(f) for f in np.float32(inv)))


def random_chunk(seed, B=2, T=192, N=4, K=2, H=32, S_cache=1024, q_offset=(640, 448)):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, S_cache, H)), jnp.float32)
    return q, k, jnp.asarray(q_offset, jnp.int32)


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_estimate_scores_and_selection_match_the_numpy_spec(impl):
    """Both score implementations (``triton``: the Pallas kernel in interpret mode) against the spec."""
    H, N, K = 32, 4, 2
    q, k, q_offset = random_chunk(0)
    lengths = jnp.array([800, 620], jnp.int32)   # row 0: chunk [640, 832) ends at 800; row 1: [448, 620)
    rope = rope_for(H)
    scale = jnp.array([0.3, 0.25], jnp.float32)
    begin, end, P = sparse.segments(q_offset, q.shape[1], lengths, DCA.chunk_len)
    vert, slash = sparse.scores(q, k, q_offset, begin, end, P, scale, dca=DCA, rope=rope, key_block=128, impl=impl,
                                interpret=True)
    budgets = sparse.Budgets((30, 40, 200, 9), (50, 60, 80, 300))
    sel = sparse.select(vert, slash, begin, end, P, jnp.array([True, True]), budgets=budgets, chunk_len=DCA.chunk_len)
    inv = np.asarray(rope.inv_freq, np.float64)
    checked = 0
    for b in range(2):
        for g in range(begin.shape[1]):
            bg, en, Pg = int(begin[b, g]), int(end[b, g]), int(P[b, g])
            if en <= bg:
                continue
            n = min(64, en - bg)
            rows = np.arange(en - n, en) - int(q_offset[b])
            for h in range(N):
                v_np, s_np = sparse_spec.scores_head(np.asarray(q[b, rows, h], np.float64),
                                                     np.asarray(k[b, h // (N // K), :en], np.float64), en, Pg,
                                                     S=DCA.chunk_len, C=DCA.chunk_size, scale=float(scale[b]), inv=inv)
                np.testing.assert_allclose(np.asarray(vert[b, g, h, :en]), v_np, rtol=2e-4, atol=1e-6)
                np.testing.assert_allclose(np.asarray(slash[b, g, h, :en]), s_np, rtol=2e-4, atol=1e-6)
                assert np.all(np.asarray(vert[b, g, h, en:]) == 0) and np.all(np.asarray(slash[b, g, h, en:]) == 0)
                # selection from the same (JAX) scores, exactly
                want = sparse_spec.select_head(np.asarray(vert[b, g, h]), np.asarray(slash[b, g, h]), bg, en, Pg,
                                               S=DCA.chunk_len, vertical_size=budgets.vertical[h],
                                               slash_size=budgets.slash[h])
                assert want[2][1][0] == 0        # budgets of 50-80 diagonals: the main one is still in (d = 0)
                for p, (c, d) in enumerate(want):
                    cn, dn = int(sel.col_count[b, g, h, p]), int(sel.dist_count[b, g, h, p])
                    np.testing.assert_array_equal(np.asarray(sel.cols[b, g, h, p, :cn]), c)
                    np.testing.assert_array_equal(np.asarray(sel.dist[b, g, h, p, :dn]), d)
                checked += 1
    assert checked == 2 * 2 * N      # both rows span two segments (DCA boundaries at 768 and 512)


from pallas_kernels import MaskSpec, masked_attention, vslash_attention  # noqa: E402


@pytest.mark.parametrize("kernel,mask_name,G,block_k", [
    ("triton", "causal", 1, 64), ("triton", "dca", 4, 64), ("triton", "dca", 7, 128),
    ("mosaic_tpu", "causal", 4, 64), ("mosaic_tpu", "dca", 7, 64)])
def test_sparse_kernel_matches_masked_dense_reference(kernel, mask_name, G, block_k):
    rng = np.random.default_rng(G)
    B, T, H, S = 2, 200, 32, 768
    K = 1 if G == 7 else 2
    N = K * G
    mask = MaskSpec(chunk_len=128) if mask_name == "dca" else MaskSpec()
    q_offset = jnp.array([320, 128], jnp.int32)
    kv_length = jnp.array([520, 300], jnp.int32)      # row 1: the cache ends before its last queries
    lengths = jnp.array([520, 328], jnp.int32)
    seg_begin, seg_end, _ = sparse.segments(q_offset, T, lengths, 128 if mask_name == "dca" else 10 ** 6)
    sel = vslash.random_selection(rng, (B, seg_begin.shape[1], N, len(mask.phases), 24, 40), seg_begin, seg_end,
                                  max_dist=700, n_keys=S)
    qs = tuple(jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32) for _ in mask.phases)
    k = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    scale = jnp.array([0.2, 0.15], jnp.float32)
    out, lse = vslash_attention(qs, k, v, sel, q_offset=q_offset, kv_length=kv_length, scale=scale, mask=mask,
                                impl=kernel, block_k=block_k, interpret=True)
    positions = q_offset[:, None] + jnp.arange(T)[None]
    restrict = vslash.dense_mask(sel, positions, S)
    ref_out, ref_lse = masked_attention(qs, k, v, positions, kv_length, scale, mask=mask, restrict=restrict)
    dense_out, _ = masked_attention(qs, k, v, positions, kv_length, scale, mask=mask)
    out, lse, ref_out, ref_lse = map(np.asarray, (out, lse, ref_out, ref_lse))
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert np.isneginf(ref_lse).any() and np.isfinite(ref_lse).any()            # empty rows occur, and real ones
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=2e-5, rtol=1e-5)
    assert np.abs(ref_out - np.asarray(dense_out)).max() > 1e-2                  # the mask really is sparse


def budgets_json(layers, heads, vertical, slash):
    return [{str(h): ["vertical_and_slash", vertical, slash, 0.95] for h in range(heads)} for _ in range(layers)]


DCA_TINY = {"chunk_size": 192, "local_size": 64}                 # S = 128: 400 tokens span four chunks


def test_the_mask_in_64_row_blocks_equals_it_row_by_row():
    """``allows_in_blocks`` (the reference's and the blockwise path's mask) against ``allows`` row by row: random
    selections over 3 segments, rows starting anywhere (not only on a 64-row boundary), a key block that does not
    start at 0, every phase."""
    seed = int(np.random.SeedSequence().entropy % 2 ** 32)
    rng = np.random.default_rng(seed)
    B, N, P, S = 2, 3, 3, 640
    seg_begin = jnp.asarray([[0, 192, 384]] * B, jnp.int32)
    seg_end = jnp.asarray([[192, 384, S]] * B, jnp.int32)
    slots = jnp.arange(100, S, dtype=jnp.int32)

    @jax.jit
    def both(sel, positions, slots):
        return [(vslash.allows(sel, p, positions, slots), vslash.allows_in_blocks(sel, p, positions, slots))
                for p in range(P)]

    for T in (1, 64, 331):
        q_offset = jnp.asarray(rng.integers(0, S - T, B), jnp.int32)
        sel = vslash.random_selection(rng, (B, 3, N, P, 24, 40), seg_begin, seg_end, max_dist=700, n_keys=S)
        positions = q_offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        seen = []
        for row_by_row, in_blocks in both(sel, positions, slots):
            np.testing.assert_array_equal(np.asarray(in_blocks), np.asarray(row_by_row), err_msg=f"seed {seed}")
            seen.append(np.asarray(row_by_row).ravel())
        seen = np.concatenate(seen)
        assert seen.any() and not seen.all(), (seed, T, seen.mean())           # neither empty nor full


def test_sparse_prefill_with_covering_budgets_equals_dense_dca(tiny_checkpoint):
    import qwen_jax
    tokens = np.random.default_rng(0).integers(0, 1000, (2, 400))
    dense = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=DCA_TINY,
                          prefill_chunk_size=128)
    sparse_cfg = dict(DCA_TINY, sparse_attention_enabled=True, sparse_attention_threshold=0,
                      sparse_attention_config=budgets_json(2, 4, 10000, 10000))
    model = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=sparse_cfg,
                          prefill_chunk_size=128)
    assert model.config.dual_chunk_attention_config.sparse_attention_enabled
    ref = dense.logits(tokens)
    got = model.logits(tokens)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_sparse_prefill_paths_agree_and_budgets_matter(tiny_checkpoint):
    """Small budgets: the blockwise jnp path, the dense reference and both kernels (interpret) compute the
    same sparse attention, which differs from dense DCA."""
    import qwen_jax
    from qwen_jax.attention import AttentionSpec
    tokens = np.random.default_rng(1).integers(0, 1000, (1, 384))
    cfg = dict(DCA_TINY, sparse_attention_enabled=True, sparse_attention_threshold=0,
               sparse_attention_config=budgets_json(2, 4, 30, 50))
    base = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=cfg, prefill_chunk_size=192)
    blockwise = base.logits(tokens)
    outs = {}
    for name, spec in [("reference", AttentionSpec(impl="reference")),
                       ("triton", AttentionSpec(impl="pallas", kernel="triton", interpret=True)),
                       ("mosaic_tpu", AttentionSpec(impl="pallas", kernel="mosaic_tpu", interpret=True))]:
        outs[name] = qwen_jax.Model(base.config, base.params, attn_implementation=spec,
                                    prefill_chunk_size=192).logits(tokens)
        assert np.abs(outs[name] - blockwise).max() <= 1e-5 * np.abs(blockwise).max(), name
    dense = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=DCA_TINY,
                          prefill_chunk_size=192).logits(tokens)
    assert np.abs(dense - blockwise).max() > 1e-3 * np.abs(dense).max()
    # below the threshold the same config stays dense
    cfg_hi = dict(cfg, sparse_attention_threshold=10 ** 6)
    high = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=cfg_hi,
                         prefill_chunk_size=192).logits(tokens)
    assert np.abs(high - dense).max() <= 1e-5 * np.abs(dense).max()


def test_sparse_prefill_through_the_kernels_with_jax_enable_x64_equals_it_without(tiny_checkpoint):
    """With 64-bit ints on (a caller's float64 oracle turns them on), the kernels' ``lax.div(int32, 2)`` made the 2
    int64 and failed to trace (``lax.div requires arguments to have the same dtypes``); on a GPU, every decode step."""
    import qwen_jax
    from qwen_jax.attention import AttentionSpec
    # two whole chunks, over three DCA chunks: one program a kernel (a shorter last chunk compiles a second; 64 -> 40 s)
    tokens = np.random.default_rng(9).integers(0, 1000, (1, 384))
    cfg = dict(DCA_TINY, sparse_attention_enabled=True, sparse_attention_threshold=0,
               sparse_attention_config=budgets_json(2, 4, 30, 50))
    base = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=cfg, prefill_chunk_size=192)
    for kernel in ("triton", "mosaic_tpu"):
        model = qwen_jax.Model(base.config, base.params, prefill_chunk_size=192,
                               attn_implementation=AttentionSpec(impl="pallas", kernel=kernel, interpret=True))
        want = model.logits(tokens)
        with jax.enable_x64(True):
            got = model.logits(tokens)
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), kernel


def test_a_one_token_prefill_chunk_runs_sparse_and_decode_stays_dense(tiny_checkpoint, monkeypatch):
    """A 321-token prompt in chunks of 320 ends in a one-token chunk: a prefill chunk, so it estimates (from its one
    query) and attends sparsely as the chunk before it did (a single query was taken for a decode step, and it ran
    dense); the blockwise and reference paths agree on it. A decode step after it estimates nothing."""
    import qwen_jax
    from qwen_jax.attention import AttentionSpec
    estimated = []
    original = sparse.estimate
    monkeypatch.setattr(sparse, "estimate", lambda q, *a, **kw: estimated.append(q.shape[1]) or original(q, *a, **kw))
    jax.clear_caches()                       # every program traced again, so every estimate is seen
    cfg = dict(DCA_TINY, sparse_attention_enabled=True, sparse_attention_threshold=0,
               sparse_attention_config=budgets_json(2, 4, 30, 50))
    model = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=cfg, prefill_chunk_size=320)
    tokens = np.random.default_rng(5).integers(0, 1000, (1, 321))
    got = model.logits(tokens)
    assert sorted(set(estimated)) == [1, 320], estimated
    ref = qwen_jax.Model(model.config, model.params, attn_implementation=AttentionSpec(impl="reference"),
                         prefill_chunk_size=320).logits(tokens)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    estimated.clear()
    out = qwen_jax.generation.generate_ids(model.params, model.config, [tokens[0].tolist()], max_new_tokens=3,
                                           spec=model.attention, prefill_chunk_size=320)
    assert len(out[0]) == 3 and 1 not in estimated and estimated      # the prompt's chunks only


def test_layers_share_a_prefill_program_only_where_their_budgets_agree(tiny_checkpoint):
    """Prefill runs one compiled program per distinct layer budgets (``model.program_layers``); with different
    budgets per layer each layer keeps its own: the layer-by-layer prefill equals the one-program forward,
    which reads every layer's budgets by its index, and swapping the two layers' budgets changes the logits."""
    import jax.numpy as jnp
    import qwen_jax
    from qwen_jax import model as model_fns
    from qwen_jax.cache import init_cache
    tokens = np.random.default_rng(4).integers(0, 1000, (1, 384))
    small, covering = budgets_json(1, 4, 30, 50), budgets_json(1, 4, 10000, 10000)
    logits = {}
    for name, layers in (("small, covering", small + covering), ("covering, small", covering + small),
                         ("small, small", small + small)):
        cfg = dict(DCA_TINY, sparse_attention_enabled=True, sparse_attention_threshold=0,
                   sparse_attention_config=layers)
        model = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=cfg,
                              prefill_chunk_size=384)
        assert model_fns.program_layers(model.config) == ((0, 0) if name == "small, small" else (0, 1))
        logits[name] = model.logits(tokens)
        positions = jnp.arange(384, dtype=jnp.int32)[None]
        whole, _ = model_fns.forward(model.params, jnp.asarray(tokens, jnp.int32), positions,
                                     init_cache(model.config, 1, 384, jnp.float32), model.config,
                                     spec=model.attention)
        assert np.abs(logits[name] - np.asarray(whole)).max() <= 1e-5 * np.abs(logits[name]).max(), name
    scale = np.abs(logits["small, small"]).max()
    assert np.abs(logits["small, covering"] - logits["covering, small"]).max() > 1e-3 * scale
    assert np.abs(logits["small, covering"] - logits["small, small"]).max() > 1e-3 * scale


def test_sparse_config_errors_are_clear(tiny_checkpoint):
    import qwen_jax
    from qwen_jax.errors import ConfigError
    bad = dict(DCA_TINY, sparse_attention_enabled=True, sparse_attention_config=budgets_json(1, 4, 30, 50))
    with pytest.raises(ConfigError, match="has 1 layers, the model 2"):
        qwen_jax.load(tiny_checkpoint[0], dual_chunk_attention_config=bad)
    odd = [{"0": ["stream_llm", 1, 1, 0.5]}] * 2
    with pytest.raises(ConfigError, match="pattern 'stream_llm' is not supported"):
        qwen_jax.load(tiny_checkpoint[0], dual_chunk_attention_config=dict(DCA_TINY, sparse_attention_config=odd))
    with pytest.raises(ConfigError, match="multiple of 64"):
        qwen_jax.load(tiny_checkpoint[0], dual_chunk_attention_config={"chunk_size": 200, "local_size": 64,
                                                                        "sparse_attention_enabled": True})


def test_recall_tool_table_json_and_png(tiny_checkpoint, tmp_path, capsys):
    """Covering budgets keep all the mass (recall 1); small ones keep less, never more than 1."""
    import json
    import struct

    from qwen_jax.cli import main
    full = tmp_path / "full.json"
    full.write_text(json.dumps(budgets_json(2, 4, 10000, 10000)))
    common = ["recall", "--model", tiny_checkpoint[0], "--dca", "chunk_size=192,local_size=64",
              "--prefill-chunk", "128", "--dtype", "float32"]
    assert main(common + ["--length", "400", "--sparse-config", str(full), "--json", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    np.testing.assert_allclose(np.asarray(a["recall"]), 1.0, atol=1e-5)
    small = tmp_path / "small.json"
    small.write_text(json.dumps(budgets_json(2, 4, 30, 50)))
    words = np.random.default_rng(0).choice(["def", "x", "=", "(", ")", "return", "alpha", "beta", "for"], 3000)
    (tmp_path / "p.txt").write_text(" ".join(words))
    text = ["--prompt-file", str(tmp_path / "p.txt"), "--length", "384"]       # cut to 384 tokens (64 | 384)
    assert main(common + text + ["--sparse-config", str(small), "--json", str(tmp_path / "b.json"),
                                 "--png", str(tmp_path / "b.png"), "--save-selections", str(tmp_path / "s.npz")]) == 0
    b_json = json.loads((tmp_path / "b.json").read_text())
    b = np.asarray(b_json["recall"])
    assert b.shape == (2, 4) and (b <= 1.0 + 1e-6).all() and (b > 0).all() and b.min() < 0.999
    # tile share: covering budgets compute every causal pair (and their vertical tiles on top); small ones less
    tiles_full, tiles_small = np.asarray(a["tile share"]), np.asarray(b_json["tile share"])
    assert (tiles_full >= 1.0).all()
    assert (tiles_small < tiles_full).all() and (tiles_small > 0).all()
    # the sparse benchmark times the kernels on the saved selections (heads doubled) and counts the same tiles
    from qwen_jax.bench import sparse as bench_sparse
    assert bench_sparse.main(["--selections", str(tmp_path / "s.npz"), "--heads", "8", "--kv-heads", "4",
                              "--head-dim", "32", "--kernels", "triton", "--interpret", "--no-dense", "--repeats", "1",
                              "--json", str(tmp_path / "bench.json")]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["inputs"] for r in rows] == ["model L0", "model L1", "model all (2 layers)"]
    for layer in range(2):     # the benchmark counts T * T / 2 dense pairs per head, recall T (T + 1) / 2
        share = float(rows[layer]["tiles computed / dense"]) * 384 / 385
        np.testing.assert_allclose(share, tiles_small[layer].mean(), rtol=2e-3)
    png = (tmp_path / "b.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (4 * 16, 2 * 16)
    out = capsys.readouterr().out
    assert "layer |" in out and '"mean"' in out
    assert main(["recall", "--model", tiny_checkpoint[0], "--length", "400"]) == 1     # no --dca: one-line error
    assert "pass --dca" in capsys.readouterr().err
    assert main(["passkey", "--model", tiny_checkpoint[0], "--lengths", "1k", "--sparse"]) == 1
    assert "pass --dca too" in capsys.readouterr().err


@pytest.mark.parametrize("kernel,platform", [("triton", "cuda"), ("mosaic_tpu", "tpu")])
def test_sparse_kernels_lower_for_their_hardware(kernel, platform):
    """Qwen2.5-7B heads (28 / 4, head_dim 128), bf16, DCA, 2 segments, budgets of 6096 / 1000."""
    from jax import export
    from pallas_kernels.vslash_gpu import vslash_attention_gpu
    from pallas_kernels.vslash_tpu import vslash_attention_tpu
    B, T, N, K, H, S, Gs, P, D, V = 1, 1024, 28, 4, 128, 4096, 2, 3, 6096, 1000
    mask = MaskSpec(chunk_len=2048)

    def f(qs, k, v, qo, kl, sc, dist, dn, cols, cn, sb, se):
        sel = vslash.Selection(dist, dn, cols, cn, sb, se)
        index = vslash.build_index(sel, qo, T, kl, mask, 64, S)
        if kernel == "triton":
            return vslash_attention_gpu(qs, k, v, qo, kl, sc, index, cn, mask=mask, block_k=64)
        return vslash_attention_tpu(qs, k, v, qo, kl, sc, index, cn, mask=mask)

    sd, i32 = jax.ShapeDtypeStruct, jnp.int32
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if kernel == "triton" else []
    exported = export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(
        tuple(sd((B, T, N, H), jnp.bfloat16) for _ in range(P)), sd((B, K, S, H), jnp.bfloat16),
        sd((B, K, S, H), jnp.bfloat16), sd((B,), i32), sd((B,), i32), sd((B,), jnp.float32),
        sd((B, Gs, N, P, D), i32), sd((B, Gs, N, P), i32), sd((B, Gs, N, P, V), i32), sd((B, Gs, N, P), i32),
        sd((B, Gs), i32), sd((B, Gs), i32))
    assert exported.platforms == (platform,)
    assert ("triton" if kernel == "triton" else "tpu_custom_call") in exported.mlir_module()


@pytest.mark.parametrize("kernel", ["triton", "mosaic_tpu"])
def test_block_sparse_primitive_matches_masked_dense_reference(kernel):
    """Arbitrary per-block lists of 64-key blocks (duplicates, empty lists, DCA phases) through the kernels."""
    from pallas_kernels import block_sparse_attention
    rng = np.random.default_rng(5)
    B, T, N, K, H, S, M = 2, 192, 4, 2, 32, 512, 5
    mask = MaskSpec(chunk_len=128)
    P, nqb = len(mask.phases), -(-T // 64)
    blocks = jnp.asarray(rng.integers(0, S // 64, (B, N, nqb, P, M)), jnp.int32)
    counts = jnp.asarray(rng.integers(0, M + 1, (B, N, nqb, P)), jnp.int32).at[0, 0].set(0)
    qs = tuple(jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32) for _ in range(P))
    k = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    args = dict(q_offset=jnp.array([256, 128]), kv_length=jnp.array([448, 300]), scale=0.2, mask=mask)
    out, lse = block_sparse_attention(qs, k, v, blocks, counts, impl=kernel, interpret=True, **args)
    ref_out, ref_lse = block_sparse_attention(qs, k, v, blocks, counts, impl="reference", **args)
    out, lse, ref_out, ref_lse = map(np.asarray, (out, lse, ref_out, ref_lse))
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)) and np.isneginf(ref_lse[0, :, 0]).all()
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=2e-5, rtol=1e-5)


def small_selection(dists, cols, *, N=2, P=1, D=4, V=4, dist_count=None, col_count=None):
    """One row, one segment covering every query, the same lists for every head and phase."""
    d = np.full((1, 1, N, P, D), vslash.NO_KEY, np.int32)
    c = np.full((1, 1, N, P, V), vslash.NO_KEY, np.int32)
    d[..., :len(dists)], c[..., :len(cols)] = dists, cols
    counts = lambda n, default: jnp.full((1, 1, N, P), default if n is None else n, jnp.int32)  # noqa: E731
    return vslash.Selection(jnp.asarray(d), counts(dist_count, len(dists)), jnp.asarray(c),
                            counts(col_count, len(cols)), jnp.zeros((1, 1), jnp.int32),
                            jnp.full((1, 1), 10 ** 6, jnp.int32))


@pytest.mark.parametrize("kernel", ["triton", "mosaic_tpu"])
def test_sparse_kernels_count_a_repeated_column_once_and_read_no_count_past_its_list(kernel):
    """A key listed twice is one key of the mask (as the reference reads it), and a count above the list's
    capacity means the whole list; the kernels counted the column twice and read past the list."""
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.normal(size=(1, 128, 2, 32)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, 1, 256, 32)), jnp.float32) for _ in range(2))
    run = functools.partial(vslash_attention, q, k, v, q_offset=64, kv_length=192, interpret=True)
    for sel, same in [(small_selection([0], [5, 5, 9, 9]), small_selection([0], [5, 9])),
                      (small_selection([0, 3], [5, 40], dist_count=20, col_count=20), small_selection([0, 3], [5, 40]))]:
        out, lse = map(np.asarray, run(sel, impl=kernel))
        ref_out, ref_lse = map(np.asarray, run(same, impl="reference"))
        np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(lse, ref_lse, atol=2e-6, rtol=1e-5)
        np.testing.assert_array_equal(ref_out, np.asarray(run(sel, impl="reference")[0]))


@pytest.mark.parametrize("impl", ["reference", "triton", "mosaic_tpu"])
def test_sparse_entry_points_refuse_what_their_kernels_cannot_read(impl):
    """Selections or block lists of another shape, a q_offset off the 64-row grid, unsorted or negative lists: one
    line each, from every implementation alike (they answered silently, or crashed inside the kernel)."""
    from pallas_kernels import block_sparse_attention
    q = jnp.zeros((1, 128, 2, 32), jnp.float32)
    k = jnp.zeros((1, 1, 256, 32), jnp.float32)
    run = functools.partial(vslash_attention, q, k, k, kv_length=192, impl=impl, interpret=True)
    with pytest.raises(ValueError, match=r"q_offset a multiple of 64 .* got \[32\]"):
        run(small_selection([0], [5]), q_offset=32)
    with pytest.raises(ValueError, match=r"N=2 query heads .* got dist \(1, 1, 1, 1, 4\)"):
        run(small_selection([0], [5], N=1), q_offset=64)
    with pytest.raises(ValueError, match="P=3 mask phases"):
        vslash_attention((q, q, q), k, k, small_selection([0], [5]), q_offset=64, kv_length=192,
                         mask=MaskSpec(chunk_len=64), impl=impl, interpret=True)
    with pytest.raises(ValueError, match="cols must be sorted"):
        run(small_selection([0], [40, 5]), q_offset=64)
    with pytest.raises(ValueError, match="dist holds a negative entry"):
        run(small_selection([-3, 0], [5]), q_offset=64)
    run(small_selection([0], [40, 5], col_count=1), q_offset=64)          # past the count: not read, not checked
    blocks, counts = jnp.zeros((1, 2, 1, 1, 3), jnp.int32), jnp.ones((1, 2, 1, 1), jnp.int32)
    with pytest.raises(ValueError, match=r"blocks must be \[B, N, T/64, P, M\] = \[1, 2, 2, 1, 'M'\]"):
        block_sparse_attention(q, k, k, blocks, counts, q_offset=0, kv_length=192, impl=impl, interpret=True)
    with pytest.raises(ValueError, match="blocks must be"):
        block_sparse_attention(q, k, k, blocks[:, :1].repeat(2, 2), counts[:, :1].repeat(2, 2), q_offset=0,
                               kv_length=192, impl=impl, interpret=True)


def test_rows_over_and_under_the_threshold_in_one_batch(tiny_checkpoint):
    """A batch mixing a prompt over the threshold (sparse) and one under it (dense) gives each row what
    it gets alone."""
    import qwen_jax
    from qwen_jax.cache import cache_length
    cfg = dict(DCA_TINY, sparse_attention_enabled=True, sparse_attention_threshold=200,
               sparse_attention_config=budgets_json(2, 4, 30, 50))
    model = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=cfg, prefill_chunk_size=128)
    rng = np.random.default_rng(3)
    lengths = [320, 150]
    tokens = np.zeros((2, 320), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(0, 1000, n)

    def last_logits(toks, lens):
        cache = qwen_jax.init_cache(model.config, len(lens), cache_length(toks.shape[1]), jnp.float32)
        logits, _ = qwen_jax.prefill(model.params, toks, np.asarray(lens), cache, model.config, chunk_size=128,
                                     spec=model.attention)
        return np.asarray(logits)

    both = last_logits(tokens, lengths)
    for i, n in enumerate(lengths):
        alone = last_logits(tokens[i:i + 1, :n], [n])[0]
        assert np.abs(both[i] - alone).max() <= 1e-5 * np.abs(alone).max(), i
    dense = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=DCA_TINY,
                          prefill_chunk_size=128)
    cache = qwen_jax.init_cache(dense.config, 1, cache_length(320), jnp.float32)
    dense_logits, _ = qwen_jax.prefill(dense.params, tokens[:1], np.asarray([320]), cache, dense.config,
                                       chunk_size=128, spec=dense.attention)
    assert np.abs(np.asarray(dense_logits)[0] - both[0]).max() > 1e-4     # the long row really ran sparse


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _mgpu_decisions(mask, phase, block_k, n_keys, active, q0, c, kv_length, window, tile_ends):
    """One consumer's decisions for one query block, as the kernel makes them (one program for what
    would otherwise be many small eager ones): its rows' key ranges, its slash windows' ``(start, klo,
    khi, kind)`` and its vertical tiles' kinds."""
    from pallas_kernels import vslash_mgpu as vm
    first = q0 + vslash.BAND * c
    rows = first + jnp.arange(vslash.BAND)
    a_rows, b_rows = mask.key_range(phase, rows, rows, kv_length)
    span = vm.row_span(mask, phase, first, kv_length)
    start, klo, khi = vm.slash_bounds(*window, q0, c, block_k, n_keys)
    kind = vm.slash_kind(start, klo, khi, span, block_k, active)
    vkind = vm.vertical_kind(*tile_ends, span, active)
    return a_rows, b_rows, start, klo, khi, kind, vkind


def mgpu_coverage(index, q_offset, kv_length, mask, T, S, block_k, qkv=None, consumers=2):
    """Replay the Mosaic GPU sparse kernel's schedule in numpy: how often each (phase, row, head, query,
    key) is computed unmasked, using the kernel's own tables and per-step decisions. Also counts steps
    by kind. Returns ``(cover [P, B, N, T, S] int, kinds {kind: count}, out, lse)``; with ``qkv = (qs, k,
    v, scale)`` also the kernel's arithmetic (base-2 online softmax from M_FLOOR) in float64.
    ``consumers``: query blocks per program (the kernel's consumer warpgroups)."""
    from pallas_kernels import vslash_mgpu as vm
    C = consumers
    B, N = index.t0.shape[:2]
    P, nqb = len(mask.phases), index.block_seg.shape[1]
    n_pairs = -(-nqb // C)
    W = block_k
    _, *tables = jax.jit(vm._tables, static_argnums=(3, 4, 5, 6))(index, q_offset, kv_length, mask, W, n_pairs, C)
    sched, win, vpos, keep = map(np.asarray, tables)
    q_offset, kv_length = np.asarray(q_offset), np.asarray(kv_length)
    cover = np.zeros((P, B, N, C * n_pairs * 64, S + 1), np.int32)           # column S: keys that do not exist
    kinds = {vm.SKIP: 0, vm.WHOLE: 0, vm.COLUMNS: 0, vm.MASKED: 0}
    Tp = C * n_pairs * 64
    if qkv is not None:
        qs, k, v, scale = qkv
        qs, k, v, scale = [np.asarray(q, np.float64) for q in qs], np.asarray(k), np.asarray(v), np.asarray(scale)
        G, H = N // k.shape[1], k.shape[-1]
        qs = [np.pad(q, ((0, 0), (0, Tp - q.shape[1]), (0, 0), (0, 0))) for q in qs]
        m = np.full((B, N, Tp), vm.M_FLOOR)
        l = np.zeros((B, N, Tp))
        acc = np.zeros((B, N, Tp, H))

    def step(b, n, out_rows, p, keys, ok):
        if qkv is None:
            return
        kk, vv = k[b, n // G, keys], v[b, n // G, keys]
        s = qs[p][b, out_rows, n] @ kk.T * scale[b] * vm.LOG2E
        s = np.where(ok, s, vm.MASK_VALUE)
        m_new = np.maximum(m[b, n, out_rows], s.max(1))
        alpha = np.exp2(m[b, n, out_rows] - m_new)
        pr = np.exp2(s - m_new[:, None])
        acc[b, n, out_rows] = acc[b, n, out_rows] * alpha[:, None] + pr @ vv
        l[b, n, out_rows] = l[b, n, out_rows] * alpha + pr.sum(1)
        m[b, n, out_rows] = m_new

    for b, n, qi in np.ndindex(B, N, n_pairs):                                 # the step numbering the kernel uses
        lengths = (sched[b, n, qi, :, :, 1] - sched[b, n, qi, :, :, 0] + sched[b, n, qi, :, :, 3]
                   - sched[b, n, qi, :, :, 2]).reshape(-1)
        np.testing.assert_array_equal(sched[b, n, qi, :, :, 5 + C].reshape(-1), np.cumsum(lengths) - lengths)
    for b, n, qi, p, part in np.ndindex(B, N, n_pairs, P, C):
        phase = mask.phases[p]
        t0, t1, v0, v1, g, *act = sched[b, n, qi, p, part, :5 + C]
        q0 = int(q_offset[b]) + 64 * C * qi
        tiles = vpos[b, g, n, p].reshape(-1, W)
        for c in range(C):
            rows = q0 + 64 * c + np.arange(64)
            out_rows = rows - q_offset[b]
            window = tuple(win[b, g, n, p, :, f] for f in range(4))             # decide for all windows at once
            a_rows, b_rows, start, klo, khi, kind, vkind = map(np.asarray, _mgpu_decisions(
                mask, phase, W, S, bool(act[c]), q0, c, kv_length[b], window, (tiles[:, 0], tiles[:, -1])))
            start, klo, khi, kind = start[t0:t1], klo[t0:t1], khi[t0:t1], kind[t0:t1]
            assert ((0 <= start) & (start <= S - W) & (start % 8 == 0)).all()          # TMA into tiled smem
            for i in range(t1 - t0):
                kinds[int(kind[i])] += 1
                pos = start[i] + np.arange(W)
                ok = (pos >= np.maximum(a_rows, klo[i])[:, None]) & (pos < np.minimum(b_rows, khi[i])[:, None])
                assert kind[i] != vm.WHOLE or ok.all()
                # a window masked by its columns alone: every row sees the run's part of it, [klo, khi)
                assert kind[i] != vm.COLUMNS or (ok == ((pos >= klo[i]) & (pos < khi[i]))[None]).all()
                assert kind[i] != vm.SKIP or not act[c] or not ok.any()      # a skipped window has nothing to see
                cover[p, b, n, out_rows[:, None], pos[None]] += ok & (kind[i] != vm.SKIP)
                if kind[i] != vm.SKIP:
                    step(b, n, out_rows, p, pos, ok | (kind[i] == vm.WHOLE))
            for i in range(v0, v1):
                kinds[int(vkind[i])] += 1
                pos = np.where(keep[b, n, C * qi + c, p, i * W:(i + 1) * W] != 0, tiles[i], vslash.NO_KEY)
                ok = (pos >= a_rows[:, None]) & (pos < b_rows[:, None])
                assert vkind[i] == vm.MASKED or not act[c] or not ok.any()
                if vkind[i] == vm.MASKED:
                    np.add.at(cover[p, b, n], (out_rows[:, None], np.minimum(pos, S)[None]), ok)
                    step(b, n, out_rows, p, np.clip(tiles[i], 0, S - 1), ok)
    if qkv is None:
        return cover[:, :, :, :T, :S], kinds, None, None
    out = acc / np.maximum(l, 1e-30)[..., None]
    lse = np.where(l > 0, (m + np.log2(np.maximum(l, 1e-30))) * np.log(2.0), -np.inf)
    return cover[:, :, :, :T, :S], kinds, out[:, :, :T].transpose(0, 2, 1, 3), lse[:, :, :T].transpose(0, 2, 1)


@pytest.mark.parametrize("mask_name,q_offset,block_k,consumers", [
    ("causal", (320, 128), 128, 2), ("dca", (320, 128), 128, 2), ("dca", (384, 64), 64, 2),
    ("causal", (64, 192), 96, 2), ("dca", (320, 128), 80, 2), ("dca", (320, 128), 96, 3),
    ("causal", (64, 192), 128, 3), ("dca", (384, 64), 64, 3)])
def test_mgpu_sparse_schedule_computes_each_visible_key_once(mask_name, q_offset, block_k, consumers):
    """The Mosaic GPU sparse kernel (no CPU interpreter) replayed in numpy from its own tables and step
    decisions: every key of the sparse mask is computed exactly once per query, no other key ever, and
    windows it calls whole or skipped really are. Programs of two or three query blocks cut by segment
    boundaries, rows whose cache ends early, queries past the cache."""
    rng = np.random.default_rng(len(mask_name) + block_k)
    B, T, N, S = 2, 456, 3, 1024
    mask = MaskSpec(chunk_len=128) if mask_name == "dca" else MaskSpec()
    q_offset = jnp.array(q_offset, jnp.int32)                  # 320 = 5 x 64: DCA chunk starts split pairs
    kv_length = jnp.array([776, 300], jnp.int32)
    lengths = jnp.array([776, 500], jnp.int32)
    seg_begin, seg_end, _ = sparse.segments(q_offset, T, lengths, 128 if mask_name == "dca" else 10 ** 6)
    sel = vslash.random_selection(rng, (B, seg_begin.shape[1], N, len(mask.phases), 40, 60), seg_begin, seg_end,
                                  max_dist=900, n_keys=S)
    index = jax.jit(vslash.build_index, static_argnums=(2, 4, 5, 6))(sel, q_offset, T, kv_length, mask, 64, S)
    qs = tuple(rng.normal(size=(B, T, N, 16)) for _ in mask.phases)
    k, v = rng.normal(size=(2, B, 1, S, 16))
    scale = np.array([0.3, 0.2])
    from pallas_kernels import vslash_mgpu as vm
    who = np.asarray(vm.pair_windows(index.rel_start, index.rel_end, block_k, consumers)[3])
    if consumers == 2:                                     # windows one consumer computes alone: wide windows only
        assert (block_k > 64) == (who != vm.BOTH).any()
    assert set(np.unique(who)) <= {vm.BOTH, *range(consumers)}
    cover, kinds, out, lse = mgpu_coverage(index, q_offset, kv_length, mask, T, S, block_k, (qs, k, v, scale),
                                           consumers)
    positions = q_offset[:, None] + jnp.arange(T)[None]
    slots = jnp.arange(S)
    restrict = np.asarray(jax.jit(vslash.dense_mask, static_argnums=2)(sel, positions, S))    # [P, B, N, T, S]
    for p, phase in enumerate(mask.phases):
        visible = np.asarray(mask.visible(phase, positions[:, :, None], slots[None, None], kv_length[:, None, None]))
        want = restrict[p] & visible[:, None]
        assert want.any()
        np.testing.assert_array_equal(cover[p], want.astype(np.int32), err_msg=f"phase {phase}")
    assert min(kinds.values()) > 0, kinds                                    # every kind of step occurs
    computed = jax.jit(vm.computed_pairs, static_argnums=(3, 4, 5))(index, q_offset, kv_length, mask, block_k,
                                                                     consumers)
    computed_steps = kinds[vm.WHOLE] + kinds[vm.COLUMNS] + kinds[vm.MASKED]
    assert float(computed) == computed_steps * 64 * block_k                  # the benchmark's count
    ref_out, ref_lse = masked_attention(tuple(map(jnp.asarray, qs)), jnp.asarray(k), jnp.asarray(v), positions,
                                        kv_length, jnp.asarray(scale), mask=mask, restrict=jnp.asarray(restrict))
    ref_out, ref_lse = np.asarray(ref_out), np.asarray(ref_lse)
    assert np.isneginf(ref_lse).any() and np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)          # empty rows: 0


@pytest.mark.parametrize("consumers", [2, 3])
def test_mgpu_sparse_schedule_on_the_block_sparse_primitive(consumers):
    """Block-sparse tables (each query block its own segment: every program walks a part per block)."""
    rng = np.random.default_rng(7)
    B, T, N, S, M = 2, 320, 2, 512, 5
    mask = MaskSpec(chunk_len=128)
    P, nqb = len(mask.phases), -(-T // 64)
    blocks = jnp.asarray(rng.integers(0, S // 64, (B, N, nqb, P, M)), jnp.int32)
    counts = jnp.asarray(rng.integers(0, M + 1, (B, N, nqb, P)), jnp.int32)
    q_offset, kv_length = jnp.array([192, 64], jnp.int32), jnp.array([512, 300], jnp.int32)
    index, _ = vslash.block_sparse_index(blocks, counts, q_offset, kv_length)
    cover, *_ = mgpu_coverage(index, q_offset, kv_length, mask, T, S, 128, consumers=consumers)
    positions = q_offset[:, None] + jnp.arange(T)[None]
    restrict = np.asarray(vslash.block_sparse_dense_mask(blocks, counts, positions, S))
    for p, phase in enumerate(mask.phases):
        visible = np.asarray(mask.visible(phase, positions[:, :, None], jnp.arange(S)[None, None],
                                          kv_length[:, None, None]))
        np.testing.assert_array_equal(cover[p], (restrict[p] & visible[:, None]).astype(np.int32))


@pytest.mark.parametrize("mask_name,block_k,consumers", [("causal", 96, 2), ("dca", 128, 2), ("dca", 80, 2),
                                                         ("dca", 96, 3), ("causal", 128, 3)])
def test_mgpu_sparse_kernel_lowers_for_cuda(mask_name, block_k, consumers):
    """Qwen2.5-7B heads (28 / 4, head_dim 128), bf16, a 4096-query chunk at an offset, budgets 6096 / 1000:
    the Mosaic GPU sparse kernel lowers to a Mosaic GPU custom call (no GPU needed)."""
    from jax import export
    from pallas_kernels.vslash_mgpu import max_stages, vslash_attention_mgpu
    mask = MaskSpec(chunk_len=8192) if mask_name == "dca" else MaskSpec()
    B, T, N, K, H, S, D, V = 1, 4096, 28, 4, 128, 16384, 6096, 1000
    Gs, P = (2, 3) if mask_name == "dca" else (1, 1)

    def f(qs, k, v, qo, kl, sc, dist, dn, cols, cn, sb, se):
        sel = vslash.Selection(dist, dn, cols, cn, sb, se)
        index = vslash.build_index(sel, qo, T, kl, mask, vslash.BAND, S)
        return vslash_attention_mgpu(qs, k, v, qo, kl, sc, index, cn, mask=mask, block_k=block_k,
                                     stages=max_stages(block_k, consumers=consumers),
                                     pingpong=block_k == 128 and consumers == 2, consumers=consumers)

    sd, i32 = jax.ShapeDtypeStruct, jnp.int32
    exported = export.export(jax.jit(f), platforms=["cuda"])(
        tuple(sd((B, T, N, H), jnp.bfloat16) for _ in range(P)), sd((B, K, S, H), jnp.bfloat16),
        sd((B, K, S, H), jnp.bfloat16), sd((B,), i32), sd((B,), i32), sd((B,), jnp.float32),
        sd((B, Gs, N, P, D), i32), sd((B, Gs, N, P), i32), sd((B, Gs, N, P, V), i32), sd((B, Gs, N, P), i32),
        sd((B, Gs), i32), sd((B, Gs), i32))
    assert exported.platforms == ("cuda",) and "mosaic_gpu" in exported.mlir_module()


def test_sparse_dispatch_picks_or_refuses_loudly():
    import pallas_kernels
    from pallas_kernels.vslash_mgpu import check_supported
    assert "mosaic_gpu" in pallas_kernels.SPARSE_IMPLS
    assert pallas_kernels._SPARSE_NATIVE["gpu"] == "mosaic_gpu"
    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    k = jnp.zeros((1, 2, 512, 128), jnp.bfloat16)
    assert pallas_kernels._sparse_mgpu_block("auto", (q,), k, k, None) == 96
    assert pallas_kernels._mgpu_sparse_stages(96) == 3 and pallas_kernels._mgpu_sparse_stages(64) == 4
    assert pallas_kernels._sparse_mgpu_block("auto", (q[:, :64],), k, k, None) is None         # decode-sized: Triton
    assert pallas_kernels._sparse_mgpu_block("mosaic_gpu", (q[:, :64],), k, k, 128) == 128    # asked for: served
    f32 = (q.astype(jnp.float32),), k.astype(jnp.float32), k.astype(jnp.float32)
    assert pallas_kernels._sparse_mgpu_block("auto", *f32, None) is None                        # float32: Triton
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        pallas_kernels._sparse_mgpu_block("mosaic_gpu", *f32, None)
    with pytest.raises(ValueError, match="head_dim a multiple of 64"):
        check_supported((q[..., :32],), k[..., :32], k[..., :32], 128, 2)
    with pytest.raises(ValueError, match="multiples of 16 keys"):
        check_supported((q,), k, k, 72, 2)
    check_supported((q,), k, k, 80, 4)                                 # 80-key windows: V takes a 32-byte swizzle
    with pytest.raises(ValueError, match="shared memory"):
        check_supported((q,), k, k, 256, 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        check_supported((q,), k[:, :, :300], k[:, :, :300], 128, 2)
    sel = vslash.random_selection(np.random.default_rng(0), (1, 1, 4, 1, 4, 4), jnp.zeros((1, 1), jnp.int32),
                                  jnp.full((1, 1), 256, jnp.int32), max_dist=256, n_keys=512)
    with pytest.raises(ValueError, match="does not run on 'cpu'"):
        vslash_attention(q, k, k, sel, q_offset=0, kv_length=256, impl="mosaic_gpu")
    with pytest.raises(ValueError, match="no CPU interpreter"):
        vslash_attention(q, k, k, sel, q_offset=0, kv_length=256, impl="mosaic_gpu", interpret=True)
    with pytest.raises(ValueError, match="not available"):
        vslash_attention(q, k, k, sel, q_offset=0, kv_length=256, impl="cutlass")
    with pytest.raises(ValueError, match="no Pallas attention kernel runs natively on 'cpu'"):
        vslash_attention(q, k, k, sel, q_offset=0, kv_length=256)          # as flash_attention (it ran the reference)


@pytest.mark.parametrize("S,unroll", [(700, False), (3072, False), (3072, True), (700, 4)])
def test_top_indices_pick_what_a_stable_sort_picks_ties_included(S, unroll, monkeypatch):
    """The sort-free top-k against numpy's stable argsort: ties (zeros, repeated values, +-inf) go to the
    lower index, every row has its own count, and n = 0 and n = k work (3072: rows cut in blocks;
    ``unroll``: the binary search unrolled, wholly or by 4 as GPUs run it)."""
    monkeypatch.setattr(vslash, "UNROLL", unroll)
    rng = np.random.default_rng(S)
    R, k = 12, 300
    score = np.floor(rng.random((R, S)) * 6).astype(np.float32) / 4          # heavy ties
    score[rng.random((R, S)) < 0.1] = 0.0
    score[:, :20] = np.inf
    score[3, 500:] = -np.inf
    score[5] = rng.normal(size=S).astype(np.float32)                           # negative values too
    n = rng.integers(1, k + 1, R)
    n[0], n[1] = 0, k
    got = np.asarray(sparse.top_indices(jnp.asarray(score), jnp.asarray(n), k))
    for r in range(R):
        want = np.sort(np.argsort(-score[r].astype(np.float64), kind="stable")[:n[r]])
        np.testing.assert_array_equal(got[r, :n[r]], want)
        assert (got[r, n[r]:] == S).all()


@pytest.mark.parametrize("splits,splits2,group", [(1, 1, 1), (3, 5, 7), (128, 64, 1)])
def test_estimate_kernel_matches_the_xla_scores(splits, splits2, group):
    """The Pallas estimate kernel (interpret mode) against the XLA scores: 7 query heads per kv head,
    three DCA phases in one segment, programs with no tile, one tile and many, a row not at the end of
    the cache; every entry below ``end`` compared (the kernel leaves those past it undefined: the caller
    masks them, as the numpy-spec test checks through ``sparse.scores``)."""
    from pallas_kernels import estimate_gpu
    rng = np.random.default_rng(splits)
    dca = DCAConfig(chunk_size=320, local_size=64, sparse_attention_enabled=True, sparse_attention_threshold=0)
    B, T, N, K, H, S_cache = 2, 96, 7, 1, 32, 1024
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, S_cache, H)), jnp.float32)
    q_offset = jnp.array([800, 512], jnp.int32)          # row 0: keys in all three phases; row 1: a DCA boundary
    lengths = jnp.array([870, 608], jnp.int32)
    rope = rope_for(H)
    begin, end, P = sparse.segments(q_offset, T, lengths, dca.chunk_len)
    scale = jnp.array([0.3, 0.2], jnp.float32)
    want = sparse.scores(q, k, q_offset, begin, end, P, scale, dca=dca, rope=rope, key_block=128, impl="xla")
    for b in range(B):
        for g in range(begin.shape[1]):
            bg, en, Pg = (int(x[b, g]) for x in (begin, end, P))
            if en <= bg:
                continue
            rows = en - 64 + np.arange(64)
            q_est = q[b, np.clip(rows - int(q_offset[b]), 0, T - 1)]
            qe = jnp.stack([rope.apply(q_est[None], jnp.asarray(rows - Pg + shift)[None])[0]
                            for shift in (dca.chunk_size, dca.chunk_len, 0)]).transpose(0, 2, 1, 3)
            info = jnp.array([max(Pg - dca.chunk_len, 0), Pg, en, bg, -(-en // 64), 0, 0, 0], jnp.int32)
            vert, slash = estimate_gpu.segment_scores(qe, k, info, scale[b:b + 1], b=b, W=64, splits=splits,
                                                      splits2=splits2, group=group, interpret=True)
            for got, ref in ((vert, want[0][b, g]), (slash, want[1][b, g])):
                np.testing.assert_allclose(np.asarray(got)[:, :en], np.asarray(ref)[:, :en], rtol=1e-5, atol=1e-7)
                assert np.abs(np.asarray(ref)[:, :en]).max() > 0


def test_estimate_kernel_lowers_for_cuda():
    """The whole estimate with the Pallas scores, Qwen2.5-7B heads (28 / 4, head_dim 128), bf16, DCA."""
    from jax import export
    H = 128
    dca = DCAConfig(chunk_size=2560, local_size=512, sparse_attention_enabled=True, sparse_attention_threshold=0)
    budgets = sparse.Budgets((1000,) * 28, (2000,) * 28)

    def f(q, k, q_offset, lengths):
        return sparse.estimate(q, k, q_offset, lengths, jnp.ones((1,), jnp.float32), dca=dca, rope=rope_for(H),
                               budgets=budgets, impl="triton", all_sparse=True)

    sd = jax.ShapeDtypeStruct
    exported = export.export(jax.jit(f), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        sd((1, 1024, 28, H), jnp.bfloat16), sd((1, 4, 8192, H), jnp.bfloat16), sd((1,), jnp.int32),
        sd((1,), jnp.int32))
    module = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    assert "qwen_jax_estimate_lse" in module and "qwen_jax_estimate_scores" in module


def test_unrolled_binary_searches_equal_the_loop(monkeypatch):
    """``vslash.search`` unrolled (by 4: what GPUs run; wholly) and as a loop (elsewhere) give the same counts."""
    rng = np.random.default_rng(5)
    rows = jnp.asarray(np.sort(rng.integers(0, 1000, (5, 300)), -1), jnp.int32)
    row = jnp.asarray(rng.integers(0, 5, (7, 11)), jnp.int32)
    x = jnp.asarray(rng.integers(-5, 1005, (7, 11)), jnp.int32)
    got = {}
    for unroll in (False, True, 4):
        monkeypatch.setattr(vslash, "UNROLL", unroll)
        got[unroll] = [np.asarray(vslash.search(rows, row, x, right=right)) for right in (False, True)]
    want = [np.stack([np.searchsorted(np.asarray(rows)[i], v, side=side) for i, v in
                      zip(np.asarray(row).ravel(), np.asarray(x).ravel())]).reshape(x.shape)
            for side in ("left", "right")]
    for unroll in (False, True, 4):
        for g, w in zip(got[unroll], want):
            np.testing.assert_array_equal(g, w)


def test_sparse_benchmark_compares_the_estimate_implementations(tmp_path):
    """``--estimates xla,triton``: the kernel (interpret mode) row reports the same picks as XLA's."""
    import json
    from qwen_jax.bench import sparse as bench_sparse
    out = tmp_path / "est.json"
    assert bench_sparse.main(["--estimate-only", "--estimates", "xla,triton", "--interpret", "--kernels", "triton",
                              "--lengths", "2k", "--inputs", "random", "--heads", "4", "--kv-heads", "1",
                              "--head-dim", "32", "--chunk", "1024", "--dca", "1280,256", "--budgets", "100,300",
                              "--repeats", "1", "--key-blocks", "512", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["estimate"] for r in rows] == ["xla", "triton"]
    assert float(rows[1]["picks equal"]) == 1.0 and float(rows[1]["max score difference"]) < 1e-5


def test_sparse_benchmark_refuses_unknown_kernel_options():
    """``--kernels`` takes mosaic_gpu[:block_k[:stages[:pp|free|c3[:prefetch|noprefetch]]]]; anything else is one
    line."""
    from qwen_jax.bench import sparse as bench_sparse
    for spec in ("mosaic_gpu:96:3:free:later", "mosaic_gpu:96:3:fast", "cutlass"):
        with pytest.raises(SystemExit, match="unknown kernel"):
            bench_sparse.main(["--kernels", spec, "--lengths", "2k"])
    with pytest.raises(SystemExit, match="no interpreter"):                    # parsed, then refused on a CPU
        bench_sparse.main(["--kernels", "mosaic_gpu:96:3:free:noprefetch", "--interpret", "--lengths", "2k"])
    with pytest.raises(SystemExit, match="no interpreter"):
        bench_sparse.main(["--kernels", "mosaic_gpu:96:3:c3", "--interpret", "--lengths", "2k"])
