"""Qwen2 / Qwen2.5 configuration: parsed from Hugging Face ``config.json`` into frozen dataclasses.

The config is hashable so it can be a static argument under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import warnings
from typing import Any, Mapping

from qwen_jax.errors import ConfigError, read_json

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

    def __post_init__(self):
        # (config.json's block is checked as it is parsed, ``_parse_dca``; this catches one built in code)
        sizes = (self.chunk_size, self.local_size)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in sizes) or not 0 <= self.local_size < \
                self.chunk_size:
            raise ConfigError(f"DCAConfig needs integers 0 <= local_size < chunk_size, got local_size "
                              f"{self.local_size!r} and chunk_size {self.chunk_size!r}")

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
        if self.dual_chunk_attention_config is not None and self.rope_scaling is not None:
            # from_hf_dict drops YaRN with a warning (Qwen's rule); a config built in code would rotate with it
            raise ConfigError("rope_scaling cannot be combined with dual_chunk_attention_config: DCA rotates with "
                              "plain RoPE, as Qwen's inference code does; replace rope_scaling=None too")
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
        if _sliding_layers(raw):
            raise ConfigError(
                "use_sliding_window: true is not supported (Qwen2.5 checkpoints set it false); "
                "set it to false in config.json or pass use_sliding_window=False")
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {act!r} is not supported (Qwen2 uses silu)")
        if raw.get("quantization_config"):
            raise ConfigError("quantized checkpoints (quantization_config) are not supported; use a bf16/fp32 checkpoint")
        try:
            hidden = _int(raw, "hidden_size")
            heads = _int(raw, "num_attention_heads")
            head_dim = hidden // heads if raw.get("head_dim") is None else _int(raw, "head_dim")
            rope_params = raw.get("rope_parameters") or {}
            if not isinstance(rope_params, Mapping):
                raise ConfigError(f"{MALFORMED}rope_parameters must be a mapping, "
                                  f"got {rope_params!r}")
            theta_from = raw if raw.get("rope_theta") is not None else rope_params
            if raw.get("rope_theta") is not None and rope_params.get("rope_theta") is not None and \
                    raw["rope_theta"] != rope_params["rope_theta"]:
                # transformers 4 reads the first, transformers 5 the second: which model is meant is unknowable
                raise ConfigError(f"config.json has two rope_theta values: {raw['rope_theta']!r} and "
                                  f"rope_parameters.rope_theta {rope_params['rope_theta']!r}; make them agree")
            eos = raw.get("eos_token_id")
            eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
            dca, scaling = _parse_dca(raw.get("dual_chunk_attention_config")), _parse_rope_scaling(raw, rope_params)
            if dca is not None and scaling is not None:
                # Qwen's vLLM builds DCA's rotary embedding (plain RoPE) before it looks at rope_scaling.
                warnings.warn("rope_scaling (YaRN) is ignored with dual_chunk_attention_config: DCA rotates with "
                              "plain RoPE, as Qwen's inference code does", stacklevel=2)
                scaling = None
            return cls(
                vocab_size=_int(raw, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_int(raw, "intermediate_size"),
                num_hidden_layers=_int(raw, "num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=heads if raw.get("num_key_value_heads") is None else _int(raw, "num_key_value_heads"),
                head_dim=head_dim,
                rope_theta=_float(theta_from, "rope_theta", 10000.0, positive=True),
                rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6, positive=False),
                tie_word_embeddings=_bool(raw, "tie_word_embeddings", False),
                max_position_embeddings=_int(raw, "max_position_embeddings", 32768),
                rope_scaling=scaling,
                dual_chunk_attention_config=dca,
                eos_token_ids=tuple(_int({"eos_token_id": e}, "eos_token_id", minimum=0) for e in eos),
                pad_token_id=None if raw.get("pad_token_id") is None else _int(raw, "pad_token_id", minimum=0),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing the required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{MALFORMED}{e}") from None


def _sliding_layers(raw: Mapping[str, Any]) -> bool:
    """Whether transformers would give any layer a sliding window: with ``use_sliding_window`` and a
    ``sliding_window``, the layers ``layer_types`` marks "sliding_attention" (transformers 5 writes that list
    into config.json), without it those from ``max_window_layers`` (default 28, transformers') on."""
    if not raw.get("use_sliding_window") or raw.get("sliding_window", 4096) is None:
        return False
    types = raw.get("layer_types")
    if isinstance(types, list):
        return "sliding_attention" in types
    layers, window_layers = raw.get("num_hidden_layers"), raw.get("max_window_layers", 28)
    return not (isinstance(layers, int) and isinstance(window_layers, int) and window_layers >= layers)


# Typed reads of one field: a wrong type or range is refused naming the field and what it allows, where int()
# and float() would truncate 64.5 to 64, read "false" as true or let a zero rope_theta turn every logit into NaN.

MALFORMED = "config.json has a malformed field: "      # how a field's error starts (``load`` re-words overrides')


def _malformed(field: str, allowed: str, value) -> ConfigError:
    return ConfigError(f"{MALFORMED}{field} must be {allowed}, got {value!r}")


_REQUIRED = object()


def _int(block: Mapping[str, Any], key: str, default: Any = _REQUIRED, *, minimum: int = 1, where: str = "") -> int:
    """``block[key]`` as an int >= ``minimum`` (an integral float such as 64.0 is accepted)."""
    value = block[key] if default is _REQUIRED else block.get(key, default)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer() \
            and value >= minimum:
        return int(value)
    allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise _malformed(where + key, allowed, value)


def _float(block: Mapping[str, Any], key: str, default: Any = _REQUIRED, *, positive: bool, where: str = "") -> float:
    """``block[key]`` as a finite float, > 0 (``positive``) or >= 0."""
    value = block[key] if default is _REQUIRED else block.get(key, default)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
            and (value > 0 if positive else value >= 0):
        return float(value)
    raise _malformed(where + key, "a finite number " + ("> 0" if positive else ">= 0"), value)


def _bool(block: Mapping[str, Any], key: str, default: bool, *, where: str = "") -> bool:
    value = block.get(key, default)
    if isinstance(value, bool):
        return value
    raise _malformed(where + key, "true or false", value)


def _parse_rope_scaling(raw: Mapping[str, Any], rope_params: Mapping[str, Any]) -> RopeScaling | None:
    # HF writes the scaling either as legacy `rope_scaling` or (transformers >= 5) inside `rope_parameters`.
    scaling = raw.get("rope_scaling") or None
    if scaling is not None and not isinstance(scaling, Mapping):
        raise _malformed("rope_scaling", 'a mapping such as {"rope_type": "yarn", "factor": 4.0, '
                         '"original_max_position_embeddings": 32768}', scaling)
    if scaling is None and rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
        scaling = rope_params
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"rope scaling type {kind!r} is not supported (Qwen2.5 uses 'yarn' or none)")
    where = "rope_scaling." if scaling is raw.get("rope_scaling") else "rope_parameters."
    orig = scaling.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings") \
        or raw.get("max_position_embeddings", 32768)
    orig = _int({"original_max_position_embeddings": orig}, "original_max_position_embeddings", where=where)
    factor = scaling.get("factor")
    if factor is None:
        factor = _int(raw, "max_position_embeddings", orig) / orig
    optional = {}
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if scaling.get(key) is not None:
            optional[key] = _float(scaling, key, positive=key == "attention_factor", where=where)
    return RopeScaling(
        factor=_float({"factor": factor}, "factor", positive=True, where=where),
        original_max_position_embeddings=orig,
        beta_fast=_float({"beta_fast": scaling.get("beta_fast") or 32.0}, "beta_fast", positive=True, where=where),
        beta_slow=_float({"beta_slow": scaling.get("beta_slow") or 1.0}, "beta_slow", positive=True, where=where),
        truncate=_bool(scaling, "truncate", True, where=where),
        **optional,
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
    where = "dual_chunk_attention_config."
    chunk_size = _int(block, "chunk_size", 8192, where=where)
    local_size = _int(block, "local_size", 1024, minimum=0, where=where)
    orig = _int(block, "original_max_position_embeddings", 0, minimum=0, where=where)
    if not 0 <= local_size < chunk_size:
        given = lambda key: "" if key in block else " (the default)"  # noqa: E731
        raise ConfigError(f"dual_chunk_attention_config needs 0 <= local_size < chunk_size, got local_size "
                          f"{local_size}{given('local_size')} and chunk_size {chunk_size}{given('chunk_size')}")
    sparse_cfg = block.get("sparse_attention_config")
    if sparse_cfg is not None:
        check_sparse_layers(sparse_cfg, where + "sparse_attention_config")
    return DCAConfig(
        chunk_size=chunk_size,
        local_size=local_size,
        original_max_position_embeddings=orig,
        sparse_attention_enabled=_bool(block, "sparse_attention_enabled", sparse_cfg is not None, where=where),
        sparse_attention_threshold=_int(block, "sparse_attention_threshold", 32768, minimum=0, where=where),
        sparse_attention_last_q=_int(block, "sparse_attention_last_q", 64, where=where),
        sparse_attention_config=_freeze(sparse_cfg),
    )


def check_sparse_layers(layers: Any, source: str) -> None:
    """Refuse a ``sparse_attention_config`` that is not, per layer, head index -> [pattern, vertical_size,
    slash_size, ...] with non-negative integer budgets (``source`` names the file or field in the message)."""
    if not isinstance(layers, (list, tuple)) or not all(isinstance(layer, Mapping) for layer in layers):
        raise ConfigError(f"{source}: expected a list with one {{head index: [pattern, vertical_size, "
                          f"slash_size, score]}} mapping per layer, got {_short(layers)}")
    for i, layer in enumerate(layers):
        for head, entry in layer.items():
            if not (isinstance(head, str) and head.isdigit() or isinstance(head, int) and not isinstance(head, bool)):
                raise ConfigError(f"{source}: layer {i}: head keys are head indices (\"0\", \"1\", ...), got {head!r}")
            if not isinstance(entry, (list, tuple)) or len(entry) < 3 or not isinstance(entry[0], str):
                raise ConfigError(f"{source}: layer {i} head {head}: expected [pattern, vertical_size, slash_size, "
                                  f"score], got {_short(entry)}")
            for name, value in zip(("vertical_size", "slash_size"), entry[1:3]):
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer() \
                        or value < 0:
                    raise ConfigError(f"{source}: layer {i} head {head}: {name} must be an integer >= 0, "
                                      f"got {value!r}")


def read_sparse_config(path: str, source: str | None = None) -> list:
    """A ``sparse_attention_config.json`` file, checked (``check_sparse_layers``); errors begin with ``source``
    (default: the path)."""
    source = source or path
    layers = read_json(path, ConfigError, source)
    check_sparse_layers(layers, source)
    return layers


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    raw = read_json(path, ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    # Qwen's rule: the file next to config.json is loaded into the DCA block's sparse_attention_config; here
    # also into a block given as an override, unless that block names its own
    sparse_path = os.path.join(folder, "sparse_attention_config.json")
    key = "dual_chunk_attention_config"
    if isinstance(raw.get(key), Mapping) and os.path.isfile(sparse_path):
        raw[key] = dict(raw[key], sparse_attention_config=read_sparse_config(sparse_path))
    for name, value in (overrides or {}).items():
        known = name in raw or name in _IGNORED_FIELDS or name in _KNOWN_FIELDS
        if not known and name in _HF_LOADING_KEYWORDS:
            raise ConfigError(f"{name}= is a keyword of HF's from_pretrained that qwen_jax.load has no use for "
                              f"({_HF_LOADING_KEYWORDS[name]})")
        if not known:
            raise ConfigError(f"unknown config field {name!r} (not in config.json and not a Qwen2 config field)")
        if name in _REFUSED_OVERRIDES and _REFUSED_OVERRIDES[name][0](value):
            raise ConfigError(f"{name}={value!r}: {_REFUSED_OVERRIDES[name][1]}")
        if name == "rope_parameters" and isinstance(value, Mapping):
            # transformers 5 takes the rotary embedding from this block alone: the file's legacy rope_scaling and
            # rope_theta go with the block they stood for (a rope_theta the new block leaves out stays the file's)
            previous = raw.get("rope_parameters")
            theta = raw.get("rope_theta")
            if theta is None and isinstance(previous, Mapping):
                theta = previous.get("rope_theta")
            value = {**({"rope_theta": theta} if theta is not None else {}), **value}
            raw.pop("rope_scaling", None)
            raw.pop("rope_theta", None)
        raw[name] = value
        params = raw.get("rope_parameters")
        if name in ("rope_theta", "rope_scaling") and isinstance(params, Mapping):
            # transformers 5 keeps both in rope_parameters: the override replaces them there too
            params = dict(params)
            if name == "rope_theta":
                params["rope_theta"] = value
            elif value is None:
                params = {"rope_type": "default", **{k: params[k] for k in ("rope_theta",) if k in params}}
            raw["rope_parameters"] = params
    block = (overrides or {}).get(key)
    if isinstance(block, Mapping) and "sparse_attention_config" not in block and os.path.isfile(sparse_path):
        raw[key] = dict(block, sparse_attention_config=read_sparse_config(sparse_path))
    return raw


# HF keywords that ``from_pretrained`` users pass and qwen-jax would otherwise accept and ignore: (refused when,
# why). The dtype is ``qwen_jax.load``'s own argument.
_REFUSED_OVERRIDES = {
    "torch_dtype": (lambda v: True, "qwen-jax takes the parameters' dtype as qwen_jax.load(path, dtype=...)"),
    "dtype": (lambda v: True, "qwen-jax takes the parameters' dtype as qwen_jax.load(path, dtype=...)"),
    "output_attentions": (bool, "qwen-jax returns logits only (attention weights are never materialised)"),
    "output_hidden_states": (bool, "qwen-jax returns logits only"),
    "use_cache": (lambda v: not v, "qwen-jax always prefills into and decodes from a KV cache"),
}


# ``from_pretrained`` keywords about loading, not the config: why qwen-jax has no such choice.
_HF_LOADING_KEYWORDS = {
    "trust_remote_code": "no checkpoint code is ever run: Qwen2 is built in",
    "device_map": "parameters go to the default device, or over mesh=",
    "low_cpu_mem_usage": "weights are read one tensor at a time already",
    "revision": "download that revision to a folder and load the folder",
    "cache_dir": "download to a folder and load the folder",
    "token": "download to a folder and load the folder",
    "local_files_only": "a folder is always read locally",
    "use_safetensors": "only safetensors are read",
    "quantization_config": "weights load as bfloat16, float16 or float32 (dtype=)",
    "load_in_8bit": "weights load as bfloat16, float16 or float32 (dtype=)",
    "load_in_4bit": "weights load as bfloat16, float16 or float32 (dtype=)",
}


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
