"""Generation mechanics: chunked prefill, batching, sampling, EOS and stop strings, streaming."""

import functools
import re

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
    assert cache.k[0].committed and cache.k[0].devices() == {jax.devices()[0]}   # where the parameters are
    _, cache = qwen_jax.prefill(model.params, tokens, lengths, cache, model.config, chunk_size=24)
    assert model_fns.prefill_programs() == before + 3           # embedding, one layer program, final rows
    assert model_fns._layer_step._cache_size() == layers_before + 1
    logits = qwen_jax.prefill_logits(model.params, np.asarray(tokens), model.config, chunk_size=24)
    assert model_fns.prefill_programs() == before + 4           # the all-logits variant: only its final step
    assert np.isfinite(logits).all()


def test_a_cache_made_on_another_device_than_the_parameters_is_moved_to_them(model):
    """``init_cache`` commits its buffers to JAX's default device (one program makes them all); parameters
    committed elsewhere take the cache there (prefill's ``placed_like``) and give the same logits."""
    from qwen_jax.cache import init_cache
    other = (jax.devices() + jax.devices("cpu"))[1]            # a one-GPU host: a CPU device
    with jax.default_device(other):
        cache = init_cache(model.config, 1, 128, jnp.float32)
    assert {x.devices().pop() for x in cache.k + cache.v} == {other} and all(x.committed for x in cache.k)
    assert not np.asarray(cache.k[0]).any()
    tokens = np.random.default_rng(11).integers(0, 1000, (1, 30))
    lengths = jnp.full((1,), 30, jnp.int32)
    here, _ = qwen_jax.prefill(model.params, tokens, lengths, init_cache(model.config, 1, 128, jnp.float32),
                               model.config)
    params = jax.device_put(model.params, other)
    there, cache = qwen_jax.prefill(params, tokens, lengths, init_cache(model.config, 1, 128, jnp.float32),
                                    model.config)
    assert there.devices() == {other} and cache.k[-1].devices() == {other}
    np.testing.assert_allclose(np.asarray(there), np.asarray(here), rtol=0, atol=1e-6 * np.abs(here).max())


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


def test_a_position_outside_the_cache_gives_nan_logits_not_a_write_clamped_into_it(model):
    """Decoding past the cache's last slot (or before its first) wrote the keys at the last slot (the write's
    ``dynamic_update_slice`` clamps), over the row's real keys, and returned finite logits: now that row's logits
    are NaN, the other rows' are untouched, and a forward of more tokens than slots is refused in one line."""
    cfg = model.config
    tokens = jnp.asarray(np.random.default_rng(15).integers(0, 1000, (2, 8)), jnp.int32)
    cache = qwen_jax.init_cache(cfg, 2, 32, jnp.float32)     # (32: the GPU kernels' smallest key block)
    _, cache = qwen_jax.prefill(model.params, tokens, np.array([8, 5]), cache, cfg)
    logits, cache = qwen_jax.decode_step(model.params, tokens[:, 0], jnp.asarray([32, 5], jnp.int32), cache, cfg)
    logits = np.asarray(logits)
    assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all()
    logits, _ = qwen_jax.forward(model.params, tokens[:, :3], jnp.asarray([[-1, 0, 1], [2, 3, 4]], jnp.int32), cache,
                                 cfg)
    assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1])).all()
    with pytest.raises(qwen_jax.QwenJaxError, match="^40 tokens do not fit a KV cache of 32 slots"):
        qwen_jax.forward(model.params, jnp.zeros((1, 40), jnp.int32), jnp.arange(40, dtype=jnp.int32)[None],
                         qwen_jax.init_cache(cfg, 1, 32, jnp.float32), cfg)


