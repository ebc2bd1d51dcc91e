"""Orbax checkpoints under WORKDIR/checkpoints: train state + each host's data-iterator state.

A small API, as in MaxText: `create_manager`, `restore_or_none`, `save`, `restore_params`.
Saves are asynchronous (the step loop goes on while the arrays are written), keep the last
`max_to_keep`, and happen every `every_steps`, at the end, and when the run is preempted
(SIGTERM, or a TPU maintenance notice seen by Orbax). A run started again with the same workdir
resumes from the newest checkpoint and sees the same data it would have seen.
"""
from __future__ import annotations

import os
import signal
import threading

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


# Beside the checkpoints in the workdir: the model's architecture (HF CLIPConfig JSON), so that
# export and eval rebuild the model from the workdir alone.
MODEL_CONFIG = "model_config.json"


def checkpoint_dir(workdir: str) -> epath.Path:
  workdir = str(workdir)
  if "://" not in workdir:  # Orbax wants absolute local paths
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir) / "checkpoints"


def create_manager(workdir: str, every_steps: int, max_to_keep: int,
                   async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=every_steps, max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None,
         force: bool = False) -> bool:
  """Saves when the interval says so (or `force`); returns whether a save was started."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore_or_none(manager: ocp.CheckpointManager, abstract_state, data_iterator=None):
  """(step, state) from the newest checkpoint, restoring `data_iterator` in place; or None.

  `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings: the arrays come back
  sharded as the training step expects, whatever mesh wrote them.
  """
  step = manager.latest_step()
  if step is None:
    return None
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info("Restored checkpoint %d from %s", step, manager.directory)
  return step, restored["state"]


def restore_params(workdir: str, step: int | None = None):
  """The params alone (host numpy arrays, as saved) from WORKDIR/checkpoints."""
  # With the handler named, item_metadata describes the arrays (else it is None, and Orbax
  # restores onto the writer's devices: a pod's, or another process's, are not here).
  manager = ocp.CheckpointManager(checkpoint_dir(workdir),
                                  item_handlers={"state": ocp.StandardCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}")
  if step not in manager.all_steps():
    raise FileNotFoundError(f"No checkpoint of step {step} in {checkpoint_dir(workdir)} "
                            f"(have {sorted(manager.all_steps())})")
  metadata = manager.item_metadata(step)["state"]
  # Restore onto this host's devices unsharded, whatever sharding wrote it.
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  return jax.device_get(restored["state"]["params"])


class PreemptionWatch:
  """Notices SIGTERM (what a preempted VM or `kill` sends) so the loop can save and stop."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
    self._event.set()

  def preempted(self, manager: ocp.CheckpointManager, step: int, sync_every: int = 10) -> bool:
    """Whether to save and stop now; all hosts agree (a signal may reach only some)."""
    if manager.reached_preemption(step):
      return True
    if jax.process_count() == 1:
      return self._event.is_set()
    if step % sync_every:  # a cross-host sync every step would stall the async dispatch
      return False
    flags = multihost_utils.process_allgather(np.int32(self._event.is_set()))
    return bool(np.any(flags))

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
