"""checkpoints.restore_or_none: a checkpoint that does not restore is reported with a one-line
reason and moved to WORKDIR/corrupt_checkpoints, and the one before it restored; when none
restores it raises and moves nothing. Also on gs:// and with two JAX processes.

Run as a script, this file is the child those two tests start (`python test_checkpoints.py
MODE WORKDIR`)."""
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.experimental import multihost_utils

from countclip_jax import checkpoints
from countclip_jax.sharding import initialize_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds for a child; they take 5-15 s on a free 2-core machine


def state(step, sharding=None):
  """A small train state whose values say its step. Random weights: OCDBT keeps small or
  constant chunks inside its index, where removing the data files would not reach them."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  values = {"params": {"w": np.random.RandomState(step).randn(64, 64).astype(np.float32),
                       "b": np.arange(6, dtype=np.float32) + step},
            "step": np.asarray(step, np.int32)}
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(x.shape, sharding if x.ndim else replicated(sharding),
                                             lambda i: x[i]), values)


def replicated(sharding):
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()) if isinstance(
      sharding, jax.sharding.NamedSharding) else sharding


def abstract(tree):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def save_steps(workdir, steps=(1, 2, 3), sharding=None):
  manager = checkpoints.create_manager(str(workdir), 1, 10, async_save=False)
  for step in steps:
    checkpoints.save(manager, step, state(step, sharding), force=True)
  manager.wait_until_finished()
  return manager


def assert_state_of(step, restored):
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         restored, state(step))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("saved")
  save_steps(workdir).close()
  return workdir


@pytest.fixture
def workdir(saved, tmp_path):
  shutil.copytree(saved, tmp_path / "run")
  return tmp_path / "run"


def truncate(path: pathlib.Path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def files(directory: pathlib.Path):
  return [p for p in directory.iterdir() if p.is_file()]


# Ways a checkpoint goes bad: a write cut short (disk full, a copy interrupted), files lost.
# Under checkpoints/<step>/state: ocdbt.process_<i>/d holds the array chunks each process
# wrote, d/ and manifest.ocdbt the merged index, _METADATA and array_metadatas the tree.
CORRUPTIONS = {
    "truncated array data": lambda s: [truncate(p) for p in files(s / "ocdbt.process_0" / "d")],
    "array data deleted": lambda s: shutil.rmtree(s / "ocdbt.process_0"),
    "truncated index": lambda s: [truncate(p) for p in files(s / "d")],
    "index deleted": lambda s: (s / "manifest.ocdbt").unlink(),
    "truncated tree metadata": lambda s: truncate(s / "_METADATA"),
    "truncated array metadata": lambda s: truncate(s / "array_metadatas" / "process_0"),
    "state item deleted": shutil.rmtree,
}


def corrupt(workdir, step, how="truncated tree metadata"):
  CORRUPTIONS[how](workdir / "checkpoints" / str(step) / "state")


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_restored(
    workdir, how, caplog):
  corrupt(workdir, 3, how)
  directory = checkpoints.checkpoint_dir(str(workdir))
  manager = checkpoints.create_manager(str(workdir), 1, 10, async_save=False)
  with caplog.at_level(logging.WARNING):
    step, restored = checkpoints.restore_or_none(manager, abstract(state(0)))
  assert step == 2
  assert_state_of(2, restored)

  # Reported: the step, where it is, and why, in one line; then where it went.
  reported = [w for w in warnings_of(caplog) if w.startswith("Checkpoint 3 in ")]
  assert len(reported) == 1, warnings_of(caplog)
  assert str(directory) in reported[0] and "does not restore: " in reported[0]
  reason = reported[0].split("does not restore: ", 1)[1]
  assert reason and "\n" not in reason and len(reason) <= 200, reason
  aside = workdir / "corrupt_checkpoints"
  assert f"Checkpoint 3 moved aside to {aside / '3'}" in "\n".join(warnings_of(caplog))

  # Out of Orbax's sight, kept whole (with a note of why) and never deleted.
  assert not (directory / "3").exists() and (aside / "3" / "_CHECKPOINT_METADATA").exists()
  assert reason in (aside / "3.txt").read_text()
  assert manager.all_steps() == [1, 2]
  assert checkpoints.latest_step(str(workdir)) == 2

  # Training goes on: step 3 saves again, and a later resume restores that one.
  checkpoints.save(manager, 3, state(33), force=True)
  manager.wait_until_finished()
  manager.close()
  manager = checkpoints.create_manager(str(workdir), 1, 10, async_save=False)
  step, restored = checkpoints.restore_or_none(manager, abstract(state(0)))
  assert step == 3
  assert_state_of(33, restored)


def test_steps_set_aside_twice_and_several_at_once_keep_every_copy(workdir, caplog):
  corrupt(workdir, 3)
  manager = checkpoints.create_manager(str(workdir), 1, 10, async_save=False)
  assert checkpoints.restore_or_none(manager, abstract(state(0)))[0] == 2
  checkpoints.save(manager, 3, state(3), force=True)
  manager.wait_until_finished()
  corrupt(workdir, 3, "array data deleted")
  corrupt(workdir, 2, "truncated array metadata")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    step, restored = checkpoints.restore_or_none(manager, abstract(state(0)))
  assert step == 1
  assert_state_of(1, restored)
  assert sorted(os.listdir(workdir / "corrupt_checkpoints")) == [
      "2", "2.txt", "3", "3.1", "3.1.txt", "3.txt"]
  assert manager.all_steps() == [1]
  assert sum(w.startswith(("Checkpoint 3 in", "Checkpoint 2 in")) for w in warnings_of(caplog)) == 2


def test_no_restorable_checkpoint_raises_a_short_error_and_moves_nothing(workdir):
  for step in (1, 2, 3):
    corrupt(workdir, step, ["truncated tree metadata", "index deleted", "state item deleted"][
        step - 1])
  manager = checkpoints.create_manager(str(workdir), 1, 10, async_save=False)
  with pytest.raises(checkpoints.RestoreError) as raised:
    checkpoints.restore_or_none(manager, abstract(state(0)))
  message = str(raised.value)
  assert message.startswith(f"No checkpoint in {checkpoints.checkpoint_dir(str(workdir))} "
                            "restores (tried steps [3, 2, 1]; step 3: "), message
  assert "\n" not in message and len(message) < 800, message
  assert raised.value.__cause__ is None and raised.value.__suppress_context__
  assert manager.all_steps() == [1, 2, 3]
  assert not (workdir / "corrupt_checkpoints").exists()


def test_another_config_is_not_taken_for_corruption(workdir):
  """Every checkpoint fails alike (another model: other shapes): nothing is moved."""
  other = state(0)
  other["params"]["w"] = jnp.zeros((32, 64))
  manager = checkpoints.create_manager(str(workdir), 1, 10, async_save=False)
  with pytest.raises(checkpoints.RestoreError,
                     match="tried steps \\[3, 2, 1\\]; step 3: ValueError: "):
    checkpoints.restore_or_none(manager, abstract(other))
  assert manager.all_steps() == [1, 2, 3]
  assert not (workdir / "corrupt_checkpoints").exists()


def test_intact_checkpoints_restore_the_newest_and_none_restores_none(workdir, tmp_path, caplog):
  manager = checkpoints.create_manager(str(workdir), 1, 10, async_save=False)
  with caplog.at_level(logging.WARNING):
    step, restored = checkpoints.restore_or_none(manager, abstract(state(0)))
  assert step == 3
  assert_state_of(3, restored)
  assert not warnings_of(caplog) and not (workdir / "corrupt_checkpoints").exists()
  assert manager.all_steps() == [1, 2, 3]
  empty = checkpoints.create_manager(str(tmp_path / "empty"), 1, 10, async_save=False)
  assert checkpoints.restore_or_none(empty, abstract(state(0))) is None


# ----------------------------------------------------------------------------- in children

def child(mode, workdir):
  """Saves steps 1-3, breaks step 3, resumes and saves step 3 again. mode "gcs": one process,
  step 3's tree metadata broken; "processes": the same on two processes (each reads its own
  shards, all read the metadata); "disagree": two processes, only process 1's shards broken."""
  initialize_distributed()
  sharding = None
  if mode != "gcs":
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  manager = save_steps(workdir, sharding=sharding)
  broken = epath.Path(workdir) / "checkpoints" / "3" / "state"
  if jax.process_index() == 0 and mode == "disagree":
    for chunks in (broken / "ocdbt.process_1" / "d").iterdir():
      chunks.write_bytes(chunks.read_bytes()[:10])
  elif jax.process_index() == 0:
    (broken / "_METADATA").write_text((broken / "_METADATA").read_text()[:100])
  multihost_utils.sync_global_devices("broken")
  step, restored = checkpoints.restore_or_none(manager, abstract(state(0, sharding)))
  for got, want in zip(jax.tree_util.tree_leaves(restored),
                       jax.tree_util.tree_leaves(state(2, sharding))):
    for a, b in zip(got.addressable_shards, want.addressable_shards):
      np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
  checkpoints.save(manager, 3, state(3, sharding), force=True)
  manager.wait_until_finished()
  print(f"restored {step}; then steps {manager.all_steps()}", flush=True)
  manager.close()


