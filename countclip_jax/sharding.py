"""Device mesh, logical-axis rules for the params, batch placement, multi-host start.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism whose params
and optimizer state are sharded too) and `model` (tensor parallelism over heads and MLP). The
batch is split over `data` and `fsdp` together. Params name their dimensions logically
(models/clip.py); RULES map those names to mesh axes, as data, not code.
"""
from __future__ import annotations

import contextlib
import os

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# logical param axis -> mesh axis (None = replicated along that dimension).
RULES = (
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("mlp", "model"),
    ("proj", None),
    ("norm", None),
    ("layers", None),  # model.scan_layers' stacked axis: never split (the dims after it are)
)

# logical activation axis -> mesh axis, inside the train step (models/clip.py `constrain`):
# the batch over the data axes, heads and MLP over `model`, so the layout of FSDP and tensor
# parallelism is pinned at every layer instead of left to XLA's propagation.
ACTIVATION_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "model"),
    ("act_mlp", "model"),
)


def initialize_distributed() -> None:
  """Joins the JAX processes of a multi-host job; a no-op on a single host.

  On a TPU VM pod (and SLURM, Open MPI, GKE) `jax.distributed.initialize()` finds the
  coordinator by itself. Elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (how the two-process CPU test runs). Must run before JAX touches a device.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:  # no cluster detected: one process
    logging.debug("Single process (%s)", e)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, model) from the config; one axis may be -1 for "the devices left over"."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"Mesh axes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices cannot be split into mesh "
                       f"{dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"there are {num_devices}")
  return tuple(sizes)


def dcn_shape(mesh_config, shape: tuple[int, int, int]) -> tuple[int, int, int]:
  """How many slices (multislice TPU) or hosts each axis of a mesh of `shape` spans:
  mesh.dcn_data, dcn_fsdp, dcn_model (1 = within one slice: the fast ICI links only)."""
  sizes = tuple(int(mesh_config.get(f"dcn_{a}", 1)) for a in MESH_AXES)
  if any(d < 1 or s % d for s, d in zip(shape, sizes)):
    raise ValueError(f"mesh.dcn_* {dict(zip(MESH_AXES, sizes))} must be >= 1 and divide the "
                     f"mesh {dict(zip(MESH_AXES, shape))}")
  return sizes


def device_grid(mesh_config, devices) -> np.ndarray | None:
  """The devices as a (data, fsdp, model) array for a multislice mesh (some mesh.dcn_* > 1):
  each axis is `dcn` blocks of `size / dcn` devices, each block within one slice, so only the
  axes given a dcn factor cross the slow data-centre network (put `data` there: one gradient
  all-reduce per step). Slices are the devices' `slice_index` (TPU), else their processes.
  None for a single-slice mesh."""
  shape = mesh_shape(mesh_config, len(devices))
  dcn = dcn_shape(mesh_config, shape)
  if dcn == (1, 1, 1):
    return None
  ici = tuple(s // d for s, d in zip(shape, dcn))
  try:
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=not hasattr(devices[0], "slice_index"))
  except (ValueError, AssertionError) as e:
    raise ValueError(f"Cannot lay out mesh {dict(zip(MESH_AXES, shape))} with "
                     f"mesh.dcn_* {dict(zip(MESH_AXES, dcn))} over these devices: {e}") from e


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  # Auto axes: shardings are given explicitly at the jit boundary and propagated by XLA inside
  # (activations pinned by ACTIVATION_RULES).
  axis_types = (jax.sharding.AxisType.Auto,) * 3
  grid = device_grid(mesh_config, devices)
  if grid is not None:
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  # make_mesh places devices by the TPU topology.
  return jax.make_mesh(mesh_shape(mesh_config, len(devices)), MESH_AXES, axis_types=axis_types,
                       devices=devices)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
  """Traces under this see `mesh` and ACTIVATION_RULES, so models/clip.py's `constrain` pins
  the activations (elsewhere it does nothing)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
    yield


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def param_shardings(mesh: Mesh, logical_axes, shapes, rules=RULES):
  """NamedSharding per param from its logical axes; a dimension that the mesh axis does not
  divide evenly is replicated instead (logged), so any vocabulary or width works."""
  specs = nn.logical_to_mesh(logical_axes, rules)

  def fit(spec, shape):
    axes = []
    for dim, axis in zip(shape.shape, tuple(spec) + (None,) * (len(shape.shape) - len(spec))):
      size = int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))
                          if a is not None]))
      if axis is not None and dim % size:
        logging.info("Replicating a dimension of size %d: mesh axis %s (%d) does not divide it",
                     dim, axis, size)
        axis = None
      axes.append(axis)
    return NamedSharding(mesh, P(*axes))

  return jax.tree_util.tree_map(fit, specs, shapes,
                                is_leaf=lambda x: isinstance(x, P))
