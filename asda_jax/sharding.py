"""Meshes and the one table that maps logical axis names to mesh axes.

Parameters carry logical names (``embed``, ``heads``, ``mlp`` ...); activations are
constrained with the same names. ``LOGICAL_AXIS_RULES`` is the only place that says
which mesh axis each name is split over, so the same model runs on 1 CPU, 8 fake CPU
devices, a GPU box or a TPU pod by changing the mesh shape alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DATA_PARALLEL = types.MappingProxyType({"data": -1, "fsdp": 1, "tensor": 1})  # every device

# logical name -> mesh axis (or axes, or None for replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),  # examples: pure data parallelism plus FSDP
    ("embed", "fsdp"),  # model width of weights: sharded by FSDP, gathered per layer
    ("heads", "tensor"),  # attention heads: tensor parallelism
    ("mlp", "tensor"),  # MLP hidden units: tensor parallelism
    ("head_dim", None),
    ("qk_group", None),  # the [q1 | q2 | k1 | k2] axis of the fused projection
    ("length", None),
    ("act_embed", None),  # model width of activations: replicated
    ("conv_time", None),  # convolution kernels: time taps,
    ("conv_freq", None),  # frequency taps,
    ("conv_in", None),  # and input channels per group
    ("classes", None),
    ("norm", None),  # LayerNorm scales and other small vectors
)


def resolve_mesh_shape(shape: Mapping[str, int] | Sequence[int], device_count: int) -> list[int]:
    """Sizes of (data, fsdp, tensor) for ``device_count`` devices; one size may be -1."""
    sizes = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, Mapping) else list(shape)
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh shape needs {len(MESH_AXES)} axes {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if device_count % known:
            raise ValueError(f"{device_count} devices do not divide into mesh {sizes}")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"but {device_count} are present"
        )
    return sizes


def make_mesh(
    shape: Mapping[str, int] | Sequence[int],
    devices: Sequence[jax.Device] | None = None,
    dcn_shape: Mapping[str, int] | None = None,
) -> Mesh:
    """A (data, fsdp, tensor) mesh with automatic (GSPMD) axis types.

    ``shape`` gives each axis's size within a slice; one may be -1 to take the devices
    left over. ``dcn_shape`` (multi-slice TPU) gives each axis's size across slices:
    the mesh is then built by ``create_hybrid_device_mesh`` so that only the axes
    named there cross the slower data-centre network.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not dcn_shape:
        sizes = resolve_mesh_shape(shape, len(devices))
        return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)
    from jax.experimental import mesh_utils

    dcn = [dcn_shape.get(a, 1) for a in MESH_AXES]
    ici = resolve_mesh_shape(shape, len(devices) // math.prod(dcn))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, MESH_AXES)


def logical_shardings(boxed, mesh: Mesh):
    """NamedShardings on ``mesh`` for a tree of logically named (boxed) Flax variables,
    real or abstract, as the rules say."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_AXIS_RULES)


def first_local_device() -> jax.sharding.SingleDeviceSharding:
    """This process's first device: where the tools place what they restore."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
    """Makes ``mesh`` and the logical rules current (activation constraints, kernels)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside ``activate``."""
    return nn.with_logical_constraint(x, tuple(logical_axes))


def current_mesh_spec(logical_axes: Sequence[str | None]) -> P | None:
    """The PartitionSpec that the active rules give ``logical_axes``, or None without a mesh."""
    if jax.sharding.get_abstract_mesh().empty:
        return None
    return nn.logical_to_mesh_axes(tuple(logical_axes), LOGICAL_AXIS_RULES)


@dataclasses.dataclass(frozen=True)
class Split:
    """How one array of a per-device function lies over the mesh: split along the mesh
    axes the active rules give its dims' logical ``names`` (none: whole on every
    device), or, ``summed``, an output that is each device's partial sum over its own
    examples (see ``_summed_over_batch``)."""

    names: tuple[str | None, ...] = ()
    summed: bool = False


WHOLE = Split()


def split(*names: str | None) -> Split:
    return Split(names)


def summed(*names: str | None) -> Split:
    """A partial sum over a device's examples (a weight gradient) that leaves summed
    over the batch axes, laid out as its dims' logical ``names`` say (the parameter's)."""
    return Split(names, summed=True)


def _is_split(x) -> bool:
    return isinstance(x, Split)


def _axes(entry) -> tuple[str, ...]:  # one PartitionSpec entry as a tuple of mesh axes
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _summed_spec(s: Split) -> P:
    """Where a summed output lies: along the batch axes its names map to, replicated
    over the other axes (every rank of those computed the same whole sum)."""
    batch = _axes(current_mesh_spec(("batch",))[0])
    spec = current_mesh_spec(s.names) if s.names else P()
    return P(*(tuple(a for a in _axes(entry) if a in batch) or None for entry in spec))


def _summed_over_batch(partial: jax.Array, s: Split) -> jax.Array:
    """A device's partial sum summed over every batch axis: reduce-scattered along the
    dims laid out over a batch axis (an FSDP-sharded parameter's gradient: each device
    receives only its own shard, as XLA's form of the same gradient does, and fewer
    bytes cross the slower links than in a whole all-reduce), all-reduced over the rest.
    The sum runs in the partial's dtype: float32, the parameters' own."""
    batch = _axes(current_mesh_spec(("batch",))[0])
    scattered: list[str] = []
    for dim, entry in enumerate(_summed_spec(s)):
        if axes := _axes(entry):
            partial = jax.lax.psum_scatter(partial, axes, scatter_dimension=dim, tiled=True)
            scattered += axes
    rest = tuple(a for a in batch if a not in scattered)
    return jax.lax.psum(partial, rest) if rest else partial


def per_device(fn: Callable, in_splits, out_splits, *, check_vma: bool = True) -> Callable:
    """``fn`` run by each device on its own part of its arguments under the active mesh
    (``jax.shard_map``), each argument and output laid out as its ``Split`` says
    (``in_splits`` a tuple, one per argument; ``out_splits`` the structure of fn's
    output). Without a mesh: ``fn`` itself. A Pallas call cannot be auto-partitioned,
    and left to itself the partitioner may gather a whole batch onto every device
    around an op; running per device avoids both. Pallas calls need ``check_vma=False``
    (they carry no rule for which mesh axes their results vary over)."""
    if jax.sharding.get_abstract_mesh().empty:
        return fn

    def spec(s: Split) -> P:
        if s.summed:
            return _summed_spec(s)
        return current_mesh_spec(s.names) if s.names else P()

    def body(*args):
        outs = fn(*args)
        return jax.tree.map(
            lambda s, o: _summed_over_batch(o, s) if s.summed else o,
            out_splits,
            outs,
            is_leaf=_is_split,
        )

    return jax.shard_map(
        body,
        in_specs=tuple(spec(s) for s in in_splits),
        out_specs=jax.tree.map(spec, out_splits, is_leaf=_is_split),
        check_vma=check_vma,
    )


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as a NumPy array on every host (gathered across processes)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
