"""gs:// end to end, against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py): training
records read from the bucket; workdirs: Orbax checkpoints, kill -9 and resume, metrics and
TensorBoard in the bucket, export to gs:// and load_pretrained from it.

Everything that touches gs:// runs in a subprocess with the emulator's environment (gcsfs reads
it when imported); this process only talks to the emulator's JSON API and compares arrays.
"""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

import gcs_emulator  # tests/ is on sys.path under pytest
from countclip_jax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
BUCKET = "countclip-test"
# XLA's -O0 halves the CPU compile time, most of a tiny run; every run compared uses it.
JAX_ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                                "--xla_backend_optimization_level=0"}
TIMEOUT = 300  # seconds for any one subprocess; they take 10-30 s on a free 2-core machine


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  log = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
  try:
    emulator = gcs_emulator.GcsEmulator(str(log)).start()
  except gcs_emulator.EmulatorUnavailable as e:
    if os.environ.get("CI"):  # CI installs .[test]: a skip there would hide a broken install
      pytest.fail(f"GCS emulator did not start in CI: {e}")
    warnings.warn(f"GCS tests skipped: {e}")
    pytest.skip(f"GCS emulator unavailable: {e}")
  emulator.create_bucket(BUCKET)
  yield emulator
  emulator.stop()


class Children:
  """This test's subprocesses: output in files, all killed when the test ends, their output in
  every failure message."""

  def __init__(self, directory):
    self.directory, self.procs = directory, []

  def start(self, name, args, env):
    with open(self.directory / f"{name}.log", "w") as log:
      process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    process.name = name
    self.procs.append(process)
    return process

  def output(self, process) -> str:
    return (self.directory / f"{process.name}.log").read_text(errors="replace")

  def fail(self, process, why):
    pytest.fail(f"{process.name}: {why}\n--- its output (end) ---\n{self.output(process)[-6000:]}")

  def wait(self, process, expect=0):
    try:
      code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      self.fail(process, f"still running after {TIMEOUT} s")
    if code != expect:
      self.fail(process, f"exit code {code}, expected {expect}")
    return self.output(process)

  def run(self, name, args, env):
    return self.wait(self.start(name, args, env))

  def kill_all(self):
    for process in self.procs:
      if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture
def children(tmp_path):
  runs = Children(tmp_path)
  yield runs
  runs.kill_all()


@pytest.fixture
def jax_env():
  # os.environ carries conftest's compilation cache: a run that resumes does not compile again.
  return {**os.environ, **JAX_ENV}


@pytest.fixture
def gs_env(gcs, jax_env):
  return {**jax_env, **gcs.env()}


def main_args(workdir, *overrides):
  return ["-m", "countclip_jax.main", f"--config={TINY}", f"--workdir={workdir}", *overrides]


# Our model from the run (export.load_run) and from the exported HF directory
# (models.load_pretrained), both on gs://; their logits for fixed pixels and the run's tokens.
LOAD_EXPORT = """
import sys, flax, numpy as np
from countclip_jax import export, models
workdir, hf_dir, out = sys.argv[1:]
model, params, tokenizer = export.load_run(workdir)
hf_model, hf_params = models.load_pretrained(hf_dir)
ids = tokenizer(["a photo of three red stars", "some blue circles"])
size = model.config.vision.image_size
pixels = np.random.RandomState(0).randn(2, size, size, 3).astype(np.float32)
logits = lambda m, p: np.asarray(m.apply({"params": p}, pixels, ids).logits_per_image)
np.savez(out, ids=ids, pixels=pixels, run_logits=logits(model, params),
         hf_logits=logits(hf_model, hf_params),
         **{"run/" + k: v for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()},
         **{"hf/" + k: v for k, v in flax.traverse_util.flatten_dict(hf_params, sep="/").items()})
"""


# The records pipeline on gs:// shards (ArrayRecord's reader, gcsfs for the glob and the numbers
# sidecars), 3 threads preparing rows: its first batches, flattened into an npz.
READ_RECORDS = """
import sys, jax, numpy as np
from configs import common
from countclip_jax.data import pipeline, synthetic
from countclip_jax.text.tokenizer import build_tokenizer
counting, general, out = sys.argv[1:]
config = common.base()
config.data.source, config.data.records.counting, config.data.records.general = (
    "records", counting, general)
config.train.batch_size, config.count.fraction, config.data.augment = 8, 0.5, True
tokenizer = build_tokenizer(synthetic.vocabulary() + ["cats", "dogs", "photo", "of"], 16)
it = pipeline.train_iterator(config, tokenizer, 32, process_index=0, process_count=1,
                             num_threads=3, start=1)
batches = [next(it) for _ in range(3)]
np.savez(out, **{f"{i}{jax.tree_util.keystr(k)}": v for i, b in enumerate(batches)
                 for k, v in jax.tree_util.tree_flatten_with_path(b)[0]})
"""