@pytest.mark.parametrize("bad", [1024, 5000, -1, -1024, 2**32])
def test_token_ids_outside_the_vocabulary_are_refused_in_one_line(model, bad):
    """An id outside [0, V) gave NaN logits with no error through forward, prefill, prefill_logits and decode_step
    (-1 .. -V even finite ones: the embedding wrapped them to the table's end; 2**32 wrapped to 0 in int32); host ids
    and concrete jax arrays (decode_step: host ids only) are now refused before anything runs."""
    cfg = model.config
    tokens = np.random.default_rng(18).integers(0, 1000, (2, 8))
    tokens[1, 5] = bad
    positions = np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))
    message = rf"^token ids must be in \[0, 1024\) \(the vocabulary\), got {bad}$"
    for ids in (tokens, jnp.asarray(tokens) if bad != 2**32 else tokens.tolist()):
        with pytest.raises(qwen_jax.QwenJaxError, match=message):
            qwen_jax.forward(model.params, ids, positions, qwen_jax.init_cache(cfg, 2, 32, jnp.float32), cfg)
        with pytest.raises(qwen_jax.QwenJaxError, match=message):
            qwen_jax.prefill(model.params, ids, np.array([8, 8]), qwen_jax.init_cache(cfg, 2, 32, jnp.float32), cfg)
        with pytest.raises(qwen_jax.QwenJaxError, match=message):
            qwen_jax.model.prefill_logits(model.params, ids, cfg)
    with pytest.raises(qwen_jax.QwenJaxError, match=message):
        qwen_jax.decode_step(model.params, tokens[:, 5] if bad != 2**32 else [0, bad], np.array([0, 0]),
                             qwen_jax.init_cache(cfg, 2, 32, jnp.float32), cfg)
    with pytest.raises(qwen_jax.QwenJaxError, match=message):
        model.logits(tokens)


@pytest.mark.parametrize("bad", [1024, -1])
def test_traced_token_ids_outside_the_vocabulary_give_nan_logits_in_their_row(model, bad):
    """Inside a caller's ``jax.jit`` the ids cannot be read: the row holding a wrong one gets NaN logits, as README
    says, the other rows are untouched (-1 gave finite logits: the embedding wrapped it to the table's last row)."""
    cfg = model.config
    tokens = np.random.default_rng(19).integers(0, 1000, (2, 8))
    tokens[0, 5] = bad
    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    forward = jax.jit(qwen_jax.forward, static_argnames=("config",))
    logits, _ = forward(model.params, jnp.asarray(tokens), positions, qwen_jax.init_cache(cfg, 2, 32, jnp.float32),
                        config=cfg)
    logits = np.asarray(logits)
    assert np.isnan(logits[0, 5:]).all() and np.isfinite(logits[1]).all()
    prefill = jax.jit(qwen_jax.prefill, static_argnames=("config",))
    last, _ = prefill(model.params, jnp.asarray(tokens), jnp.asarray([8, 8]), qwen_jax.init_cache(cfg, 2, 32, jnp.float32),
                      config=cfg)
    assert np.isnan(np.asarray(last[0])).all() and np.isfinite(np.asarray(last[1])).all()
    decode = jax.jit(qwen_jax.decode_step, static_argnames=("config",))
    step, _ = decode(model.params, jnp.asarray(tokens[:, 5]), jnp.asarray([0, 0]),
                     qwen_jax.init_cache(cfg, 2, 32, jnp.float32), config=cfg)
    assert np.isnan(np.asarray(step[0])).all() and np.isfinite(np.asarray(step[1])).all()
    # a device array given to decode_step is not read either (it would wait for the last step on every call)
    step, _ = qwen_jax.decode_step(model.params, jnp.asarray(tokens[:, 5]), jnp.asarray([0, 0]),
                                   qwen_jax.init_cache(cfg, 2, 32, jnp.float32), cfg)
    assert np.isnan(np.asarray(step[0])).all() and np.isfinite(np.asarray(step[1])).all()


def test_prefill_refuses_lengths_that_end_before_its_tokens(model):
    """A row of length 0 (or less), or one ending before ``start``, has no token among those given: prefill returned
    the logits of a zero hidden state (all zero) for it, with no error. A row longer than the tokens given is a
    prompt prefilled in parts: it runs, and equals the same tokens with the row's length cut to them where DCA's
    scale does not depend on the length."""
    cfg = model.config
    tokens = np.random.default_rng(16).integers(0, 1000, (2, 8))
    for lengths in ([8, 0], [-1, 2]):
        with pytest.raises(qwen_jax.QwenJaxError, match=rf"^prompt lengths must be at least 1 \(each row's last token "
                                                        rf"at or after the first of the 8 tokens given\), got \{lengths}"):
            qwen_jax.prefill(model.params, tokens, np.array(lengths), qwen_jax.init_cache(cfg, 2, 16, jnp.float32), cfg)
    with pytest.raises(qwen_jax.QwenJaxError, match=r"prompt lengths must be at least 5 \(.* given, at 4\), got \[12, 4\]"):
        qwen_jax.prefill(model.params, tokens, np.array([12, 4]), qwen_jax.init_cache(cfg, 2, 16, jnp.float32), cfg,
                         start=4)
    with pytest.raises(qwen_jax.QwenJaxError, match=r"lengths must be \[B\] = \[2\]"):
        qwen_jax.prefill(model.params, tokens, np.array([8]), qwen_jax.init_cache(cfg, 2, 16, jnp.float32), cfg)
    logits, _ = qwen_jax.prefill(model.params, tokens, np.array([8, 1]), qwen_jax.init_cache(cfg, 2, 16, jnp.float32),
                                 cfg)
    assert (np.abs(np.asarray(logits)).max(axis=1) > 0).all()      # lengths 8 and 1: both rows real logits
    _, whole = qwen_jax.prefill(model.params, tokens, np.array([8, 8]), qwen_jax.init_cache(cfg, 2, 16, jnp.float32),
                                cfg)
    _, part = qwen_jax.prefill(model.params, tokens, np.array([12, 8]), qwen_jax.init_cache(cfg, 2, 16, jnp.float32),
                               cfg)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(part)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))    # row 0, 12 long, got its first 8 tokens' K/V


