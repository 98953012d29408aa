"""Per-head sparse budgets from recall runs: Qwen's ``sparse_attention_config.json``, refined by measurement.

Qwen refined the default (1000, 6096) budgets of Qwen2.5-1M by measuring each head's attention recall
and enlarging the budgets of heads that kept too little mass (qwen25_1m.md section 3); the tool was
not released. Here the measurement is ``qwen-jax recall``, run once per candidate budget file on the
same prompt. In a recall run dense attention drives the model, so a head's recall depends on its
own budgets only: the runs can be combined head by head, and the combined file keeps exactly the
recall each head had in the run it was taken from.

    qwen-jax recall --model M --length 128k --dca ... --json r1.json                        # defaults
    qwen-jax recall ... --sparse-config x2.json --json r2.json                               # and so on
    qwen-jax budgets r1.json r2.json r4.json --target 0.9 --out sparse_attention_config.json

For each (layer, head) the cheapest run whose recall reaches ``target`` is taken (cheapest: the
smallest tile share, the key tiles a sparse kernel computes); a head no run brings to the target
takes the run with its highest recall. The file's ``score`` is the head's measured recall.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from qwen_jax.attention.sparse import DEFAULT_BUDGET
from qwen_jax.errors import QwenJaxError

# what must agree between runs for their heads to be comparable
_SAME = ("tokens", "prefill chunk", "prompt sha256", "dtype", "kv_cache_dtype")
_SAME_DCA = ("chunk_size", "local_size", "original_max_position_embeddings")


class Run(NamedTuple):
    path: str
    recall: np.ndarray     # [L, N]
    tiles: np.ndarray      # [L, N] tile share
    budgets: np.ndarray    # [L, N, 2] (vertical_size, slash_size)


def read_run(path: str) -> tuple[Run, dict]:
    """One ``qwen-jax recall --json`` file: the run, and what identifies its prompt and model."""
    try:
        with open(path) as f:
            d = json.load(f)
        recall, tiles = np.asarray(d["recall"], np.float64), np.asarray(d["tile share"], np.float64)
        recall[recall < 0] = np.nan       # written as -1: a head that never ran sparse
        dca = d["dca"]
        if not isinstance(dca, dict):
            raise TypeError("dca is not an object")
        budgets = np.asarray(d["head budgets"], np.int64) if "head budgets" in d else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise QwenJaxError(f"{path}: not a recall file written by qwen-jax recall --json ({e})") from None
    if np.any(recall > 1 + 1e-3):          # rounding aside
        raise QwenJaxError(f"{path}: recall above 1, which no run measures; not a recall file of qwen-jax recall")
    if budgets is None and str(dca.get("budgets", "")).startswith("default"):
        budgets = np.broadcast_to(np.asarray(DEFAULT_BUDGET, np.int64), recall.shape + (2,))
    elif budgets is None:
        raise QwenJaxError(f"{path}: the run used a budget file but does not record its per-head budgets "
                           "(written by an older qwen-jax recall): run it again")
    if recall.ndim != 2 or tiles.shape != recall.shape or budgets.shape != recall.shape + (2,):
        raise QwenJaxError(f"{path}: recall, tile share and head budgets disagree in shape")
    key = {k: d.get(k) for k in _SAME} | {k: dca.get(k) for k in _SAME_DCA} | {"heads": recall.shape}
    key["model"] = d.get("model")       # compared by _same_model
    return Run(path, recall, tiles, budgets), key


def _same_model(a, b) -> bool:
    """Whether two recorded ``--model`` values (a folder or a hub repo id, as typed; None: not recorded) name
    one model: one spelled two ways ("ckpt/" and "ckpt", or two paths to one folder) counts as the same."""
    if a is None or b is None:
        return True
    a, b = str(a), str(b)
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.samefile(a, b)      # both local folders (relative paths: as seen from here)
    except OSError:
        return False


def refine(runs: list[Run], target: float) -> tuple[list[dict], np.ndarray]:
    """``(config, choice)``: Qwen's per-layer ``{head: ["vertical_and_slash", v, s, recall]}`` list and the
    index [L, N] of the run each head was taken from."""
    if not 0.0 < target <= 1.0:
        raise QwenJaxError(f"--target must be in (0, 1], got {target}")
    recall = np.stack([r.recall for r in runs])                                   # [R, L, N]
    tiles = np.stack([r.tiles for r in runs])
    if np.isnan(recall).any():
        raise QwenJaxError("a run has heads without a recall (its prompt was not longer than the sparse threshold)")
    cost = np.where(recall >= target, tiles, np.inf)
    choice = np.where(np.isfinite(cost).any(0), np.argmin(cost, 0), np.argmax(recall, 0))
    L, N = choice.shape
    config = []
    for layer in range(L):
        entry = {}
        for head in range(N):
            r = runs[choice[layer, head]]
            v, s = (int(x) for x in r.budgets[layer, head])
            entry[str(head)] = ["vertical_and_slash", v, s, round(float(r.recall[layer, head]), 4)]
        config.append(entry)
    return config, choice


def combine(paths: list[str], target: float) -> tuple[list[dict], dict]:
    """Read the recall files, check they measured the same model and prompt, and refine: ``(config, report)``
    with the report's expected mean recall and tile share and how many heads each run gave."""
    if not paths:
        raise QwenJaxError("give at least one recall file")
    paths = list(dict.fromkeys(paths))     # a file named twice (a shell glob and its name) is one run
    runs, keys = zip(*(read_run(p) for p in paths))
    for path, key in zip(paths[1:], keys[1:]):
        if not _same_model(key["model"], keys[0]["model"]):
            raise QwenJaxError(f"{path} and {paths[0]} measured different models ({key['model']} and "
                               f"{keys[0]['model']}): combine runs of one model only")
        diff = [k for k in key if k != "model" and key[k] != keys[0][k]
                and None not in (key[k], keys[0][k])]   # None: not recorded
        if diff:
            raise QwenJaxError(f"{path} and {paths[0]} measured different runs ({', '.join(map(str, diff))} differ)")
    config, choice = refine(list(runs), target)
    pick = lambda field: np.take_along_axis(np.stack([getattr(r, field) for r in runs]), choice[None], 0)[0]  # noqa: E731
    recall, tiles = pick("recall"), pick("tiles")
    report = {"target": target, "heads": int(recall.size), "mean recall": float(recall.mean()),
              "heads below target": int((recall < target).sum()), "mean tile share": float(tiles.mean()),
              "heads per run": {p: int((choice == i).sum()) for i, p in enumerate(paths)},
              "runs": {p: {"mean recall": float(r.recall.mean()), "mean tile share": float(r.tiles.mean())}
                       for p, r in zip(paths, runs)}}
    return config, report