def test_records_pipeline_reads_array_record_shards_from_gcs(gcs, children, gs_env, tmp_path):
  """Training pairs straight from gs:// ArrayRecord shards: the batches of the same shards
  read from a local directory."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from countclip_jax.data import pipeline, records, synthetic  # pylint: disable=g-import-not-at-top
  from countclip_jax.text import numbers  # pylint: disable=g-import-not-at-top
  from countclip_jax.text.tokenizer import build_tokenizer  # pylint: disable=g-import-not-at-top
  local = tmp_path / "records"
  for name, ids in (("counting", range(20)), ("general", range(100, 120))):
    with records.ShardWriter(str(local), name, num_shards=3) as writer:
      for i in ids:
        image = io.BytesIO()
        Image.new("RGB", (40, 30), (i, 255 - i, 7)).save(image, "JPEG" if i % 2 else "PNG")
        n = 2 + i % 9 if name == "counting" else 0
        caption = f"a photo of {numbers.NUMBER_WORDS[n]} cats" if n else "a photo of dogs"
        writer.write(image.getvalue(), caption, n, key=str(i))
  for path in sorted(local.iterdir()):  # shards and their numbers sidecars
    gcs.write(BUCKET, f"records/{path.name}", path.read_bytes())
  pattern = lambda root, name: f"{root}/{name}-*.array_record"
  remote = f"gs://{BUCKET}/records"
  children.run("read", ["-c", READ_RECORDS, pattern(remote, "counting"),
                        pattern(remote, "general"), str(tmp_path / "gcs.npz")], gs_env)
  got = np.load(tmp_path / "gcs.npz")

  config = common.base()
  config.data.source = "records"
  config.data.records.counting = pattern(local, "counting")
  config.data.records.general = pattern(local, "general")
  config.train.batch_size, config.count.fraction, config.data.augment = 8, 0.5, True
  tokenizer = build_tokenizer(synthetic.vocabulary() + ["cats", "dogs", "photo", "of"], 16)
  it = pipeline.train_iterator(config, tokenizer, 32, process_index=0, process_count=1,
                               num_threads=0, start=1)
  want = {f"{i}{jax.tree_util.keystr(k)}": v for i in range(3)
          for k, v in jax.tree_util.tree_flatten_with_path(next(it))[0]}
  assert sorted(got.files) == sorted(want) and len(want) == 21
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  assert got["0['count']['image']"].shape == (4, 32, 32, 3)


def committed_steps(gcs, run) -> list[int]:
  """Checkpoint steps Orbax finished in gs://BUCKET/run (on GCS it marks them with a file)."""
  prefix = f"{run}/checkpoints/"
  return sorted(int(name[len(prefix):].split("/")[0]) for name in gcs.list(BUCKET, prefix)
                if name.endswith("/commit_success.txt") and name.count("/") == 3)


def metrics_rows(gcs, run) -> list[dict]:
  return [json.loads(line) for line in gcs.read(BUCKET, f"{run}/metrics.jsonl").decode()
          .splitlines() if line.strip()]


