"""Several JAX processes train exactly as one: the input pipeline's global batch does not depend on
the process count, and a real two-process CPU run (jax.distributed on 127.0.0.1, gloo
collectives, one shared workdir as on a pod) matches a one-process run step for step."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from countclip_jax import checkpoints
from countclip_jax.data import pipeline, synthetic
from countclip_jax.metric_writer import read_metrics
from countclip_jax.text.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
DENSITY = os.path.join(ROOT, "configs", "density.py")
TIMEOUT = 300  # seconds for a run; a few steps take 30-60 s on a free 2-core machine
STEPS = 4
FAST_COMPILE = "--xla_backend_optimization_level=0"


@pytest.mark.parametrize("processes, balance", [(2, True), (4, False)])
def test_processes_share_out_the_batches_of_one_process(processes, balance):
  c = tiny.get_config()
  # A world of 40 examples and batches of 16 (8 counting, 8 general): the 5 batches below cross
  # epochs, where each set is reshuffled.
  c.data.synthetic.size, c.data.balance_numbers = 40, balance
  tok = build_tokenizer(synthetic.vocabulary(), c.data.context_length)
  batches = lambda p, n: pipeline.train_iterator(c, tok, 64, process_index=p, process_count=n,
                                                 num_threads=0)
  one = batches(0, 1)
  shares = [batches(p, processes) for p in range(processes)]
  for _ in range(5):
    want, got = next(one), [next(s) for s in shares]
    assert want["count"]["image"].shape[0] == 8
    # A global batch is process 0's rows, then process 1's, ... (make_array_from_process_local_data)
    jax.tree_util.tree_map(lambda w, *g: np.testing.assert_array_equal(np.concatenate(g), w),
                           want, *got)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_all(named_commands, tmp_path):
  """Runs the commands at once; kills all of them and fails with their output if one fails or
  they take longer than TIMEOUT. Returns each one's output."""
  procs, logs = {}, {name: tmp_path / f"{name}.log" for name in named_commands}
  output = lambda name: logs[name].read_text(errors="replace")
  try:
    for name, (command, env) in named_commands.items():
      with open(logs[name], "w") as log:
        procs[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + TIMEOUT
    while any(p.poll() is None for p in procs.values()):
      failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
      if failed or time.time() > deadline:
        why = f"{failed} failed" if failed else f"still running after {TIMEOUT} s"
        pytest.fail(why + "".join(f"\n--- {n} (exit {p.poll()}) ---\n{output(n)[-4000:]}"
                                  for n, p in procs.items()))
      time.sleep(0.2)
    failed = {n: p.returncode for n, p in procs.items() if p.returncode}
    assert not failed, "".join(f"\n--- {n} (exit {c}) ---\n{output(n)[-4000:]}"
                               for n, c in failed.items())
    return {name: output(name) for name in procs}
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()


def environments(tmp_path):
  """(one process with two CPU devices, two processes with one each): the same mesh."""
  base = {k: v for k, v in os.environ.items()
          if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  base.update(JAX_PLATFORMS="cpu", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
  # XLA's -O0 halves the CPU compile time, most of a tiny run; all runs use it.
  one = {**base, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}"}
  two = {**base, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}",
         "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2",
         # CPU collectives across processes: jax 0.10's default, named for older versions.
         "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  return one, [{**two, "JAX_PROCESS_ID": str(i)} for i in range(2)]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
  command = lambda workdir: [
      sys.executable, "-m", "countclip_jax.main", f"--config={TINY}", f"--workdir={workdir}",
      f"--config.train.steps={STEPS}", "--config.train.log_every=1",
      "--config.checkpoint.every_steps=2",
      # Params and optimizer state sharded across the processes (the batch still is too), and
      # the final eval computed by both from those shards.
      "--config.mesh.data=1", "--config.mesh.fsdp=2",
      "--config.eval.datasets=synthetic", "--config.eval.size=27", "--config.eval.batch_size=10"]
  one, two = environments(tmp_path)
  shared = tmp_path / "shared"  # one workdir for both processes, as gs:// on a pod
  logs = run_all({
      "one": (command(tmp_path / "one"), one),
      "two-0": (command(shared), two[0]),
      "two-1": (command(shared), two[1]),
  }, tmp_path)
  assert "over 2 devices (1 processes)" in logs["one"]
  assert "over 2 devices (2 processes)" in logs["two-0"]

  # Metrics (process 0 writes them, once per step): the same losses and the same final eval.
  single, multi = read_metrics(str(tmp_path / "one")), read_metrics(str(shared))
  evals = lambda rows: [r for r in rows if "eval/synthetic/count_accuracy" in r]
  assert len(evals(single)) == len(evals(multi)) == 1
  for name in ("count_accuracy", "count_mae", "color_accuracy", "shape_accuracy"):
    assert evals(multi)[0][f"eval/synthetic/{name}"] == pytest.approx(
        evals(single)[0][f"eval/synthetic/{name}"], abs=1e-6), name
  assert (shared / "eval" / f"synthetic_step{STEPS}.json").exists()
  single, multi = [r for r in single if r not in evals(single)], [r for r in multi
                                                                 if r not in evals(multi)]
  assert [r["step"] for r in multi] == [r["step"] for r in single] == list(range(1, STEPS + 1))
  for name in ("train/loss", "train/clip_loss", "train/count_loss", "train/grad_norm"):
    np.testing.assert_allclose([r[name] for r in multi], [r[name] for r in single], rtol=1e-5,
                               err_msg=name)
  assert len({r["train/loss"] for r in single}) == STEPS  # each step saw other data

  # Checkpoints (both processes wrote their shards; no per-process data state): the same params.
  items = os.listdir(shared / "checkpoints" / str(STEPS))
  assert "state" in items and "data" not in items, items
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      checkpoints.restore_params(str(shared)), checkpoints.restore_params(str(tmp_path / "one")))

  # The eval alone, of the same params: starting the finished run again restores it and runs
  # the final eval, as one process and as two.
  assert_two_processes_evaluate_like_one(tmp_path, tmp_path / "one", command,
                                         f"synthetic_step{STEPS}.json", 27, one, two)


def assert_two_processes_evaluate_like_one(tmp_path, run, command, result, size, one, two,
                                           first=None):
  """Two processes re-evaluating a finished `run` each read only their share of every eval
  batch (batches of 10: process 0 rows 0-4, 10-14, ..., process 1 rows 5-9, ...; or `first`
  examples for process 0), and write exactly the results of one process."""
  copies = {name: tmp_path / f"eval-{name}" for name in ("one", "two")}
  for copy in copies.values():
    shutil.copytree(run, copy)
  logs = run_all({"eval-one": (command(copies["one"]), one),
                  "eval-two-0": (command(copies["two"]), two[0]),
                  "eval-two-1": (command(copies["two"]), two[1])}, tmp_path)
  if first is None:
    first = sum(min(5, size - b) for b in range(0, size, 10))
  for name, share in (("eval-one", size), ("eval-two-0", first), ("eval-two-1", size - first)):
    assert f"this process read {share} of {size} examples" in logs[name], logs[name][-3000:]
  read = lambda copy: json.loads((copy / "eval" / result).read_text())
  assert read(copies["two"]) == read(copies["one"])
  assert read(copies["one"]) == read(run)  # the same params give the same results


def test_two_processes_evaluate_a_density_run_like_one(tmp_path):
  """The density task's eval with its params sharded over both processes (fsdp)."""
  command = lambda workdir: [
      sys.executable, "-m", "countclip_jax.main", f"--config={DENSITY}:tiny",
      f"--workdir={workdir}", "--config.train.steps=1", "--config.mesh.data=1",
      "--config.mesh.fsdp=2", "--config.eval.batch_size=10", "--config.density.eval_size=16"]
  one, two = environments(tmp_path)
  run_all({"train": (command(tmp_path / "run"), one)}, tmp_path)
  assert_two_processes_evaluate_like_one(tmp_path, tmp_path / "run", command, "density_step1.json",
                                         16, one, two)


def write_fsc147(root, test_widths):
  """An FSC-147 tree (its published layout) of random-pixel JPEGs: 2 training images and one
  test image (the eval's split) per width, all 96 px high, with a few points each."""
  rng = np.random.default_rng(0)
  names = {"train": ["t0.jpg", "t1.jpg"], "test": [f"v{i}.jpg" for i in range(len(test_widths))]}
  widths = dict(zip(names["train"], (96, 128)), **dict(zip(names["test"], test_widths)))
  os.makedirs(root / "images_384_VarV2")
  annotations = {}
  for name, width in widths.items():
    pixels = rng.integers(0, 255, (96, width, 3), np.uint8)
    Image.fromarray(pixels).save(root / "images_384_VarV2" / name, format="JPEG")
    points = rng.uniform(1, [width - 1, 95], (1 + len(annotations) % 4, 2)).tolist()
    annotations[name] = {"H": 96, "W": width, "ratio_h": 1.0, "ratio_w": 1.0, "points": points,
                         "box_examples_coordinates": []}
  (root / "annotation_FSC147_384.json").write_text(json.dumps(annotations))
  (root / "Train_Test_Val_FSC_147.json").write_text(json.dumps({**names, "val": []}))
  classes = ["sea shells", "apples", "red circles", "hot air balloons"]
  (root / "ImageClasses_FSC147.txt").write_text("".join(
      f"{name}\t{classes[i % 4]}\n" for i, name in enumerate(widths)))


def test_two_processes_evaluate_a_real_set_like_one(tmp_path):
  """The sliding-window eval of a real set (FSC-147's layout): each process reads every other
  image, windows of several images share a call, and the counts are the one-process ones."""
  write_fsc147(tmp_path / "fsc", (96, 200, 150, 300, 130))
  command = lambda workdir: [
      sys.executable, "-m", "countclip_jax.main", f"--config={DENSITY}:tiny",
      f"--workdir={workdir}", "--config.train.steps=1", "--config.mesh.data=1",
      "--config.mesh.fsdp=2", "--config.density.source=fsc147",
      f"--config.density.data_dir={tmp_path / 'fsc'}", "--config.density.crop_size=96",
      "--config.density.eval_window_stride=32", "--config.train.batch_size=2"]
  one, two = environments(tmp_path)
  run_all({"train": (command(tmp_path / "run"), one)}, tmp_path)
  results = json.loads((tmp_path / "run" / "eval" / "density_step1.json").read_text())
  assert results["skipped"] == 0 and results["mean_count"] == pytest.approx(
      np.mean([1 + i % 4 for i in range(2, 7)]))
  assert_two_processes_evaluate_like_one(tmp_path, tmp_path / "run", command,
                                         "density_step1.json", 5, one, two, first=3)


def test_preempted_on_two_processes_resumes_on_one(tmp_path):
  """SIGTERM to one process of two: JAX's coordination service makes both stop at one step,
  save it and exit 0; the run then resumes as a single process (the data position is the
  step, not a per-process iterator state) and ends where an uninterrupted run ends."""
  steps = 16
  command = lambda workdir: [
      sys.executable, "-m", "countclip_jax.main", f"--config={TINY}", f"--workdir={workdir}",
      f"--config.train.steps={steps}", "--config.checkpoint.every_steps=2",
      "--config.mesh.data=1", "--config.mesh.fsdp=2"]
  one, two = environments(tmp_path)
  shared = tmp_path / "shared"
  logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("two-0", "two-1")}
  procs = [subprocess.Popen(command(shared), cwd=ROOT, env=two[i], stdin=subprocess.DEVNULL,
                            stdout=logs[f"two-{i}"], stderr=subprocess.STDOUT) for i in range(2)]
  try:
    deadline = time.time() + TIMEOUT
    while not (shared / "checkpoints" / "4").exists():
      assert all(p.poll() is None for p in procs), "the run ended before it was preempted"
      assert time.time() < deadline
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=TIMEOUT) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  output = (tmp_path / "two-0.log").read_text(errors="replace")
  assert codes == [0, 0], output[-4000:]
  stopped = checkpoints.create_manager(str(shared), 2, 3).latest_step()
  assert 4 <= stopped < steps, stopped
  assert f"Preempted at step {stopped}" in output

  run_all({"resumed": (command(shared), one), "straight": (command(tmp_path / "one"), one)},
          tmp_path)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
      checkpoints.restore_params(str(shared)), checkpoints.restore_params(str(tmp_path / "one")))
