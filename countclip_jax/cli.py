"""How every command meets its user: mistakes are one line, `--help` succeeds, libraries quiet.

`run(main)` replaces `absl.app.run`: a bad flag, an unknown config key, a bad value or a missing
file is printed as `error: <what and where>` on stderr with exit status 2, with no traceback and
no config dump (a traceback of one is `--verbosity=1` away). Commands raise `UserError` for the
mistakes they find; `ArgumentParser` does the same for the argparse commands. Below WARNING, only
this project's own log lines are shown unless `--verbosity` asks for more (Orbax alone writes
dozens of INFO lines per checkpoint).
"""
from __future__ import annotations

import argparse
import contextlib
import logging as std_logging
import os
import re
import sys
from typing import Callable, NoReturn

from absl import app, flags, logging

USER_ERROR = 2  # exit status of a user's mistake (as argparse's)
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
_OWN_CODE = tuple(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + d
                  for d in ("countclip_jax", "configs", "launch"))


class UserError(ValueError):
  """A mistake in the command, config or inputs: reported as one line, exit status 2."""


def one_line(message) -> str:
  return " ".join(str(message).split())


def fail(message) -> NoReturn:
  print(f"error: {one_line(message)}", file=sys.stderr)
  sys.exit(USER_ERROR)


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]):
  """Inside: `kinds` (and UserError) are the user's mistakes, re-raised as UserError."""
  try:
    yield
  except UserError:
    raise
  except kinds as e:
    raise UserError(one_line(e)) from e


def config_key_error(error: BaseException, argv: list[str]) -> str | None:
  """An unknown key in a `--config.a.b=...` override, named with the closest valid one."""
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError)
    error = error.args[0]
  text = str(error.args[0]) if error.args else ""
  bad = re.match(r"'([^']+)'", text)
  guess = re.search(r'Did you mean "([^"]+)"', text)
  for arg in argv:
    override = re.match(r"--\w+\.([\w.]+)", arg)
    path = override.group(1).split(".") if override else []
    if bad and bad.group(1) in path:
      parent = path[:path.index(bad.group(1))]
      message = f"unknown config key {'.'.join(parent + [bad.group(1)])!r} (in {arg.split('=')[0]})"
      if guess:
        message += f"; did you mean {'.'.join(parent + [guess.group(1)])!r}?"
      return message
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl exits 1 after printing the help it was asked for
    if any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    fail(e)
  except (KeyError, AttributeError) as e:  # ml_collections on an unknown override key
    message = config_key_error(e, argv)
    if message is None:
      raise
    fail(message)
  except (FileNotFoundError, OSError) as e:  # a --config file that is not there
    fail(e)


class _OwnLinesBelowWarning(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_OWN_CODE)


def quiet_libraries() -> None:
  """Other libraries' INFO lines off (unless --verbosity >= 1 was given)."""
  if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
    return
  logging.get_absl_handler().addFilter(_OwnLinesBelowWarning())


def run(main: Callable[[list[str]], int | None],
        user_error_kinds: tuple[type[BaseException], ...] = ()) -> None:
  """absl.app.run(main) with one-line user errors; `user_error_kinds` (e.g. FileNotFoundError)
  raised by main count as user errors too."""

  def wrapped(argv):
    quiet_libraries()
    verbose = flags.FLAGS.verbosity >= 1
    try:
      with user_errors(*user_error_kinds):
        return main(argv)
    except (UserError, app.UsageError) as e:
      if verbose:
        raise
      fail(e)

  app.run(wrapped, flags_parser=_parse_flags)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the same contract: `error: ...` on one line, exit status 2."""

  def error(self, message):
    fail(f"{message} (see {self.prog} --help)")
