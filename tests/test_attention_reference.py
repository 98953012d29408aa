"""The dense reference attention against a float64 numpy implementation written from the definition."""

import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.attention import mha_reference


def numpy_attention(q, k, v, q_pos, k_pos, kv_len, causal):
    B, T, N, H = q.shape
    K = k.shape[1]
    out = np.zeros((B, T, N, H))
    lse = np.full((B, T, N), -np.inf)
    for b in range(B):
        for n in range(N):
            kh = n // (N // K)
            logits = q[b, :, n].astype(np.float64) @ k[b, kh].astype(np.float64).T / np.sqrt(H)
            for t in range(T):
                ok = np.arange(k.shape[2]) < kv_len[b]
                if causal:
                    ok &= k_pos[b] <= q_pos[b, t]
                if ok.any():
                    row = logits[t, ok]
                    m = row.max()
                    p = np.exp(row - m)
                    out[b, t, n] = p @ v[b, kh, ok] / p.sum()
                    lse[b, t, n] = m + np.log(p.sum())
    return out, lse


@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_float64_numpy(G, causal):
    rng = np.random.default_rng(G + 10 * causal)
    B, T, S, K, H = 2, 9, 21, 2, 16
    q = rng.normal(size=(B, T, K * G, H)).astype(np.float32)
    k = rng.normal(size=(B, K, S, H)).astype(np.float32)
    v = rng.normal(size=(B, K, S, H)).astype(np.float32)
    q_pos = np.stack([np.arange(T) + 5, np.arange(T) - 3])  # a chunk at an offset; row 1 starts before any key
    k_pos = np.stack([np.arange(S), np.arange(S)])
    kv_len = np.array([21, 13])
    out, lse = mha_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(q_pos), jnp.asarray(kv_len),
                             causal=causal)
    ref_out, ref_lse = numpy_attention(q, k, v, q_pos, k_pos, kv_len, causal)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-6, rtol=1e-5)
    assert np.array_equal(np.isinf(np.asarray(lse)), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], ref_lse[finite], atol=2e-6, rtol=1e-6)
    if causal:
        assert np.isinf(ref_lse[1, :3]).all() and (np.asarray(out)[1, :3] == 0).all()  # rows that see no key


def test_lse_merge_of_disjoint_key_sets_equals_one_softmax():
    """merge_partials: the exact log-sum-exp merge used to combine partial attentions (an empty one included)."""
    from qwen_jax.attention import merge_partials
    rng = np.random.default_rng(3)
    B, T, N, K, H, S = 2, 7, 4, 2, 16, 30
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    pos = jnp.full((B, T), S, jnp.int32)
    full = mha_reference(q, k, v, pos)
    cuts = [(0, 11), (11, 11), (11, 30)]  # the middle partial sees nothing
    parts = [mha_reference(q, k[:, :, a:b] if b > a else k[:, :, :1], v[:, :, a:b] if b > a else v[:, :, :1], pos,
                           jnp.full((B,), b - a, jnp.int32)) for a, b in cuts]
    assert np.isinf(np.asarray(parts[1][1])).all()
    out, lse = merge_partials(parts)
    np.testing.assert_allclose(np.asarray(out), np.asarray(full[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(full[1]), atol=1e-6)


@pytest.mark.parametrize("dca", [False, True])
def test_the_default_cpu_attention_differentiates_to_the_reference_gradient(dca):
    """``jax.grad`` through the default CPU attention (blockwise: a key loop with traced bounds) failed with JAX's
    "Reverse-mode differentiation does not work for lax.while_loop"; its gradient is now the reference twin's, with
    several query and key blocks, and through DCA's three phases."""
    import jax

    import qwen_jax
    from conftest import hf_config
    from qwen_jax.attention import AttentionSpec
    from qwen_jax.config import DCAConfig, QwenConfig
    config = QwenConfig.from_hf_dict(hf_config().to_dict())
    if dca:
        config = config.replace(dual_chunk_attention_config=DCAConfig(chunk_size=16, local_size=4,
                                                                      original_max_position_embeddings=8))
    params = qwen_jax.init_params(config, jax.random.key(3), jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(20).integers(0, 1000, (2, 40)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))

    def loss(params, spec):
        logits, _ = qwen_jax.forward(params, tokens, positions, qwen_jax.init_cache(config, 2, 64, jnp.float32), config,
                                     spec=spec)
        return jax.nn.log_softmax(logits).mean()

    blockwise = AttentionSpec(impl="blockwise", block_q=8, block_k=16)   # the CPU's default, named for any platform
    assert AttentionSpec().resolved().impl == "blockwise" or jax.default_backend() != "cpu"
    got, want = (jax.grad(loss)(params, spec) for spec in (blockwise, AttentionSpec(impl="reference")))
    flat_got, flat_want = jax.tree.leaves_with_path(got), jax.tree.leaves(want)
    for (path, a), b in zip(flat_got, flat_want):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(b).max() > 0, path
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max(), err_msg=jax.tree_util.keystr(path))
