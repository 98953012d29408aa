"""The one place mesh axes are named.

Model code speaks logical axes (``batch``, ``seq``, ``heads``, ``kv_heads``, ``embed``, ``mlp``,
``vocab``, ``head_dim``); ``LOGICAL_RULES`` maps them onto the mesh axes ``data``, ``seq`` and
``tensor``. A logical axis whose size the mesh axis does not divide stays replicated (for example
4 kv heads on ``tensor=8``): weights shard "as far as they go".
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.errors import ConfigError

MESH_AXES = ("data", "seq", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("seq", "seq"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", None),
    ("head_dim", None),
)


def parse_mesh(spec: str | None) -> dict[str, int]:
    """Axis sizes from a string such as ``"seq=4,tensor=2"`` (absent axes, or no string, give 1)."""
    sizes = {axis: 1 for axis in MESH_AXES}
    for part in str(spec).split(",") if spec else ():
        name, _, value = part.strip().partition("=")
        if name not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"bad mesh {spec!r}: expected comma-separated axis=size with axes {', '.join(MESH_AXES)}")
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
        return spec
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh(spec)
    if not spec:
        devices = devices[:1]
    need = math.prod(sizes.values())
    if need > len(devices):
        raise ConfigError(f"mesh {spec!r} needs {need} devices but only {len(devices)} are available")
    grid = np.asarray(devices[:need], dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dims carry the ``logical`` axis names."""
    rules = dict(LOGICAL_RULES)
    out, used = [], set()
    for name, dim in zip(logical, shape):
        axis = rules.get(name) if name is not None else None
        size = mesh.shape.get(axis, 1) if axis else 1
        if axis is None or axis in used or size == 1 or dim % size:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return PartitionSpec(*out)


def named_sharding(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))
