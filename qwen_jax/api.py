"""``qwen_jax.load`` and ``Model``: the high-level entry points over the pure functions."""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import attention
from qwen_jax.config import MALFORMED, QwenConfig, read_config_json
from qwen_jax.errors import CheckpointError, ConfigError, QwenJaxError, read_json
from qwen_jax.generation import (check_generation_args, generate_ids, special_stops, stop_strings,
                                 truncate_at_stop)
from qwen_jax.cache import cache_dtype
from qwen_jax.model import (DEFAULT_PREFILL_CHUNK, abstract_params, check_token_ids, param_shardings, params_dtype,
                            prefill_logits)
from qwen_jax.prefix import DEFAULT_RESERVE, PrefixCache, cache_prefix
from qwen_jax.sampling import Sampling
from qwen_jax.sharding import as_mesh, check_same_on_every_process
from qwen_jax.tokenizer import Tokenizer

DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "f32": jnp.float32,
          "float16": jnp.float16, "fp16": jnp.float16}
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]


def _dtype(dtype) -> jnp.dtype | None:
    """A name from ``DTYPES`` or one of their dtypes (``jnp.bfloat16``, ``np.float32``, ...); None for ``None`` or
    ``"auto"`` (``default_dtype`` decides once the configuration and mesh are known)."""
    allowed = f"use auto, one of {', '.join(DTYPES)} (or the jnp dtype)"
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; {allowed}")
        return jnp.dtype(DTYPES[dtype])
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise ConfigError(f"unknown dtype {dtype!r}; {allowed}") from None
    if resolved not in {jnp.dtype(d) for d in DTYPES.values()}:
        raise ConfigError(f"dtype {resolved.name} is not supported for parameters; {allowed}")
    return resolved


def default_dtype(config: QwenConfig, mesh=None) -> jnp.dtype:
    """``dtype="auto"``: bfloat16 on GPUs and TPUs; on CPUs float32 (XLA converts bfloat16 weights to float32 for
    every matrix product there, at every step: the 0.5B decodes 8x faster in float32), unless float32 weights would
    take more than half of the host's memory (a 7B on a 24 GB host): then bfloat16, which holds them in half."""
    from qwen_jax import memory
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    if any(d.platform != "cpu" for d in devices):
        return jnp.dtype(jnp.bfloat16)
    local = sum(d.process_index == jax.process_index() for d in devices)     # their shares all live in this host
    weights = memory.plan(config, tokens=1, mesh=mesh, dtype=jnp.float32, sparse=False).weights * local
    host = memory.host_memory()
    fits = host is None or weights <= host // 2
    if jax.process_count() > 1:      # every process must choose the same: float32 only if it fits on every host
        from jax.experimental import multihost_utils
        fits = bool(np.min(multihost_utils.process_allgather(np.int32(fits))))
    return jnp.dtype(jnp.float32 if fits else jnp.bfloat16)


