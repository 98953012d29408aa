"""qwen-jax: Qwen2.5 inference in JAX, from Hugging Face checkpoints to million-token prompts.

High level::

    model = qwen_jax.load("path/to/Qwen2.5-0.5B-Instruct", dtype="bfloat16")
    model.generate("def fibonacci(n):", max_new_tokens=64)
    model.logits(tokens)                     # float32 [B, T, V]
    doc = model.cache_prefix(long_text)      # prefilled once; then each question prefills only itself
    model.generate("Question: ...", prefix=doc, max_new_tokens=64)

Pure functions underneath (parameters are a plain pytree, the config a static frozen dataclass):
``init_params``, ``abstract_params``, ``forward``, ``prefill``, ``decode_step``, ``init_cache``, ``cache_prefix``.
"""

from qwen_jax.api import Model, load
from qwen_jax.cache import KVCache, init_cache
from qwen_jax.compile_cache import enable as enable_compile_cache
from qwen_jax.config import DCAConfig, QwenConfig, RopeScaling
from qwen_jax.errors import CheckpointError, ConfigError, QwenJaxError
from qwen_jax.model import (abstract_params, decode_step, forward, init_params, logical_axes, param_shardings,
                            prefill, prefill_logits)
from qwen_jax.prefix import PrefixCache, cache_prefix
from qwen_jax.sampling import Sampling, sample

__version__ = "0.1.0"

__all__ = ["load", "Model", "QwenConfig", "RopeScaling", "DCAConfig", "KVCache", "init_cache", "init_params",
           "abstract_params", "logical_axes", "param_shardings", "forward", "prefill", "prefill_logits",
           "decode_step", "cache_prefix", "PrefixCache", "enable_compile_cache", "Sampling", "sample", "QwenJaxError",
           "ConfigError", "CheckpointError"]
