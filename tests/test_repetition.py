"""The repetition penalty (HF's ``RepetitionPenaltyLogitsProcessor`` the oracle) and the sampling a checkpoint's
generation_config.json recommends (``Model.generation_config``, ``qwen-jax generate --generation-config``)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from conftest import run_cli
from qwen_jax import generation
from qwen_jax.generation import generate_ids
from qwen_jax.sampling import Sampling, penalize, sample, seen_in_prompts


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return qwen_jax.load(tiny_checkpoint[0], dtype="float32")


def _hf_penalized(logits, ids, penalty):
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor
    return RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(logits)).numpy()


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_penalized_logits_equal_transformers_repetition_penalty(penalty):
    rng = np.random.default_rng(int(penalty * 10))
    B, V, T = 4, 64, 40
    logits = rng.normal(0, 2, (B, V)).astype(np.float32)
    ids = rng.integers(0, V, (B, T))                       # 40 draws of 64 ids: repeats, and ids never drawn
    seen = np.zeros((B, V), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    assert all(len(set(row)) < T for row in ids) and not seen.all(axis=1).any()
    expected = _hf_penalized(logits, ids, penalty)
    assert (expected != logits).sum() == seen.sum()        # every seen logit moved (none is 0), no other did
    assert (logits[seen] > 0).any() and (logits[seen] < 0).any()
    got = np.asarray(penalize(jnp.asarray(logits), jnp.asarray(seen), penalty))
    np.testing.assert_array_equal(got[logits < 0], expected[logits < 0])      # multiplied: exact
    np.testing.assert_allclose(got, expected, rtol=2 ** -23, atol=0)          # divided: XLA's CPU division may be an ulp off
    greedy = sample(jnp.asarray(logits), jax.random.key(0), Sampling(repetition_penalty=penalty), jnp.asarray(seen))
    np.testing.assert_array_equal(greedy, np.argmax(expected, -1))
    assert (np.argmax(expected, -1) != np.argmax(logits, -1)).any()     # the penalty changed some row's choice


def test_seen_ids_of_right_padded_prompts_leave_the_padding_out():
    rng = np.random.default_rng(21)
    B, V, T = 5, 50, 24
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    tokens = rng.integers(0, V, (B, T))
    padded = np.where(np.arange(T)[None] < lengths[:, None], tokens, 7)     # padding: id 7, as batching pads
    expected = np.zeros((B, V), bool)
    for row in range(B):
        expected[row, tokens[row, :lengths[row]]] = True
    assert (expected[:, 7] != (padded == 7).any(axis=1)).any()                # padding would have marked 7
    np.testing.assert_array_equal(seen_in_prompts(jnp.asarray(padded), jnp.asarray(lengths), V), expected)


def test_a_penalty_without_seen_ids_is_refused():
    with pytest.raises(qwen_jax.QwenJaxError, match="repetition penalty needs seen"):
        sample(jnp.zeros((1, 8)), jax.random.key(0), Sampling(repetition_penalty=1.2))


def test_greedy_generation_with_a_penalty_equals_transformers(tiny_checkpoint, model):
    """Two prompts of different lengths as one batch; each row against HF run on its prompt alone (HF would
    count the batch's padding)."""
    import torch
    hf = tiny_checkpoint[1]
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (9, 23)]
    N = 16
    ours = generate_ids(model.params, model.config, prompts, max_new_tokens=N,
                        sampling=Sampling(repetition_penalty=1.3))
    plain = generate_ids(model.params, model.config, prompts, max_new_tokens=N)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, repetition_penalty=1.3,
                              max_new_tokens=N)
        assert ours[row] == out[0, len(prompt):].tolist(), row
        assert ours[row] != plain[row], row                 # the penalty changed this row's continuation
        assert len(set(plain[row])) < len(plain[row])       # (greedy alone repeats itself)


def test_sampling_with_a_penalty_is_seeded_and_differs_from_none(model):
    prompts = [[5, 6, 7, 8, 5, 6], [9, 10]]
    penalised = Sampling(temperature=1.0, top_k=8, repetition_penalty=1.5)
    plain = Sampling(temperature=1.0, top_k=8)
    runs = {seed: generate_ids(model.params, model.config, prompts, max_new_tokens=12, sampling=penalised, seed=seed)
            for seed in (1, 2, 3)}
    assert runs[1] == generate_ids(model.params, model.config, prompts, max_new_tokens=12, sampling=penalised, seed=1)
    assert len({str(r) for r in runs.values()}) > 1
    assert any(runs[s] != generate_ids(model.params, model.config, prompts, max_new_tokens=12, sampling=plain, seed=s)
               for s in runs)


@pytest.mark.parametrize("bad", [0, -1, 0.0, float("nan"), float("inf"), True, "1.1", None])
def test_bad_repetition_penalties_are_refused_with_one_line(model, bad):
    with pytest.raises(qwen_jax.QwenJaxError, match="repetition_penalty must be") as e:
        Sampling(repetition_penalty=bad)
    assert "\n" not in str(e.value)
    with pytest.raises(qwen_jax.QwenJaxError, match="repetition_penalty must be"):
        model.generate("hi", max_new_tokens=2, repetition_penalty=bad)


def test_repetition_penalty_is_normalised_and_off_at_one(model, monkeypatch):
    assert Sampling(repetition_penalty=2) == Sampling(repetition_penalty=2.0)
    assert type(Sampling(repetition_penalty=np.float64(1.5)).repetition_penalty) is float
    assert hash(Sampling(0, 0, 1, 1)) == hash(Sampling())
    # p == 1: no seen ids are built or carried; the plain step runs
    monkeypatch.setattr(generation, "_prompt_seen", lambda *a: pytest.fail("seen ids built without a penalty"))
    ids = generate_ids(model.params, model.config, [[1, 2, 3]], max_new_tokens=3,
                       sampling=Sampling(repetition_penalty=1.0))
    assert len(ids[0]) == 3


