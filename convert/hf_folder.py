"""A Hugging Face checkpoint folder: which safetensors files hold which tensors, validated up front.

Single file (``model.safetensors``) or sharded (``model.safetensors.index.json``). Pickle formats
(``*.bin``, ``*.pt``, ...) are refused, never opened: loading them can execute arbitrary code. Index
entries must name files inside the folder.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from convert.safetensors_io import SafetensorsFile, no_duplicate_keys
from qwen_jax.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files copied next to converted weights: config, generation defaults, tokenizer, chat template, sparse budgets.
METADATA_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "sparse_attention_config.json",
)


class HFCheckpoint:
    """Tensor name -> the safetensors file holding it, for one checkpoint folder."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: not a folder")
        self.folder = folder
        index_path = os.path.join(folder, INDEX_NAME)
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(single):
            # model.safetensors first, as transformers reads it: a folder that also holds shards and their index
            # (one layout saved over the other) gives the weights transformers gives
            self._where = {}
            self._add_file(SafetensorsFile(single))
        elif os.path.isfile(index_path):
            self._where = self._from_index(index_path)
        else:
            paths = sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors")))
            if not paths:
                pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
                if pickles:
                    raise CheckpointError(
                        f"{folder}: only pickle weights ({', '.join(pickles)}); pickle checkpoints are refused because "
                        "loading them can execute code: save the model as safetensors first")
                raise CheckpointError(f"{folder}: no model weights (*.safetensors) found")
            self._where = {}
            for path in paths:
                self._add_file(SafetensorsFile(path))

    def _add_file(self, st: SafetensorsFile, expected: set[str] | None = None):
        for key in st.keys():
            if key in self._where:
                raise CheckpointError(f"duplicated key {key!r} in {os.path.basename(st.path)} and "
                                      f"{os.path.basename(self._where[key].path)}")
            if expected is not None and key not in expected:
                raise CheckpointError(f"{os.path.basename(st.path)}: key {key!r} is not listed in {INDEX_NAME}")
            self._where[key] = st

    def _from_index(self, index_path: str) -> dict[str, SafetensorsFile]:
        try:
            with open(index_path) as f:
                index = json.load(f, object_pairs_hook=no_duplicate_keys)
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except CheckpointError as e:
            raise CheckpointError(f"{INDEX_NAME}: {e}") from None
        except (OSError, ValueError, KeyError, AssertionError, TypeError):
            raise CheckpointError(f"{INDEX_NAME}: malformed (expected a JSON object with a 'weight_map' of file names)") from None
        by_file: dict[str, set[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(name, set()).add(key)
        self._where = {}
        for name, keys in sorted(by_file.items()):
            # the name, not where a link leads: the hub's cache links each shard to ../../blobs/<sha>, outside
            # the snapshot folder, and that folder is what a repo id resolves to
            parts = name.replace("\\", "/").split("/")
            if os.path.isabs(name) or not name or any(p in ("", ".", "..") for p in parts):
                raise CheckpointError(f"{INDEX_NAME}: entry {name!r} points outside the checkpoint folder; refused")
            path = os.path.join(self.folder, name)
            if not name.endswith(".safetensors"):
                raise CheckpointError(f"{INDEX_NAME}: entry {name!r} is not a .safetensors file; refused")
            if not os.path.isfile(path):
                raise CheckpointError(f"missing shard {name!r} (listed in {INDEX_NAME})")
            st = SafetensorsFile(path)
            self._add_file(st, expected=keys)
            absent = sorted(keys - set(st.keys()))
            if absent:
                raise CheckpointError(f"{name}: missing key {absent[0]!r} that {INDEX_NAME} places there")
        return self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, key: str) -> tuple[np.dtype, tuple[int, ...]]:
        return self._where[key].info(key)

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)
