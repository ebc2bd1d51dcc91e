"""launch/tpu.py: the exact commands of each subcommand (--dry-run), the input checks, that a
dry run runs nothing and a real run runs the same argvs, and that the shell lines sent to the
workers do what they say (run here with bash in a fake home directory)."""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # launch/ is not an installed package: import it from the checkout
  sys.path.insert(0, REPO)
from launch import tpu  # pylint: disable=g-import-not-at-top

TPU = ["countclip-v4", "--zone=us-central2-b"]
SSH = "gcloud compute tpus tpu-vm ssh countclip-v4 --zone=us-central2-b"
REAL_RUN, REAL_POPEN = subprocess.run, subprocess.Popen
_own = {"shell": False}  # set while a test runs its own shell (bash checks of remote lines)


def real_run(argv, **kwargs):
  """subprocess.run for the tests' own bash/python, past the guard below."""
  _own["shell"] = True
  try:
    return REAL_RUN(argv, **kwargs)
  finally:
    _own["shell"] = False


@pytest.fixture(autouse=True)
def nothing_runs(monkeypatch, tmp_path):
  """No test may start gcloud: every way to start a process fails loudly (except the tests'
  own shells) and PATH has no gcloud."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"subprocess called: {args} {kwargs}")

  def popen(*args, **kwargs):
    if not _own["shell"]:
      refuse(*args, **kwargs)
    return REAL_POPEN(*args, **kwargs)
  for name in ("run", "call", "check_call", "check_output"):
    monkeypatch.setattr(subprocess, name, refuse)
  monkeypatch.setattr(subprocess, "Popen", popen)
  monkeypatch.setattr(os, "system", refuse)
  monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))


def dry(capsys, *argv: str) -> list[str]:
  """The printed lines of `python -m launch.tpu COMMAND --dry-run ARGS...`."""
  assert tpu.main([argv[0], "--dry-run", *argv[1:]]) == 0, capsys.readouterr().err
  out = capsys.readouterr().out
  return out.splitlines()


def fails(capsys, *argv: str) -> str:
  """stderr of a command that must be refused (exit 2) with nothing printed to stdout."""
  assert tpu.main([argv[0], "--dry-run", *argv[1:]]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  return captured.err


def remote(line: str) -> str:
  """The --command= of a printed ssh line."""
  (command,) = [w for w in shlex.split(line) if w.startswith("--command=")]
  return command[len("--command="):]


# ---------------------------------------------------------------------------------------------
# Accelerators.

@pytest.mark.parametrize("name,generation,runtime,workers", [
    ("v4-8", "v4", "tpu-ubuntu2204-base", 1),
    ("v4-32", "v4", "tpu-ubuntu2204-base", 4),
    ("v4-128", "v4", "tpu-ubuntu2204-base", 16),
    ("v5litepod-1", "v5e", "v2-alpha-tpuv5-lite", 1),
    ("v5litepod-8", "v5e", "v2-alpha-tpuv5-lite", 1),
    ("v5litepod-16", "v5e", "v2-alpha-tpuv5-lite", 4),
    ("v5litepod-256", "v5e", "v2-alpha-tpuv5-lite", 64),
    ("v5p-8", "v5p", "v2-alpha-tpuv5", 1),
    ("v5p-32", "v5p", "v2-alpha-tpuv5", 4),
    ("v6e-4", "v6e", "v2-alpha-tpuv6e", 1),
    ("v6e-16", "v6e", "v2-alpha-tpuv6e", 4),
])
def test_accelerator_table(name, generation, runtime, workers):
  accelerator = tpu.parse_accelerator(name)
  assert accelerator.generation.name == generation
  assert accelerator.generation.runtime == runtime
  assert accelerator.workers == workers


KNOWN = ("Known: v4: v4-N with N in 8, 16, 32, ... (multiples of 8); "
         "v5e: v5litepod-N with N in 1, 4, 8, 16, 32, 64, 128, 256; "
         "v5p: v5p-N with N in 8, 16, 32, ... (multiples of 8); "
         "v6e: v6e-N with N in 1, 4, 8, 16, 32, 64, 128, 256.")


@pytest.mark.parametrize("name,message", [
    ("v3-8", "Unknown accelerator type 'v3-8'. " + KNOWN),
    ("v5e-16", "Unknown accelerator type 'v5e-16' (v5e slices are called v5litepod-N: "
               "v5litepod-16). " + KNOWN),
    ("tpu-v4", "Accelerator type 'tpu-v4' is not of the form GENERATION-N (e.g. v4-32). " + KNOWN),
    ("v4", "Accelerator type 'v4' is not of the form GENERATION-N (e.g. v4-32). " + KNOWN),
    ("v4-12", "There is no v4 slice 'v4-12'. v4: v4-N with N in 8, 16, 32, ... (multiples of 8)."),
    ("v5p-4", "There is no v5p slice 'v5p-4'. v5p: v5p-N with N in 8, 16, 32, ... "
              "(multiples of 8)."),
    ("v6e-2", "There is no v6e slice 'v6e-2'. v6e: v6e-N with N in 1, 4, 8, 16, 32, 64, 128, "
              "256."),
])
def test_bad_accelerator_says_what_exists(name, message):
  with pytest.raises(tpu.LaunchError) as e:
    tpu.parse_accelerator(name)
  assert str(e.value) == message


# ---------------------------------------------------------------------------------------------
# create

def test_create(capsys):
  assert dry(capsys, "create", *TPU, "--accelerator=v4-32") == [
      "gcloud compute tpus tpu-vm create countclip-v4 --zone=us-central2-b "
      "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base"]


@pytest.mark.parametrize("accelerator,version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_create_picks_the_runtime_per_generation(capsys, accelerator, version):
  (line,) = dry(capsys, "create", "my-tpu", "--zone=us-east5-b", f"--accelerator={accelerator}")
  assert shlex.split(line) == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-east5-b",
      f"--accelerator-type={accelerator}", f"--version={version}"]


def test_create_options(capsys):
  assert dry(capsys, "create", *TPU, "--accelerator=v6e-16", "--spot", "--project=my-proj",
             "--version=v2-alpha-tpuv6e-custom",
             "--service-account=tpu@my-proj.iam.gserviceaccount.com") == [
      "gcloud compute tpus tpu-vm create countclip-v4 --zone=us-central2-b --project=my-proj "
      "--accelerator-type=v6e-16 --version=v2-alpha-tpuv6e-custom --spot "
      "--service-account=tpu@my-proj.iam.gserviceaccount.com "
      "--scopes=https://www.googleapis.com/auth/cloud-platform"]
  assert dry(capsys, "create", *TPU, "--accelerator=v4-8", "--preemptible") == [
      "gcloud compute tpus tpu-vm create countclip-v4 --zone=us-central2-b "
      "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base --preemptible"]


def test_create_queued(capsys):
  assert dry(capsys, "create", *TPU, "--accelerator=v4-32", "--queued", "--spot") == [
      "gcloud compute tpus queued-resources create countclip-v4 --zone=us-central2-b "
      "--node-id=countclip-v4 --accelerator-type=v4-32 "
      "--runtime-version=tpu-ubuntu2204-base --spot"]


def test_create_refuses(capsys):
  assert "--spot and --preemptible exclude each other" in fails(
      capsys, "create", *TPU, "--accelerator=v4-32", "--spot", "--preemptible")
  assert "Queued resources take --spot, not --preemptible." in fails(
      capsys, "create", *TPU, "--accelerator=v4-32", "--queued", "--preemptible")
  assert "Unknown accelerator type 'v5e-16' (v5e slices are called v5litepod-N" in fails(
      capsys, "create", *TPU, "--accelerator=v5e-16")
  assert "create takes nothing after `--`" in fails(
      capsys, "create", *TPU, "--accelerator=v4-8", "--", "--oops")


@pytest.mark.parametrize("argv,message", [
    (["Countclip", "--zone=us-central2-b"],
     "TPU name 'Countclip': use 1-63 lowercase letters, digits and hyphens, starting with a "
     "letter (e.g. countclip-v4)."),
    (["countclip-", "--zone=us-central2-b"], "TPU name 'countclip-': use"),
    (["countclip", "--zone=us-central2"],
     "--zone='us-central2' is not a zone: a zone is a region and a letter, e.g. us-central2-b"),
    (["countclip", "--zone=us central2-b"], "--zone='us central2-b' is not a zone"),
])
def test_bad_name_or_zone(capsys, argv, message):
  err = fails(capsys, "create", *argv, "--accelerator=v4-8")
  assert err.startswith("error: ") and err.count("\n") == 1  # one line, as every command's
  assert message in err


# ---------------------------------------------------------------------------------------------
# setup

GUARD = ('pid=$(cat ~/countclip/train.pid 2>/dev/null || true); '
         'if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$(hostname): a countclip '
         'job is running (pid $pid); stop it first" >&2; exit 1; fi; ')
INSTALL = (
    "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --user --upgrade uv; "
    "~/.local/bin/uv venv --quiet --seed --allow-existing --python 3.12 ~/countclip/venv; "
    '~/countclip/venv/bin/pip install --quiet --upgrade "jax[tpu]" '
    "-c ~/countclip/repo/launch/constraints.txt; "
    "~/countclip/venv/bin/pip install --quiet --editable ~/countclip/repo "
    "-c ~/countclip/repo/launch/constraints.txt; "
    'printf "%s: countclip-jax ready, jax " "$(hostname)"; '
    '~/countclip/venv/bin/python -c "import countclip_jax, jax; print(jax.__version__)"')


def test_setup_copies_the_checkout(capsys):
  tarball = os.path.join(tempfile.gettempdir(), "countclip-jax-countclip-v4.tar.gz")
  lines = dry(capsys, "setup", *TPU)
  assert [shlex.split(l) for l in lines[:2]] == [
      ["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "countclip-v4:countclip-jax.tar.gz",
       "--zone=us-central2-b", "--worker=all"]]
  assert shlex.split(lines[2])[:8] == shlex.split(SSH) + ["--worker=all"]
  assert remote(lines[2]) == (
      "set -e; " + GUARD + "rm -rf ~/countclip/repo; mkdir -p ~/countclip; "
      "mkdir -p ~/countclip/repo; "
      "tar -xzf countclip-jax.tar.gz -C ~/countclip/repo; rm countclip-jax.tar.gz; " + INSTALL)
  assert len(lines) == 3


def test_setup_clones(capsys):
  (line,) = dry(capsys, "setup", *TPU, "--repo-url=https://github.com/me/countclip-jax.git",
                "--ref=v0.1", "--python=3.11", "--project=p")
  assert shlex.split(line)[:9] == shlex.split(SSH) + ["--project=p", "--worker=all"]
  assert remote(line) == (
      "set -e; " + GUARD + "rm -rf ~/countclip/repo; mkdir -p ~/countclip; "
      "git clone --quiet https://github.com/me/countclip-jax.git ~/countclip/repo; "
      "git -C ~/countclip/repo checkout --quiet v0.1; " + INSTALL.replace("3.12", "3.11"))
  (line,) = dry(capsys, "setup", *TPU, "--repo-url=https://github.com/me/countclip-jax.git")
  assert "checkout" not in line  # the default branch as cloned


# ---------------------------------------------------------------------------------------------
# run

L14 = ["--config=configs/l14.py", "--workdir=gs://my-bucket/countclip-l14"]


def run_line(extra_flags=(), overrides=(), accelerator="v4-32", env=()):
  """What `run` sends, written out by hand."""
  env = "env " + " ".join(env) + " " if env else ""
  return (
      "set -e; cd ~/countclip/repo; pid=$(cat ~/countclip/train.pid 2>/dev/null || true); "
      'if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$(hostname): a countclip job '
      'is already running (pid $pid); stop it first" >&2; exit 1; fi; '
      'echo "=== $(date -u) start" >> ~/countclip/train.log; '
      f"nohup {env}~/countclip/venv/bin/python -m countclip_jax.main "
      + " ".join(extra_flags) +
      " >> ~/countclip/train.log 2>&1 < /dev/null & echo $! > ~/countclip/train.pid; "
      'echo "$(hostname): started pid $!"')


def test_run(capsys):
  (line,) = dry(capsys, "run", *TPU, "--accelerator=v4-32", *L14)
  assert shlex.split(line)[:8] == shlex.split(SSH) + ["--worker=all"]
  assert remote(line) == run_line(L14)


def main_argv(line: str) -> list[str]:
  """The arguments countclip_jax.main gets on the worker, parsed as the remote shell would."""
  words = shlex.split(remote(line))
  start = words.index("countclip_jax.main") + 1
  return words[start:words.index(">>", start)]


def test_run_passes_overrides_exactly(capsys):
  overrides = [
      "--config.data.records.counting=gs://my-bucket/data/counting-*.array_record",
      "--config.data.tfds.name=with space",
      "--config.model.init=it's \"quoted\"",
      "--config.train.freeze=^vision_model/|$HOME;rm -rf /",
      "--config.eval.countbench_dir=../countbench",
  ]
  (line,) = dry(capsys, "run", *TPU, *L14, "--", *overrides)
  assert main_argv(line) == L14 + overrides
  # Globs, $, ; and quotes reach the job as text: each is quoted for the remote shell, in
  # double quotes where that is enough.
  assert ('"--config.data.records.counting=gs://my-bucket/data/counting-*.array_record" '
          '"--config.data.tfds.name=with space" '
          "'--config.model.init=it'\"'\"'s \"quoted\"' "
          "'--config.train.freeze=^vision_model/|$HOME;rm -rf /' "
          "--config.eval.countbench_dir=../countbench >>") in remote(line)


def test_run_env(capsys):
  (line,) = dry(capsys, "run", *TPU, *L14, "--env=HF_HUB_ENABLE_HF_TRANSFER=0",
                "--env", "XLA_FLAGS=--xla_dump_to=/tmp/x --xla_dump_hlo_as_text")
  assert remote(line) == run_line(L14, env=[
      "HF_HUB_ENABLE_HF_TRANSFER=0", '"XLA_FLAGS=--xla_dump_to=/tmp/x --xla_dump_hlo_as_text"'])
  assert "is not NAME=VALUE" in fails(capsys, "run", *TPU, *L14, "--env=1X=2")


def test_run_workdir_rules(capsys):
  # A multi-worker slice: local workdirs are refused, saying why.
  err = fails(capsys, "run", *TPU, "--accelerator=v4-32", "--config=configs/l14.py",
              "--workdir=/tmp/run")
  assert ("--workdir='/tmp/run' is local, but v4-32 has 4 workers: each would write its part "
          "of every checkpoint to its own disk and the run could never resume. Use a "
          "gs://BUCKET/RUN workdir.") in err
  # Slice unknown: gs:// is required.
  err = fails(capsys, "run", *TPU, "--config=configs/l14.py", "--workdir=runs/l14")
  assert "--workdir='runs/l14' is not a gs:// path. Give gs://BUCKET/RUN" in err
  assert "pass --accelerator, e.g. --accelerator=v4-8" in err
  # One VM: a local absolute path is allowed, a relative one is not.
  (line,) = dry(capsys, "run", *TPU, "--accelerator=v6e-8", "--config=configs/tiny.py",
                "--workdir=/home/me/runs/tiny")
  assert main_argv(line) == ["--config=configs/tiny.py", "--workdir=/home/me/runs/tiny"]
  assert "must be an absolute path" in fails(
      capsys, "run", *TPU, "--accelerator=v6e-8", "--config=configs/tiny.py", "--workdir=runs")
  for bad in ("gs://", "gs://My_Bucket/run", "gs://b/run"):
    assert f"--workdir='{bad}' is not a Cloud Storage path: use gs://BUCKET/RUN" in fails(
        capsys, "run", *TPU, "--config=configs/l14.py", f"--workdir={bad}")


def test_run_refuses_bad_flags(capsys):
  assert "Override 'config.train.lr=1' is not a flag" in fails(
      capsys, "run", *TPU, *L14, "--", "config.train.lr=1")
  assert "set the config file and workdir with the launcher's own" in fails(
      capsys, "run", *TPU, *L14, "--", "--workdir=gs://other/run")
  assert "--config='l14' is not a config file" in fails(
      capsys, "run", *TPU, "--config=l14", "--workdir=gs://my-bucket/run")


@pytest.mark.parametrize("config, overrides, message", [
    ("configs/l15.py", [], "--config=configs/l15.py: there is no file configs/l15.py in "),
    ("configs/density.py:fsc148", [], "--config=configs/density.py:fsc148 does not load: "
     "ValueError: configs/density.py takes 'demo', 'tiny' or 'fsc147', got 'fsc148'"),
    ("configs/l14.py", ["--config.train.lrr=1e-5"],
     "unknown config key 'train.lrr' (in --config.train.lrr); did you mean 'train.lr'?"),
    ("configs/l14.py", ["--config.trian.lr=1e-5"], "unknown config key 'trian'"),
    ("configs/l14.py", ["--config.train.steps=1e4"],
     "flag --config.train.steps=1e4: invalid literal for int() with base 10: '1e4'"),
    ("configs/l14.py", ["--config.data.augment=maybe"], "flag --config.data.augment=maybe: "),
], ids=["no file", "bad preset", "unknown key", "unknown group", "bad int", "bad bool"])
def test_run_checks_the_config_and_its_overrides_before_any_gcloud_call(capsys, config,
                                                                        overrides, message):
  """Not a dry run: nothing_runs fails the test if any process starts."""
  argv = ["run", *TPU, f"--config={config}", "--workdir=gs://my-bucket/run", "--", *overrides]
  assert tpu.main(argv) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.startswith("error: " + message), captured.err
  assert captured.err.count("\n") == 1


def test_without_ml_collections_only_the_config_file_is_checked(capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "ml_collections", None)  # what `import` then refuses
  assert "there is no file configs/l15.py" in fails(
      capsys, "run", *TPU, "--config=configs/l15.py", "--workdir=gs://my-bucket/run")
  assert tpu.main(["run", *TPU, *L14, "--dry-run", "--", "--config.train.lrr=1"]) == 0
  assert "ml_collections is not installed here" in capsys.readouterr().err


def test_run_passes_other_flags_and_valid_overrides(capsys):
  overrides = ["--config.train.lr=3e-6", "--noconfig.model.remat", "--config.count.scale=learned",
               "--verbosity=1"]  # main's absl flags are not the config's: the workers check them
  (line,) = dry(capsys, "run", *TPU, "--config=configs/density.py:fsc147",
                "--workdir=gs://my-bucket/run", "--", *overrides)
  assert main_argv(line)[2:] == overrides


def test_argparse_errors_are_one_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    tpu.main(["run", *TPU, "--workdir=gs://my-bucket/run"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == ("error: the following arguments are required: --config "
                                     "(see python -m launch.tpu run --help)\n")


def test_dry_run_after_the_separator_is_refused(capsys):
  """`... -- --config.x=1 --dry-run` must not reach gcloud (and must not be silently real)."""
  err = fails(capsys, "run", *TPU, *L14, "--", "--config.train.lr=1", "--dry-run")
  assert "--dry-run after `--` would be passed on to the job" in err
  assert tpu.main(["run", *TPU, *L14, "--", "--dry-run"]) == 2


# ---------------------------------------------------------------------------------------------
# logs, stop, status, exec, delete

def test_logs(capsys):
  assert dry(capsys, "logs", *TPU) == [
      SSH + " --worker=0 '--command=tail -n 100 -F ~/countclip/train.log'"]
  assert dry(capsys, "logs", *TPU, "--worker=3", "--lines=20", "--no-follow") == [
      SSH + " --worker=3 '--command=tail -n 20 ~/countclip/train.log'"]


def test_stop(capsys):
  (line,) = dry(capsys, "stop", *TPU, "--grace=30")
  assert shlex.split(line)[:8] == shlex.split(SSH) + ["--worker=all"]
  assert remote(line) == (
      'pid=$(cat ~/countclip/train.pid 2>/dev/null || true); '
      'if ! { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }; then '
      'echo "$(hostname): no countclip job running"; else kill -TERM "$pid"; '
      'echo "$(hostname): SIGTERM to $pid, waiting for its checkpoint"; '
      'i=0; while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 30 ]; do sleep 1; i=$((i+1)); done; '
      'if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; echo "$(hostname): killed $pid"; '
      'else echo "$(hostname): stopped"; fi; fi; rm -f ~/countclip/train.pid')


def test_status(capsys):
  lines = dry(capsys, "status", *TPU)
  assert lines[0] == "gcloud compute tpus tpu-vm describe countclip-v4 --zone=us-central2-b"
  assert remote(lines[1]).endswith('then echo "$(hostname): running (pid $pid)"; '
                                   'else echo "$(hostname): not running"; fi')
  assert dry(capsys, "status", *TPU, "--queued", "--project=p") == [
      "gcloud compute tpus queued-resources describe countclip-v4 --zone=us-central2-b "
      "--project=p"]


def test_exec(capsys):
  # One word: a shell line for the remote shell.
  (line,) = dry(capsys, "exec", *TPU, "--", "python -m countclip_jax.data.countbench "
                "--out ../countbench && ls ../countbench | head")
  assert remote(line) == (
      "cd ~/countclip/repo && . ~/countclip/venv/bin/activate && python -m "
      "countclip_jax.data.countbench --out ../countbench && ls ../countbench | head")
  # Several words: one command, its arguments kept exactly.
  (line,) = dry(capsys, "exec", *TPU, "--worker=0", "--", "python", "-c",
                "import jax; print(jax.device_count())")
  assert shlex.split(line)[7] == "--worker=0"
  assert remote(line) == ("cd ~/countclip/repo && . ~/countclip/venv/bin/activate && "
                          'python -c "import jax; print(jax.device_count())"')
  assert "exec needs a command after `--`" in fails(capsys, "exec", *TPU)


def test_delete(capsys):
  assert dry(capsys, "delete", *TPU) == [
      "gcloud compute tpus tpu-vm delete countclip-v4 --zone=us-central2-b"]
  assert dry(capsys, "delete", *TPU, "--queued", "--yes") == [
      "gcloud compute tpus queued-resources delete countclip-v4 --zone=us-central2-b "
      "--force --quiet"]


# ---------------------------------------------------------------------------------------------
# Dry run vs real run.

EVERY_COMMAND = [
    ["create", *TPU, "--accelerator=v4-32", "--spot"],
    ["setup", *TPU],
    ["run", *TPU, *L14, "--", "--config.train.steps=10"],
    ["logs", *TPU],
    ["stop", *TPU],
    ["status", *TPU],
    ["exec", *TPU, "--", "nproc"],
    ["delete", *TPU, "--yes"],
]


@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=lambda a: a[0])
def test_a_real_run_runs_what_the_dry_run_prints(capsys, monkeypatch, argv):
  printed = [shlex.split(l) for l in dry(capsys, *argv)]  # and nothing ran (nothing_runs)
  calls = []
  def record(argv, **kwargs):
    calls.append((argv, kwargs))
    return subprocess.CompletedProcess(argv, 0)
  monkeypatch.setattr(subprocess, "run", record)
  assert tpu.main(argv) == 0
  assert calls == [(p, {"check": True}) for p in printed]
  assert capsys.readouterr().err == "".join(f"+ {shlex.join(p)}\n" for p in printed)


def test_a_failing_command_stops_the_rest(capsys, monkeypatch):
  calls = []
  def record(argv, **kwargs):
    calls.append(argv)
    if argv[0] == "gcloud":
      raise subprocess.CalledProcessError(255, argv)
    return subprocess.CompletedProcess(argv, 0)
  monkeypatch.setattr(subprocess, "run", record)
  assert tpu.main(["setup", *TPU]) == 255
  assert [c[:2] for c in calls] == [["git", "-C"], ["gcloud", "compute"]]  # no ssh after scp
  assert "launch.tpu: exit status 255: gcloud compute tpus tpu-vm scp" in capsys.readouterr().err


def test_missing_gcloud(capsys, monkeypatch):
  def missing(argv, **kwargs):
    raise FileNotFoundError(argv[0])
  monkeypatch.setattr(subprocess, "run", missing)
  assert tpu.main(["delete", *TPU]) == 127
  assert "gcloud not found: install it (gcloud: the Google Cloud CLI)" in capsys.readouterr().err


def test_cli_entry_point_dry_run():
  """`python -m launch.tpu` from the repo root, with no gcloud on PATH."""
  out = real_run([sys.executable, "-m", "launch.tpu", "delete", *TPU, "--dry-run"], cwd=REPO,
                 capture_output=True, text=True, check=True,
                 env={"PATH": os.environ["PATH"]}).stdout
  assert out == "gcloud compute tpus tpu-vm delete countclip-v4 --zone=us-central2-b\n"


# ---------------------------------------------------------------------------------------------
# The remote shell lines, run here by bash in a fake home with a fake job.

FAKE_PYTHON = """#!/bin/sh
# Stands in for the venv's python: records its arguments, saves a "checkpoint" on SIGTERM.
printf '%s\\n' "$@" > "$HOME/args.tmp" && mv "$HOME/args.tmp" "$HOME/args"
trap 'echo checkpoint > "$HOME/saved"; exit 0' TERM
while :; do sleep 0.05; done
"""


@pytest.fixture
def bash():
  path = shutil.which("bash", path="/usr/bin:/bin")
  if path is None:
    pytest.skip("needs bash")
  return path


@pytest.fixture
def worker(tmp_path, bash):
  """(fake home, function running a --command there like the worker's login shell would)."""
  home = tmp_path / "home"
  (home / "countclip" / "repo").mkdir(parents=True)
  (home / "countclip" / "venv" / "bin").mkdir(parents=True)
  python = home / "countclip" / "venv" / "bin" / "python"
  python.write_text(FAKE_PYTHON)
  python.chmod(0o755)
  (home / "countclip" / "venv" / "bin" / "activate").write_text("export ACTIVE=yes\n")
  env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}

  def ssh(line: str) -> subprocess.CompletedProcess:
    return real_run([bash, "-c", remote(line)], env=env, cwd=home, capture_output=True,
                    text=True, timeout=20)

  yield home, ssh
  pid_file = home / "countclip" / "train.pid"  # never leave the fake job behind
  if pid_file.exists() and pid_file.read_text().strip().isdigit():
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except ProcessLookupError:
      pass


