r"""countclip-jax on a Cloud TPU VM slice: create, set up, run on every worker, logs, stop, delete.

  python -m launch.tpu create my-tpu --zone=us-central2-b --accelerator=v4-32 [--spot | --queued]
  python -m launch.tpu setup  my-tpu --zone=us-central2-b
  python -m launch.tpu run    my-tpu --zone=us-central2-b --accelerator=v4-32 \
      --config=configs/l14.py --workdir=gs://BUCKET/l14 [-- --config.train.lr=1e-5 ...]
  python -m launch.tpu logs   my-tpu --zone=us-central2-b
  python -m launch.tpu stop   my-tpu --zone=us-central2-b
  python -m launch.tpu delete my-tpu --zone=us-central2-b

Every command is a short list of `gcloud compute tpus ...` calls (and `git archive` for setup),
run one after the other; the first failure stops the rest. `--dry-run` prints them, one per
line and shell-quoted, and runs nothing. A mistake in the command line is one line `error: ...`
(exit status 2) and runs nothing; `run` also loads the config file and applies its
`--config.*` overrides here first, as countclip_jax.main will on the workers. Standard library
only: the launcher needs gcloud and git on your machine, not JAX (the config check needs
ml_collections, as the repo's venv has; without it, only the config file's existence is
checked). The walkthrough from an empty GCP project is launch/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Where things live on every worker. The remote shell expands `~`, so these paths are written
# into remote commands as they are, never shell-quoted; everything a user passes is quoted.
REMOTE = "~/countclip"
REMOTE_REPO = REMOTE + "/repo"    # the code; replaced by every `setup`; jobs run here
REMOTE_VENV = REMOTE + "/venv"    # kept across `setup`s
CONSTRAINTS = f"{REMOTE_REPO}/launch/constraints.txt"
REMOTE_LOG = REMOTE + "/train.log"
REMOTE_PID = REMOTE + "/train.pid"
TARBALL = "countclip-jax.tar.gz"  # setup's copy of the checkout, in the remote home
# jax, flax and grain need Python >= 3.11; the TPU VM images have 3.10, so setup gets one
# with uv.
PYTHON = "3.12"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


class LaunchError(ValueError):
  """Bad input: the message says what to change."""


def one_line(message) -> str:
  return " ".join(str(message).split())


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the commands' contract (countclip_jax.cli.ArgumentParser, which imports
  absl, hence this copy): `error: ...` on one line, exit status 2."""

  def error(self, message):
    print(f"error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Accelerators.

@dataclasses.dataclass(frozen=True)
class Generation:
  name: str                      # what people call it: v4, v5e, v5p, v6e
  prefix: str                    # accelerator types are PREFIX-N
  runtime: str                   # the TPU VM software version (`--version`)
  sizes: tuple[int, ...] | None  # the N that exist; None: any multiple of 8
  per_worker: int                # N per TPU VM in multi-VM slices

  def describe(self) -> str:
    sizes = ", ".join(map(str, self.sizes)) if self.sizes else "8, 16, 32, ... (multiples of 8)"
    return f"{self.name}: {self.prefix}-N with N in {sizes}"


# v4 and v5p count TensorCores (2 per chip, 4 chips per VM: v4-32 is 16 chips on 4 VMs);
# v5e and v6e count chips (up to 8 on one VM, 4 per VM beyond: v6e-16 is 4 VMs).
GENERATIONS = (
    Generation("v4", "v4", "tpu-ubuntu2204-base", None, 8),
    Generation("v5e", "v5litepod", "v2-alpha-tpuv5-lite", (1, 4, 8, 16, 32, 64, 128, 256), 4),
    Generation("v5p", "v5p", "v2-alpha-tpuv5", None, 8),
    Generation("v6e", "v6e", "v2-alpha-tpuv6e", (1, 4, 8, 16, 32, 64, 128, 256), 4),
)


@dataclasses.dataclass(frozen=True)
class Accelerator:
  type: str
  generation: Generation
  size: int

  @property
  def workers(self) -> int:
    """TPU VMs in the slice = JAX processes of a run."""
    return 1 if self.size <= 8 else self.size // self.generation.per_worker


def parse_accelerator(name: str) -> Accelerator:
  known = "Known: " + "; ".join(g.describe() for g in GENERATIONS) + "."
  m = re.fullmatch(r"(v[0-9a-z]+)-([0-9]+)", name or "")
  if not m:
    raise LaunchError(f"Accelerator type {name!r} is not of the form GENERATION-N "
                      f"(e.g. v4-32). {known}")
  prefix, size = m.group(1), int(m.group(2))
  generation = next((g for g in GENERATIONS if g.prefix == prefix), None)
  if generation is None:
    hint = f" (v5e slices are called v5litepod-N: v5litepod-{size})" if prefix == "v5e" else ""
    raise LaunchError(f"Unknown accelerator type {name!r}{hint}. {known}")
  if not (size in generation.sizes if generation.sizes else size >= 8 and size % 8 == 0):
    raise LaunchError(f"There is no {generation.name} slice {name!r}. {generation.describe()}.")
  return Accelerator(name, generation, size)


# ---------------------------------------------------------------------------------------------
# Input checks.

NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
GCS_PATH = re.compile(r"gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?")
ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.S)


