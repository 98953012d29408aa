"""Prefix caching: a prefix prefilled once, then continued many times, equals prefilling the whole prompt."""

import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax.generation import generate_ids
from qwen_jax.prefix import PrefixCache, cache_prefix
from qwen_jax.sampling import Sampling
from tests.test_sparse import DCA_TINY, budgets_json

SAMPLED = Sampling(temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.3)


@pytest.fixture(scope="module", params=["plain", "dca"])
def model(request, tiny_checkpoint):
    extra = {"dual_chunk_attention_config": DCA_TINY} if request.param == "dca" else {}   # DCA chunks of 128
    return qwen_jax.load(tiny_checkpoint[0], dtype="float32", prefill_chunk_size=64, **extra)


def _ids(seed, n):
    return np.random.default_rng(seed).integers(0, 1000, n).tolist()


def _run(model, prompts, prefix=None, **kwargs):
    kwargs = {"max_new_tokens": 10, **kwargs}
    return generate_ids(model.params, model.config, prompts, spec=model.attention,
                        prefill_chunk_size=model.prefill_chunk_size, prefix=prefix, **kwargs)


def test_prefill_after_a_prefix_equals_prefilling_the_whole_prompt(model):
    """Logits at the last token and every cache slot of the prompt, for a prefix that ends inside a 64-token
    chunk and inside a DCA chunk, and a continuation that crosses both."""
    prefix, rest = _ids(1, 203), _ids(2, 90)
    whole = np.asarray([prefix + rest])
    lengths = jnp.asarray([293], jnp.int32)
    cache = qwen_jax.init_cache(model.config, 1, 384, jnp.float32)
    ref, ref_cache = qwen_jax.prefill(model.params, whole, lengths, cache, model.config, chunk_size=64)
    cache = qwen_jax.init_cache(model.config, 1, 384, jnp.float32)
    _, cache = qwen_jax.prefill(model.params, np.asarray([prefix]), jnp.asarray([203], jnp.int32), cache,
                                model.config, chunk_size=64)
    got, cache = qwen_jax.prefill(model.params, np.asarray([rest]), lengths, cache, model.config, chunk_size=64,
                                  start=203)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        np.testing.assert_allclose(np.asarray(a)[:, :, :293], np.asarray(b)[:, :, :293], rtol=0,
                                   atol=1e-5 * np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("sampling", [Sampling(), SAMPLED], ids=["greedy", "sampled"])
def test_each_continuation_equals_generating_from_the_whole_prompt(model, sampling):
    """Two continuations in one call, then the first again after the second left its tokens past the prefix:
    each gives the tokens its whole prompt gives in one batch of the whole prompts (sampled: the same seed, so the
    same key for the same row, the penalty counting the prefix)."""
    prefix, rests = _ids(3, 203), [_ids(4, 37), _ids(5, 70)]
    pc = cache_prefix(model.params, model.config, prefix, reserve=128, spec=model.attention, prefill_chunk_size=64)
    got = _run(model, rests, pc, sampling=sampling, seed=7)
    again = _run(model, rests[:1], pc, sampling=sampling, seed=7)
    want = _run(model, [prefix + r for r in rests], sampling=sampling, seed=7)
    assert got == want and again == want[:1]
    if sampling.temperature:
        assert _run(model, rests[:1], pc, sampling=sampling, seed=8) != want[:1]


@pytest.mark.parametrize("P, chunk", [(256, 128), (203, 64)])
def test_sparse_continuation_equals_a_chunked_prefill_whose_chunks_start_where_it_does(tiny_checkpoint, monkeypatch, P,
                                                                                      chunk):
    """Small budgets (the mask really is sparse). A 256-token prefix continued by 160 tokens gives the logits of the
    whole prompt prefilled in 128-token chunks, whose chunks start there too; a 203-token prefix is continued from
    slot 192 (its last 11 tokens again, then the prompt), as the whole prompt's 64-token chunks are."""
    cfg = dict(DCA_TINY, sparse_attention_enabled=True, sparse_attention_threshold=0,
               sparse_attention_config=budgets_json(2, 4, 30, 50))
    model = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=cfg,
                          prefill_chunk_size=chunk)
    dense = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=DCA_TINY)
    prefix, rest = _ids(6, P), _ids(7, 160)
    whole = np.asarray([prefix + rest])
    start = P - P % 64
    pc = model.cache_prefix(prefix, reserve=256)
    got, _ = qwen_jax.prefill(model.params, np.asarray([prefix[start:] + rest]), jnp.asarray([P + 160], jnp.int32),
                              pc.cache, model.config, chunk_size=chunk, spec=model.attention, start=start)
    ref = model.logits(whole)[:, -1]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert np.abs(dense.logits(whole)[:, -1] - ref).max() > 1e-3
    from qwen_jax import generation
    calls, prefill = [], generation.prefill
    monkeypatch.setattr(generation, "prefill", lambda *a, **kw: calls.append((a[1], kw["start"])) or prefill(*a, **kw))
    pc = model.cache_prefix(prefix, reserve=256)
    assert _run(model, [rest], pc) == _run(model, [prefix + rest])
    (tokens, begin), _ = calls                    # the continuation's prefill, then the whole prompt's
    assert begin == start and tokens[0, :P - start + 160].tolist() == prefix[start:] + rest


