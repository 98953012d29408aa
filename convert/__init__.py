"""Checkpoint conversion: Hugging Face safetensors <-> qwen-jax parameters (orbax), bit-exact both ways.

    convert_checkpoint(src, dst, to="jax")   # HF folder -> converted folder (orbax params + metadata)
    convert_checkpoint(src, dst, to="hf")    # converted folder -> HF safetensors folder
    read_hf_params(folder, config, ...)      # HF tensors -> parameter tree, one tensor in host memory at a time
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Callable

import ml_dtypes
import numpy as np

from convert import keymap
from convert.converted import (atomic_folder, check_destination, copy_metadata, is_converted, read_marker,
                               restore_params, save_params, write_marker)
from convert.hf_folder import INDEX_NAME, METADATA_FILES, HFCheckpoint
from convert.safetensors_io import write_safetensors
from qwen_jax.config import QwenConfig, read_config_json
from qwen_jax.errors import CheckpointError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
CAST_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32),
               "float16": np.dtype(np.float16)}
WEIGHT_DTYPES = {*CAST_DTYPES.values(), np.dtype(np.float64)}


def cast_dtype(dtype) -> np.dtype | None:
    """``convert_checkpoint``'s ``dtype``: None (keep), or one of ``CAST_DTYPES`` by name or dtype."""
    if dtype is None:
        return None
    try:
        resolved = CAST_DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
    except (KeyError, TypeError):
        resolved = None
    if resolved not in CAST_DTYPES.values():
        raise CheckpointError(f"cannot cast weights to {dtype!r}: use None (keep), {', '.join(CAST_DTYPES)}")
    return resolved


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="tensor", disable=None if enabled else True, leave=False)


def expected_paths(config: QwenConfig) -> set[tuple[str, ...]]:
    from qwen_jax.model import abstract_params
    return {path for path, _ in keymap.flatten(abstract_params(config))}


def read_hf_params(folder: str, config: QwenConfig, *, dtype=None,
                   place: Callable[[tuple[str, ...], np.ndarray], object] | None = None, progress: bool = True) -> dict:
    """Read, validate and map an HF checkpoint's tensors into the parameter tree.

    Every key, shape and file is checked before any tensor data is read. Tensors are then read one at
    a time, transformed, cast to ``dtype`` (default: kept as stored) and handed to ``place(path, array)``
    (for example ``jax.device_put`` with a sharding); without ``place`` the tree holds numpy arrays.
    """
    checkpoint = HFCheckpoint(folder)
    keys = checkpoint.keys()
    todo = keymap.plan(keys, {k: checkpoint.info(k)[1] for k in keys}, config, expected_paths(config))
    for key, _, _ in todo:
        stored = checkpoint.info(key)[0]
        if stored not in WEIGHT_DTYPES:
            raise CheckpointError(f"{key}: stored as {stored.name}; model weights must be float16, bfloat16, float32 "
                                  f"or float64 (a quantized or integer checkpoint is not supported)")
    if config.tie_word_embeddings and "lm_head.weight" in keys:
        if not np.array_equal(checkpoint.read("lm_head.weight"), checkpoint.read("model.embed_tokens.weight")):
            raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings is "
                                  "true; set tie_word_embeddings false in config.json")
    out = []
    for key, rule, path in _progress(todo, "reading weights", progress):
        array = rule.to_jax(checkpoint.read(key), config)
        # laid out row-major in the stored dtype, then cast: numpy casts a transposed bfloat16 kernel to float32
        # 2-15x slower than a row-major one (the real 0.5B to float32, under cProfile: 3.7 -> 2.2 s of the two)
        array = np.ascontiguousarray(array)
        if dtype is not None:
            array = array.astype(dtype, copy=False)
        out.append((path, place(path, array) if place is not None else array))
    return keymap.unflatten(out)