def test_a_cache_made_for_another_batch_is_refused_in_one_line(model):
    # it failed deep inside the layer's vmap with an XLA shape error
    cfg = model.config
    tokens = np.random.default_rng(17).integers(0, 1000, (2, 8))
    with pytest.raises(qwen_jax.ConfigError, match=r"^the KV cache holds 1 rows, the tokens 2: make it with "
                                                   r"init_cache\(config, batch=2, ...\)"):
        qwen_jax.prefill(model.params, tokens, np.array([8, 8]), qwen_jax.init_cache(cfg, 1, 16, jnp.float32), cfg)
    with pytest.raises(qwen_jax.ConfigError, match=r"^the KV cache holds 3 rows, the tokens 2"):
        qwen_jax.decode_step(model.params, jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32),
                             qwen_jax.init_cache(cfg, 3, 16, jnp.float32), cfg)


@pytest.mark.parametrize("sparse", [False, True])
def test_prefill_inside_the_callers_jit_equals_prefill_called_directly(model, sparse):
    """``prefill`` traced inside a caller's ``jax.jit`` (config, chunk size and spec static, cache donated) gives
    what it gives called directly: it asked the traced parameters where they were placed (``committed``: a
    ConcretizationTypeError), and sparse prefill read the traced lengths as numpy."""
    from qwen_jax.config import DCAConfig
    config = model.config
    if sparse:
        config = config.replace(dual_chunk_attention_config=DCAConfig(
            chunk_size=96, local_size=32, sparse_attention_enabled=True, sparse_attention_threshold=100))
    tokens = jnp.asarray(np.random.default_rng(14).integers(0, 1000, (2, 192)), jnp.int32)
    lengths = jnp.asarray([192, 70], jnp.int32)            # (sparse: one row over the threshold, one under)
    want, _ = qwen_jax.prefill(model.params, tokens, lengths, qwen_jax.init_cache(config, 2, 256, jnp.float32), config,
                               chunk_size=64)
    jitted = jax.jit(qwen_jax.prefill, static_argnames=("config", "chunk_size"), donate_argnames=("cache",))
    got, cache = jitted(model.params, tokens, lengths, qwen_jax.init_cache(config, 2, 256, jnp.float32), config=config,
                        chunk_size=64)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6 * np.abs(np.asarray(want)).max())
    assert cache.max_len == 256


def test_a_program_with_jax_enable_x64_prefills_and_decodes_as_one_without(model):
    """With 64-bit ints on (``jax_enable_x64``, as a caller's float64 oracle turns it on), every cache write failed:
    its slot index mixed the int32 positions with int64 literals (``lax.concatenate requires arguments to have the same
    dtypes``), so not even ``init_params`` ran."""
    cfg = model.config
    tokens = np.random.default_rng(17).integers(0, 1000, (2, 40))

    def run():
        params = qwen_jax.init_params(cfg, jax.random.key(0), jnp.float32)
        cache = qwen_jax.init_cache(cfg, 2, 64, jnp.float32)
        last, cache = qwen_jax.prefill(model.params, tokens, np.array([40, 21]), cache, cfg, chunk_size=16)
        step, _ = qwen_jax.decode_step(model.params, jnp.asarray(tokens[:, 0]), jnp.asarray([40, 21]), cache, cfg)
        return params, np.asarray(last), np.asarray(step)

    want = run()
    with jax.enable_x64(True):
        got = run()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
    for bad in (dict(temperature=-1), dict(temperature=1e-39), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                dict(repetition_penalty=0.0), dict(repetition_penalty=1e-39)):
        with pytest.raises(qwen_jax.QwenJaxError):
            Sampling(**bad)