def test_model_generate_after_a_prefix_streams_each_prompt_as_its_row(tiny_checkpoint):
    model = qwen_jax.load(tiny_checkpoint[0], dtype="float32")
    pc = model.cache_prefix("The quick brown fox jumps over the lazy dog. " * 20, reserve=256)
    assert isinstance(pc, PrefixCache) and pc.room >= 256 and "tokens" in repr(pc)
    ids = [model.tokenizer.encode(p) for p in ("Once upon", "a time")]
    out = model.generate(["Once upon", "a time"], prefix=pc, max_new_tokens=8)
    assert out == [model.tokenizer.decode(r) for r in _run(model, ids, pc, max_new_tokens=8,
                                                           eos_ids=model.eos_token_ids)]
    # the tiny model's ids past its tokenizer's 400 decode to nothing: letters stand in for text
    heard, letters = {}, (lambda tokens: "".join(chr(97 + t % 26) for t in tokens))
    rows = _run(model, ids, pc, max_new_tokens=8, decode=letters,
                on_text=lambda row, text: heard.__setitem__(row, heard.get(row, "") + text))
    assert heard == {row: letters(tokens) for row, tokens in enumerate(rows)} and len(heard) == 2
    assert repr(model).startswith("Model(") and "layers" in repr(model)


def test_a_refused_or_failed_continuation_leaves_the_prefix_usable(model, tiny_checkpoint):
    prefix, rest = _ids(8, 150), _ids(9, 20)
    pc = cache_prefix(model.params, model.config, prefix, reserve=64, spec=model.attention, prefill_chunk_size=64)
    want = _run(model, [prefix + rest])
    with pytest.raises(qwen_jax.QwenJaxError, match=r"room for \d+ slots .* reserve=\d+ or more"):
        _run(model, [rest], pc, max_new_tokens=200)

    def boom(row, text):
        raise RuntimeError("callback failed")
    with pytest.raises(RuntimeError):
        _run(model, [rest], pc, decode=lambda ids: "x" * len(ids), on_text=boom)
    assert _run(model, [rest], pc) == want
    other = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config={"chunk_size": 96,
                                                                                          "local_size": 32})
    with pytest.raises(qwen_jax.QwenJaxError, match="another configuration"):
        generate_ids(other.params, other.config, [rest], max_new_tokens=4, prefix=pc)
    with pytest.raises(qwen_jax.QwenJaxError, match="prefix must be a PrefixCache"):
        _run(model, [rest], prefix=prefix)
    with pytest.raises(qwen_jax.QwenJaxError, match=r"token ids must be in \[0, "):
        _run(model, [[model.config.vocab_size]], pc)
    assert _run(model, [rest], pc) == want


@pytest.mark.parametrize("kwargs, message", [
    ({"tokens": []}, "a prefix must be a non-empty list of token ids"),
    ({"tokens": [1, "a"]}, "a prefix must be a non-empty list of token ids"),
    ({"tokens": [1, -1]}, r"a prefix: token ids must be in \[0, "),
    ({"reserve": 0}, "reserve must be an integer >= 1"),
    ({"reserve": 2.5}, "reserve must be an integer >= 1"),
])
def test_bad_prefixes_are_refused_in_one_line(model, kwargs, message):
    kwargs = {"tokens": [1, 2, 3], **kwargs}
    with pytest.raises(qwen_jax.QwenJaxError, match=message):
        cache_prefix(model.params, model.config, **kwargs)