def run_children(commands, directory, expect=0):
  """Runs `python test_checkpoints.py ARGS` for each (args, env) at once; their outputs."""
  logs = [directory / f"child{i}.log" for i in range(len(commands))]
  procs = []
  try:
    for (args, env), log in zip(commands, logs):
      with open(log, "w") as out:
        procs.append(subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, env=env,
                                      stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=TIMEOUT) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = [log.read_text(errors="replace") for log in logs]
  assert codes == [expect] * len(procs), "\n---\n".join(log[-4000:] for log in logs)
  return logs


def test_two_processes_agree_and_set_aside_once(tmp_path):
  import test_multihost  # pylint: disable=g-import-not-at-top  (tests/ is on sys.path)
  _, two = test_multihost.environments(tmp_path)
  logs = run_children([(["processes", str(tmp_path)], env) for env in two], tmp_path)
  for log in logs:
    assert "restored 2; then steps [1, 2, 3]" in log, log[-4000:]
    assert "Checkpoint 3 in " in log and "does not restore: " in log
  assert "moved aside" in logs[0] and "moved aside" not in logs[1]
  assert sorted(os.listdir(tmp_path / "corrupt_checkpoints")) == ["3", "3.txt"]


def test_processes_that_restore_different_steps_stop(tmp_path):
  """Only process 1's shards of step 3 are broken: process 0 restores 3, process 1 restores 2.
  Both stop with the reason instead of training on different states, and nothing is moved."""
  import test_multihost  # pylint: disable=g-import-not-at-top  (tests/ is on sys.path)
  _, two = test_multihost.environments(tmp_path)
  logs = run_children([(["disagree", str(tmp_path)], env) for env in two], tmp_path, expect=1)
  for process, restored in enumerate((3, 2)):
    assert (f"RestoreError: Process {process} restored checkpoint {restored} "
            in logs[process]), logs[process][-4000:]
  assert "Checkpoint 3 in " in logs[1] and "does not restore" in logs[1]
  assert not (tmp_path / "corrupt_checkpoints").exists()
  assert (tmp_path / "checkpoints" / "3").exists()


