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

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Imported on first use (PEP 562), so that ``qwen-jax --help``, a usage error or ``import qwen_jax.errors``
# does not import JAX and Flax first (~2.5 s on a 2-core CPU): name -> (module, attribute)
_EXPORTS = {
    "load": ("qwen_jax.api", "load"), "Model": ("qwen_jax.api", "Model"),
    "KVCache": ("qwen_jax.cache", "KVCache"), "init_cache": ("qwen_jax.cache", "init_cache"),
    "enable_compile_cache": ("qwen_jax.compile_cache", "enable"),
    "DCAConfig": ("qwen_jax.config", "DCAConfig"), "QwenConfig": ("qwen_jax.config", "QwenConfig"),
    "RopeScaling": ("qwen_jax.config", "RopeScaling"),
    "CheckpointError": ("qwen_jax.errors", "CheckpointError"), "ConfigError": ("qwen_jax.errors", "ConfigError"),
    "QwenJaxError": ("qwen_jax.errors", "QwenJaxError"),
    **{name: ("qwen_jax.model", name) for name in ("abstract_params", "decode_step", "forward", "init_params",
                                                    "logical_axes", "param_shardings", "prefill", "prefill_logits")},
    "PrefixCache": ("qwen_jax.prefix", "PrefixCache"), "cache_prefix": ("qwen_jax.prefix", "cache_prefix"),
    "Sampling": ("qwen_jax.sampling", "Sampling"), "sample": ("qwen_jax.sampling", "sample"),
}

__all__ = ["load", "Model", "QwenConfig", "RopeScaling", "DCAConfig", "KVCache", "init_cache", "init_params",
           "abstract_params", "logical_axes", "param_shardings", "forward", "prefill", "prefill_logits",
           "decode_step", "cache_prefix", "PrefixCache", "enable_compile_cache", "Sampling", "sample", "QwenJaxError",
           "ConfigError", "CheckpointError"]


def __getattr__(name: str):
    """The public names above, and the submodules (``qwen_jax.generation``, ...), imported on first use."""
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:     # what type checkers and IDEs see: the same names, imported eagerly
    from qwen_jax.api import Model, load
    from qwen_jax.cache import KVCache, init_cache
    from qwen_jax.compile_cache import enable as enable_compile_cache
    from qwen_jax.config import DCAConfig, QwenConfig, RopeScaling
    from qwen_jax.errors import CheckpointError, ConfigError, QwenJaxError
    from qwen_jax.model import (abstract_params, decode_step, forward, init_params, logical_axes, param_shardings,
                                prefill, prefill_logits)
    from qwen_jax.prefix import PrefixCache, cache_prefix
    from qwen_jax.sampling import Sampling, sample
