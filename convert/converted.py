"""Folders written by the converter: an orbax checkpoint of the parameters plus the HF metadata files.

    DST/qwen_jax.json     format marker and provenance
    DST/config.json       (and tokenizer, generation and chat-template files, copied verbatim)
    DST/params/           orbax checkpoint of the parameter tree

Writes are atomic: everything goes to a sibling temporary folder renamed into place at the end, so a
failed or interrupted conversion leaves nothing at the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from qwen_jax.errors import CheckpointError

MARKER = "qwen_jax.json"
FORMAT = "qwen-jax"
FORMAT_VERSION = 1


def is_converted(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def check_destination(dst: str) -> None:
    if os.path.lexists(dst):
        raise CheckpointError(f"{dst}: already exists; choose a new destination or remove it first")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise CheckpointError(f"{parent}: the destination's parent folder does not exist")


@contextlib.contextmanager
def atomic_folder(dst: str):
    """Yield a temporary folder next to ``dst``; rename it to ``dst`` only if the block succeeds."""
    check_destination(dst)
    parent = os.path.dirname(os.path.abspath(dst))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(dst))}.partial-", dir=parent)
    try:
        yield tmp
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_metadata(src: str, dst: str, names: list[str]) -> None:
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def save_params(folder: str, params: dict) -> None:
    """Orbax-save a pytree of numpy arrays into ``folder/params``."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(os.path.join(os.path.abspath(folder), "params"), params)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()


def write_marker(folder: str, **info) -> None:
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump({"format": FORMAT, "version": FORMAT_VERSION, **info}, f, indent=2)


def read_marker(folder: str) -> dict:
    try:
        with open(os.path.join(folder, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable {MARKER} ({e})") from None
    if marker.get("format") != FORMAT or marker.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: {MARKER} is not a qwen-jax version {FORMAT_VERSION} checkpoint")
    return marker


def restore_params(folder: str, target, *, as_numpy: bool = False):
    """Restore ``folder/params`` into ``target``, a pytree of ``jax.ShapeDtypeStruct``: dtype and sharding
    are honoured, so each device reads only its own shards. ``as_numpy``: host arrays in the stored dtype."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(folder), "params")
    if not os.path.isdir(path):
        raise CheckpointError(f"{folder}: no params/ folder (incomplete conversion?)")
    with ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(path)
        stored = getattr(meta, "item_metadata", meta)
        stored = getattr(stored, "tree", stored)
        _check_tree(stored, target, folder)
        if as_numpy:
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            return ocp.PyTreeCheckpointer().restore(path, restore_args=restore_args)
        return checkpointer.restore(path, target)


def _check_tree(stored, target, folder):
    import jax

    flat_stored = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    flat_target = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(target)}
    for key in sorted(set(flat_stored) | set(flat_target)):
        if key not in flat_target:
            raise CheckpointError(f"{folder}: parameter {key} is not part of this config")
        if key not in flat_stored:
            raise CheckpointError(f"{folder}: parameter {key} is missing")
        if tuple(flat_stored[key].shape) != tuple(flat_target[key].shape):
            raise CheckpointError(f"{folder}: parameter {key} has shape {list(flat_stored[key].shape)}, config.json "
                                  f"implies {list(flat_target[key].shape)}")
