"""JAX's persistent compilation cache, on for the command line.

A later process with the same shapes loads what an earlier one compiled instead of compiling it again.
Compiling the 7B-1M's sparse 1M prefill chunk takes 14 s on an H100 (three programs; GPU_NOTES,
thirteenth session); when it was one program of all 28 layers it took 203 s, and 25 s to load from
the cache (twelfth session).

``qwen-jax`` calls ``enable()`` before anything compiles. Where the cache goes, first match wins:

- ``QWEN_JAX_COMPILE_CACHE``: a folder, or ``off`` (also ``0``, ``false``, ``none``, ``no``) for no cache
  (set but empty counts as unset);
- ``JAX_COMPILATION_CACHE_DIR`` (JAX's own setting): left as it is;
- ``$XDG_CACHE_HOME/qwen-jax/xla`` (default ``~/.cache/qwen-jax/xla``).

Python users opt in with ``qwen_jax.enable_compile_cache()`` (a library does not change JAX's global
settings on import). JAX writes only programs that took at least
``jax_persistent_cache_min_compile_time_secs`` (1 s) to compile; in multi-process jobs only process 0
writes. Entries are keyed by the program, the devices, and the JAX and XLA versions, so a stale entry is
never used; deleting the folder is always safe.
"""

from __future__ import annotations

import os
import warnings

ENV = "QWEN_JAX_COMPILE_CACHE"
OFF = ("off", "0", "false", "none", "no")


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qwen-jax", "xla")


def resolve(path: str | None = None) -> str | None:
    """The folder the cache would use (None: off), from ``path`` or the environment (module docstring)."""
    if path is None:
        path = os.environ.get(ENV) or None     # set but empty: as if unset
    if path is not None:
        return None if path.strip().lower() in OFF else os.path.abspath(os.path.expanduser(path))
    import jax
    return jax.config.jax_compilation_cache_dir or default_dir()


def enable(path: str | None = None) -> str | None:
    """Turn the persistent compilation cache on (folder from ``path``, else ``resolve``); returns the folder,
    or None when it is off. Call it before the first compilation: JAX reads the setting once."""
    import jax
    folder = resolve(path)
    if folder is None:    # off, even where JAX_COMPILATION_CACHE_DIR set one
        if jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", None)
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError as e:   # JAX would warn at every compilation instead: say it once and compile without
        warnings.warn(f"no compilation cache ({e}); set {ENV} to a writable folder, or to off", stacklevel=2)
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    if jax.config.jax_compilation_cache_dir != folder:
        jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def state() -> str:
    """What the cache is doing in this process, for reports: its folder or ``off``."""
    import jax
    return jax.config.jax_compilation_cache_dir or "off"