def check_common(args) -> None:
  if not NAME.fullmatch(args.name):
    raise LaunchError(f"TPU name {args.name!r}: use 1-63 lowercase letters, digits and hyphens, "
                      "starting with a letter (e.g. countclip-v4).")
  if not ZONE.fullmatch(args.zone):
    raise LaunchError(f"--zone={args.zone!r} is not a zone: a zone is a region and a letter, "
                      "e.g. us-central2-b (v4), us-east5-a (v5p), us-east1-d (v6e).")


def check_workdir(workdir: str, accelerator: Accelerator | None) -> None:
  """gs:// always works; a local dir only on a single-VM slice (and is lost with the VM)."""
  if workdir.startswith("gs://"):
    if not GCS_PATH.fullmatch(workdir):
      raise LaunchError(f"--workdir={workdir!r} is not a Cloud Storage path: use "
                        "gs://BUCKET/RUN, e.g. gs://my-bucket/countclip-l14.")
    return
  if accelerator is None:
    raise LaunchError(
        f"--workdir={workdir!r} is not a gs:// path. Give gs://BUCKET/RUN: every worker of a "
        "multi-host slice writes its part of each checkpoint there, and it outlives the TPU VM. "
        "(A local workdir is allowed on a single-VM slice only: pass --accelerator, e.g. "
        "--accelerator=v4-8.)")
  if accelerator.workers > 1:
    raise LaunchError(
        f"--workdir={workdir!r} is local, but {accelerator.type} has {accelerator.workers} "
        "workers: each would write its part of every checkpoint to its own disk and the run "
        "could never resume. Use a gs://BUCKET/RUN workdir.")
  if not workdir.startswith("/"):
    raise LaunchError(f"--workdir={workdir!r}: a local workdir must be an absolute path (jobs "
                      f"run in {REMOTE_REPO}, which every setup replaces).")


# ---------------------------------------------------------------------------------------------
# Commands. Each builder returns the argvs to run, in order.

def gcloud(args, *words: str) -> list[str]:
  argv = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
  return argv + ([f"--project={args.project}"] if args.project else [])


def ssh(args, command: str, worker: str = "all") -> list[str]:
  return gcloud(args, "tpu-vm", "ssh", args.name) + [f"--worker={worker}", f"--command={command}"]


def script(*lines: str) -> str:
  """One shell line: `;` between commands, but none after a command put in the background."""
  out = ""
  for line in lines:
    out += line + (" " if line.endswith("&") else "; ")
  return out.rstrip("; ")


def quote(word: str) -> str:
  """A word for the remote shell: as is if safe, else in double quotes if that is enough (so
  the printed lines stay readable inside gcloud's single-quoted --command=), else shlex.quote."""
  if shlex.quote(word) == word or re.search(r'[$`\\"!\n]', word):
    return shlex.quote(word)
  return f'"{word}"'


def join(words) -> str:
  return " ".join(quote(w) for w in words)


# The job's pid is in REMOTE_PID; `$pid` is set and alive when a job runs.
READ_PID = f"pid=$(cat {REMOTE_PID} 2>/dev/null || true)"
ALIVE = '[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null'


def create(args, extra) -> list[list[str]]:
  del extra
  accelerator = parse_accelerator(args.accelerator)
  version = args.version or accelerator.generation.runtime
  if args.spot and args.preemptible:
    raise LaunchError("--spot and --preemptible exclude each other; Spot is the newer kind.")
  if args.queued:
    if args.preemptible:
      raise LaunchError("Queued resources take --spot, not --preemptible.")
    argv = gcloud(args, "queued-resources", "create", args.name) + [
        f"--node-id={args.name}", f"--accelerator-type={accelerator.type}",
        f"--runtime-version={version}"]
  else:
    argv = gcloud(args, "tpu-vm", "create", args.name)
    argv += [f"--accelerator-type={accelerator.type}", f"--version={version}"]
  argv += ["--spot"] * args.spot + ["--preemptible"] * args.preemptible
  if args.service_account:  # scopes apply only with an explicit account; IAM decides access
    argv += [f"--service-account={args.service_account}", f"--scopes={CLOUD_PLATFORM}"]
  return [argv]


