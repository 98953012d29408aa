"""Safetensors read lazily, tensor by tensor, and written in streaming fashion.

Format: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data section) plus an
optional ``"__metadata__"`` of strings, then the raw little-endian tensor bytes. Reading never
executes code and validates the header against the file size first, so a truncated file or a
corrupt header is reported by name instead of crashing mid-conversion.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from qwen_jax.errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def no_duplicate_keys(pairs):
    """``json.load`` hook: a repeated key is an error, not "last one wins"."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"duplicated key {k!r}")
        out[k] = v
    return out


class SafetensorsFile:
    """Header of one ``.safetensors`` file, validated; tensors are read on demand."""

    def __init__(self, path: str):
        self.path = path
        name = os.path.basename(path)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{name}: truncated file ({size} bytes, no safetensors header)")
                n = int.from_bytes(head, "little")
                if n < 2 or n > _MAX_HEADER:
                    raise CheckpointError(f"{name}: corrupt header (declared header length {n})")
                if 8 + n > size:
                    raise CheckpointError(f"{name}: truncated file (header needs {8 + n} bytes, file has {size})")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{name}: cannot read ({e.strerror})") from None
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
        except CheckpointError as e:
            raise CheckpointError(f"{name}: corrupt header ({e})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{name}: corrupt header (not valid JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{name}: corrupt header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, entry in header.items():
            if isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] not in DTYPES:
                # a valid file in a format newer than this reader (complex, 4-bit, 6-bit, float8 exponent scales)
                raise CheckpointError(f"{name}: {key!r} is stored as {entry['dtype']}, which qwen-jax cannot read "
                                      "(model weights must be float16, bfloat16, float32 or float64)")
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{name}: corrupt header entry for {key!r}: {entry!r}") from None
            if any(d < 0 for d in shape) or end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise CheckpointError(f"{name}: corrupt header: {key!r} has offsets {begin}..{end} for shape {list(shape)}")
            if end > data_size:
                raise CheckpointError(f"{name}: truncated file ({key!r} ends at byte {self._data_start + end}, "
                                      f"file has {size})")
            self._entries[key] = (dtype, shape, begin, end)
        spans = sorted((begin, end, key) for key, (_, _, begin, end) in self._entries.items() if end > begin)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:          # two tensors on the same bytes: one of them would read the other's data
                raise CheckpointError(f"{name}: corrupt header: {first!r} and {second!r} overlap")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def info(self, key: str) -> tuple[np.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self._entries[key]
        return dtype, shape

    def read(self, key: str) -> np.ndarray:
        """The tensor as a fresh, writable numpy array (host memory: this one tensor)."""
        dtype, shape, begin, end = self._entries[key]
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            out = np.fromfile(f, dtype=dtype.newbyteorder("<"), count=math.prod(shape))
        if out.size != math.prod(shape):
            raise CheckpointError(f"{os.path.basename(self.path)}: truncated file while reading {key!r}")
        return out.astype(dtype, copy=False).reshape(shape)


def write_safetensors(path: str, entries: Iterable[tuple[str, np.dtype, tuple[int, ...], Callable[[], np.ndarray]]],
                      metadata: dict[str, str] | None = None, wrap=lambda items: items) -> None:
    """Write tensors given as ``(name, dtype, shape, produce)``; each array is produced, written and dropped.

    ``wrap`` wraps the write loop (a progress bar)."""
    entries = list(entries)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape, _ in entries:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, dtype, shape, produce in wrap(entries):
            array = np.ascontiguousarray(produce())
            if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
                raise ValueError(f"{name}: produced {array.dtype}{array.shape}, declared {np.dtype(dtype)}{tuple(shape)}")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
