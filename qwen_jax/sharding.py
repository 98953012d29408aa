"""The one place mesh axes are named.

Model code speaks logical axes (``batch``, ``seq``, ``heads``, ``kv_heads``, ``embed``, ``mlp``,
``vocab``, ``head_dim``, and ``attn_heads``: heads inside sequence-parallel attention and in the KV
cache); ``LOGICAL_RULES`` maps them onto the mesh axes ``data``, ``seq`` and ``tensor`` (``attn_heads``
onto ``tensor`` and ``seq`` together, ``tensor`` major). A logical axis whose size the mesh axes do
not divide stays replicated (for example 4 kv heads on ``tensor=8``): weights shard "as far as they go".

In a multi-process job (``qwen_jax.distributed``) every process runs the same program on the same host
values: ``global_array`` places a host value onto a mesh that spans other processes' devices (each
process copies only its own shards), host inputs handed to a jitted step are placed the same way by
jit itself, and ``to_host`` reads back an output whose shards live on other processes.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.errors import ConfigError

MESH_AXES = ("data", "seq", "tensor")
SEQ = "seq"  # the axis tokens are split over (sequence-parallel attention exchanges over it)

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", "data"),
    ("seq", "seq"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", None),
    ("head_dim", None),
    ("attn_heads", ("tensor", "seq")),
)


def parse_mesh(spec: str | None) -> dict[str, int]:
    """Axis sizes from a string such as ``"seq=4,tensor=2"`` (absent axes, or no string, give 1)."""
    sizes = {axis: 1 for axis in MESH_AXES}
    given = set()
    for part in str(spec).split(",") if spec else ():
        name, _, value = (x.strip() for x in part.partition("="))
        if name not in sizes or not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise ConfigError(f"bad mesh {spec!r}: expected comma-separated axis=size with axes {', '.join(MESH_AXES)}")
        if name in given:
            raise ConfigError(f"bad mesh {spec!r}: axis {name} given twice")
        given.add(name)
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str | Mesh | None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``MESH_AXES`` from a string such as ``"seq=4,tensor=2"`` (absent axes get size 1).

    ``None`` gives a one-device mesh; a ``Mesh`` is returned as is once its axis names are checked.
    """
    if isinstance(spec, Mesh):
        unknown = set(spec.axis_names) - set(MESH_AXES)
        if unknown:
            raise ConfigError(f"mesh axes {sorted(unknown)} are not used by qwen-jax (use {', '.join(MESH_AXES)})")
        missing = set(range(jax.process_count())) - {d.process_index for d in spec.devices.flat}
        if missing:
            raise ConfigError(f"the mesh has no device of process(es) {sorted(missing)}; a multi-process mesh must "
                              f"give every process a part")
        if set(spec.axis_names) == set(MESH_AXES):
            return spec
        # axes left out have size 1: the same devices, every axis named (attention asks each one's size)
        names, devices = list(spec.axis_names), spec.devices
        for axis in MESH_AXES:
            if axis not in names:
                names.append(axis)
                devices = devices[..., None]
        return Mesh(devices.transpose([names.index(axis) for axis in MESH_AXES]), MESH_AXES)
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh(spec)
    if not spec:
        devices = devices[:1]
    need = math.prod(sizes.values())
    if need > len(devices):
        raise ConfigError(f"mesh {spec!r} needs {need} devices but only {len(devices)} are available")
    if jax.process_count() > 1 and need != len(devices):
        raise ConfigError(f"mesh {spec!r} uses {need} of the {len(devices)} devices of this {jax.process_count()}-"
                          f"process job; a multi-process mesh must use them all, so that every process owns a part")
    grid = np.asarray(devices[:need], dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dims carry the ``logical`` axis names."""
    rules = dict(LOGICAL_RULES)
    out, used = [], set()
    for name, dim in zip(logical, shape):
        axis = rules.get(name) if name is not None else None
        axes = tuple(a for a in ((axis,) if isinstance(axis, str) else axis or ()) if mesh.shape.get(a, 1) > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or used & set(axes) or dim % size:
            out.append(None)
        else:
            out.append(axes[0] if len(axes) == 1 else axes)
            used |= set(axes)
    return PartitionSpec(*out)


def attention_degree(mesh: Mesh | None) -> int:
    """How many ways attention's heads are split: the product of the mesh axes ``attn_heads`` maps to."""
    if mesh is None:
        return 1
    axes = dict(LOGICAL_RULES)["attn_heads"]
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def attention_shard_index():
    """Inside ``shard_map``: this device's block of ``attn_heads`` (``tensor`` major, then ``seq``)."""
    index = jax.numpy.int32(0)
    for axis in dict(LOGICAL_RULES)["attn_heads"]:
        index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
    return index


def named_sharding(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))


def global_array(value, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host value, identical on every process, as an array placed by ``sharding``.

    Each process copies only the shards on its own devices. (``jax.device_put`` of host data onto
    devices of other processes instead gathers the whole value from every process to check that the
    copies agree: a full all-gather per weight when loading a checkpoint.)
    """
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def as_mesh(mesh: str | Mesh | None) -> Mesh | None:
    """``mesh`` as ``load`` takes it, a ``Mesh`` or a string such as ``"seq=4,tensor=2"`` (``make_mesh``); None
    (one device, no mesh) stays None."""
    return None if mesh is None else make_mesh(mesh)


def check_same_on_every_process(value, what: str) -> None:
    """In a multi-process job, refuse in one line (on every process) a host value that is not the same on every
    process: each process would feed its own into the one computation (a mix of them, or collectives that do not
    match). A collective of a 64-bit digest: every process must call this in the same order."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    data = value.tobytes() + repr((value.shape, value.dtype.str)).encode() if isinstance(value, np.ndarray) else \
        repr(value).encode()     # (an array's repr leaves out the middle of a large one)
    digest = np.frombuffer(hashlib.sha256(data).digest()[:8], np.int32)
    every = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
    other = np.flatnonzero((every != every[0]).any(axis=1)).tolist()
    if other:
        raise ConfigError(f"{what} differ between the processes of this job (process(es) {other} have others than "
                          f"process 0); every process must be given the same")


def to_host(array) -> np.ndarray:
    """The whole value of ``array`` as numpy, on every process.

    An array with shards on other processes (say logits split over ``tensor`` across hosts) is gathered,
    which is a collective: every process must call this in the same order, as SPMD programs do.
    """
    if isinstance(array, jax.Array) and not (array.is_fully_addressable or array.is_fully_replicated):
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)

