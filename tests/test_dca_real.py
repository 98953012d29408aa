"""Real weights with an artificially short DCA chunk: passkeys at 4x the chunk size.

Qwen2.5-Coder-0.5B-Instruct (../shared/real_models) with chunk_size 128 / local_size 16 retrieves the
passkey from a 512-token prompt at every tested depth; plain attention restricted to the same
128-token window cannot see needles outside it. (The GPU run in the README uses the model's trained
32768 and 1M-token prompts.)

Both run through ``qwen-jax passkey`` in a process of their own with XLA's default CPU flags: this is
the suite's one test that runs more than it compiles, and conftest's quick-compile flags made it about
3x slower to run (12 -> 36 s a 1024-token prompt on two cores). The prompts were 1024 tokens with chunk
256 / local 32 until session 37 (the same scores: 3/3 and 0/2); half as long, a prefill costs 6.6 s
instead of 15.7 s (the whole file alone: 124 -> ~90 s).
"""

import json

import pytest
from conftest import run_cli_at_xla_defaults

CHUNK, LOCAL, LENGTH = 128, 16, 512
SLACK = 24    # a prompt ends within one filler group (about 20 tokens) of its length


def _passkey(model, out, *args):
    run = run_cli_at_xla_defaults("passkey", "--model", model, "--lengths", LENGTH, "--dtype", "float32",
                                  "--prefill-chunk", LENGTH, "--seed", 7, "--json", out, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)
    return json.loads(out.read_text())["results"]


@pytest.fixture(scope="module")
def results(real_model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dca_real")
    dca = f"chunk_size={CHUNK},local_size={LOCAL},original_max_position_embeddings=32768"
    return (_passkey(real_model_path, folder / "dca.json", "--depths", "0.1,0.5,0.9", "--dca", dca),
            _passkey(real_model_path, folder / "window.json", "--depths", "0.1,0.5", "--window", str(CHUNK)))


def test_dca_retrieves_passkeys_at_four_times_the_chunk(results):
    with_dca, _ = results
    assert len(with_dca) == 3 and all(r["tokens"] >= 4 * CHUNK - SLACK for r in with_dca)
    assert all(r["found"] for r in with_dca), with_dca


def test_plain_attention_in_the_same_window_cannot(results):
    _, windowed = results
    assert len(windowed) == 2 and all(r["tokens"] >= 4 * CHUNK - SLACK for r in windowed)
    assert not any(r["found"] for r in windowed), windowed    # both needles lie outside the window