def test_a_tiny_temperature_samples_the_largest_logit_and_splits_its_ties():
    """Logits divided by 1e-37 overflowed to +inf (both of 39 and 40: the first id won every draw); now the largest
    is moved to 0 first, so the draws go to it, and equal largest logits share them."""
    keys = jax.random.split(jax.random.key(3), 400)
    for temperature in (1e-37, 1e-30, 1e-6):
        for logits, allowed in (([39.0, 40.0, -5.0], {1}), ([9.0, 10.0, 10.0, -5.0], {1, 2})):
            draw = functools.partial(sample, jnp.asarray([logits]), sampling=Sampling(temperature))
            got = np.asarray(jax.vmap(lambda k, draw=draw: draw(key=k))(keys))[:, 0]
            assert set(got.tolist()) == allowed, (temperature, logits, np.bincount(got))
    # moving the largest to 0 does not change what an ordinary temperature draws
    logits = jnp.asarray(np.random.default_rng(4).normal(0, 3, (3, 40)), jnp.float32)
    drawn = jax.vmap(lambda k: sample(logits, k, Sampling(0.7, top_k=10, top_p=0.9)))(keys)
    moved = jax.vmap(lambda k: sample(logits + 100.0, k, Sampling(0.7, top_k=10, top_p=0.9)))(keys)
    assert np.array_equal(drawn, moved)


def test_a_rows_samples_do_not_depend_on_the_other_prompts(model):
    """Each row draws with its own key (the seed and its number): row 1 samples the same tokens whatever row 0
    holds; the same prompt as rows 0 and 1 samples two continuations."""
    s = Sampling(temperature=1.0, top_k=50)
    b = [21, 22, 23, 24, 25]
    one = generate_ids(model.params, model.config, [[5, 6, 7], b], max_new_tokens=12, sampling=s, seed=3)
    other = generate_ids(model.params, model.config, [[9] * 40, b], max_new_tokens=12, sampling=s, seed=3)
    assert one[1] == other[1]
    same = generate_ids(model.params, model.config, [b, b], max_new_tokens=12, sampling=s, seed=3)
    assert same[1] == one[1] and same[0] != same[1]


def test_token_ids_stop_strings_and_progress_are_checked_before_anything_runs(model):
    V = model.config.vocab_size
    for prompts, message in (([[5, V]], rf"prompt 0: token ids must be in \[0, {V}\)"),
                             ([[1], [-1]], "prompt 1: token ids must be in"), ([[1, 2**40]], "token ids must be in"),
                             ([[1.5]], "prompt 0 must be a non-empty list of token ids"),
                             ([[]], "every prompt must have at least one token")):
        with pytest.raises(qwen_jax.QwenJaxError, match=message):
            generate_ids(model.params, model.config, prompts, max_new_tokens=2)
    with pytest.raises(qwen_jax.QwenJaxError, match="pass decode="):
        generate_ids(model.params, model.config, [[1, 2]], max_new_tokens=2, stop=["x"])
    with pytest.raises(qwen_jax.QwenJaxError, match="progress must be a function"):
        generate_ids(model.params, model.config, [[1, 2]], max_new_tokens=2, progress=5)


def test_eos_stops_a_row(model):
    prompt = [[11, 12, 13]]
    free = generate_ids(model.params, model.config, prompt, max_new_tokens=10)[0]
    stopped = generate_ids(model.params, model.config, prompt, max_new_tokens=10, eos_ids=[free[3]])[0]
    assert stopped == free[: free.index(free[3])]


def _expected_events(block: int, max_new_tokens: int, last_read: int) -> list[str]:
    """``generate``'s dispatches ("step": a block of decode steps) and reads up to the one holding token
    ``last_read``: the prefill's token is read alone, then each block's; a block goes out before the read
    before it, while tokens remain to sample."""
    events, fed, read = [], 1, -1
    while read < last_read:
        if fed < max_new_tokens:
            events.append("step")
            fed += block
        events.append("read")
        read = 0 if read < 0 else read + block
    return events