def convert_checkpoint(src: str, dst: str, *, to: str = "jax", dtype=None, progress: bool = True,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Convert ``src`` into a new folder ``dst`` (never overwritten); returns ``dst``."""
    if to not in ("jax", "hf"):
        raise CheckpointError(f"unknown conversion target {to!r} (use 'jax' or 'hf')")
    dtype = cast_dtype(dtype)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a folder")
    _check_side_files(src)
    check_destination(dst, src)
    if to == "jax":
        if is_converted(src):
            raise CheckpointError(f"{src} is already a qwen-jax checkpoint (use --to hf to go back)")
        config = QwenConfig.from_hf_dict(read_config_json(src))
        params = read_hf_params(src, config, dtype=dtype, progress=progress)
        with atomic_folder(dst) as tmp:
            save_params(tmp, params)
            copy_metadata(src, tmp, _metadata_files(src))
            _record_dtype(tmp, dtype)
            write_marker(tmp, source=os.path.abspath(src))
        return dst
    if not is_converted(src):
        raise CheckpointError(f"{src} is not a qwen-jax checkpoint (no qwen_jax.json); "
                              "--to hf converts folders written by 'qwen-jax convert'")
    read_marker(src)
    config = QwenConfig.from_hf_dict(read_config_json(src))
    params = load_converted_numpy(src, config)
    with atomic_folder(dst) as tmp:
        write_hf_safetensors(tmp, params, config, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress)
        copy_metadata(src, tmp, _metadata_files(src))
        _record_dtype(tmp, dtype)
    return dst


def _check_side_files(folder: str) -> None:
    """The generation defaults and the tokenizer are copied as they are: refuse them here if ``qwen_jax.load``
    would, rather than write a folder that cannot be loaded."""
    from qwen_jax.api import _read_generation_config
    from qwen_jax.tokenizer import Tokenizer
    _read_generation_config(folder)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        Tokenizer(folder)


def _record_dtype(folder: str, dtype) -> None:
    """A cast (``dtype`` given) is written into the copied config.json's ``dtype`` / ``torch_dtype``, so HF's
    ``from_pretrained(dtype="auto")`` loads the weights in the dtype they are stored in."""
    if dtype is None:
        return
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    name = np.dtype(dtype).name
    keys = [k for k in ("dtype", "torch_dtype") if k in raw] or ["torch_dtype"]
    for key in keys:
        raw[key] = name
    with open(path, "w") as f:
        json.dump(raw, f, indent=2)


def _metadata_files(folder: str) -> list[str]:
    return [n for n in METADATA_FILES if os.path.isfile(os.path.join(folder, n))]


def load_converted_numpy(folder: str, config: QwenConfig) -> dict:
    from qwen_jax.model import abstract_params
    return restore_params(folder, abstract_params(config), as_numpy=True)


def _natural(path: tuple[str, ...]):
    return [int(t) if t.isdigit() else t for part in path for t in re.split(r"(\d+)", part)]


def write_hf_safetensors(folder: str, params: dict, config: QwenConfig, *, dtype=None,
                         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> None:
    """Write ``params`` as HF safetensors (sharded with an index past ``max_shard_bytes``)."""
    items = sorted(keymap.flatten(params), key=lambda kv: (kv[0][0] not in ("embed",), _natural(kv[0])))
    entries = []
    for path, array in items:
        name, rule = keymap.for_path(path, config)
        out_dtype = np.dtype(dtype) if dtype is not None else np.asarray(array).dtype

        def produce(array=array, rule=rule, out_dtype=out_dtype):
            return rule.to_hf(np.asarray(array), config).astype(out_dtype, copy=False)

        entries.append((name, out_dtype, rule.hf_shape(config), produce))
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), shards[0],
                          wrap=lambda items: _progress(items, "writing", progress))
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(folder, name), shard,
                          wrap=lambda items, name=name: _progress(items, f"writing {name}", progress))
        for entry in shard:
            weight_map[entry[0]] = name
            total += math.prod(entry[2]) * entry[1].itemsize
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


__all__ = ["convert_checkpoint", "read_hf_params", "write_hf_safetensors", "load_converted_numpy", "HFCheckpoint",
           "is_converted", "restore_params", "expected_paths"]