def setup(args, extra) -> list[list[str]]:
  del extra
  if args.repo_url:
    commands = []
    fetch = [f"git clone --quiet {quote(args.repo_url)} {REMOTE_REPO}"]
    if args.ref != "HEAD":
      fetch.append(f"git -C {REMOTE_REPO} checkout --quiet {quote(args.ref)}")
  else:  # a tarball of the local checkout's commit: exactly the code you have, no .venv
    tarball = os.path.join(tempfile.gettempdir(), f"countclip-jax-{args.name}.tar.gz")
    commands = [
        ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={tarball}", args.ref],
        gcloud(args, "tpu-vm", "scp", tarball, f"{args.name}:{TARBALL}") + ["--worker=all"],
    ]
    fetch = [f"mkdir -p {REMOTE_REPO}", f"tar -xzf {TARBALL} -C {REMOTE_REPO}", f"rm {TARBALL}"]
  commands.append(ssh(args, script(
      "set -e",
      READ_PID,  # a running job still imports from the repo (lazily): never pull it away
      f'if {ALIVE}; then echo "$(hostname): a countclip job is running (pid $pid); stop it '
      'first" >&2; exit 1; fi',
      f"rm -rf {REMOTE_REPO}",
      f"mkdir -p {REMOTE}",
      *fetch,
      # PIP_BREAK_SYSTEM_PACKAGES lets newer images' pip install into ~/.local; older pips
      # ignore it. uv fetches a Python the images lack.
      "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --user --upgrade uv",
      f"~/.local/bin/uv venv --quiet --seed --allow-existing --python {quote(args.python)} "
      f"{REMOTE_VENV}",
      # The tested versions (launch/constraints.txt) on every worker, libtpu included.
      f'{REMOTE_VENV}/bin/pip install --quiet --upgrade "jax[tpu]" -c {CONSTRAINTS}',
      f"{REMOTE_VENV}/bin/pip install --quiet --editable {REMOTE_REPO} -c {CONSTRAINTS}",
      'printf "%s: countclip-jax ready, jax " "$(hostname)"',
      f'{REMOTE_VENV}/bin/python -c "import countclip_jax, jax; print(jax.__version__)"')))
  return commands


def _last_line(error: BaseException) -> str:
  """The gist of an error whose message may hold a traceback (ml_collections puts the config
  file's in it): its last line."""
  lines = [line for line in str(error).splitlines() if line.strip()]
  return one_line(lines[-1] if lines else type(error).__name__)


def check_config(config: str, overrides: list[str]) -> None:
  """Loads the config file and applies the `--config.*` overrides as countclip_jax.main will
  on the workers, so that a typo fails here and not on every worker after the slice's setup.
  The path is the repo's: the jobs run in a copy of this checkout."""
  path = config.split(":", 1)[0]
  if not os.path.isfile(os.path.join(REPO_ROOT, path)):
    raise LaunchError(f"--config={config}: there is no file {path} in {REPO_ROOT} (the "
                      "workers run a copy of this checkout).")
  try:
    from absl import flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  except ImportError:  # the launcher itself needs only the standard library
    print("launch.tpu: note: ml_collections is not installed here, so the config's overrides "
          "are checked on the workers only (pip install ml-collections).", file=sys.stderr)
    return
  if REPO_ROOT not in sys.path:  # the presets import configs.common, the errors cli
    sys.path.insert(0, REPO_ROOT)
  from countclip_jax import cli  # pylint: disable=g-import-not-at-top
  argv = ["countclip_jax.main", f"--config={os.path.join(REPO_ROOT, config)}",
          *[flag for flag in overrides if re.match(r"--(no)?config\.", flag)]]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  does_not_load = lambda e: f"--config={config} does not load: {_last_line(e)}"
  try:
    values(argv)
  except flags.Error as e:  # an override's value that does not parse, or the file's own error
    raise LaunchError(does_not_load(e) if "\n" in str(e) else one_line(e)) from e
  except (KeyError, AttributeError) as e:  # an unknown key (named with the closest one)
    unknown = cli.config_key_error(e, argv)
    raise LaunchError(unknown or does_not_load(e)) from e
  except Exception as e:  # pylint: disable=broad-except
    raise LaunchError(does_not_load(e)) from e
  try:
    values.config.keys()  # a file that could not be read raises only when the config is used
  except Exception as e:  # pylint: disable=broad-except
    raise LaunchError(does_not_load(e)) from e