def test_each_block_is_dispatched_before_the_previous_tokens_are_read(model, monkeypatch):
    from qwen_jax import generation
    monkeypatch.setattr(generation, "DECODE_BLOCK", 2)
    events, real_step, real_host = [], generation.decode_block, generation.to_host
    monkeypatch.setattr(generation, "decode_block", lambda *a, **k: events.append("step") or real_step(*a, **k))
    monkeypatch.setattr(generation, "to_host", lambda x: events.append("read") or real_host(x))
    prompt = [[11, 12, 13]]
    sampled = dict(sampling=Sampling(temperature=1.0), seed=3)      # varied tokens (greedy repeats one here)
    free = generate_ids(model.params, model.config, prompt, max_new_tokens=6, **sampled)[0]
    # 6 tokens: the first from the prefill, then blocks of 2 (the third block's second token is dropped)
    assert events == ["step", "read"] * 3 + ["read"] == _expected_events(2, 6, 5) and len(free) == 6
    for k in range(1, 5):
        events.clear()
        if free[k] in free[:k]:
            continue
        stopped = generate_ids(model.params, model.config, prompt, max_new_tokens=6, eos_ids=[free[k]], **sampled)[0]
        assert stopped == free[:k]      # token k is the EOS: what was computed past it is dropped
        assert events == _expected_events(2, 6, k)


@pytest.mark.parametrize("block", [1, 3, 8])
def test_blocks_of_decode_steps_sample_as_one_step_per_program(model, monkeypatch, block):
    """``generate``'s blocks of steps give the tokens of the one-step loop: token 0 sampled from the prefill's
    logits with each row's key (``row_keys``: ``fold_in(key(seed), row)``) folded with 0, token j fed back at position
    ``length + j`` and token j + 1 sampled with the row keys folded with j + 1; with a temperature, top-k and a repetition penalty, rows of different lengths, and
    a last block running past ``max_new_tokens`` and past the cache's slots."""
    from qwen_jax import generation
    from qwen_jax.cache import cache_length
    from qwen_jax.generation import decode_and_sample, prompt_seen, right_padded
    monkeypatch.setattr(generation, "DECODE_BLOCK", block)
    rng = np.random.default_rng(12)
    # the cache: 256 slots, and the longer row's last token asked for is fed back at slot 254; blocks of 3 feed
    # tokens up to position 256
    prompts = [rng.integers(0, 1000, n).tolist() for n in (100, 128)]
    sampling, seed, n = Sampling(temperature=0.9, top_k=50, repetition_penalty=1.3), 7, 128
    got = generate_ids(model.params, model.config, prompts, max_new_tokens=n, sampling=sampling, seed=seed)

    tokens, lengths = right_padded(prompts, model.config)
    cache = qwen_jax.init_cache(model.config, 2, cache_length(tokens.shape[1], n), jnp.float32)
    assert cache.max_len == 256
    seen = prompt_seen(tokens, lengths, model.config, model.attention)
    logits, cache = qwen_jax.prefill(model.params, tokens, lengths, cache, model.config)
    key = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(2, dtype=jnp.uint32))
    step_key = jax.vmap(jax.random.fold_in, (0, None))
    current = generation._first_sample(logits, step_key(key, 0), sampling, seen)
    want = [np.asarray(current)]
    for j in range(n - 1):
        current, cache, seen = decode_and_sample(model.params, current, jnp.asarray(lengths + j), cache,
                                                 step_key(key, j + 1), model.config, model.attention,
                                                 sampling, seen)
        want.append(np.asarray(current))
    assert got == np.stack(want, 1).tolist()


def test_stop_strings_cut_and_stream(model):
    out = model.generate("The grass is", max_new_tokens=24)[0]
    assert len(out) > 6
    stop = out[3:6]
    pieces = []
    cut = model.generate("The grass is", max_new_tokens=24, stop=[stop], on_text=lambda r, t: pieces.append((r, t)))[0]
    assert cut == out[: out.index(stop)]
    assert "".join(t for _, t in pieces) == cut
    assert all(type(r) is int and r == 0 for r, _ in pieces)       # a plain int (it was numpy's while decoding)