def test_on_gcs(tmp_path):
  import gcs_emulator  # pylint: disable=g-import-not-at-top  (tests/ is on sys.path)
  try:
    emulator = gcs_emulator.GcsEmulator(str(tmp_path / "gcs.log")).start()
  except gcs_emulator.EmulatorUnavailable as e:
    if os.environ.get("CI"):
      pytest.fail(f"GCS emulator did not start in CI: {e}")
    warnings.warn(f"GCS test skipped: {e}")
    pytest.skip(f"GCS emulator unavailable: {e}")
  try:
    emulator.create_bucket("countclip-test")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **emulator.env()}
    logs = run_children([(["gcs", "gs://countclip-test/run"], env)], tmp_path)
    assert "restored 2; then steps [1, 2, 3]" in logs[0], logs[0][-4000:]
    # On GCS a rename needs the destination's folder to exist: the note makes it.
    names = emulator.list("countclip-test", "run/corrupt_checkpoints/")
    assert "run/corrupt_checkpoints/3.txt" in names
    assert "run/corrupt_checkpoints/3/state/_METADATA" in names
    assert "run/checkpoints/3/commit_success.txt" in emulator.list("countclip-test", "run/")
  finally:
    emulator.stop()


if __name__ == "__main__":
  child(sys.argv[1], sys.argv[2])
