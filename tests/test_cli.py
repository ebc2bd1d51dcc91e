"""Every command's contract (countclip_jax/cli.py), from the command line: `--help` exits 0,
and a missing file or directory is one line `error: ...` on stderr, exit status 2, no traceback
and nothing written."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each command and a flag its help must list.
COMMANDS = {
    "countclip_jax.evaluate": "--countbench", "countclip_jax.export": "--overwrite",
    "countclip_jax.count": "--prompt", "countclip_jax.explain": "--start_layer",
    "countclip_jax.retrieve": "--query", "countclip_jax.data.prepare": "--output_dir",
    "countclip_jax.data.countbench": "--retry-failed", "launch.tpu": "COMMAND",
}


def command(module, *args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})


def one_line_error(done) -> str:
  """The one stderr line of a command refused as the user's mistake."""
  assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_exits_0(module):
  done = command(module, "--help")
  assert done.returncode == 0, done.stderr[-3000:]
  assert COMMANDS[module] in done.stdout + done.stderr


# Each command, arguments naming a file or directory that is not there, and what its error names.
MISSING = [
    ("countclip_jax.evaluate", ["--workdir=no-run"], "no-run/model_config.json is missing"),
    ("countclip_jax.export", ["--workdir=no-run", "--out=out"], "no-run/model_config.json"),
    ("countclip_jax.count", ["--workdir=no-run", "--prompt=apples", "a.png"], "no-run/"),
    ("countclip_jax.explain", ["--workdir=no-run", "--synthetic_shares=2"], "no-run"),
    ("countclip_jax.retrieve", ["--workdir=no-run", "--images=*.png", "--query=two cats"],
     "no workdir no-run"),
    ("countclip_jax.data.prepare", ["--input=no-*.tar", "--output_dir=out"], "no-*.tar"),
    ("countclip_jax.data.countbench", ["--out=out", "--json=no.json"], "no.json"),
    ("launch.tpu", ["run", "my-tpu", "--zone=us-central2-b", "--config=configs/no.py",
                    "--workdir=gs://my-bucket/run"], "configs/no.py"),
]


@pytest.mark.parametrize("module, args, names", MISSING, ids=[case[0] for case in MISSING])
def test_a_missing_file_is_one_line_and_writes_nothing(tmp_path, module, args, names):
  (tmp_path / "a.png").write_bytes(b"")
  before = sorted(os.listdir(tmp_path))
  line = one_line_error(command(module, *args, cwd=tmp_path))
  assert names in line, line
  assert sorted(os.listdir(tmp_path)) == before  # no out/, no cache


def test_argparse_mistakes_are_one_line():
  for module in ("countclip_jax.data.prepare", "countclip_jax.data.countbench", "launch.tpu"):
    line = one_line_error(command(module, "--bogus"))
    assert "--bogus" in line or "required" in line, line
