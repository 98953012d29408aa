"""Logits and greedy generation against HF transformers Qwen2ForCausalLM on tiny random configs."""

import zlib

import numpy as np
import pytest
import torch

import qwen_jax
from conftest import make_hf_model, rel_err, save_hf_checkpoint
from qwen_jax.generation import generate_ids

CONFIGS = {
    "tied_g1_hd64": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4, head_dim=64),
    "untied_g2_hd128": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128),
    "untied_g7_hd64": dict(num_attention_heads=7, num_key_value_heads=1, head_dim=64),
    "yarn_x4_g2_hd64": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                            rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                             "rope_theta": 10000.0}),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = make_hf_model(seed=zlib.crc32(request.param.encode()) % 1000, **CONFIGS[request.param])
    folder = save_hf_checkpoint(hf, tmp_path_factory.mktemp(request.param), with_tokenizer=False)
    return request.param, hf, qwen_jax.load(folder, dtype="float32")


def test_logits_match_transformers(pair):
    name, hf, model = pair
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, hf.config.vocab_size, (2, 150))  # past 64: the YaRN ramp and factor matter
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    out = model.logits(tokens)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4, name


def test_yarn_changes_the_logits(pair):
    """The YaRN case must exercise the scaling: plain RoPE would give visibly different logits."""
    name, hf, model = pair
    if not name.startswith("yarn"):
        assert model.config.rope_scaling is None
        return
    tokens = np.random.default_rng(1).integers(0, hf.config.vocab_size, (1, 150))
    plain = qwen_jax.Model(model.config.replace(rope_scaling=None), model.params)
    assert rel_err(plain.logits(tokens), model.logits(tokens)) > 1e-2


def test_greedy_generation_matches_transformers(pair):
    name, hf, model = pair
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, hf.config.vocab_size, n).tolist() for n in (23, 9)]  # different lengths, one batch
    ours = generate_ids(model.params, model.config, prompts, max_new_tokens=32)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref, name