def test_a_stop_string_that_is_a_special_token_stops_at_that_token(model):
    """Decoded text skips special tokens, so ``stop=["<|im_start|>"]`` never matched and the row ran on past the token;
    now the token stops the row as EOS does. A stop string holding a special token among other text is refused."""
    from qwen_jax.api import Model
    start = model.tokenizer.special_tokens["<|im_start|>"]
    prompt = model.encode_prompts("The grass is")
    plain = generate_ids(model.params, model.config, prompt, max_new_tokens=12, eos_ids=model.eos_token_ids)[0]
    t = next(x for i, x in enumerate(plain) if i >= 2 and x not in plain[:i])     # a token first chosen later on
    assert t != start and len(plain) == 12
    # <|im_start|> made token t's twin: t's embedding, and t's output row times 1.05, so the special token is chosen
    # where t's (positive) logit won and the row then goes on as after t
    head = model.params["lm_head"]
    axis = [d for d, n in enumerate(head["kernel"].shape) if n == model.config.vocab_size][0]
    kernel, embedding = np.array(head["kernel"]), np.array(model.params["embed"]["embedding"])
    np.moveaxis(kernel, axis, 0)[start] = 1.05 * np.moveaxis(kernel, axis, 0)[t]
    embedding[start] = embedding[t]
    params = {**model.params, "lm_head": {**head, "kernel": jnp.asarray(kernel)},
              "embed": {**model.params["embed"], "embedding": jnp.asarray(embedding)}}
    biased = Model(model.config, params, model.tokenizer, eos_token_ids=model.eos_token_ids)
    ids = generate_ids(params, model.config, prompt, max_new_tokens=12, eos_ids=model.eos_token_ids)[0]
    assert start in ids and 2 <= ids.index(start) < len(ids) - 1          # the row goes on past the token
    want = model.tokenizer.decode(ids[:ids.index(start)])
    assert want
    assert model.tokenizer.decode(ids) != want                           # so stopping there is seen
    pieces = []
    got = biased.generate("The grass is", max_new_tokens=12, stop=["<|im_start|>"],
                          on_text=lambda r, text: pieces.append(text))
    assert got == [want] and "".join(pieces) == want
    with pytest.raises(qwen_jax.QwenJaxError, match=re.escape("holds the special token '<|im_start|>'")):
        model.generate("The grass is", max_new_tokens=2, stop=["\n<|im_start|>"])


def _byte_decoder(pieces):
    """A byte-level decoder as Qwen's: token i is the bytes pieces[i]; a list decodes to its bytes as UTF-8."""
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_stop_checker_holds_back_partial_stop_strings():
    checker = StopChecker(_byte_decoder([b"ab", b"ST", b"OP!"]), ["STOP"])
    assert checker.push(0) == "ab"
    assert checker.push(1) == ""  # "ST" may begin "STOP"
    assert checker.push(2) == "" and checker.stopped


class _WholeRowStopChecker:
    """The spec: the row's whole text decoded at every token, cut at the first stop string (streamed as far as
    `streamable_end` allows, which StopChecker shares)."""

    def __init__(self, decode, stop):
        self.decode, self.stop, self.tokens, self.emitted, self.stopped = decode, [s for s in stop if s], [], 0, False

    def push(self, token):
        from qwen_jax.generation import streamable_end, truncate_at_stop
        self.tokens.append(token)
        text, found = truncate_at_stop(self.decode(self.tokens), self.stop)
        self.stopped = self.stopped or found
        safe = len(text) if self.stopped else streamable_end(text, self.stop)
        delta = text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return delta


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_stop_checker_text_grows_as_the_whole_row_decodes(seed, strip):
    # pieces: ASCII, multi-byte characters whole and split over tokens, lone invalid bytes, empty tokens
    rng = np.random.default_rng(seed)
    chars = ["a", "b", "S", "T", "O", "P", " ", "\n", "é", "中", "🙂", "\ufffd"]
    pieces = [c.encode() for c in chars] + [c.encode()[:k] for c in ("é", "中", "🙂") for k in (1, 2)]
    pieces += [c.encode()[k:] for c in ("é", "中", "🙂") for k in (1, 2)] + [b"\xff", b"\x80", b"", b"STO", b"OP"]
    decode = _byte_decoder(pieces)
    if strip:       # a SentencePiece-like decoder drops the text's leading space: the window needs its context
        decode = (lambda whole: lambda ids: whole(ids).removeprefix(" "))(decode)
    stop = [["STOP"], ["中🙂", "\n\n"], []][seed % 3]
    tokens = rng.integers(0, len(pieces), 400).tolist()
    fast, spec = StopChecker(decode, stop), _WholeRowStopChecker(decode, stop)
    for t in tokens:
        assert fast.push(t) == spec.push(t)
        assert fast.stopped == spec.stopped
        if spec.stopped:
            break
    from qwen_jax.generation import truncate_at_stop
    assert fast.emitted + len(fast.flush()) == len(truncate_at_stop(decode(fast.tokens), stop)[0])