def test_killed_gcs_run_resumes_to_the_params_of_an_uninterrupted_local_run(
    gcs, children, jax_env, gs_env, tmp_path):
  steps = ["--config.train.steps=20", "--config.checkpoint.every_steps=4",
           "--config.train.log_every=1", "--config.checkpoint.async_save=true"]
  # The uninterrupted run, local, alongside the first part of the gs:// one.
  straight = children.start("straight", main_args(tmp_path / "straight", *steps), jax_env)
  run, workdir = "resumed", f"gs://{BUCKET}/resumed"
  first = children.start("first", main_args(workdir, *steps), gs_env)
  deadline = time.time() + TIMEOUT
  # Orbax saves step 1 (no checkpoint yet), then every 4th: wait for one the interval made.
  while max(committed_steps(gcs, run), default=0) < 4:
    if first.poll() is not None:
      children.fail(first, "ended before a checkpoint was seen in the bucket")
    if time.time() > deadline:
      children.fail(first, f"no checkpoint in {workdir} after {TIMEOUT} s")
    time.sleep(0.05)
  first.send_signal(signal.SIGKILL)
  children.wait(first, expect=-signal.SIGKILL)
  saved = max(committed_steps(gcs, run))
  assert 4 <= saved < 20, saved

  log = children.run("second", main_args(workdir, *steps), gs_env)
  assert f"Resuming at step {saved}" in log
  assert committed_steps(gcs, run)[-1] == 20
  # The bucket's last checkpoint, restored here from a copy (restore_params on gs:// itself is
  # export.load_run's, in the next test): the same params as the uninterrupted run.
  gcs.download(BUCKET, f"{run}/checkpoints/20", str(tmp_path / "copy" / "checkpoints" / "20"))
  resumed = checkpoints.restore_params(str(tmp_path / "copy"))
  children.wait(straight)
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed,
                         checkpoints.restore_params(str(tmp_path / "straight")))

  # Metrics: the resumed run added to the bucket's metrics.jsonl rather than replacing it.
  logged = [r["step"] for r in metrics_rows(gcs, run)]
  assert logged[0] == 1, logged  # written by the killed run (the first row goes up at once)
  assert logged[-1] == 20 and set(range(saved + 1, 21)) <= set(logged), logged
  events = [n for n in gcs.list(BUCKET, f"{run}/tensorboard/") if "tfevents" in n]
  assert events and any(b"train/loss" in gcs.read(BUCKET, n) for n in events), events


def test_export_to_gcs_loads_in_transformers_and_load_pretrained(gcs, children, gs_env,
                                                                 tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  workdir, out = f"gs://{BUCKET}/exported-run", f"gs://{BUCKET}/exported-hf"
  children.run("train", main_args(workdir, "--config.train.steps=2"), gs_env)
  children.run("export", ["-m", "countclip_jax.export", f"--workdir={workdir}", f"--out={out}"],
               gs_env)
  children.run("load", ["-c", LOAD_EXPORT, workdir, out, str(tmp_path / "loaded.npz")],
               gs_env)
  loaded = np.load(tmp_path / "loaded.npz")

  # models.load_pretrained(gs://) gives back exactly the run's params.
  run_keys = sorted(k[4:] for k in loaded.files if k.startswith("run/"))
  assert run_keys == sorted(k[3:] for k in loaded.files if k.startswith("hf/"))
  for key in run_keys:
    np.testing.assert_array_equal(loaded["hf/" + key], loaded["run/" + key], err_msg=key)
  np.testing.assert_allclose(loaded["hf_logits"], loaded["run_logits"], rtol=1e-6, atol=1e-6)

  # The files in the bucket are a directory transformers reads, with the same outputs.
  local = tmp_path / "hf"
  names = gcs.download(BUCKET, "exported-hf", str(local))
  assert {"exported-hf/config.json", "exported-hf/model.safetensors",
          "exported-hf/tokenizer.json", "exported-hf/README.md"} <= set(names), names
  reference = transformers.CLIPModel.from_pretrained(local).eval()
  with torch.no_grad():
    theirs = reference(pixel_values=torch.tensor(loaded["pixels"]).permute(0, 3, 1, 2),
                       input_ids=torch.tensor(loaded["ids"]).long()).logits_per_image.numpy()
  np.testing.assert_allclose(loaded["run_logits"], theirs, atol=1e-4)
  assert np.ptp(theirs) > 1e-3  # logits that differ per pair: the comparison means something


def test_export_into_a_non_empty_gcs_directory_is_refused(gcs, children, gs_env, tmp_path):
  """Checked before the run is read (there is none here): one line, and the bucket as it was."""
  gcs.write(BUCKET, "taken-hf/config.json", b"{}")
  gcs.write(BUCKET, "taken-hf/text_encoder/config.json", b"{}")
  before = {name: gcs.read(BUCKET, name) for name in gcs.list(BUCKET, "taken-hf/")}
  out = f"gs://{BUCKET}/taken-hf"
  process = children.start("export", ["-m", "countclip_jax.export",
                                      f"--workdir=gs://{BUCKET}/no-run", f"--out={out}"], gs_env)
  output = children.wait(process, expect=2)
  assert output.splitlines() == [  # stdout and stderr: this line alone
      f"error: --out={out} is not empty: give a new or empty directory, or pass --overwrite to "
      "write into it. Nothing was written."]
  assert {name: gcs.read(BUCKET, name) for name in gcs.list(BUCKET, "taken-hf/")} == before
  assert not gcs.list(BUCKET, "no-run")