def wait_for(path, seconds=10.0):
  deadline = time.monotonic() + seconds
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.02)


def test_remote_lines_start_guard_and_stop_the_job(capsys, worker):
  home, ssh = worker
  overrides = ["--config.data.tfds.name=with space", "--config.model.init=it's $HOME"]
  (run,) = dry(capsys, "run", *TPU, *L14, "--", *overrides)
  (status,) = dry(capsys, "status", *TPU)[1:]
  (stop,) = dry(capsys, "stop", *TPU, "--grace=10")
  (logs,) = dry(capsys, "logs", *TPU, "--no-follow")

  started = ssh(run)
  assert started.returncode == 0, started.stderr
  assert re.fullmatch(r".+: started pid [0-9]+\n", started.stdout)
  wait_for(home / "args")
  assert (home / "args").read_text().splitlines() == [  # exactly as given: nothing expanded
      "-m", "countclip_jax.main", *L14, *overrides]
  assert "running (pid" in ssh(status).stdout

  again = ssh(run)  # a second job would fight the first for the TPU
  assert again.returncode == 1
  assert "a countclip job is already running" in again.stderr

  (_, _, setup) = dry(capsys, "setup", *TPU)  # would pull the code from under the job
  refused = ssh(setup)
  assert refused.returncode == 1 and "a countclip job is running" in refused.stderr
  assert (home / "countclip" / "repo").is_dir()

  assert "=== " in ssh(logs).stdout and " start" in ssh(logs).stdout
  stopped = ssh(stop)
  assert stopped.stdout.splitlines()[-1].endswith(": stopped"), stopped.stdout
  assert (home / "saved").read_text() == "checkpoint\n"  # SIGTERM, not SIGKILL
  assert not (home / "countclip" / "train.pid").exists()
  assert "not running" in ssh(status).stdout
  assert "no countclip job running" in ssh(stop).stdout