def run(args, overrides) -> list[list[str]]:
  accelerator = parse_accelerator(args.accelerator) if args.accelerator else None
  check_workdir(args.workdir, accelerator)
  if not re.fullmatch(r"[^:]+\.py(:.*)?", args.config):
    raise LaunchError(f"--config={args.config!r} is not a config file: give a path in the repo, "
                      "e.g. configs/l14.py.")
  for flag in overrides:
    if not flag.startswith("--"):
      raise LaunchError(f"Override {flag!r} is not a flag: after `--` come flags of "
                        "countclip_jax.main, e.g. --config.train.lr=1e-5.")
    if re.match(r"--(config|workdir)(=|$)", flag):
      raise LaunchError(f"{flag!r} after `--`: set the config file and workdir with the "
                        "launcher's own --config and --workdir.")
  check_config(args.config, overrides)
  for variable in args.env:
    if not ENV.fullmatch(variable):
      raise LaunchError(f"--env {variable!r} is not NAME=VALUE.")
  env = "env " + join(args.env) + " " if args.env else ""
  flags = join([f"--config={args.config}", f"--workdir={args.workdir}", *overrides])
  return [ssh(args, script(
      "set -e",
      f"cd {REMOTE_REPO}",
      READ_PID,
      f'if {ALIVE}; then echo "$(hostname): a countclip job is already running (pid $pid); '
      'stop it first" >&2; exit 1; fi',
      f'echo "=== $(date -u) start" >> {REMOTE_LOG}',
      # nohup and no terminal: the job outlives this ssh session; the log is appended to, so
      # a resumed run's log follows the first one.
      f"nohup {env}{REMOTE_VENV}/bin/python -m countclip_jax.main {flags} "
      f">> {REMOTE_LOG} 2>&1 < /dev/null &",
      f"echo $! > {REMOTE_PID}",
      'echo "$(hostname): started pid $!"'))]


def logs(args, extra) -> list[list[str]]:
  del extra
  tail = f"tail -n {args.lines} {'-F ' if args.follow else ''}{REMOTE_LOG}"
  return [ssh(args, tail, worker=args.worker)]


def stop(args, extra) -> list[list[str]]:
  del extra
  # SIGTERM makes the trainer save a checkpoint and exit (as on a preemption); after
  # --grace seconds, SIGKILL.
  return [ssh(args, script(
      READ_PID,
      f'if ! {{ {ALIVE}; }}; then echo "$(hostname): no countclip job running"',
      'else kill -TERM "$pid"',
      'echo "$(hostname): SIGTERM to $pid, waiting for its checkpoint"',
      f'i=0; while kill -0 "$pid" 2>/dev/null && [ "$i" -lt {args.grace} ]; do sleep 1; '
      'i=$((i+1)); done',
      'if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; echo "$(hostname): killed $pid"',
      'else echo "$(hostname): stopped"; fi',
      "fi",
      f"rm -f {REMOTE_PID}"))]


def status(args, extra) -> list[list[str]]:
  del extra
  if args.queued:  # the TPU VM exists only once the request is ACTIVE
    return [gcloud(args, "queued-resources", "describe", args.name)]
  return [gcloud(args, "tpu-vm", "describe", args.name),
          ssh(args, script(READ_PID, f'if {ALIVE}; then echo "$(hostname): running (pid $pid)"',
                           'else echo "$(hostname): not running"; fi'))]


def exec_(args, command) -> list[list[str]]:
  if not command:
    raise LaunchError("exec needs a command after `--`, e.g. -- python -m countclip_jax.export "
                      "--workdir=gs://BUCKET/RUN --out=gs://BUCKET/RUN-hf")
  # One word is a shell line for the remote shell (pipes, &&, ~ work); several words are one
  # command whose arguments arrive exactly as given.
  line = command[0] if len(command) == 1 else join(command)
  return [ssh(args, f"cd {REMOTE_REPO} && . {REMOTE_VENV}/bin/activate && {line}",
              worker=args.worker)]


def delete(args, extra) -> list[list[str]]:
  del extra
  if args.queued:  # --force deletes the TPU VM with the request
    argv = gcloud(args, "queued-resources", "delete", args.name) + ["--force"]
  else:
    argv = gcloud(args, "tpu-vm", "delete", args.name)
  return [argv + ["--quiet"] * args.yes]


# ---------------------------------------------------------------------------------------------
# CLI.

COMMANDS = {"create": create, "setup": setup, "run": run, "logs": logs, "stop": stop,
            "status": status, "exec": exec_, "delete": delete}
