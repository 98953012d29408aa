"""Attention recall of sparse prefill: per layer and head, the share of softmax mass the sparse mask keeps.

For every prefill chunk the model runs dense DCA attention (which drives the hidden states) and the
sparse attention of the same queries; a query's recall is ``exp(lse_sparse - lse_dense)`` (the mask is
a subset of the dense one, so it lies in [0, 1]). Reported per (layer, head): the mean over the
prompt's queries in chunks that run sparse (prompts not longer than the threshold have none), and the
*tile share*: the (query, key) pairs in the 64 x 64 key tiles a sparse kernel computes for the mask,
over the dense causal pairs (what the attention can save at best; scattered diagonals cost a whole
band each). ``--save-selections`` keeps every layer's selections (``save_selections``), which
``python -m qwen_jax.bench.sparse --selections`` times the kernels on.

    qwen-jax recall --model DIR --length 128k --dca chunk_size=32768,local_size=2048,\
        original_max_position_embeddings=32768 [--sparse-config FILE] --json r.json --png r.png
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import vslash
from qwen_jax import attention
from qwen_jax.cache import cache_length, init_cache
from qwen_jax.config import QwenConfig
from qwen_jax.errors import QwenJaxError
from qwen_jax.model import _check_sparse_chunks, _embed_step, apply_layer, params_dtype, placed_like, through_layers


@functools.partial(jax.jit, static_argnames=("config", "spec", "layer", "selections"),
                   donate_argnames=("x", "k_cache", "v_cache"))
def _layer(layer_params, x, start, request_lengths, k_cache, v_cache, config, spec, layer, selections):
    """One decoder layer of a recall chunk (a program per layer kind, as prefill runs them):
    ``(x, k_cache, v_cache, kept [N], count [N], tiles [N], selection or None)``."""
    (x, k_cache, v_cache), state = apply_layer(layer_params, x, start, request_lengths, k_cache, v_cache, config,
                                               spec, layer, mutable=["intermediates"])
    attn = state.get("intermediates", {}).get("attn")
    if attn is None:     # this chunk ran dense (one query, or sparse off): nothing to record
        zeros = jnp.zeros((config.num_attention_heads,), jnp.float32)
        return x, k_cache, v_cache, zeros, zeros, zeros, None
    kept, count, tiles = (attn["recall"][0][j].astype(jnp.float32) for j in range(3))
    return x, k_cache, v_cache, kept, count, tiles, attn["selection"][0] if selections else None


def _chunk(params, tokens, start, request_lengths, cache, config, spec, selections=False):
    """Recall of one prefill chunk, per layer and head: ``(kept, count, tiles [L, N], selections with a leading
    layer axis or None, cache)``; the cache is donated."""
    x = _embed_step(params["embed"]["embedding"], tokens, config, spec)

    def step(layer_params, x, k, v, layer):
        return _layer(layer_params, x, start, request_lengths, k, v, config, spec, layer, selections)

    _, cache, out = through_layers(params, x, cache, config, step)
    kept, count, tiles = (jnp.stack([o[j] for o in out]) for j in range(3))
    sel = _stack_layers([o[3] for o in out]) if selections and out[0][3] is not None else None
    return kept, count, tiles, sel, cache


def _stack_layers(sels: list[vslash.Selection]) -> vslash.Selection:
    """The layers' selections with a leading layer axis; a layer whose budgets are smaller has its lists
    padded to the widest layer's with unused slots (``NO_KEY``, past its counts, as ``select`` pads)."""
    def pad(x, width):
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])], constant_values=vslash.NO_KEY)
    D, V = max(s.dist.shape[-1] for s in sels), max(s.cols.shape[-1] for s in sels)
    sels = [s._replace(dist=pad(s.dist, D), cols=pad(s.cols, V)) for s in sels]
    return jax.tree.map(lambda *x: jnp.stack(x), *sels)