def test_remote_stop_kills_after_the_grace(capsys, worker):
  home, ssh = worker
  python = home / "countclip" / "venv" / "bin" / "python"  # a job that ignores SIGTERM
  python.write_text(FAKE_PYTHON.replace('echo checkpoint > "$HOME/saved"; exit 0', ":"))
  (run,) = dry(capsys, "run", *TPU, *L14)
  (stop,) = dry(capsys, "stop", *TPU, "--grace=1")
  assert ssh(run).returncode == 0
  wait_for(home / "args")
  pid = int((home / "countclip" / "train.pid").read_text())
  assert ssh(stop).stdout.splitlines()[-1].endswith(f": killed {pid}")
  assert not (home / "saved").exists()
  assert not (home / "countclip" / "train.pid").exists()


def test_remote_exec_runs_in_the_repo_with_the_venv(capsys, worker):
  home, ssh = worker
  (line,) = dry(capsys, "exec", *TPU, "--", "pwd && echo $ACTIVE")
  result = ssh(line)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [str(home / "countclip" / "repo"), "yes"]


def test_remote_lines_parse(capsys):
  """Every shell line sent to the workers is valid for bash and for POSIX sh (dash)."""
  shells = [s for s in (shutil.which("bash", path="/usr/bin:/bin"),
                        shutil.which("sh", path="/usr/bin:/bin")) if s]
  if not shells:
    pytest.skip("needs a shell")
  lines = [remote(line)
           for argv in EVERY_COMMAND + [["setup", *TPU, "--repo-url=https://x/y.git", "--ref=v1"]]
           for line in dry(capsys, *argv) if "--command=" in line]
  assert len(lines) == 7
  for shell in shells:
    for line in lines:
      result = real_run([shell, "-n", "-c", line], capture_output=True, text=True)
      assert result.returncode == 0, (shell, line, result.stderr)