TAKES_EXTRA = ("run", "exec")


def parser() -> argparse.ArgumentParser:
  common = ArgumentParser(add_help=False)
  common.add_argument("name", help="TPU VM name (the queued resource has the same name)")
  common.add_argument("--zone", required=True, help="e.g. us-central2-b")
  common.add_argument("--project", default="", help="default: gcloud's configured project")
  common.add_argument("--dry-run", action="store_true",
                      help="print the commands, one per line, and run nothing")
  p = ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n")[0],
                     epilog="Walkthrough: launch/README.md")
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

  def add(name, help_):
    return sub.add_parser(name, parents=[common], help=help_, description=help_)

  c = add("create", "create the TPU VM slice")
  c.add_argument("--accelerator", required=True,
                 help="v4-8, v4-32, v5litepod-16, v5p-32, v6e-16, ...")
  c.add_argument("--version", default="", help="TPU software version (default: per generation)")
  c.add_argument("--spot", action="store_true", help="Spot VMs: cheaper, may be preempted")
  c.add_argument("--preemptible", action="store_true", help="older form of --spot")
  c.add_argument("--queued", action="store_true",
                 help="ask through a queued resource: waits for capacity instead of failing")
  c.add_argument("--service-account", default="",
                 help="the VMs' identity (default: the Compute Engine default account)")

  s = add("setup", "copy the code to every worker, install jax[tpu] and the package")
  s.add_argument("--repo-url", default="",
                 help="git clone this URL on the workers instead of copying your checkout")
  s.add_argument("--ref", default="HEAD", help="commit, branch or tag to copy or check out")
  s.add_argument("--python", default=PYTHON, help="Python version of the workers' venv")

  r = add("run", "start training on every worker (in the background)")
  r.add_argument("--config", required=True, help="config file in the repo, e.g. configs/l14.py")
  r.add_argument("--workdir", required=True, help="gs://BUCKET/RUN (checkpoints, metrics, ...)")
  r.add_argument("--accelerator", default="",
                 help="the slice's type; needed only to allow a local workdir on one VM")
  r.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="environment variable for the job (repeatable)")

  lg = add("logs", "print (and follow) a worker's log")
  lg.add_argument("--worker", default="0", help="which worker's log (default 0, the primary)")
  lg.add_argument("--lines", type=int, default=100)
  lg.add_argument("--no-follow", dest="follow", action="store_false", help="print and exit")

  st = add("stop", "stop the job on every worker (it saves a checkpoint first)")
  st.add_argument("--grace", type=int, default=600,
                  help="seconds to wait for the checkpoint before SIGKILL (0: kill now)")

  su = add("status", "the TPU VM's state and whether a job runs on each worker")
  su.add_argument("--queued", action="store_true", help="describe the queued resource instead")

  e = add("exec", "run a command on workers, in the repo dir with the venv active: after "
          "`--`, one quoted shell line, or a command and its arguments")
  e.add_argument("--worker", default="all", help="all (default) or a worker number")

  d = add("delete", "delete the TPU VM (stops the billing)")
  d.add_argument("--queued", action="store_true", help="it was created with --queued")
  d.add_argument("--yes", action="store_true", help="do not ask for confirmation")
  return p


def execute(commands: list[list[str]]) -> int:
  for argv in commands:
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    try:
      subprocess.run(argv, check=True)
    except FileNotFoundError:
      print(f"launch.tpu: {argv[0]} not found: install it (gcloud: the Google Cloud CLI).",
            file=sys.stderr)
      return 127
    except subprocess.CalledProcessError as e:
      print(f"launch.tpu: exit status {e.returncode}: {shlex.join(argv)}", file=sys.stderr)
      return e.returncode
    except KeyboardInterrupt:  # ^C ends `logs`; the job itself goes on
      return 130
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Everything after `--` is passed through: main's flags for `run`, the command for `exec`.
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  args = parser().parse_args(argv)
  try:
    if "--dry-run" in extra:  # it would reach the job, and the commands would really run
      raise LaunchError("--dry-run after `--` would be passed on to the job; put it before "
                        "`--`. Nothing was run.")
    if extra and args.command not in TAKES_EXTRA:
      raise LaunchError(f"{args.command} takes nothing after `--`, got {shlex.join(extra)}")
    check_common(args)
    commands = COMMANDS[args.command](args, extra)
  except LaunchError as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2
  if args.dry_run:
    print("\n".join(shlex.join(argv) for argv in commands))
    return 0
  return execute(commands)


if __name__ == "__main__":
  sys.exit(main())