class Model:
    """A loaded Qwen2 model: ``config``, ``params`` (plain pytree), ``tokenizer``, ``dtype``, ``generation_config``
    (the checkpoint's recommended ``generate`` keywords), plus ``logits``, ``generate`` and ``cache_prefix``."""

    def __init__(self, config: QwenConfig, params: Any, tokenizer: Tokenizer | None = None, *, mesh=None,
                 eos_token_ids: Sequence[int] = (), attn_implementation: "attention.AttentionSpec | str | None" = None,
                 prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK, kv_cache_dtype=None,
                 generation_config: dict | None = None):
        mesh = as_mesh(mesh)
        self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
        # the ``generate`` keywords the checkpoint recommends: ``model.generate(p, **model.generation_config)``
        self.generation_config = dict(generation_config or {})
        self.kv_cache_dtype = cache_dtype(kv_cache_dtype, params_dtype(params))
        self.eos_token_ids = tuple(dict.fromkeys(int(e) for e in eos_token_ids))
        if mesh is not None:
            from qwen_jax.attention.parallel import check_mesh
            check_mesh(config, mesh)
        self.attention = dataclasses.replace(attention.AttentionSpec.of(attn_implementation), mesh=mesh)
        self.prefill_chunk_size = prefill_chunk_size

    @property
    def dtype(self) -> jnp.dtype:
        """The parameters' (and the computation's) dtype."""
        return jnp.dtype(params_dtype(self.params))

    def __repr__(self) -> str:
        c = self.config
        size = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.params))
        dca = ", DCA" + (" + sparse prefill" if c.dual_chunk_attention_config.sparse_attention_enabled else "") \
            if c.dual_chunk_attention_config is not None else ""
        mesh = f", mesh {dict(self.mesh.shape)}" if self.mesh is not None else ""
        return (f"Model({size / 1e9:.2f}B parameters, {c.num_hidden_layers} layers, {c.num_attention_heads}/"
                f"{c.num_key_value_heads} heads, {self.dtype.name}, "
                f"{jnp.dtype(self.kv_cache_dtype).name} cache{dca}{mesh})")

    def logits(self, tokens) -> np.ndarray:
        """Full-sequence forward, through the chunked-prefill path: int tokens [B, T] -> float32 [B, T, V]."""
        try:
            tokens = np.asarray(tokens)
        except ValueError:  # ragged rows
            raise QwenJaxError("tokens must be an integer array [batch, length] (rows of equal length); "
                               "pad ragged rows, or run them one at a time") from None
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or not tokens.size:
            raise QwenJaxError(f"tokens must be a non-empty integer array [batch, length], got "
                               f"{tokens.dtype}{list(tokens.shape)}")
        check_token_ids(tokens, self.config.vocab_size)
        check_same_on_every_process(tokens, "the tokens")
        return prefill_logits(self.params, tokens, self.config, chunk_size=self.prefill_chunk_size,
                              spec=self.attention, cache_dtype=self.kv_cache_dtype)

    def encode_prompts(self, prompts) -> list[list[int]]:
        """A string, a chat (list of message dicts), or a list of either -> token-id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise QwenJaxError("prompts must be a string, a list of chat messages, or a non-empty list of those")
        for i, prompt in enumerate(prompts):
            chat = isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt)
            if not (isinstance(prompt, str) or chat):
                raise QwenJaxError(
                    f"prompt {i} is {_describe(prompt)}: a prompt is a string or a chat (a non-empty list of "
                    "{'role': ..., 'content': ...} dicts); token ids go to qwen_jax.generation.generate_ids")
        if self.tokenizer is None:
            raise CheckpointError("this checkpoint has no tokenizer.json, so text prompts cannot be encoded")
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                text = prompt
            else:
                text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            ids = self.tokenizer.encode(text)
            if not ids:
                raise QwenJaxError("a prompt encodes to zero tokens")
            out.append(ids)
        return out

    def cache_prefix(self, prefix: str | Sequence[int], *, reserve: int = DEFAULT_RESERVE,
                     progress: Callable[[int, int], None] | None = None) -> PrefixCache:
        """Prefill ``prefix`` (text, encoded without a chat template, or token ids) once, for ``generate(...,
        prefix=...)`` to continue as often as needed; ``reserve``: the slots kept after it for a continuation
        and its new tokens. See ``qwen_jax.prefix``."""
        if isinstance(prefix, str):
            if self.tokenizer is None:
                raise CheckpointError("this checkpoint has no tokenizer.json, so a text prefix cannot be encoded")
            prefix = self.tokenizer.encode(prefix)
        elif isinstance(prefix, (list, tuple)) and prefix and isinstance(prefix[0], dict):
            raise QwenJaxError("a prefix is text (encoded without a chat template) or token ids, not a chat: cache the "
                               "text the chats share, rendered with the template (as `qwen-jax generate --chat "
                               "--question` does)")
        cached = cache_prefix(self.params, self.config, prefix, reserve=reserve, spec=self.attention,
                              prefill_chunk_size=self.prefill_chunk_size, cache_dtype=self.kv_cache_dtype,
                              progress=progress)
        cached.owner = self
        return cached

    def generate(self, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, repetition_penalty: float = 1.0, seed: int = 0,
                 stop: str | Sequence[str] | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 progress: Callable[[int, int], None] | None = None, prefix: PrefixCache | None = None) -> list[str]:
        """Continue each prompt; returns one completion string per prompt (prompt and EOS excluded,
        cut before the first stop string; a stop string that is a special token's text, such as ``"<|im_start|>"``,
        stops at that token as at EOS). ``repetition_penalty`` (HF's; 1: off) divides a positive logit of an
        id already in the row (prompt or output) by it, and multiplies a negative one. ``on_text(row, text)``
        receives text as it is produced;
        ``progress(done, total)`` the prefill's tokens after each chunk, for prompts longer than one chunk.
        ``prefix`` (from ``cache_prefix``): the prompts are text that follows it, each continued in turn."""
        stop = stop_strings(stop)
        stop_ids = special_stops(stop, self.tokenizer.special_tokens) if self.tokenizer is not None else []
        sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
        check_generation_args(max_new_tokens=max_new_tokens, seed=seed, on_text=on_text,    # before the prompts encode
                              progress=progress)
        if prefix is not None and not (isinstance(prompts, str) or (
                isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts))):
            raise QwenJaxError("after a prefix, prompts are the text that follows it (a string or a list of strings); "
                               "a chat renders its template from the start: put its first part in the prefix")
        if isinstance(prefix, PrefixCache) and prefix.owner is not None and prefix.owner is not self:
            raise QwenJaxError("this prefix was cached by another model (its cache holds that model's keys and "
                               "values); cache it with this one")
        ids = generate_ids(self.params, self.config, self.encode_prompts(prompts), max_new_tokens=max_new_tokens,
                           sampling=sampling, seed=seed, eos_ids=(*self.eos_token_ids, *stop_ids), stop=stop,
                           decode=self.tokenizer.decode, on_text=on_text, spec=self.attention,
                           prefill_chunk_size=self.prefill_chunk_size, cache_dtype=self.kv_cache_dtype,
                           progress=progress, prefix=prefix)
        return [truncate_at_stop(self.tokenizer.decode(row), stop)[0] for row in ids]


def load(path: str | os.PathLike, *, dtype="auto", mesh=None, **config_overrides) -> Model:
    """Load an HF checkpoint folder, a folder written by ``qwen-jax convert``, or (online) a hub repo id.

    ``dtype``: parameter and compute dtype, "bfloat16", "float32" or "float16"; "auto" (or None): bfloat16 on GPUs and
    TPUs, float32 on CPUs where it fits in half the host's memory (``default_dtype``). ``mesh``: a ``jax.sharding.Mesh``
    or a string such as ``"seq=4,tensor=2"``; parameters are placed by their logical axes. In a
    multi-process job (``qwen_jax.distributed``) the mesh must span every process's devices; each
    process reads the checkpoint and puts only its own shards on its devices.
    ``attn_implementation`` and ``prefill_chunk_size`` set the attention path and prefill chunk;
    ``kv_cache_dtype`` the KV cache's storage ("auto": the model dtype; "fp8": float8_e4m3fn, half of
    bf16); every other keyword replaces that field of config.json, as HF ``from_pretrained(**kwargs)`` does.
    ``Model.generation_config`` holds the sampling that ``generation_config.json`` recommends, as keywords.
    """
    from convert import is_converted, read_hf_params, restore_params
    from qwen_jax.sharding import global_array

    impl = attention.AttentionSpec.of(config_overrides.pop("attn_implementation", None))
    chunk = config_overrides.pop("prefill_chunk_size", DEFAULT_PREFILL_CHUNK)
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ConfigError(f"prefill_chunk_size must be a positive integer (tokens per prefill chunk), got {chunk!r}")
    chunk = int(chunk)
    kv_dtype = config_overrides.pop("kv_cache_dtype", None)
    cache_dtype(kv_dtype, jnp.float32)           # a bad name is refused before any weight is read
    dtype = _dtype(dtype)
    folder = resolve_checkpoint(str(path))
    try:
        config = QwenConfig.from_hf_dict(read_config_json(folder, config_overrides))
    except ConfigError as e:      # a field given here, not read from the file: say so
        field = str(e).removeprefix(MALFORMED).split(".")[0].split(" ")[0]
        if str(e).startswith(MALFORMED) and field in config_overrides:
            raise ConfigError(f"{str(e).removeprefix(MALFORMED)} (as given to load or on the command line, not read "
                              f"from config.json)") from None
        raise
    generation_eos, recommended = _read_generation_config(folder)    # a malformed one: refused before the weights
    if mesh is None and jax.process_count() > 1:
        raise ConfigError(f"this is a {jax.process_count()}-process job: pass a mesh over all {jax.device_count()} "
                          f"devices, e.g. mesh=\"seq={jax.process_count()},tensor={jax.local_device_count()}\" (one "
                          f"long prompt) or \"data={jax.process_count()},tensor={jax.local_device_count()}\" (a batch of "
                          f"prompts)")
    mesh = as_mesh(mesh)
    dtype = dtype or default_dtype(config, mesh)
    if mesh is not None:
        shardings = param_shardings(config, mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_params(config, dtype))
    if is_converted(folder):
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
                              abstract_params(config, dtype), shardings)
        params = restore_params(folder, target)
    else:
        def place(path, array):
            node = shardings
            for key in path:
                node = node[key]
            return global_array(array, node)
        params = read_hf_params(folder, config, dtype=dtype, place=place, progress=jax.process_index() == 0)
    tokenizer = Tokenizer(folder) if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None
    eos_ids = [*config.eos_token_ids, *generation_eos]
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.append(tokenizer.eos_token_id)
    return Model(config, params, tokenizer, mesh=mesh, eos_token_ids=eos_ids,
                 attn_implementation=impl, prefill_chunk_size=chunk, kv_cache_dtype=kv_dtype,
                 generation_config=recommended)


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")
# what HF's ``generate`` samples with where neither the checkpoint nor the caller sets the field
# (``GenerationConfig._get_default_generation_params``): top-p 1 and a penalty of 1 are off here too, top-k is not
_HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50}


def _read_generation_config(folder: str) -> tuple[list[int], dict]:
    """From ``generation_config.json`` (read once): the EOS ids it names, and the ``generate`` keywords it
    recommends (``Model.generation_config``). Neither without the file."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return [], {}
    generation_config = read_json(path)
    if not isinstance(generation_config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(generation_config).__name__}")
    return _generation_config_eos(path, generation_config), _recommended_sampling(path, generation_config)


