"""Memory planner: per-device bytes of a prefill before anything is allocated, and a refusal that names
the shortfall and the ways out instead of an out-of-memory crash halfway through a 1M-token prompt.

Counted per device, with the mesh's sharding rules (``qwen_jax.sharding``):

    weights       every parameter divided by the mesh axes its logical axes map to
    KV cache      layers x 2 x [B, K', S, H], heads over ``tensor`` x ``seq`` (K' = K, or each kv head
                  once per attention shard when the shards outnumber K; ``attention.parallel``)
    activations   one prefill chunk through one layer: hidden states, the MLP's two [T, F] projections
                  and their product (T: the chunk's 1/seq share of tokens), q/k/v (one query copy per
                  DCA phase) and the float32 attention output (all T tokens of 1/(tensor x seq) of the
                  heads), the last-token logits
    workspace     the attention path's temporaries: blockwise logits tiles, or for sparse prefill the
                  estimate's score vectors and logits blocks plus the index tables and gathered columns;
                  an 8-bit cache's widened copy of one layer

plus a fixed 1 GiB for XLA's own buffers. Estimates, not measurements: the benchmark reports the
measured peak next to them.

On a CPU's attention paths (``blockwise``, ``reference``: jnp, whose dots XLA's CPU backend runs in float32) the
activations are float32 and the MLP's (gate and up; a float32 model's product too) or attention's (queries per
phase, output), whichever is larger, besides the residual and the normed input; the workspace holds the layer's
weights in float32, its K and V widened whole to float32 (sparse: the estimate's keys once more), the updated K and
V copied once, and the path's own: each phase's picked diagonals and columns for the 64-row blocks of a 512-query
block (sparse blockwise; its logits tiles take the estimate's logits block's place), or the reference's [T, S]
float32 logits per phase, masked logits and probabilities (sparse: each phase's bool mask besides). Against XLA's
buffer assignment of the compiled layer program (with every other layer's weights and cache resident: 7B and 14B,
32K-1M tokens, chunks of 4K-128K, bf16 and fp8 caches, dense and sparse) these counts, the reserve aside, are 0-14%
over.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp

from qwen_jax.config import QwenConfig
from qwen_jax.errors import QwenJaxError

GiB = 1024 ** 3
XLA_RESERVE = 1 * GiB
_UNITS = {"b": 1, "kib": 1024, "mib": 1024 ** 2, "gib": GiB, "tib": 1024 ** 4, "k": 1024, "m": 1024 ** 2, "g": GiB,
          "t": 1024 ** 4, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


def parse_size(text: str) -> int:
    """Bytes from a size such as ``80``, ``79.6GiB``, ``80GB`` or ``81559MiB`` (a bare number is GiB; G, GiB
    are powers of 1024, GB of 1000), for ``--device-memory``."""
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or (unit and unit not in _UNITS) or float(m.group(1)) <= 0:
        raise QwenJaxError(f"bad memory size {text!r}: a positive number of GiB, or with a unit such as 80GB, "
                           f"79.6GiB, 81559MiB")
    return int(float(m.group(1)) * (_UNITS[unit] if unit else GiB))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    weights: int
    cache: int
    activations: int
    workspace: int
    capacity: int | None            # bytes per device, when known
    cache_heads: int = 1            # kv heads of the cache a device holds (more attention shards split them)
    cache_itemsize: int = 2         # bytes of one cached element

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.activations + self.workspace + XLA_RESERVE

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GiB:.1f}"
                          for name in ("weights", "cache", "activations", "workspace"))
        cap = "" if self.capacity is None else f" of {self.capacity / GiB:.1f} GiB"
        return f"{self.total / GiB:.1f} GiB per device{cap} ({parts}, XLA reserve {XLA_RESERVE / GiB:.0f})"


def mesh_sizes(mesh) -> dict[str, int]:
    """Axis sizes of a ``Mesh``, a string such as ``"seq=4,tensor=2"``, a dict, or None (one device)."""
    from qwen_jax.sharding import MESH_AXES, parse_mesh
    if mesh is None or isinstance(mesh, str):
        return parse_mesh(mesh)
    shape = mesh if isinstance(mesh, dict) else mesh.shape
    return {a: int(shape.get(a, 1)) for a in MESH_AXES}


def _sharded_bytes(shape, logical, sizes, itemsize) -> int:
    from qwen_jax.sharding import logical_to_spec
    spec = logical_to_spec(logical, shape, SimpleNamespace(shape=sizes))
    factor = math.prod(sizes[a] for entry in spec if entry is not None
                       for a in ((entry,) if isinstance(entry, str) else entry))
    return math.prod(shape) * itemsize // factor


@functools.lru_cache(maxsize=16)
def _param_layout(config: QwenConfig) -> tuple:
    """(shape, logical axes) of every parameter; tracing the module once per config."""
    from qwen_jax.model import abstract_params, logical_axes
    leaves = jax.tree.leaves(abstract_params(config, jnp.float32))
    axes = jax.tree.leaves(logical_axes(config), is_leaf=lambda x: isinstance(x, tuple))
    return tuple((a.shape, ax) for a, ax in zip(leaves, axes))


def plan(config: QwenConfig, *, tokens: int, batch: int = 1, mesh=None, chunk_size: int = 32768,
         dtype="bfloat16", cache_dtype=None, sparse: bool | None = None, attention: str = "pallas",
         capacity: int | None = None) -> MemoryPlan:
    """Per-device bytes to prefill ``batch`` prompts of ``tokens`` tokens (see the module docstring); ``attention``:
    the path (``AttentionSpec.impl``, resolved), ``blockwise`` and ``reference`` planned as a CPU runs them."""
    from qwen_jax.attention.parallel import attention_heads, cache_kv_heads, check_mesh
    from qwen_jax.cache import CACHE_AXES, cache_length
    from qwen_jax.sharding import attention_degree

    sizes = mesh_sizes(mesh)
    check_mesh(config, SimpleNamespace(shape=sizes))
    item = jnp.dtype(dtype).itemsize
    cache_item = jnp.dtype(cache_dtype or dtype).itemsize
    c = config
    weights = sum(_sharded_bytes(shape, ax, sizes, item) for shape, ax in _param_layout(c))
    S = cache_length(tokens)
    kv_heads = cache_kv_heads(c, SimpleNamespace(shape=sizes))
    kv = _sharded_bytes((batch, kv_heads, S, c.head_dim), CACHE_AXES, sizes, cache_item)   # one layer's K (or V)
    cache = 2 * c.num_hidden_layers * kv
    data = sizes["data"] if batch % sizes["data"] == 0 else 1
    tensor = sizes["tensor"]
    T = min(chunk_size, tokens) // max(sizes["seq"], 1)
    B = batch // data
    dca = c.dual_chunk_attention_config
    phases = 3 if dca is not None else 1
    # query heads inside attention (padded where they do not split over the mesh: parallel.pad_heads)
    N, H, D, F = attention_heads(c, SimpleNamespace(shape=sizes)), c.head_dim, c.hidden_size, c.intermediate_size
    n_t = tensor if N % tensor == 0 else 1
    f_t = tensor if F % tensor == 0 else 1
    Tc, n_a = min(chunk_size, tokens), n_t * sizes["seq"]          # inside attention: the whole chunk, 1/n_a of heads
    tiles = 4 * B * N * 512 * 512 * 4                               # blockwise logits tiles (512 x 512 blocks)
    if attention == "pallas":
        activations = (B * T * D * item * 6                         # residual, norms, attention/MLP outputs
                       + B * T * N * H * item * (phases + 1) // n_t  # rotated queries per phase, keys/values
                       + B * T * N * H * 4 // n_t                    # float32 attention output
                       + 3 * B * T * F * item // f_t                 # gate, up, their product
                       + B * c.vocab_size * 4)                       # last-token logits
    else:
        # the jnp paths (blockwise, reference) as XLA compiles them for a CPU, whose dots read float32: all in
        # float32, the MLP's and attention's in turn (never live together): gate, up and their product (a
        # narrower model rounds it over a factor), or the rotated queries per phase and the output; besides them
        # the residual and the normed input, and the last-token logits
        mlp = (3 if item == 4 else 2) * B * T * F * 4 // f_t
        activations = max(mlp, B * T * N * H * 4 * (phases + 1) // n_t) + 2 * B * T * D * 4 + B * c.vocab_size * 4
    if sparse is None:
        sparse = dca is not None and dca.sparse_attention_enabled and tokens > dca.sparse_attention_threshold
    if sparse:
        from qwen_jax.attention.sparse import LAST_Q, layer_budgets, list_widths, n_segments
        G = n_segments(Tc, dca.chunk_len)
        budgets = [layer_budgets(dca, i, c.num_attention_heads) for i in range(c.num_hidden_layers)]
        vs, ss = (max(max(getattr(b, kind)) for b in budgets) for kind in ("vertical", "slash"))  # the largest
        estimate_block = B * N * LAST_Q * 16384 * 4 // n_a         # the estimate's logits of one key block
        workspace = (2 * B * G * N * S * 4 // n_a                  # vertical and slash scores
                     + estimate_block
                     + 4 * B * N * S * 4 // n_a                     # top-k keys and running counts
                     + 2 * B * G * N * 3 * (S // 64 + 3) * 4 // n_a         # band tables of the index
                     + B * N * (Tc // 64 + 1) * 3 * (vs + 64) // n_a       # keep masks
                     + 2 * B * G * N * 3 * (vs + 64) * H * item // n_a     # gathered vertical K/V
                     + 4 * B * G * N * 3 * max(ss, S // 64 + 1) * 4 // n_a)   # distances and tiles
    elif attention == "blockwise":
        workspace = tiles // n_t
    else:
        workspace = 0
    if attention == "pallas":
        if cache_item == 1:
            workspace += 2 * kv * item                                  # one layer's K and V widened for attention
    else:
        layer_weights = sum(_sharded_bytes(shape, ax, sizes, 4) for shape, ax in _param_layout(c)
                            if "vocab" not in ax) // c.num_hidden_layers
        # float32 copies of the layer's weights and of its K and V, widened whole outside the key loop (sparse: the
        # estimate's K once more); the updated K and V copied once besides the donated buffers
        workspace += ((layer_weights if item < 4 else 0)
                      + ((3 if sparse else 2) * kv * 4 // cache_item if cache_item < 4 else 0)
                      + 2 * kv)
        if attention == "reference":
            # [T, S] float32 tensors of every head: the masked logits, each phase's, the probabilities (sparse: each
            # phase's bool mask besides, made per 64-row block and spread to the rows)
            workspace += ((phases + 1) * 4 + (phases if sparse else 0)) * B * N * Tc * S // n_a
        elif sparse:
            # each phase's picked diagonals and columns for the 64-row blocks of a 512-query block
            # (vslash.allows_in_blocks), made once per block outside the key loop; the logits tiles, in the
            # estimate's logits block's place (the two are never live together)
            lists = max(sum(list_widths(b, S)) for b in budgets)
            workspace += ((phases * B * (min(512, Tc) // 64 + 1) * N * lists * 4 + tiles) // n_a
                          - min(estimate_block, tiles // n_a))
    cache_heads = kv_heads // attention_degree(SimpleNamespace(shape=sizes))
    return MemoryPlan(weights, cache, activations, workspace, capacity, cache_heads, cache_item)


def device_capacity() -> int | None:
    """Bytes the first device may allocate (None where the backend does not say, e.g. the CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # pragma: no cover - backends without memory stats
        return None
    return None if not stats else int(stats.get("bytes_limit", 0)) or None


def host_memory() -> int | None:
    """The host's physical memory in bytes (None on a platform that does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # a platform without these sysconf names
        return None


def check(p: MemoryPlan, *, tokens: int, mesh=None, chunk_size: int) -> None:
    """Raise a one-line error naming the shortfall and the options when ``p`` does not fit."""
    if p.fits:
        return
    short = (p.total - p.capacity) / GiB
    sizes = mesh_sizes(mesh)
    devices = math.prod(sizes.values())
    options = []
    if p.weights + XLA_RESERVE >= p.capacity:
        # the weights alone do not fit: only splitting them helps (seq and data keep a whole copy a device)
        options.append(f"split the weights over more devices along tensor (now tensor={sizes['tensor']}: "
                       f"{p.weights / GiB:.1f} GiB of weights a device)")
    else:
        # where each device holds one kv head's cache already, more attention shards leave the cache as it is
        if p.cache_heads > 1:
            options.append(f"more devices along seq (now seq={sizes['seq']}, {devices} device(s) in all)")
        if p.cache_itemsize > 1:
            options.append(f"an 8-bit KV cache (--kv-cache-dtype fp8: {p.cache / GiB:.1f} GiB of cache a device, "
                           f"about half of it saved)")
        if p.weights >= p.total - p.capacity:
            options.append(f"devices along tensor instead of seq or data, which keep a whole copy of the weights "
                           f"(now tensor={sizes['tensor']}: {p.weights / GiB:.1f} GiB of weights a device)")
    if chunk_size > 4096:
        options.append(f"a smaller prefill chunk (--prefill-chunk {chunk_size // 2})")
    if not options:
        options.append("a shorter prompt")
    raise QwenJaxError(f"prefill of {tokens} tokens needs {p.describe()}: {short:.1f} GiB short; options: "
                       + "; ".join(options))
