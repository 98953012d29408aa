"""Qwen2 / Qwen2.5 configuration: parsed from Hugging Face ``config.json`` into frozen dataclasses.

The config is hashable so it can be a static argument under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from qwen_jax.errors import ConfigError

# config.json fields that change nothing in this implementation (training-only or informational).
_IGNORED_FIELDS = frozenset({
    "architectures", "attention_dropout", "dtype", "torch_dtype", "initializer_range", "model_type",
    "transformers_version", "use_cache", "max_window_layers", "sliding_window", "layer_types",
    "hidden_act", "pad_token_id", "bos_token_id", "eos_token_id", "use_mrope", "output_attentions",
    "output_hidden_states", "return_dict", "_name_or_path", "_attn_implementation_autoset",
    "use_return_dict", "tokenizer_class", "quantization_config",
})


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN scaling of the rotary frequencies (Qwen2.5's 128K recipe: factor 4 over 32768)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: 0.1 * ln(factor) + 1, as YaRN and HF do
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class DCAConfig:
    """Qwen2.5-1M ``dual_chunk_attention_config`` (semantics: docs in ``qwen_jax.attention.dca``)."""

    chunk_size: int = 8192
    local_size: int = 1024
    original_max_position_embeddings: int = 0  # 0: no length scaling (s = 1), as in Qwen's code
    sparse_attention_enabled: bool = False
    sparse_attention_threshold: int = 32768
    sparse_attention_last_q: int = 64
    # Per layer: tuple of (head, pattern, vertical_size, slash_size, score); None: default budgets.
    sparse_attention_config: tuple | None = None

    @property
    def chunk_len(self) -> int:
        """``S = chunk_size - local_size``: the span of one DCA chunk in tokens."""
        return self.chunk_size - self.local_size


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """The architecture of a Qwen2 / Qwen2.5 causal LM (field names follow HF ``Qwen2Config``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    rope_scaling: RopeScaling | None = None
    dual_chunk_attention_config: DCAConfig | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dual_chunk_attention_config is not None:
            from qwen_jax.attention.sparse import check_sparse_config
            check_sparse_config(self.dual_chunk_attention_config, self.num_hidden_layers, self.num_attention_heads)

    @property
    def num_groups(self) -> int:
        """G = N // K: query heads per kv head."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes) -> "QwenConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> "QwenConfig":
        """Parse a Hugging Face ``Qwen2Config`` dict, refusing what this implementation cannot do."""
        raw = dict(raw)
        model_type = raw.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ConfigError(f"model_type {model_type!r} is not supported (qwen-jax runs Qwen2/Qwen2.5: model_type 'qwen2')")
        if raw.get("use_sliding_window"):
            raise ConfigError(
                "use_sliding_window: true is not supported (Qwen2.5 checkpoints set it false); "
                "set it to false in config.json or pass use_sliding_window=False")
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {act!r} is not supported (Qwen2 uses silu)")
        if raw.get("quantization_config"):
            raise ConfigError("quantized checkpoints (quantization_config) are not supported; use a bf16/fp32 checkpoint")
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            head_dim = raw.get("head_dim")
            head_dim = hidden // heads if head_dim is None else int(head_dim)
            rope_params = raw.get("rope_parameters") or {}
            rope_theta = float(raw.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
            eos = raw.get("eos_token_id")
            eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
                head_dim=head_dim,
                rope_theta=rope_theta,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
                rope_scaling=_parse_rope_scaling(raw, rope_params),
                dual_chunk_attention_config=_parse_dca(raw.get("dual_chunk_attention_config")),
                eos_token_ids=eos_ids,
                pad_token_id=raw.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing the required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a malformed field: {e}") from None


def _parse_rope_scaling(raw: Mapping[str, Any], rope_params: Mapping[str, Any]) -> RopeScaling | None:
    # HF writes the scaling either as legacy `rope_scaling` or (transformers >= 5) inside `rope_parameters`.
    scaling = raw.get("rope_scaling") or None
    if scaling is None and rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
        scaling = rope_params
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"rope scaling type {kind!r} is not supported (Qwen2.5 uses 'yarn' or none)")
    orig = scaling.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings") \
        or raw.get("max_position_embeddings", 32768)
    factor = scaling.get("factor")
    if factor is None:
        factor = raw.get("max_position_embeddings", orig) / orig
    return RopeScaling(
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(scaling.get("beta_fast") or 32.0),
        beta_slow=float(scaling.get("beta_slow") or 1.0),
        attention_factor=None if scaling.get("attention_factor") is None else float(scaling["attention_factor"]),
        mscale=scaling.get("mscale"),
        mscale_all_dim=scaling.get("mscale_all_dim"),
        truncate=bool(scaling.get("truncate", True)),
    )


def _parse_dca(block: Mapping[str, Any] | None) -> DCAConfig | None:
    if not block:
        return None
    if not isinstance(block, Mapping):
        raise ConfigError("dual_chunk_attention_config must be a mapping with chunk_size and local_size")
    unknown = set(block) - {f.name for f in dataclasses.fields(DCAConfig)}
    if unknown:
        raise ConfigError(f"dual_chunk_attention_config has unknown keys {sorted(unknown)}")
    # Defaults as in Qwen's inference code (vLLM's dual-chunk backend).
    chunk_size = int(block.get("chunk_size", 8192))
    local_size = int(block.get("local_size", 1024))
    orig = int(block.get("original_max_position_embeddings", 0))
    if not 0 <= local_size < chunk_size:
        raise ConfigError(f"dual_chunk_attention_config needs 0 <= local_size < chunk_size, got {local_size}, {chunk_size}")
    sparse_cfg = block.get("sparse_attention_config")
    return DCAConfig(
        chunk_size=chunk_size,
        local_size=local_size,
        original_max_position_embeddings=orig,
        sparse_attention_enabled=bool(block.get("sparse_attention_enabled", sparse_cfg is not None)),
        sparse_attention_threshold=int(block.get("sparse_attention_threshold", 32768)),
        sparse_attention_last_q=int(block.get("sparse_attention_last_q", 64)),
        sparse_attention_config=_freeze(sparse_cfg),
    )


def _freeze(value: Any) -> Any:
    """JSON value -> hashable (dicts to sorted item tuples, lists to tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def read_config_json(folder: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read ``folder/config.json`` and apply ``from_pretrained``-style overrides, one field each."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{folder}: no config.json (is this a Hugging Face checkpoint folder?)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    sparse_path = os.path.join(folder, "sparse_attention_config.json")
    if isinstance(raw.get("dual_chunk_attention_config"), dict) and os.path.isfile(sparse_path):
        with open(sparse_path) as f:
            raw["dual_chunk_attention_config"] = dict(raw["dual_chunk_attention_config"],
                                                      sparse_attention_config=json.load(f))
    for key, value in (overrides or {}).items():
        known = key in raw or key in _IGNORED_FIELDS or key in _KNOWN_FIELDS
        if not known:
            raise ConfigError(f"unknown config field {key!r} (not in config.json and not a Qwen2 config field)")
        raw[key] = value
    return raw


_KNOWN_FIELDS = frozenset({f.name for f in dataclasses.fields(QwenConfig)} | {
    "rope_parameters", "use_sliding_window", "eos_token_id", "dual_chunk_attention_config", "rope_scaling",
    "original_max_position_embeddings"})


def yarn_attention_factor(scaling: RopeScaling) -> float:
    """The cos/sin multiplier YaRN applies (HF ``_compute_yarn_parameters``)."""
    if scaling.attention_factor is not None:
        return scaling.attention_factor

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return get_mscale(scaling.factor, scaling.mscale) / get_mscale(scaling.factor, scaling.mscale_all_dim)
    return get_mscale(scaling.factor)