def measure(params, config: QwenConfig, tokens, *, chunk_size: int, spec: attention.AttentionSpec,
            progress=None, selections: bool = False, cache_dtype=None) -> dict:
    """Recall of ``tokens`` [T] (one prompt): ``{"recall": [L, N] mean, "queries": [L, N] counts, "tiles":
    [L, N]}``, where ``tiles`` is the share of the dense causal (query, key) pairs that the 64 x 64 key
    tiles a sparse kernel computes cover (over the chunks that ran sparse). ``selections``: also return
    ``"selections"``, per sparse chunk ``(start, Selection)`` of numpy arrays with a leading layer axis.
    ``cache_dtype``: the KV cache's storage (default: the parameters' dtype; a model's ``kv_cache_dtype``)."""
    dca = config.dual_chunk_attention_config
    if dca is None or not dca.sparse_attention_enabled:
        raise QwenJaxError("recall needs a DCA config with sparse_attention_enabled")
    _check_sparse_chunks(config, chunk_size)
    tokens = jnp.asarray(tokens, jnp.int32)[None]
    T = tokens.shape[1]
    spec = attention.with_sparse_rows(dataclasses.replace(spec, recall=True), config, [T])
    cache = placed_like(params, init_cache(config, 1, cache_length(T), cache_dtype or params_dtype(params)))
    lengths = jnp.full((1,), T, jnp.int32)
    kept = np.zeros((config.num_hidden_layers, config.num_attention_heads))
    count, tiles = np.zeros_like(kept), np.zeros_like(kept)
    dense_pairs, chosen = 0, []
    for begin in range(0, T, chunk_size):
        end = min(begin + chunk_size, T)
        k, c, t, sel, cache = _chunk(params, tokens[:, begin:end], np.int32(begin), lengths, cache, config, spec,
                                     selections)
        c = np.asarray(c, np.float64)
        kept += np.asarray(k, np.float64)
        count += c
        if c.any():
            tiles += np.asarray(t, np.float64)
            dense_pairs += (end * (end + 1) - begin * (begin + 1)) // 2      # sum of (position + 1) over the chunk
            if sel is not None:
                chosen.append((begin, jax.tree.map(np.asarray, sel)))
        if progress is not None:
            progress(end)
    with np.errstate(invalid="ignore"):
        out = {"recall": kept / np.where(count > 0, count, np.nan), "queries": count,
               "tiles": tiles * vslash.BAND * vslash.BAND / dense_pairs if dense_pairs else np.full_like(kept, np.nan)}
    if selections:
        out["selections"] = chosen
    return out


def save_selections(path: str, chosen, **meta) -> None:
    """Write ``measure(..., selections=True)["selections"]`` and ``meta`` (JSON-able) to an ``.npz``."""
    arrays = {f"{i}/{field}": getattr(sel, field) for i, (_, sel) in enumerate(chosen) for field in vslash.Selection._fields}
    arrays["starts"] = np.asarray([start for start, _ in chosen], np.int64)
    arrays["meta"] = np.asarray(json.dumps(meta))
    np.savez_compressed(path, **arrays)


def load_selections(path: str) -> tuple[list, dict]:
    """``(chunks, meta)`` from ``save_selections``: chunks is a list of ``(start, Selection)`` whose arrays
    have a leading layer axis."""
    try:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            starts = [int(x) for x in f["starts"]]
            chunks = [(start, vslash.Selection(*(f[f"{i}/{field}"] for field in vslash.Selection._fields)))
                      for i, start in enumerate(starts)]
    except (OSError, KeyError, ValueError) as e:
        raise QwenJaxError(f"{path}: not a selections file written by qwen-jax recall --save-selections ({e})") from None
    return chunks, meta


def summary(recall: np.ndarray) -> dict:
    r = recall[np.isfinite(recall)]
    if r.size == 0:
        return {"heads": 0}
    q = np.quantile(r, [0.0, 0.05, 0.25, 0.5, 0.75, 1.0])
    return {"heads": int(r.size), "mean": float(r.mean()), "min": float(q[0]), "p5": float(q[1]), "p25": float(q[2]),
            "median": float(q[3]), "p75": float(q[4]), "max": float(q[5]),
            "share >= 0.95": float((r >= 0.95).mean()), "share >= 0.9": float((r >= 0.9).mean())}


def table(recall: np.ndarray) -> str:
    L, N = recall.shape
    lines = ["layer | " + " ".join(f"{h:>5}" for h in range(N)) + " |  mean",
             "------|" + "-" * (6 * N) + "-|------"]
    for i in range(L):
        lines.append(f"{i:>5} | " + " ".join(f"{x:5.3f}" for x in recall[i]) + f" | {np.nanmean(recall[i]):5.3f}")
    return "\n".join(lines)


# A small perceptual colormap (viridis anchors), 0 -> dark purple, 1 -> yellow; grey: not measured.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
UNMEASURED = (160, 160, 160)


def _color(values: np.ndarray) -> np.ndarray:
    x = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(np.floor(x).astype(int), len(_ANCHORS) - 2)
    t = (x - i)[..., None]
    rgb = (_ANCHORS[i] * (1 - t) + _ANCHORS[i + 1] * t).round().astype(np.uint8)
    rgb[np.isnan(values)] = UNMEASURED
    return rgb


def write_png(path: str, recall: np.ndarray, *, vmin: float = 0.5, cell: int = 16) -> None:
    """Heatmap of ``recall`` [L, N] (rows: layers, columns: heads), colours scaled from ``vmin`` to 1; heads
    not measured (NaN: no query of theirs ran sparse) grey."""
    rgb = _color((recall - vmin) / (1.0 - vmin))
    img = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)
