"""Folders written by the converter: an orbax checkpoint of the parameters plus the HF metadata files.

    DST/qwen_jax.json     format marker and provenance
    DST/config.json       (and tokenizer, generation and chat-template files, copied verbatim)
    DST/params/           orbax checkpoint of the parameter tree

Writes are atomic: everything goes to a sibling temporary folder renamed into place at the end, so a
failed or interrupted conversion leaves nothing at the destination, and a destination that appears meanwhile
(another conversion to it finished first) is left as it is, the later conversion refused in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time

from qwen_jax.errors import CheckpointError

MARKER = "qwen_jax.json"
FORMAT = "qwen-jax"
FORMAT_VERSION = 1


def is_converted(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def check_destination(dst: str, src: str | None = None) -> None:
    """Refuse a destination that exists, has no parent folder, or is ``src`` or inside it."""
    if not dst:
        raise CheckpointError("the destination folder is an empty name; give a new folder's path")
    if src is not None:
        root, target = os.path.realpath(src), os.path.realpath(dst)
        if os.path.commonpath([root, target]) == root:
            where = "the source folder" if target == root else f"inside the source folder {src}"
            raise CheckpointError(f"{dst}: the destination is {where}; choose a new folder outside it")
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
    before = set(threading.enumerate())
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(dst))}.partial-", dir=parent)
    except OSError as e:         # a read-only or pseudo file system: name the destination, not the temporary name
        raise CheckpointError(f"{dst}: cannot create a folder in {parent} ({e.strerror or e})") from None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)        # mkdtemp's 0700 would keep other users (a shared checkpoint) out
        _rename_new(tmp, dst)
    except BaseException:
        # threads started inside (orbax's writers) may still write into it after an interrupt: let them end first,
        # and those they start in turn (a commit thread); quietly, as a commit they can no longer finish logs a
        # 17-line traceback that the caller's one line replaces
        deadline = time.monotonic() + 30
        with _quiet_absl(logging.CRITICAL):
            while (started := set(threading.enumerate()) - before) and time.monotonic() < deadline:
                for thread in started:
                    thread.join(max(0.0, deadline - time.monotonic()))
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_new(tmp: str, dst: str) -> None:
    """Rename the folder ``tmp`` to ``dst`` unless ``dst`` exists by now (another conversion to the same destination
    finished first, or someone made it since ``check_destination``): then refuse in one line, ``dst`` untouched.

    ``os.rename`` replaces an empty folder silently (whoever made it may be writing into it: a mix) and fails on a
    full one with a bare OSError. Linux's ``renameat2(RENAME_NOREPLACE)`` checks and renames in one step; where it is
    missing (another OS, a file system without the flag) a check just before the rename leaves a window that small."""
    taken = CheckpointError(f"{dst}: created by someone else while this conversion ran (another conversion to the same "
                            f"destination?); it is left as it is and this conversion's output is discarded")
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise taken
        if err not in (errno.EINVAL, errno.ENOSYS):      # (EINVAL: the file system does not take the flag)
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise taken
    try:
        os.rename(tmp, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise taken from None
        raise


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's ``renameat2`` (glibc 2.28 and later), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def copy_metadata(src: str, dst: str, names: list[str]) -> None:
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def save_params(folder: str, params: dict) -> None:
    """Orbax-save a pytree of numpy arrays into ``folder/params``."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    # after an interrupt orbax's commit thread fails and logs a 17-line traceback at ERROR level, which the caller's
    # one line replaces (atomic_folder waits for that thread, quietly too); any other failure is raised here
    with _quiet_absl(logging.CRITICAL):
        try:
            checkpointer.save(os.path.join(os.path.abspath(folder), "params"), params)
            checkpointer.wait_until_finished()
        except BaseException:
            # interrupted: let orbax's writer threads finish first, or they write into the folder after it is removed
            with contextlib.suppress(BaseException):
                checkpointer.wait_until_finished()
            raise
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
    are honoured, so each device reads only its own shards. ``as_numpy``: host arrays in the stored dtype.

    A damaged checkpoint (unreadable metadata or array data) raises ``CheckpointError`` naming the folder."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(folder), "params")
    read_marker(folder)
    if not os.path.isdir(path):
        raise CheckpointError(f"{folder}: no params/ folder (incomplete conversion?)")
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _drop_orbax_leftovers(previous_hook)
    with ocp.StandardCheckpointer() as checkpointer:
        with _quiet_absl(), _damaged(folder, path):  # orbax logs unreadable metadata as a warning and returns none
            meta = checkpointer.metadata(path)
        stored = getattr(meta, "item_metadata", meta)
        stored = getattr(stored, "tree", stored)
        if stored is None:
            # metadata reads every array's metadata at once: when one read fails, orbax returns none and its event
            # loop closes with the sibling reads failed too, whose errors asyncio logs when collected (at exit, 70
            # lines after the one-line error, or not, as the reads' timing falls)
            _quiet_failed_reads(path)
            raise CheckpointError(f"{folder}: params/ is damaged (its parameter metadata cannot be read); "
                                  "convert the checkpoint again")
        _check_tree(stored, target, folder)
        with _damaged(folder, path):
            if as_numpy:
                restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
                params = ocp.PyTreeCheckpointer().restore(path, restore_args=restore_args)
            else:
                params = checkpointer.restore(path, target)
    # only a failed read leaves reads in flight: after one the filter stays in place
    sys.unraisablehook = previous_hook
    return params


@contextlib.contextmanager
def _damaged(folder: str, path: str | None = None):
    """Orbax and TensorStore raise bare ``Exception``s (the cause chained) for unreadable data: one line instead.
    After a failed read of ``path``, the reads' sibling tasks that failed too are dropped from asyncio's log."""
    try:
        yield
    except Exception as e:
        if path is not None:
            _quiet_failed_reads(path)
        raise CheckpointError(f"{folder}: params/ is damaged and cannot be read ({_root_cause(e)}); "
                              "convert the checkpoint again") from None


@contextlib.contextmanager
def _quiet_absl(level: int = logging.ERROR):
    """Only absl's (orbax's) log records at ``level`` or above, while inside."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _root_cause(e: BaseException, limit: int = 240) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


class _FailedReads(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" and "Future exception was never retrieved" for reads
    of one params folder: when one read fails, orbax's event loop stops and closes with its siblings' reads in
    flight. A sibling failing in the loop's last pass leaves its exception unretrieved in the future TensorStore
    resolved for it, one failing a pass earlier in its task; either is logged whenever it is collected, after
    the one-line error."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.split("\n", 1)[0].endswith(" exception was never retrieved"):
            return True
        error = record.exc_info[1] if record.exc_info else None     # the read's error, its path as it is
        return self.path not in (text if error is None else f"{error}\n{text}")


def _quiet_failed_reads(path: str) -> None:
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _FailedReads) and f.path == path for f in logger.filters):
        logger.addFilter(_FailedReads(path))


def _drop_orbax_leftovers(previous):
    """An unraisable-exception hook dropping what a failed read leaves behind: reads still in flight finish
    into orbax's closed event loop ("Event loop is closed") or die with their coroutines, each printing a
    traceback long after the one-line error. Anything else goes to ``previous``."""

    def hook(unraisable):
        exc = unraisable.exc_value
        code = getattr(unraisable.object, "cr_code", None)
        tb, frames = unraisable.exc_traceback, []
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if code is not None:
            frames.append(code.co_filename)
        if not ((isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")
                or any(f"{os.sep}orbax{os.sep}" in name for name in frames)):
            previous(unraisable)

    return hook


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
