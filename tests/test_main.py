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


def wait_for(path, process, timeout=120):
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


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_to_identical_params(tmp_path, sig, straight_params):
  steps = STEPS

  workdir = tmp_path / "interrupted"
  process = subprocess.Popen(main_command(workdir, *steps), env=ENV, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for(workdir / "checkpoints" / "10", process)
  process.send_signal(sig)
  _, stderr = process.communicate(timeout=120)
  saved = checkpoints.create_manager(str(workdir), 5, 3).latest_step()
  if sig == signal.SIGKILL:
    assert process.returncode == -signal.SIGKILL
  else:  # SIGTERM: a checkpoint of the step it stopped at, and a clean exit
    assert process.returncode == 0, stderr
    assert "Preempted at step" in stderr
  assert saved is not None and 10 <= saved < 40, saved

  run_main(workdir, *steps)
  resumed = checkpoints.restore_params(str(workdir))
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, straight_params)
  logged = [r["step"] for r in read_metrics(str(workdir))]
  assert logged[-1] == 40
