"""main.py end to end, as a user runs it: a CPU run, bad overrides, kill -9 and resume."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from countclip_jax import checkpoints
from countclip_jax.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# -O0: short runs are dominated by compile time; every run compared uses the same flags.
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                  "--xla_backend_optimization_level=0",
       "JAX_PLATFORMS": "cpu"}


def main_command(workdir, *overrides):
  return [sys.executable, "-m", "countclip_jax.main", f"--config={TINY}",
          f"--workdir={workdir}", "--verbosity=-1", *overrides]


def run_main(workdir, *overrides, check=True):
  return subprocess.run(main_command(workdir, *overrides), env=ENV, cwd=ROOT,
                        capture_output=True, text=True, check=check, timeout=300)


def test_a_short_run_from_the_command_line(tmp_path):
  run_main(tmp_path, "--config.train.steps=6", "--config.train.log_every=2")
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  assert {"train/count_loss", "train/count_accuracy", "train/examples_per_sec"} <= set(rows[0])
  for name in ("config.json", "model_config.json", "tokenizer/tokenizer.json"):
    assert (tmp_path / name).exists(), name
  assert os.listdir(tmp_path / "tensorboard")
  params = checkpoints.restore_params(str(tmp_path))
  assert params["logit_scale"].shape == ()


@pytest.mark.parametrize("override, message", [
    ("--config.train.learning_rate=1", "learning_rate"),
    ("--config.count.fraction=1.5", "count.fraction (p) must be in [0, 1]"),
    ("--config.train.batch_size=15", "not divisible by mesh.data"),
])
def test_bad_overrides_fail_before_compiling(tmp_path, override, message):
  result = run_main(tmp_path, override, check=False)
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def wait_for(path, process, timeout=400):  # generous: a loaded 2-core machine is slow
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert process.poll() is None, "the run ended before it could be interrupted"
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


STEPS = ["--config.train.steps=40", "--config.checkpoint.every_steps=5"]


@pytest.fixture(scope="module")
def straight_params(tmp_path_factory):
  """The params of an uninterrupted run, shared by the interruption tests."""
  workdir = tmp_path_factory.mktemp("straight")
  run_main(workdir, *STEPS)
  return checkpoints.restore_params(str(workdir))


# every_steps=1: SIGTERM always lands on a step the interval save has just written.
@pytest.mark.parametrize("sig, every", [(signal.SIGKILL, 5), (signal.SIGTERM, 5),
                                        (signal.SIGTERM, 1)])
def test_interrupted_run_resumes_to_identical_params(tmp_path, sig, every, straight_params):
  steps = [STEPS[0], f"--config.checkpoint.every_steps={every}"]

  workdir = tmp_path / "interrupted"
  process = subprocess.Popen(main_command(workdir, *steps), env=ENV, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for(workdir / "checkpoints" / "10", process)
  process.send_signal(sig)
  _, stderr = process.communicate(timeout=120)
  saved = checkpoints.create_manager(str(workdir), every, 3).latest_step()
  if sig == signal.SIGKILL:
    assert process.returncode == -signal.SIGKILL
  else:  # SIGTERM: a checkpoint of the step it stopped at, and a clean exit
    assert process.returncode == 0, stderr
    assert f"Preempted at step {saved}: checkpoint {saved} saved" in stderr, stderr
  assert saved is not None and 10 <= saved < 40, saved

  run_main(workdir, *steps)
  resumed = checkpoints.restore_params(str(workdir))
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, straight_params)
  logged = [r["step"] for r in read_metrics(str(workdir))]
  assert logged[-1] == 40


def test_a_run_resumes_on_another_mesh(tmp_path, straight_params):
  """Stopped on data=8 (8 devices), resumed on data=2,fsdp=4: params and optimizer state are
  resharded on restore, and the data position is the step, so it ends where the uninterrupted
  2-device run ends (up to the reduction order of another mesh)."""
  eight = {**ENV, "XLA_FLAGS": ENV["XLA_FLAGS"].replace("device_count=2", "device_count=8")}
  workdir = tmp_path / "moved"
  process = subprocess.Popen(main_command(workdir, *STEPS, "--config.mesh.data=8"), env=eight,
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
  wait_for(workdir / "checkpoints" / "10", process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr
  assert checkpoints.create_manager(str(workdir), 5, 3).latest_step() < 40
  subprocess.run(main_command(workdir, *STEPS, "--config.mesh.data=2", "--config.mesh.fsdp=4"),
                 env=eight, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         checkpoints.restore_params(str(workdir)), straight_params)


def test_worker_processes_feed_the_same_batches(tmp_path):
  """data.num_workers=2 (grain worker processes) trains exactly as the in-process pipeline."""
  steps = ["--config.train.steps=4", "--config.checkpoint.every_steps=4"]
  run_main(tmp_path / "threads", *steps)
  run_main(tmp_path / "workers", *steps, "--config.data.num_workers=2")
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         checkpoints.restore_params(str(tmp_path / "workers")),
                         checkpoints.restore_params(str(tmp_path / "threads")))