def test_chats_and_another_models_prefix_are_refused(tiny_checkpoint):
    model = qwen_jax.load(tiny_checkpoint[0], dtype="float32")
    pc = model.cache_prefix([5, 6, 7])
    with pytest.raises(qwen_jax.QwenJaxError, match="after a prefix, prompts are the text that follows it"):
        model.generate([{"role": "user", "content": "hi"}], prefix=pc, max_new_tokens=2)
    twin = qwen_jax.load(tiny_checkpoint[0], dtype="float32")     # same configuration, another model's cache
    with pytest.raises(qwen_jax.QwenJaxError, match="this prefix was cached by another model"):
        twin.generate("hi", prefix=pc, max_new_tokens=2)


@pytest.mark.parametrize("mesh", ["seq=4,tensor=2", "tensor=2"])
def test_a_prefix_on_a_mesh_continues_as_on_one_device(tiny_checkpoint, mesh):
    single = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=DCA_TINY,
                           prefill_chunk_size=64)
    sharded = qwen_jax.load(tiny_checkpoint[0], dtype="float32", dual_chunk_attention_config=DCA_TINY,
                            prefill_chunk_size=64, mesh=mesh)
    prefix, rest = _ids(10, 203), _ids(11, 45)
    pc = sharded.cache_prefix(prefix, reserve=128)
    assert _run(sharded, [rest], pc) == _run(single, [prefix + rest])
    with pytest.raises(qwen_jax.QwenJaxError, match="another mesh"):
        _run(single, [rest], pc)


def test_past_max_position_embeddings_a_continuation_warns_and_a_large_reserve_does_not(tiny_checkpoint):
    import warnings
    model = qwen_jax.load(tiny_checkpoint[0], dtype="float32", max_position_embeddings=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pc = cache_prefix(model.params, model.config, _ids(12, 200), reserve=1024)     # room is not a promise
        _run(model, [_ids(13, 20)], pc, max_new_tokens=4)
    with pytest.warns(UserWarning, match=r"prompt \(260 tokens\) \+ max_new_tokens \(4\) runs the model at 263 positions"):
        _run(model, [_ids(13, 60)], pc, max_new_tokens=4)


def test_prefix_benchmark_times_both_ways_and_compares_their_tokens(tmp_path, capsys):
    import json
    from qwen_jax.bench.prefix import main
    out = tmp_path / "prefix.json"
    assert main(["--config", "tiny-1m", "--random-weights", "--tokens", "1k", "--questions", "2", "--question-tokens",
                 "40", "--new-tokens", "4", "--prefill-chunk", "256", "--mode", "dense", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["way"] for r in rows] == ["prefix cached once", "whole prompt each time"]
    assert all(r["same tokens"] == "2/2" and r["TTFT s"] <= r["answer s"] for r in rows)
    assert rows[0]["document prefill s"] > 0 and "prefill of the document" in capsys.readouterr().err


def test_a_prefix_whose_cache_was_given_up_says_so(model):
    pc = cache_prefix(model.params, model.config, _ids(14, 100), reserve=64, spec=model.attention,
                      prefill_chunk_size=64)
    pc.cache.k[0].delete()                            # as a prefill stopped between two layers' programs leaves it
    with pytest.raises(qwen_jax.QwenJaxError, match="this prefix's cache is gone"):
        _run(model, [_ids(15, 10)], pc)


def test_prefill_start_is_checked(model):
    cache = qwen_jax.init_cache(model.config, 1, 128, jnp.float32)
    tokens, lengths = np.ones((1, 64), np.int32), jnp.asarray([100], jnp.int32)
    for bad in (-1, 1.5, True):
        with pytest.raises(qwen_jax.QwenJaxError, match="start must be an integer >= 0"):
            qwen_jax.prefill(model.params, tokens, lengths, cache, model.config, start=bad)
    with pytest.raises(qwen_jax.QwenJaxError, match="129 tokens do not fit a KV cache of 128 slots"):
        qwen_jax.prefill(model.params, tokens, lengths, cache, model.config, start=65)
    logits, _ = qwen_jax.prefill(model.params, tokens, lengths, cache, model.config, start=np.int64(36))
    assert np.isfinite(logits).all()
