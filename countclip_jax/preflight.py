"""What a run checks before it writes anything: the init directory, the tokenizer, a resume.

Each check raises `cli.UserError` naming the field and the path, so `main` stops with one line
and the workdir as it was. trainer.train_and_evaluate calls them before its first write; the
config values themselves are checked by trainer.validate and each task's validate.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import traverse_util

from countclip_jax import checkpoints
from countclip_jax.cli import UserError
from countclip_jax.text import numbers

CONFIG = "config.json"  # the config of the newest start, beside the checkpoints
HISTORY = "config_history"  # one file per start: how every checkpoint was trained
TOKENIZER = "tokenizer"  # the run's tokenizer, shared by resumes, evals and exports
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack")
# Fields a resume may not change: the task's resume_fields are added (shapes and meaning).
RESUME_FIELDS = ("task", "model.init", "model.arch", "model.scan_layers", "data.context_length",
                 "data.tokenizer")
# Fields added since older runs were recorded, with the value those runs had.
RECORD_DEFAULTS = {"model.scan_layers": False}


def _is_directory_path(name: str) -> bool:
  """A path (local or gs://) rather than a hub id like org/name."""
  return (name.startswith(("gs://", ".", "/", "~")) or os.path.exists(name)
          or name.count("/") != 1)


def is_run_workdir(path: str) -> bool:
  """A workdir of ours (its model config beside the checkpoints), e.g. a density backbone."""
  return _is_directory_path(path) and (epath.Path(path) / checkpoints.MODEL_CONFIG).exists()


def check_init(init: str, field: str = "model.init") -> None:
  """A directory init exists and holds weights (a hub id is resolved when it is read)."""
  if not init or not _is_directory_path(init):
    return
  root = epath.Path(init)
  if not root.is_dir():
    what = "is a file, not a directory" if root.exists() else "does not exist"
    raise UserError(f"{field} {init} {what} (give a Hugging Face CLIP directory, a gs:// "
                    "directory, a hub id like openai/clip-vit-base-patch32, or a workdir of ours)")
  if is_run_workdir(init):
    if checkpoints.latest_step(init) is None:
      raise UserError(f"{field} {init} is a workdir without checkpoints")
    return
  if not (root / "config.json").exists():
    raise UserError(f"{field} {init} has no config.json (not a Hugging Face CLIP directory)")
  if not any((root / name).exists() for name in WEIGHT_FILES):
    raise UserError(f"{field} {init} has no weights ({' or '.join(WEIGHT_FILES)}; pickle "
                    "files are refused)")


def tokenizer_source(config, workdir: epath.Path) -> tuple[str | None, str]:
  """(where the run's tokenizer is read from, the field that named it); None: build it for the
  synthetic world. A workdir that already has one keeps it."""
  if (workdir / TOKENIZER / "tokenizer.json").exists():
    return str(workdir / TOKENIZER), f"the workdir's {TOKENIZER}/"
  source, field = ((config.data.tokenizer, "data.tokenizer") if config.data.tokenizer
                   else (config.model.init, "model.init"))
  if not source:
    if config.data.source != "synthetic":
      raise UserError("Set data.tokenizer (or model.init): a run from scratch on "
                      f"data.source={config.data.source!r} has no tokenizer")
    return None, "the synthetic world's vocabulary"
  if is_run_workdir(source):
    return str(epath.Path(source) / TOKENIZER), f"{field}'s {TOKENIZER}/"
  if _is_directory_path(source):
    root = epath.Path(source)
    has = lambda *names: all((root / n).exists() for n in names)
    if not root.is_dir():
      raise UserError(f"{field} {source} does not exist")
    if not (has("tokenizer.json") or has("vocab.json", "merges.txt")):
      hint = " (or set data.tokenizer)" if field == "model.init" else ""
      raise UserError(f"{field} {source} has no tokenizer (tokenizer.json, or vocab.json and "
                      f"merges.txt){hint}")
  return source, field


def check_tokenizer(tokenizer, where: str) -> None:
  """The tokenizer is a real one: it tells the number words apart (a directory without
  tokenizer files once loaded as a 2-token vocabulary that maps every caption alike)."""
  encoded = {w: tuple(tokenizer.tokens(w)) for w in numbers.NUMBER_WORDS.values()}
  if len(set(encoded.values())) < len(encoded):
    raise UserError(f"the tokenizer from {where} ({tokenizer.vocab_size} tokens) encodes "
                    "different number words alike: not a CLIP tokenizer")


def check_text_fits(tokenizer, text_config, where: str) -> None:
  """Every id the tokenizer makes has a row in the model's embedding, and the context fits."""
  if tokenizer.vocab_size > text_config.vocab_size:
    raise UserError(f"the tokenizer from {where} has {tokenizer.vocab_size} tokens; the model's "
                    f"text embedding has {text_config.vocab_size} rows")
  if tokenizer.context_length > text_config.context_length:
    raise UserError(f"data.context_length {tokenizer.context_length} exceeds the model's "
                    f"{text_config.context_length}")


def _flat(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """{"train.lr": 1e-5, ...}: a config, or its JSON record, by dotted field name."""
  tree = config if isinstance(config, dict) else json.loads(config.to_json_best_effort())
  return traverse_util.flatten_dict(tree, sep=".")


def check_resume(workdir: epath.Path, config, fields: tuple[str, ...]) -> dict[str, tuple]:
  """Refuses a resume that changes any of `fields` (shapes and meaning of the checkpoints);
  returns the other changed fields {name: (before, now)}, which are allowed (log_changes)."""
  recorded = workdir / CONFIG
  if not recorded.exists():
    logging.warning("%s has checkpoints but no %s: resuming without checking that the config "
                    "matches them", workdir, CONFIG)
    return {}
  before, now = _flat(json.loads(recorded.read_text())), _flat(config)
  before = {**RECORD_DEFAULTS, **before}
  changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now))
             if before.get(k) != now.get(k)}
  refused = [k for k in changed if k in fields]
  if refused:
    described = "; ".join(f"{k}: {changed[k][0]!r} in the checkpoints' run, {changed[k][1]!r} now"
                          for k in refused)
    raise UserError(f"cannot resume {workdir} with a different {', '.join(refused)} ({described})."
                    " Use a new --workdir, or the recorded values")
  return changed


def log_changes(changed: dict[str, tuple]) -> None:
  """The allowed changes of a resume, once every check has passed (a refused run prints only
  its error)."""
  for k, (a, b) in changed.items():
    logging.warning("Resuming with %s changed: %r -> %r", k, a, b)


def record_start(workdir: epath.Path, config, start_step: int | None) -> None:
  """Writes config.json (the newest start) and a never-overwritten copy in config_history/."""
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2)
  history = workdir / HISTORY
  history.mkdir(parents=True, exist_ok=True)
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
  (history / f"{now}-step{start_step or 0:08d}.json").write_text(text)
  (workdir / CONFIG).write_text(text)