@pytest.mark.parametrize("word", [
    "plain", "", "with space", "glob-*.array_record", "~/not-home", "$HOME", "`date`", "a\"b",
    "it's", "back\\slash", "semi;colon && rm -rf /", "new\nline", "bang!", "tab\there",
    "'\"'\"'", "ünïcode ✓"])
def test_quote_is_exact_for_the_remote_shell(bash, word):
  out = real_run([bash, "-c", "printf '%s\\0' " + tpu.join([word, "end"])], capture_output=True,
                 env={"HOME": "/nowhere", "PATH": "/usr/bin:/bin"}).stdout
  assert out.decode().split("\0") == [word, "end", ""]


# ---------------------------------------------------------------------------------------------
# launch/README.md: its commands are valid, and the outputs it shows are the real ones.

README = os.path.join(REPO, "launch", "README.md")
README_VARS = {"PROJECT": "my-project", "ZONE": "us-central2-b", "REGION": "us-central2",
               "BUCKET": "my-countclip-bucket", "TPU": "countclip-v4",
               "SA": "countclip-tpu@my-project.iam.gserviceaccount.com"}


def readme_blocks() -> list[list[str]]:
  """The fenced code blocks of the README, as lists of lines (continuations joined)."""
  text = open(README, encoding="utf-8").read()
  blocks = re.findall(r"^```\n(.*?)^```", text, re.S | re.M)
  return [block.replace("\\\n", " ").splitlines() for block in blocks]