def _generation_config_eos(path: str, generation_config: dict) -> list[int]:
    eos = generation_config.get("eos_token_id")
    eos = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
        raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of token ids (integers >= 0), "
                              f"got {generation_config['eos_token_id']!r}")
    return eos


def _recommended_sampling(path: str, generation_config: dict) -> dict:
    """HF's reading: ``do_sample`` false or absent is greedy (temperature, top_p and top_k unused), true with no
    temperature samples at 1.0 and with no top_k keeps the 50 likeliest tokens (top_k 0 turns it off); the
    repetition penalty applies either way. A null field counts as absent."""
    fields = {name: generation_config[name] for name in _SAMPLING_FIELDS if generation_config.get(name) is not None}
    for name, value in fields.items():
        try:
            fields[name] = getattr(Sampling(**{name: value}), name)       # checked, and as Sampling keeps it
        except QwenJaxError as e:
            raise CheckpointError(f"{path}: {e}") from None
    do_sample = generation_config.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise CheckpointError(f"{path}: do_sample must be true or false, got {do_sample!r}")
    if do_sample:
        fields = {**_HF_SAMPLING_DEFAULTS, **fields}
    else:
        fields = {"temperature": 0.0, **{k: v for k, v in fields.items() if k == "repetition_penalty"}}
    return fields


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder for ``path``: the folder itself, or a hub repo id downloaded (json, safetensors, text)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path}: not a folder (pass a checkpoint folder)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(path, allow_patterns=_HUB_FILES)
        except Exception as e:  # offline, unknown repo, gated: all the same to the user
            raise CheckpointError(f"{path}: not a local folder, and downloading it from the Hugging Face hub failed "
                                  f"({type(e).__name__}); pass a local checkpoint folder") from None
    raise CheckpointError(f"{path}: no such folder")
