"""Exact architectures of released Qwen2.5 models (config.json fields), for random-weight benchmarks and
memory planning without downloading a checkpoint."""

from __future__ import annotations

from qwen_jax.config import QwenConfig
from qwen_jax.errors import ConfigError

_COMMON = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
           "use_sliding_window": False, "rms_norm_eps": 1e-5, "eos_token_id": 151645}
_DCA_1M = {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144,
           "sparse_attention_enabled": True, "sparse_attention_threshold": 32768}

PRESETS: dict[str, dict] = {
    "qwen2.5-7b-1m": dict(_COMMON, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=10000000.0,
                          tie_word_embeddings=False, max_position_embeddings=1010000,
                          dual_chunk_attention_config=_DCA_1M),
    "qwen2.5-14b-1m": dict(_COMMON, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                           num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, rope_theta=10000000.0,
                           tie_word_embeddings=False, max_position_embeddings=1010000,
                           dual_chunk_attention_config=_DCA_1M),
    "qwen2.5-7b": dict(_COMMON, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                       tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "qwen2.5-0.5b": dict(_COMMON, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                         tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6),
    # a few-MB model with the 7B-1M's structure (GQA 7, DCA + sparse), for CPU smoke runs
    "tiny-1m": dict(_COMMON, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, vocab_size=1024, rope_theta=10000000.0,
                    tie_word_embeddings=False, max_position_embeddings=1010000,
                    dual_chunk_attention_config=dict(_DCA_1M, chunk_size=2048, local_size=256,
                                                     original_max_position_embeddings=2048)),
}


def preset_config(name: str, **overrides) -> QwenConfig:
    """The ``QwenConfig`` of a preset (``PRESETS``); keyword overrides replace config.json fields."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return QwenConfig.from_hf_dict({**PRESETS[name], **overrides})
