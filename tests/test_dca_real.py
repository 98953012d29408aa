"""Real weights with an artificially short DCA chunk: passkeys at 4x the chunk size.

Qwen2.5-Coder-0.5B-Instruct (../shared/real_models) with chunk_size 512 / local_size 64 retrieves the
passkey from a 2048-token prompt at every tested depth; plain attention restricted to the same
512-token window cannot see needles outside it. (A 512-token chunk keeps this under two minutes on
two CPU cores; the GPU run in the README uses the model's trained 32768.)
"""

import pytest

import qwen_jax
from qwen_jax import passkey
from qwen_jax.attention import AttentionSpec

CHUNK, LOCAL, LENGTH = 512, 64, 2048


@pytest.fixture(scope="module")
def results(real_model_path):
    dca = qwen_jax.load(real_model_path, dtype="float32", prefill_chunk_size=1024,
                        dual_chunk_attention_config={"chunk_size": CHUNK, "local_size": LOCAL,
                                                     "original_max_position_embeddings": 32768})
    window = qwen_jax.load(real_model_path, dtype="float32", prefill_chunk_size=1024,
                           attn_implementation=AttentionSpec(window=CHUNK))
    return (passkey.evaluate(dca, [LENGTH], [0.1, 0.5, 0.9], seed=7),
            passkey.evaluate(window, [LENGTH], [0.1, 0.5], seed=7))


def test_dca_retrieves_passkeys_at_four_times_the_chunk(results):
    with_dca, _ = results
    print("\nDCA chunk_size 512, local_size 64:\n" + passkey.table(with_dca))
    assert all(r["tokens"] >= 4 * CHUNK - 16 for r in with_dca)
    assert all(r["found"] for r in with_dca)


def test_plain_attention_in_the_same_window_cannot(results):
    _, windowed = results
    print("\nplain attention, 512-token window:\n" + passkey.table(windowed))
    assert not any(r["found"] for r in windowed)  # both needles lie outside the window
