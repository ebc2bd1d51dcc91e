"""Orbax checkpoints under WORKDIR/checkpoints: the train state.

A small API, as in MaxText: `create_manager`, `restore_or_none`, `save`, `restore_params`.
Saves are asynchronous (the step loop goes on while the arrays are written), keep the last
`max_to_keep`, and happen every `every_steps`, at the end, and when the run is preempted
(SIGTERM, or a TPU maintenance notice seen by Orbax). A run started again with the same workdir
resumes from the newest checkpoint, on any mesh and process count, and sees the same data it
would have seen: batch i is a pure function of i, so the step is the data position.
"""
from __future__ import annotations

import os
import signal
import threading

import jax
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


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint's step, or None; creates nothing (a preflight check reads it)."""
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return None
  return max(ocp.utils.checkpoint_steps(directory), default=None)  # finalized steps only


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  """Saves when the interval (or a preemption sync point) says so, or `force`; returns whether
  a save was started."""
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                      force=force)


class RestoreError(RuntimeError):
  """No checkpoint of the workdir restores: a failed run, reported in one line."""


def restore_or_none(manager: ocp.CheckpointManager, abstract_state):
  """(step, state) from the newest checkpoint that restores, or None when there is none.

  `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings: the arrays come back
  sharded as the training step expects, whatever mesh or process count wrote them. Only the
  state is read: checkpoints of older versions also hold a per-process "data" item, which the
  step now determines.

  A checkpoint that fails to restore (truncated or missing files, broken metadata) is logged
  and the previous one tried. Only once an older one restores are the newer ones moved aside
  to WORKDIR/corrupt_checkpoints (never deleted): when none restores, the cause is more likely
  the config (another model or optimizer) than the files, so nothing is moved and this raises
  RestoreError.
  """
  failed = []  # (step, reason), newest first
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Orbax raises ValueError, KeyError, JSONDecodeError or a bare Exception for these.
      failed.append((step, _reason(e)))
      logging.warning("Checkpoint %d in %s does not restore: %s", step, manager.directory,
                      failed[-1][1])
      logging.debug("Checkpoint %d's full error:", step, exc_info=True)
      continue
    if jax.process_count() > 1:
      # The barrier's name is the outcome, and differing names raise on every process: those
      # that restored other steps (a file only some of them read is broken) must not train on.
      try:
        multihost_utils.sync_global_devices(
            f"countclip restored {step} after {[s for s, _ in failed]}")
      except AssertionError:
        raise RestoreError(
            f"Process {jax.process_index()} restored checkpoint {step} from {manager.directory} "
            f"(after failing {[s for s, _ in failed]}) and another process did not: files that "
            "only some processes read are broken (the warnings name the step); move that step "
            "out of the directory and resume.") from None
    if failed:
      _set_aside(manager, failed, step)
    logging.info("Restored checkpoint %d from %s", step, manager.directory)
    return step, restored["state"]
  if failed:  # `from None`: Orbax's exceptions can hold a whole tree's TensorStore specs
    raise RestoreError(
        f"No checkpoint in {manager.directory} restores (tried steps {[s for s, _ in failed]}; "
        f"step {failed[0][0]}: {failed[0][1]}). Nothing was moved: if the model or optimizer "
        "config changed, resume with the one that wrote them or use another workdir; "
        "--verbosity=1 logs the full errors.") from None
  return None


def _reason(error: BaseException, limit: int = 200) -> str:
  """One line: the first of the innermost cause's message (Orbax wraps TensorStore's errors
  in one that names the array index and dumps its spec)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def _set_aside(manager: ocp.CheckpointManager, failed, restored: int) -> None:
  """Moves the checkpoints that failed to WORKDIR/corrupt_checkpoints, each with a note of why:
  out of Orbax's sight, and a later save of the same step does not collide with them. No
  process reads them any more: all restored `restored`, and Orbax's restore ends in a barrier."""
  if jax.process_index() == 0:
    aside = manager.directory.parent / "corrupt_checkpoints"
    aside.mkdir(parents=True, exist_ok=True)
    for step, reason in failed:
      destination, n = aside / str(step), 0
      while destination.exists():  # a step set aside before, by an earlier resume
        n += 1
        destination = aside / f"{step}.{n}"
      # Written first, the note also makes the folder exist on GCS, where rename needs it.
      (aside / f"{destination.name}.txt").write_text(
          f"Checkpoint {step} did not restore, so the run resumed from {restored}: {reason}\n")
      # The step directory's name is the step: create_manager sets no step prefix or format.
      (manager.directory / str(step)).rename(destination)
      logging.warning("Checkpoint %d moved aside to %s; resuming from checkpoint %d", step,
                      destination, restored)
  if jax.process_count() > 1:  # every process lists the steps after the move
    multihost_utils.sync_global_devices("countclip checkpoints set aside")
  manager.reload()


def restore_params(workdir: str, step: int | None = None, shardings=None):
  """The params alone from WORKDIR/checkpoints: never the optimizer state (an Orbax partial
  restore reads only the params' files: a third of the state, what export and eval need).

  shardings: None for host numpy arrays, or a tree like the params of jax.sharding.Shardings
  to get global arrays placed shard by shard (each host reads only its shards).
  """
  if not checkpoint_dir(workdir).is_dir():  # (a manager would create it)
    raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}")
  # With the handler named, item_metadata describes the arrays (else it is None).
  manager = ocp.CheckpointManager(checkpoint_dir(workdir),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}")
  if step not in manager.all_steps():
    raise FileNotFoundError(f"No checkpoint of step {step} in {checkpoint_dir(workdir)} "
                            f"(have {sorted(manager.all_steps())})")
  metadata = manager.item_metadata(step)["state"]
  metadata = getattr(metadata, "tree", metadata)["params"]
  to_host = shardings is None
  if to_host:  # onto this host's first device, whatever sharding wrote it
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: one, metadata)
  abstract = {"params": jax.tree_util.tree_map(
      lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), metadata, shardings)}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True)))
  manager.close()
  params = restored["state"]["params"]
  return jax.device_get(params) if to_host else params


class PreemptionWatch:
  """Tells the loop when to save and stop, by one path per setting.

  Several processes: JAX's coordination service. `jax.distributed.initialize()` installs its
  own SIGTERM handler (and on TPU VMs listens for maintenance notices), and all processes agree
  on the step to stop at; Orbax's `reached_preemption` asks it, and the interval save of that
  step already saves. Nothing here replaces the handler, and no collective runs per step.
  One process: the coordination service is not running, so SIGTERM sets a flag here.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
    self._event.set()

  def preempted(self, manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether to stop after `step`; on several processes all of them answer alike."""
    return manager.reached_preemption(step) or self._event.is_set()

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
