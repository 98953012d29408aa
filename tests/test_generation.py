"""Generation mechanics: chunked prefill, batching, sampling, EOS and stop strings, streaming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax.generation import StopChecker, generate_ids
from qwen_jax.sampling import Sampling, sample


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return qwen_jax.load(tiny_checkpoint[0], dtype="float32")


@pytest.mark.parametrize("chunk", [7, 16, 50, 1000])
def test_chunked_prefill_equals_one_shot(model, chunk):
    tokens = np.random.default_rng(chunk).integers(0, 1000, (2, 50))
    one_shot = qwen_jax.prefill_logits(model.params, tokens, model.config, chunk_size=50)
    chunked = qwen_jax.prefill_logits(model.params, tokens, model.config, chunk_size=chunk)
    np.testing.assert_allclose(chunked, one_shot, rtol=0, atol=1e-5 * np.abs(one_shot).max())


def test_a_chunked_prefill_compiles_each_step_once_and_shares_it_across_layers(model):
    """The carried cache and hidden state start where the parameters are, so the first chunk's compiled steps
    serve every later chunk of the same size (before: two more compilations, inside the timed prefill); and
    every decoder layer runs one compiled program (the 7B-1M's sparse 1M chunk, H100: 101 s to compile as one
    28-layer program, 14 s as three)."""
    from qwen_jax import model as model_fns
    from qwen_jax.cache import cache_length, init_cache
    assert model.config.num_hidden_layers > 1
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 1000, (1, 4 * 24)), jnp.int32)   # a size no other test uses
    lengths = jnp.full((1,), tokens.shape[1], jnp.int32)
    before, layers_before = model_fns.prefill_programs(), model_fns._layer_step._cache_size()
    cache = init_cache(model.config, 1, cache_length(tokens.shape[1]), jnp.float32)
    assert not cache.k[0].committed          # as jnp.zeros makes it: placed by prefill
    _, cache = qwen_jax.prefill(model.params, tokens, lengths, cache, model.config, chunk_size=24)
    assert model_fns.prefill_programs() == before + 3           # embedding, one layer program, final rows
    assert model_fns._layer_step._cache_size() == layers_before + 1
    logits = qwen_jax.prefill_logits(model.params, np.asarray(tokens), model.config, chunk_size=24)
    assert model_fns.prefill_programs() == before + 4           # the all-logits variant: only its final step
    assert np.isfinite(logits).all()


def test_prefill_then_decode_equals_full_forward(model):
    """Decode logits after a (chunked) prefill equal the full-forward logits at each position."""
    tokens = np.random.default_rng(3).integers(0, 1000, (2, 40))
    lengths = np.array([30, 17])
    full = model.logits(tokens)
    cache = qwen_jax.init_cache(model.config, 2, 64, jnp.float32)
    padded = np.where(np.arange(40)[None] < lengths[:, None], tokens, 0)
    last, cache = qwen_jax.prefill(model.params, padded, lengths, cache, model.config, chunk_size=8)
    np.testing.assert_allclose(last, full[[0, 1], lengths - 1], atol=1e-5 * np.abs(full).max())
    positions = jnp.asarray(lengths, jnp.int32)
    for step in range(8):
        step_tokens = jnp.asarray(tokens[[0, 1], lengths + step], jnp.int32)
        logits, cache = qwen_jax.decode_step(model.params, step_tokens, positions, cache, model.config)
        np.testing.assert_allclose(logits, full[[0, 1], lengths + step], atol=1e-5 * np.abs(full).max())
        positions = positions + 1


def test_batch_of_different_lengths_equals_one_by_one(model):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (5, 70, 33)]
    batched = generate_ids(model.params, model.config, prompts, max_new_tokens=12)
    single = [generate_ids(model.params, model.config, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    prompts = [[5, 6, 7, 8]]
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9)
    a = generate_ids(model.params, model.config, prompts, max_new_tokens=16, sampling=s, seed=1)
    b = generate_ids(model.params, model.config, prompts, max_new_tokens=16, sampling=s, seed=1)
    c = generate_ids(model.params, model.config, prompts, max_new_tokens=16, sampling=s, seed=2)
    assert a == b and a != c


def test_greedy_is_argmax_and_top_k_top_p_restrict_support():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 2, (4, 50)), jnp.float32)
    assert np.array_equal(sample(logits, jax.random.key(0), Sampling()), np.argmax(logits, -1))
    keys = jax.random.split(jax.random.key(1), 300)
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    got = np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(1.0, top_k=3)))(keys))
    assert all(set(got[:, r]) <= set(top3[r]) for r in range(4))
    assert any(len(set(got[:, r])) == 3 for r in range(4))  # really samples, not greedy
    probs = np.asarray(jax.nn.softmax(logits / 0.7, -1))
    got = np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(0.7, top_p=0.6)))(keys))
    for r in range(4):
        order = np.argsort(-probs[r])
        nucleus = order[: np.searchsorted(np.cumsum(probs[r][order]), 0.6) + 1]
        assert set(got[:, r]) <= set(nucleus)


def test_invalid_sampling_settings_are_refused():
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(qwen_jax.QwenJaxError):
            Sampling(**bad)


def test_eos_stops_a_row(model):
    prompt = [[11, 12, 13]]
    free = generate_ids(model.params, model.config, prompt, max_new_tokens=10)[0]
    stopped = generate_ids(model.params, model.config, prompt, max_new_tokens=10, eos_ids=[free[3]])[0]
    assert stopped == free[: free.index(free[3])]


def test_stop_strings_cut_and_stream(model):
    out = model.generate("The grass is", max_new_tokens=24)[0]
    assert len(out) > 6
    stop = out[3:6]
    pieces = []
    cut = model.generate("The grass is", max_new_tokens=24, stop=[stop], on_text=lambda r, t: pieces.append(t))[0]
    assert cut == out[: out.index(stop)]
    assert "".join(pieces) == cut


def test_stop_checker_holds_back_partial_stop_strings():
    text = {1: "ab", 2: "abST", 3: "abSTOP!"}
    checker = StopChecker(lambda ids: text[len(ids)], ["STOP"])
    assert checker.push(0) == "ab"
    assert checker.push(0) == ""  # "ST" may begin "STOP"
    assert checker.push(0) == "" and checker.stopped


def test_chat_prompts_use_the_checkpoint_template(model):
    messages = [{"role": "user", "content": "Hello"}]
    rendered = model.tokenizer.apply_chat_template(messages)
    assert rendered.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    ids = model.encode_prompts([messages, "plain"])
    assert ids[0] == model.tokenizer.encode(rendered) and ids[1] == model.tokenizer.encode("plain")