def test_chat_prompts_use_the_checkpoint_template(model):
    messages = [{"role": "user", "content": "Hello"}]
    rendered = model.tokenizer.apply_chat_template(messages)
    assert rendered.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    ids = model.encode_prompts([messages, "plain"])
    assert ids[0] == model.tokenizer.encode(rendered) and ids[1] == model.tokenizer.encode("plain")


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens="3"), "max_new_tokens must be an integer >= 1, got '3'"),
    (dict(max_new_tokens=None), "max_new_tokens must be an integer >= 1, got None"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1, got 2.5"),
    (dict(seed="a"), r"seed must be an integer in \[0, 2\*\*32\), got 'a'"),
    (dict(seed=99999999999999999999), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    (dict(stop=5), "stop must be a string or a list of strings, got 5"),
    (dict(stop=[5]), r"stop must be a string or a list of strings, got \[5\]"),
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
    (dict(temperature="hot"), "temperature must be a finite number, got 'hot'"),
    (dict(temperature=1.0, top_k=2.7), r"top_k must be an integer \(0: off\), got 2.7"),
    (dict(on_text=5), "on_text must be a function"),
])
def test_generate_refuses_bad_arguments_with_one_line(model, kwargs, message):
    kwargs = dict(dict(max_new_tokens=2), **kwargs)
    with pytest.raises(qwen_jax.QwenJaxError, match=message):
        model.generate("hi", **kwargs)


def test_sampling_settings_are_normalised_and_still_hash_alike():
    assert Sampling(1, np.int64(5), 1) == Sampling(1.0, 5, 1.0)
    assert hash(Sampling(1, 5, 1)) == hash(Sampling(1.0, 5, 1.0)) and type(Sampling(1).temperature) is float


@pytest.mark.parametrize("prompts,message", [
    ([[1, 2, 3]], r"prompt 0 is list \[1, 2, 3\]: a prompt is a string or a chat"),
    ([1, 2], "prompt 0 is int 1: a prompt is a string or a chat"),
    ([{"role": "user", "content": 5}], "content a string"),
    ([{"role": "user"}], "expected a dict with 'role' and 'content'"),
])
def test_prompts_that_are_neither_strings_nor_chats_are_refused(model, prompts, message):
    with pytest.raises(qwen_jax.QwenJaxError, match=message) as e:
        model.generate(prompts, max_new_tokens=2)
    assert not isinstance(e.value, qwen_jax.CheckpointError)    # the caller's mistake, not the checkpoint's


def test_logits_refuses_ragged_and_empty_rows(model):
    with pytest.raises(qwen_jax.QwenJaxError, match="rows of equal length"):
        model.logits([[1, 2], [3]])
    with pytest.raises(qwen_jax.QwenJaxError, match="non-empty integer array"):
        model.logits(np.zeros((1, 0), np.int32))


def test_a_cache_larger_than_memory_is_refused_before_it_is_allocated(model):
    with pytest.raises(qwen_jax.QwenJaxError, match=r"max_new_tokens \(10000000000000\) needs a KV cache of .* GiB.*"
                                                     r"more than the .* GiB .*lower max_new_tokens"):
        with pytest.warns(UserWarning, match="max_position_embeddings"):
            generate_ids(model.params, model.config, [[1, 2, 3]], max_new_tokens=10 ** 13)


def test_generating_past_max_position_embeddings_warns_once_and_runs(model):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # within the limit: no warning
        generate_ids(model.params, model.config, [[1, 2, 3]], max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # 3 + 2 tokens fill 4 positions: the last one is never fed back
        generate_ids(model.params, model.config.replace(max_position_embeddings=4), [[1, 2, 3]], max_new_tokens=2)
    short = model.config.replace(max_position_embeddings=3)
    with pytest.warns(UserWarning, match=r"prompt \(3 tokens\) \+ max_new_tokens \(2\) runs the model at 4 positions, "
                                         r"more than its max_position_embeddings \(3\)") as record:
        ids = generate_ids(model.params, short, [[1, 2, 3]], max_new_tokens=2)
    assert len(ids[0]) == 2 and len(record) == 1
    from qwen_jax.config import DCAConfig
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # with DCA, running past it is what the model is set up for
        generate_ids(model.params, short.replace(dual_chunk_attention_config=DCAConfig(chunk_size=64, local_size=16)),
                     [[1, 2, 3]], max_new_tokens=2)


def _tokenizer_with_template(tmp_path, tiny_checkpoint, template):
    import json
    import shutil
    from qwen_jax.tokenizer import Tokenizer
    shutil.copy(f"{tiny_checkpoint[0]}/tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": template}))
    return Tokenizer(str(tmp_path))


