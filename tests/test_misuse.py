"""main.py misused as a new user would: each mistake is one `error:` line, exit status 2, and the
workdir exactly as it was (or never created); allowed changes on resume are recorded."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from countclip_jax import checkpoints, preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
ENV = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
RUN = ["--config.train.steps=2", "--config.checkpoint.every_steps=2", "--config.eval.datasets=()"]


def main(workdir, *overrides, check=False):
  """The command as a user types it: no --verbosity, so the default output is what is tested."""
  return subprocess.run([sys.executable, "-m", "countclip_jax.main", f"--config={TINY}",
                         f"--workdir={workdir}", *overrides], env=ENV, cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=check)


def snapshot(directory) -> dict[str, str]:
  """Every file under `directory` with a hash of its bytes (and so of any change)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def assert_one_line_error(result, *fragments):
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 2-step run of the tiny preset (traced, with a compilation cache): what the resume cases
  start from."""
  workdir = tmp_path_factory.mktemp("finished")
  result = main(workdir, *RUN, "--config.profile.start_step=2", "--config.profile.steps=1",
                f"--config.train.compilation_cache={workdir}_xla", check=True)
  (workdir.parent / "finished.stderr").write_text(result.stderr)  # its default output
  return workdir


def test_the_run_has_its_profile_step_times_and_compilation_cache(finished_run):
  traces = [f for _, _, files in os.walk(finished_run / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces
  last = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
  assert last[-1]["train/step_seconds"] > 0 and last[-1]["train/examples_per_sec"] > 0
  assert os.listdir(f"{finished_run}_xla")  # compiled executables were cached


@pytest.fixture
def copy_of_run(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  return workdir


def hf_directory(tmp_path, *, tokenizer: bool, weights: str | None):
  """A Hugging Face-style init directory: config.json, maybe tokenizer files and weights."""
  from countclip_jax.text.tokenizer import build_tokenizer
  from countclip_jax.data import synthetic
  init = tmp_path / "init"
  init.mkdir()
  (init / "config.json").write_text(json.dumps({"model_type": "clip"}))
  if tokenizer:
    build_tokenizer(synthetic.vocabulary(), 16).save(str(init))
  if weights:
    (init / weights).write_bytes(b"\x80\x04not really a pickle")
  return init


@pytest.mark.parametrize("overrides, fragments", [
    (["--config.train.lr=-1"], ["train.lr must be a finite number > 0, got -1.0"]),
    (["--config.train.lr=nan"], ["train.lr must be a finite number > 0, got nan"]),
    (["--config.train.lrr=1"], ["unknown config key 'train.lrr'", "did you mean 'train.lr'?"]),
    (["--config.trian.lr=1"], ["unknown config key 'trian'", "did you mean 'train'?"]),
    (["--config.train.lr=fast"], ["--config.train.lr=fast", "could not convert"]),
    (["--config.model.init=/no/such/dir"], ["model.init /no/such/dir does not exist"]),
    (["--config.count.fraction=1.5"], ["count.fraction (p) must be in [0, 1], got 1.5"]),
    (["--config.mesh.data=3"], ["needs 3 devices, there are 1"]),
    (["--config.train.freeze=.*"], ["train.freeze '.*' freezes every parameter"]),
])
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, overrides, fragments):
  workdir = tmp_path / "never"
  assert_one_line_error(main(workdir, *overrides), *fragments)
  assert not workdir.exists()


def test_init_without_tokenizer_is_refused(tmp_path):
  """It once trained with a 2-token tokenizer (every caption alike, the counting loss at ln 9)
  and saved that tokenizer in the workdir."""
  init = hf_directory(tmp_path, tokenizer=False, weights="model.safetensors")
  workdir = tmp_path / "never"
  result = main(workdir, f"--config.model.init={init}")
  assert_one_line_error(result, f"model.init {init} has no tokenizer", "data.tokenizer")
  assert not workdir.exists()


def test_pickle_only_init_is_refused_before_writing(tmp_path):
  init = hf_directory(tmp_path, tokenizer=True, weights="pytorch_model.bin")
  workdir = tmp_path / "never"
  assert_one_line_error(main(workdir, f"--config.model.init={init}"), "has no weights",
                        "pickle files are refused")
  assert not workdir.exists()


def test_a_junk_tokenizer_in_the_workdir_is_refused(copy_of_run):
  """A tokenizer that cannot tell the number words apart (what an init directory without
  tokenizer files once produced and saved) is never used again."""
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
  tokenizer = copy_of_run / "tokenizer"
  shutil.rmtree(tokenizer)
  tokenizer.mkdir()
  (tokenizer / "vocab.json").write_text(json.dumps(vocab))
  (tokenizer / "merges.txt").write_text("#version: 0.2\n")
  from transformers import CLIPTokenizerFast
  CLIPTokenizerFast(vocab_file=str(tokenizer / "vocab.json"),
                    merges_file=str(tokenizer / "merges.txt")).save_pretrained(str(tokenizer))
  before = snapshot(copy_of_run)
  result = main(copy_of_run, *RUN)
  assert_one_line_error(result, "the workdir's tokenizer/", "encodes different number words "
                        "alike")
  assert snapshot(copy_of_run) == before


@pytest.mark.parametrize("overrides, fragments", [
    (["--config.model.arch=b16"], ["different model.arch", "'tiny' in the checkpoints' run, "
                                   "'b16' now"]),
    (["--config.data.context_length=20", "--config.task=density"],
     ["different data.context_length, task", "data.context_length: 16 in the checkpoints' run, "
      "20 now", "task: 'contrastive' in the checkpoints' run, 'density' now"]),
    (["--config.model.scan_layers=True"], ["different model.scan_layers", "model.scan_layers: "
                                           "False in the checkpoints' run, True now"]),
])
def test_resume_with_another_architecture_is_refused(copy_of_run, overrides, fragments):
  before = snapshot(copy_of_run)
  assert_one_line_error(main(copy_of_run, *RUN, *overrides), *fragments)
  assert snapshot(copy_of_run) == before


def test_resume_with_a_new_batch_size_is_allowed_and_recorded(copy_of_run):
  # A run recorded before model.scan_layers existed resumes as the per-layer run it was.
  record = json.loads((copy_of_run / preflight.CONFIG).read_text())
  del record["model"]["scan_layers"]
  (copy_of_run / preflight.CONFIG).write_text(json.dumps(record))
  result = main(copy_of_run, "--config.train.steps=4", "--config.checkpoint.every_steps=2",
                "--config.eval.datasets=()", "--config.train.batch_size=32", check=True)
  assert "Resuming with train.batch_size changed: 16 -> 32" in result.stderr
  history = sorted(os.listdir(copy_of_run / "config_history"))
  assert [name.split("-")[-1] for name in history] == ["step00000000.json", "step00000002.json"]
  sizes = [json.loads((copy_of_run / "config_history" / h).read_text())["train"]["batch_size"]
           for h in history]
  assert sizes == [16, 32]
  assert checkpoints.latest_step(str(copy_of_run)) == 4


def test_default_output_is_quiet(finished_run, tmp_path):
  """Orbax's INFO lines (95% of a run's log) are hidden; the project's own remain."""
  quiet = (finished_run.parent / "finished.stderr").read_text()
  assert "checkpoint_manager.py" not in quiet and "orbax" not in quiet.lower()
  assert "Done at step 2" in quiet
  loud = main(tmp_path / "loud", *RUN, "--verbosity=1", check=True).stderr
  assert "orbax" in loud.lower() and "Done at step 2" in loud


def test_help_exits_zero():
  result = subprocess.run([sys.executable, "-m", "countclip_jax.main", "--help"], env=ENV,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "--workdir" in result.stdout