def test_a_penalty_on_a_mesh_equals_one_device_and_compiles_its_step_once(tiny_checkpoint, model):
    meshed = qwen_jax.load(tiny_checkpoint[0], dtype="float32", mesh="seq=2,tensor=2")
    rng = np.random.default_rng(12)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (6, 19)]
    s = Sampling(repetition_penalty=1.25)                   # a program no other test compiles
    before = generation.decode_block._cache_size()
    got = generate_ids(meshed.params, meshed.config, prompts, max_new_tokens=10, sampling=s, spec=meshed.attention)
    assert generation.decode_block._cache_size() == before + 1
    assert got == generate_ids(model.params, model.config, prompts, max_new_tokens=10, sampling=s)
    assert got != generate_ids(model.params, model.config, prompts, max_new_tokens=10)


# generation_config.json: the checkpoint's recommended sampling

QWEN_INSTRUCT = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                 "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8}


def _checkpoint_with(tiny_checkpoint, tmp_path, generation_config):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[0], folder)
    if generation_config is None:
        (folder / "generation_config.json").unlink()
    else:
        (folder / "generation_config.json").write_text(
            generation_config if isinstance(generation_config, str) else json.dumps(generation_config))
    return str(folder)


@pytest.mark.parametrize("file,expected", [
    (QWEN_INSTRUCT, dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)),
    ({"do_sample": False, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1},
     dict(temperature=0.0, repetition_penalty=1.1)),
    ({"temperature": 0.7, "top_k": 20}, dict(temperature=0.0)),                   # do_sample absent: greedy
    ({"do_sample": True, "top_p": 0.9, "top_k": None}, dict(temperature=1.0, top_p=0.9, top_k=50)),  # HF's defaults
    (None, {}),
])
def test_generation_config_holds_the_recommended_generate_keywords(tiny_checkpoint, tmp_path, file, expected):
    loaded = qwen_jax.load(_checkpoint_with(tiny_checkpoint, tmp_path, file), dtype="float32")
    assert loaded.generation_config == expected
    assert all(type(v) is type(expected[k]) for k, v in loaded.generation_config.items())
    assert len(loaded.generate("hi", max_new_tokens=3, **loaded.generation_config)) == 1


@pytest.mark.parametrize("file,expected", [
    ({"do_sample": True, "temperature": 0.7}, dict(temperature=0.7, top_k=50)),
    ({"do_sample": True, "top_p": 0.9, "top_k": None}, dict(temperature=1.0, top_p=0.9, top_k=50)),
    ({"do_sample": True, "top_k": 0}, dict(temperature=1.0, top_k=0)),
])
def test_sampling_without_top_k_in_the_file_keeps_hfs_50_likeliest_tokens(tiny_checkpoint, tmp_path, file, expected):
    """HF's ``generate`` fills a field neither the file nor the caller sets from its defaults, and its top_k is 50
    (transformers 5.24: TopKLogitsWarper(top_k=50) for these files); top_k 0 turns it off."""
    loaded = qwen_jax.load(_checkpoint_with(tiny_checkpoint, tmp_path, file), dtype="float32")
    assert loaded.generation_config == expected


@pytest.mark.parametrize("content,message", [
    ({"do_sample": True, "top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"repetition_penalty": 0}, "repetition_penalty must be at least"),
    ({"temperature": "warm"}, "temperature must be a finite number, got 'warm'"),
    ({"top_k": 2.5}, r"top_k must be an integer \(0: off\), got 2.5"),
    ({"do_sample": "yes"}, "do_sample must be true or false, got 'yes'"),
])
def test_a_malformed_sampling_field_is_named_before_the_weights_load(tiny_checkpoint, tmp_path, content, message):
    folder = _checkpoint_with(tiny_checkpoint, tmp_path, content)
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not weights")    # reading them would fail otherwise
    with pytest.raises(qwen_jax.CheckpointError, match="generation_config.json: " + message) as e:
        qwen_jax.load(folder, dtype="float32")
    assert "\n" not in str(e.value)


def test_the_model_keeps_a_copy_of_its_generation_config(model):
    recommended = {"temperature": 0.5}
    copy = qwen_jax.Model(model.config, model.params, model.tokenizer, generation_config=recommended)
    recommended["temperature"] = 2.0
    assert copy.generation_config == {"temperature": 0.5}
    assert qwen_jax.Model(model.config, model.params).generation_config == {}


def test_cli_generation_config_starts_from_the_file_and_flags_override_it(tiny_checkpoint, tmp_path):
    recommended = dict(QWEN_INSTRUCT, repetition_penalty=1.3)
    folder = _checkpoint_with(tiny_checkpoint, tmp_path, recommended)
    api = qwen_jax.load(folder, dtype="float32")
    assert api.generation_config["repetition_penalty"] == 1.3
    common = ("generate", "--model", folder, "--prompt", "The sky is", "--max-new-tokens", "10", "--dtype", "float32")
    greedy = api.generate("The sky is", max_new_tokens=10, **dict(api.generation_config, temperature=0.0))[0]
    assert greedy != api.generate("The sky is", max_new_tokens=10)[0]           # the file's penalty shows
    result = run_cli(*common, "--generation-config", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy + "\n"
    sampled = api.generate("The sky is", max_new_tokens=10, seed=3, **api.generation_config)[0]
    assert sampled != greedy                                                   # the file's temperature shows
    result = run_cli(*common, "--generation-config", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == sampled + "\n"