def test_a_broken_chat_template_is_named_and_a_refusing_one_says_why(tmp_path, tiny_checkpoint):
    messages = [{"role": "user", "content": "hi"}]
    broken = _tokenizer_with_template(tmp_path, tiny_checkpoint, "{% for m in messages %}{{ m.content + }}{% endfor %}")
    with pytest.raises(qwen_jax.CheckpointError, match=r"tokenizer_config.json: chat_template is not a valid Jinja "
                                                       r"template \(line 1\)"):
        broken.apply_chat_template(messages)
    refusing = _tokenizer_with_template(tmp_path, tiny_checkpoint, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(qwen_jax.QwenJaxError, match="chat_template refused the messages: roles must alternate"):
        refusing.apply_chat_template(messages)


@pytest.mark.parametrize("text", ["inf", "0", "-5", "nan", "0.0001k", "", "abc", "1.5", "4096.5"])
def test_passkey_lengths_below_one_token_or_not_finite_are_refused(text):
    from qwen_jax.passkey import parse_length
    with pytest.raises(qwen_jax.QwenJaxError, match="a number of tokens >= 1"):
        parse_length(text)
    assert (parse_length("32k"), parse_length("1m"), parse_length("5000"), parse_length("1.5k")) == \
        (32768, 1048576, 5000, 1536)


def test_prefill_progress_reports_each_chunk_of_a_long_prompt_only(model):
    prompt = np.random.default_rng(9).integers(0, 1000, 40).tolist()
    seen = []
    ids = generate_ids(model.params, model.config, [prompt], max_new_tokens=2, prefill_chunk_size=16,
                       progress=lambda done, total: seen.append((done, total)))
    T = seen[-1][1]
    assert T >= 40 and [d for d, _ in seen] == [min(e, T) for e in range(16, T + 15, 16)] and {t for _, t in seen} == {T}
    assert ids == generate_ids(model.params, model.config, [prompt], max_new_tokens=2, prefill_chunk_size=16)
    seen.clear()
    generate_ids(model.params, model.config, [prompt], max_new_tokens=2, prefill_chunk_size=4096,
                 progress=lambda done, total: seen.append((done, total)))
    assert seen == []                            # one chunk: nothing to report


def test_passkey_runs_with_the_models_kv_cache_dtype(tiny_checkpoint, monkeypatch):
    """``passkey.evaluate`` prefills into the cache dtype the model was loaded with (it used the parameters')."""
    from qwen_jax import generation, passkey
    fp8 = qwen_jax.load(tiny_checkpoint[0], dtype="float32", kv_cache_dtype="fp8")
    used = []
    real = generation.init_cache
    monkeypatch.setattr(generation, "init_cache", lambda *a, **k: used.append(a[3]) or real(*a, **k))
    results = passkey.evaluate(fp8, [300], [0.5], max_new_tokens=2)
    assert len(results) == 1 and used and all(jnp.dtype(d) == jnp.float8_e4m3fn for d in used)


def test_stream_benchmark_times_both_ways_of_growing_the_text(tiny_checkpoint, tmp_path):
    import json

    from qwen_jax.cli import main
    out = tmp_path / "stream.json"
    assert main(["bench", "stream", "--model", tiny_checkpoint[0], "--tokens", "64,300", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [64, 300]
    assert all(r[k] > 0 for r in rows for k in ("incremental ms/token", "last 64", "whole-row ms/token",
                                                 "whole-row last 64"))


def test_prompt_with_lone_surrogate_is_a_one_line_error(tiny_checkpoint):
    from qwen_jax.errors import QwenJaxError
    from qwen_jax.tokenizer import Tokenizer
    tok = Tokenizer(tiny_checkpoint[0])
    with pytest.raises(QwenJaxError, match="surrogate"):
        tok.encode("hi \udcff")
