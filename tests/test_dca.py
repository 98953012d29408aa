"""Dual Chunk Attention against a float64 brute-force reference written from the spec, and in the model."""

import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from conftest import rel_err
from qwen_jax.attention import mha_reference
from qwen_jax.attention.dca import dca_attention, dca_reference, key_positions, yarn_scale
from qwen_jax.config import DCAConfig, QwenConfig
from qwen_jax.rope import Rope

THETA = 10000.0


def np_rope(x, pos, theta=THETA):
    """float64 RoPE, HF rotate_half layout: x [..., T, H], pos [..., T]."""
    H = x.shape[-1]
    inv = theta ** (-np.arange(0, H, 2, dtype=np.float64) / H)
    ang = pos[..., None].astype(np.float64) * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., H // 2:], x[..., :H // 2]], -1)
    return x * cos + rot * sin


def np_dca(q, k, v, C, W, orig, L):
    """Brute force from the spec. q [B, T, N, H] unrotated, k/v [B, T, K, H] unrotated; full causal prefill
    of a request of length L per row. Returns out [B, T, N, H], lse [B, T, N] (float64)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    S = C - W
    p = np.arange(T)
    out, lse = np.zeros(q.shape), np.zeros((B, T, N))
    for b in range(B):
        s = max(1.0, 0.1 * np.log(L[b] / orig) + 1.0)
        for n in range(N):
            kh = n // (N // K)
            keys = np_rope(k[b, :, kh].astype(np.float64), p % S) * s
            q_intra = np_rope(q[b, :, n].astype(np.float64), p % S)
            q_succ = np_rope(q[b, :, n].astype(np.float64), np.minimum(p % S + S, C))
            q_inter = np_rope(q[b, :, n].astype(np.float64), np.full(T, min(2 * S - 1, C)))
            for t in range(T):
                logits = np.full(T, -np.inf)
                for j in range(t + 1):
                    qc, kc = t // S, j // S
                    qr = q_intra[t] if qc == kc else (q_succ[t] if qc - kc == 1 else q_inter[t])
                    logits[j] = qr @ keys[j] * s / np.sqrt(H)
                m = logits.max()
                w = np.exp(logits - m)
                out[b, t, n] = w @ v[b, :, kh] / w.sum()
                lse[b, t, n] = m + np.log(w.sum())
    return out, lse


def rope_for(H):
    return Rope.from_config(QwenConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=1, num_key_value_heads=1, head_dim=H, rope_theta=THETA))


def run_dca(q, k, v, dca, L, impl, **blocks):
    B, T = q.shape[:2]
    rope = rope_for(q.shape[-1])
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    Lj = jnp.asarray(L, jnp.int32)
    kr = rope.apply(jnp.asarray(k), key_positions(pos, dca)) * yarn_scale(Lj, dca)[:, None, None, None]
    fn = dca_attention if impl == "blockwise" else dca_reference
    args = (jnp.asarray(q), kr.swapaxes(1, 2), jnp.asarray(v).swapaxes(1, 2), pos, jnp.full((B,), T, jnp.int32), Lj)
    return fn(*args, dca=dca, rope=rope, **blocks)


CASES = [  # (chunk_size, local_size, T, orig, request-length factor, N, K, block_q, block_k)
    (24, 8, 90, 16, 1.0, 4, 2, 16, 16),     # S=16 divides the blocks; T=90 not a multiple of S: 6 chunks; s>1
    (20, 6, 75, 64, 1.0, 7, 1, 8, 32),      # S=14, G=7, blocks straddle chunk boundaries
    (32, 20, 70, 8, 3.0, 4, 4, 64, 8),      # W > C/2: inter rotation min(2S-1, C) = 23 < C; request longer than T
]


@pytest.mark.parametrize("impl", ["blockwise", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[f"C{c[0]}W{c[1]}T{c[2]}" for c in CASES])
def test_dca_matches_float64_bruteforce(case, impl):
    C, W, T, orig, factor, N, K, bq, bk = case
    rng = np.random.default_rng(C * T)
    B, H = 2, 32
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, T, K, H)).astype(np.float32)
    v = rng.normal(size=(B, T, K, H)).astype(np.float32)
    L = np.array([int(T * factor), int(T * factor) + 37])
    dca = DCAConfig(chunk_size=C, local_size=W, original_max_position_embeddings=orig)
    assert -(-T // dca.chunk_len) >= 5  # T spans five or more DCA chunks
    assert float(yarn_scale(jnp.asarray(L), dca)[0]) > 1.0
    blocks = dict(block_q=bq, block_k=bk) if impl == "blockwise" else {}
    out, lse = run_dca(q, k, v, dca, L, impl, **blocks)
    ref_out, ref_lse = np_dca(q, k, v, C, W, orig, L)
    assert rel_err(out, ref_out) <= 1e-5 and rel_err(lse, ref_lse) <= 1e-5


@pytest.mark.parametrize("T", [1, 13, 48])
def test_dca_equals_plain_rope_within_one_chunk(T):
    """For T <= chunk_size - local_size, DCA is exactly plain RoPE attention."""
    rng = np.random.default_rng(T)
    B, N, K, H = 2, 6, 2, 16
    dca = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=64)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, T, K, H)).astype(np.float32)
    v = rng.normal(size=(B, T, K, H)).astype(np.float32)
    out, lse = run_dca(q, k, v, dca, [T, T], "blockwise", block_q=8, block_k=8)
    rope = rope_for(H)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ref_out, ref_lse = mha_reference(rope.apply(jnp.asarray(q), pos), rope.apply(jnp.asarray(k), pos).swapaxes(1, 2),
                                     jnp.asarray(v).swapaxes(1, 2), pos)
    assert np.max(np.abs(np.asarray(out) - np.asarray(ref_out))) <= 1e-6
    assert np.max(np.abs(np.asarray(lse) - np.asarray(ref_lse))) <= 1e-6


# ----------------------------------------------------------------------------- in the model

DCA_BLOCK = {"chunk_size": 48, "local_size": 16, "original_max_position_embeddings": 4096}  # S = 32


@pytest.fixture(scope="module")
def dca_model(tiny_checkpoint):
    return qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=DCA_BLOCK,
                         attn_implementation=qwen_jax.attention.AttentionSpec(block_q=16, block_k=16))


def test_load_override_switches_dca_on(dca_model, tiny_checkpoint):
    assert dca_model.config.dual_chunk_attention_config.chunk_len == 32
    plain = qwen_jax.load(tiny_checkpoint[0], dtype="float32")
    tokens = np.random.default_rng(0).integers(0, 1000, (1, 150))
    short = tokens[:, :32]
    np.testing.assert_allclose(dca_model.logits(short), plain.logits(short), atol=1e-5 * np.abs(plain.logits(short)).max())
    assert rel_err(dca_model.logits(tokens), plain.logits(tokens)) > 1e-3  # beyond one chunk DCA differs


def test_dca_model_matches_dense_dca_reference_path(dca_model):
    tokens = np.random.default_rng(1).integers(0, 1000, (2, 170))
    dense = qwen_jax.Model(dca_model.config, dca_model.params, attn_implementation="reference")
    assert rel_err(dca_model.logits(tokens), dense.logits(tokens)) <= 1e-5


@pytest.mark.parametrize("chunk", [8, 32, 20, 45])  # divide S=32, equal it, and do not divide it
def test_chunked_prefill_equals_one_shot_with_dca(dca_model, chunk):
    """Also with s > 1: every chunk uses the whole request's length for the scale, as Qwen's code does."""
    tokens = np.random.default_rng(chunk).integers(0, 1000, (2, 150))
    dca = dca_model.config.dual_chunk_attention_config
    cfg = dca_model.config.replace(dual_chunk_attention_config=dca.__class__(
        chunk_size=dca.chunk_size, local_size=dca.local_size, original_max_position_embeddings=16))
    assert float(yarn_scale(jnp.asarray([150]), cfg.dual_chunk_attention_config)[0]) > 1.2
    params = dca_model.params
    one_shot = qwen_jax.prefill_logits(params, tokens, cfg, chunk_size=150, spec=dca_model.attention)
    chunked = qwen_jax.prefill_logits(params, tokens, cfg, chunk_size=chunk, spec=dca_model.attention)
    assert rel_err(chunked, one_shot) <= 1e-5


def test_decode_after_prefill_equals_full_forward_across_chunk_boundaries(dca_model):
    cfg, params = dca_model.config, dca_model.params
    tokens = np.random.default_rng(5).integers(0, 1000, (2, 140))
    full = dca_model.logits(tokens)  # request length 140 < original 4096: s = 1 for every length here
    lengths = np.array([50, 61])     # decoding from 50 and 61 crosses the boundaries at 64, 96 and 128
    cache = qwen_jax.init_cache(cfg, 2, 256, jnp.float32)
    padded = np.where(np.arange(140)[None] < lengths[:, None], tokens, 0)
    last, cache = qwen_jax.prefill(params, padded, lengths, cache, cfg, chunk_size=24, spec=dca_model.attention)
    assert rel_err(last, full[[0, 1], lengths - 1]) <= 1e-5
    positions = jnp.asarray(lengths, jnp.int32)
    for step in range(140 - 61):
        logits, cache = qwen_jax.decode_step(params, jnp.asarray(tokens[[0, 1], lengths + step], jnp.int32), positions,
                                             cache, cfg, spec=dca_model.attention)
        assert rel_err(logits, full[[0, 1], lengths + step]) <= 1e-5, step
        positions = positions + 1


@pytest.mark.parametrize("chunk_size, local_size", [(48, 48), (48, 60), (48, -16), (48.0, 16)])
def test_a_dca_config_built_in_code_refuses_local_size_outside_zero_to_chunk_size(chunk_size, local_size):
    """config.json's block was checked, a ``DCAConfig`` built in code was not: local_size == chunk_size failed at the
    first attention call (a ValueError about chunk_len), and a negative local_size ran with chunks longer than
    chunk_size (successive and inter queries rotated by less than their chunk's keys: wrong logits, no error)."""
    from qwen_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="DCAConfig needs integers 0 <= local_size < chunk_size"):
        DCAConfig(chunk_size=chunk_size, local_size=local_size)
    assert DCAConfig(chunk_size=48, local_size=0).chunk_len == 48