def test_readme_commands_are_valid(capsys):
  commands = [line for block in readme_blocks() for line in block
              if line.startswith("python -m launch.tpu") and "$TPU" in line]
  assert len(commands) >= 15
  for line in commands:
    line = line.split("  #")[0]  # trailing comment
    expanded = re.sub(r"\$([A-Z]+)", lambda m: README_VARS[m.group(1)], line)
    argv = shlex.split(expanded)[3:]
    assert "--dry-run" not in argv
    lines = dry(capsys, *argv)
    assert lines, line
    if argv[0] == "run":  # the job gets the config, the workdir and the overrides, as written
      own = [a for a in argv if a.startswith(("--config=", "--workdir="))]
      overrides = argv[argv.index("--") + 1:] if "--" in argv else []
      assert main_argv(lines[0]) == own + overrides


def test_readme_shows_the_real_dry_run_output(capsys):
  shown = [block for block in readme_blocks() if block[0].startswith("$ python -m launch.tpu")]
  assert [shlex.split(b[0])[4] for b in shown] == ["create", "run"]
  for block in shown:
    argv = shlex.split(block[0][2:])[3:]
    assert tpu.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == block[1:]


def test_constraints_pin_the_tested_stack():
  """launch/constraints.txt names the versions this checkout is tested with (the venv's)."""
  import importlib.metadata
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch",
                      "constraints.txt")
  pins = dict(line.split("==") for line in open(path).read().splitlines()
              if line and not line.startswith("#"))
  assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"} <= set(pins)
  for name, version in pins.items():
    assert importlib.metadata.version(name) == version, name
