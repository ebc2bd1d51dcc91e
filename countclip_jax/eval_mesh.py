"""Evals over a device mesh: each process reads its share of every global eval batch, each
device computes its slice, and every process gets the whole batch's results back.

The mesh is the params' (training's evals: the training mesh, which may span processes) or,
for params on the host or one device (the commands), all of this host's devices, data-parallel.
A global eval batch of B rows is split over the mesh's batch axes (sharding.BATCH_AXES), so
process p holds one block of B/P rows of it; `EvalMesh.batches` reads exactly that block
(pipeline.eval_batches), `place` makes the global array from it, jitted functions return
replicated results, and `gather_fields` collects the rows' other fields (strings included) from
every process. Results are keyed by example index, never by process, so a 2-process eval
equals the 1-process eval.
"""
from __future__ import annotations

import json
import math

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from countclip_jax import sharding as sharding_lib
from countclip_jax.data import pipeline


def _process_block(sharding, batch_size: int) -> tuple[int, int] | None:
  """(i, n) when this process's devices hold exactly rows [i B/n, (i + 1) B/n) of a B-row
  batch under `sharding` (n = process count); None when they hold some other set of rows (a
  mesh whose batch axes do not split over the processes: then every process reads every row)."""
  n = jax.process_count()
  rows = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                 for s in sharding.addressable_devices_indices_map((batch_size,)).values()})
  start, stop = rows[0][0], rows[-1][1]
  contiguous = all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
  block = batch_size // n
  if contiguous and stop - start == block and start % block == 0:
    return start // block, n
  return None


class EvalMesh:
  """Where an eval's params live and how its batches are split; see the module docstring.

  batch_size: the global eval batch asked for, rounded up to a multiple of the devices on the
  batch axes and of the process count (`self.batch_size`).
  """

  def __init__(self, params, batch_size: int):
    sharding = getattr(jax.tree_util.tree_leaves(params)[0], "sharding", None)
    if isinstance(sharding, NamedSharding):
      self.mesh, self.params = sharding.mesh, params
    else:  # host or single-device params (a command): replicate them over this host's devices
      self.mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "model": 1},
                                         jax.local_devices())
      self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_size = self.round_up(batch_size)
    if self.batch_size != batch_size:
      logging.info("Eval batch %d rounded up to %d (a multiple of the batch devices and "
                   "processes)", batch_size, self.batch_size)
    self.block = _process_block(self.rows(1), self.batch_size)

  def round_up(self, rows: int) -> int:
    """`rows` rounded up to a batch that splits evenly over the devices and the processes."""
    step = math.lcm(sharding_lib.data_parallel_size(self.mesh), jax.process_count())
    return -(-rows // step) * step

  def rows(self, ndim: int) -> NamedSharding:
    """The sharding of an ndim-dimensional batch: rows over the batch axes."""
    return sharding_lib.batch_sharding(self.mesh, ndim)

  def batches(self, dataset, where: str, num_threads: int = 2):
    """This process's rows of each global batch of `dataset` (pipeline.eval_batches); logs how
    many examples this process read."""
    index, count = self.block or (0, 1)
    read = 0
    for batch in pipeline.eval_batches(dataset, self.batch_size, process_index=index,
                                       process_count=count, num_threads=num_threads):
      read += int(np.sum(batch["example"] >= 0))
      yield batch
    logging.info("eval %s: this process read %d of %d examples", where, read, len(dataset))

  def place(self, local: np.ndarray) -> jax.Array:
    """This process's rows, as `batches` gave them -> the global batch array."""
    local = np.asarray(local)
    if self.block is None:  # every process read the whole batch
      return self.place_everywhere(local)
    return jax.make_array_from_process_local_data(self.rows(local.ndim), local)

  def place_everywhere(self, rows: np.ndarray) -> jax.Array:
    """The same host rows on every process (tokenised prompts, windows) -> a global array whose
    rows are split over the devices, so that no device computes all of them."""
    rows = np.asarray(rows)
    return jax.make_array_from_callback(rows.shape, self.rows(rows.ndim), lambda i: rows[i])

  def gather_fields(self, batch: dict) -> dict:
    """A batch's fields (numbers and strings; no images) from every process's rows, as numpy
    arrays in example order, padding dropped. Needs the batch's "example" field."""
    local = {k: np.asarray(v).tolist() for k, v in batch.items()}
    parts = [local] if self.block is None else gather_objects(local)
    rows = sorted((e, p, i) for p, part in enumerate(parts)
                  for i, e in enumerate(part["example"]) if e >= 0)
    return {k: np.asarray([parts[p][k][i] for _, p, i in rows]) for k in local}


def gather_objects(obj) -> list:
  """A JSON-able value from every process, in process order (one process: [obj])."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data)] = data
  everything = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:size])) for row, size in zip(everything, sizes)]


def in_example_order(values: np.ndarray, example: np.ndarray, wanted: np.ndarray) -> np.ndarray:
  """Rows of `values` (a global batch's results, row r for example[r]) for the examples
  `wanted`, in that order."""
  where = {int(e): r for r, e in enumerate(np.asarray(example)) if e >= 0}
  return np.asarray(values)[[where[int(e)] for e in wanted]]


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order (one copy of each)."""
  shards = {}
  for shard in array.addressable_shards:
    shards.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
