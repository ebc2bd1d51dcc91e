"""Training tasks: what differs between the contrastive fine-tune and the density counter.

trainer.py owns the one loop (mesh, state, jit, checkpoints, preemption, metrics, evals); a task
supplies the rest through the methods of `Task`: its model and params, the loss, the batch
layout and shardings, the input iterator and the evals. `config.task` names it.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterator

import jax.numpy as jnp

# config.model.dtype -> the compute dtype (params stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TASKS = {"contrastive": "countclip_jax.tasks.contrastive", "density": "countclip_jax.tasks.density"}


class Task:
  """The interface the loop calls. Each method is small; see tasks/contrastive.py."""

  # Config fields a resume may not change (beyond preflight.RESUME_FIELDS): they define the
  # shapes or the meaning of what the checkpoints hold.
  resume_fields: tuple[str, ...] = ()

  def validate(self, config, num_devices: int) -> None:
    """Checks the task's config fields; raises ValueError naming the field."""

  def build_model(self, config, tokenizer) -> tuple[Any, Any]:
    """(model, pretrained params or None for a random init)."""
    raise NotImplementedError

  def model_from_workdir(self, config, workdir: str) -> Any:
    """The model (no weights) from the files `model_files` wrote: what a resume rebuilds."""
    raise NotImplementedError

  def init_params(self, model, rng) -> Any:
    raise NotImplementedError

  def logical_axes(self, model) -> Any:
    """The logical axis names of every param (a tree of PartitionSpec)."""
    raise NotImplementedError

  def text_config(self, model) -> Any:
    """The model's text tower config (models.clip.TextConfig): what the tokenizer must fit."""
    raise NotImplementedError

  def model_files(self, model) -> dict[str, str]:
    """Files written beside the checkpoints so export and eval rebuild the model alone."""
    raise NotImplementedError

  def batch_shardings(self, mesh) -> Any:
    """A tree of shardings that is a prefix of the batch."""
    raise NotImplementedError

  def loss_fn(self, params, batch, step, *, model, config, mesh) -> tuple[Any, dict]:
    """(scalar loss, dict of scalar metrics) at `step` (a traced int32, for loss schedules);
    the loop differentiates the loss."""
    raise NotImplementedError

  # A loss that couples the examples of a batch (a contrastive loss: the other pairs are its
  # negatives) sets this and splits loss_fn into `features` (per example) and
  # `loss_from_features` (the whole batch), so that train.grad_accum keeps the whole batch's
  # loss (accumulation.py). Otherwise micro-batch gradients are averaged.
  couples_examples: bool = False

  def features(self, params, batch, *, model, config) -> Any:
    """A tree of per-example features (leading axis: the batch's rows)."""
    raise NotImplementedError

  def loss_from_features(self, params, features, step, *, model, config, mesh
                         ) -> tuple[Any, dict]:
    """loss_fn on `features(params, batch)`; may use params directly too (a temperature)."""
    raise NotImplementedError

  def constrain(self, params) -> Any:
    """Params after each update (e.g. a clamp)."""
    return params

  def train_iterator(self, config, tokenizer, model, *, start: int) -> Iterator:
    """This process's batches from global batch `start` on (a resume derives it from the step)."""
    raise NotImplementedError

  def evaluate(self, config, model, params, tokenizer, workdir: str, step: int) -> dict:
    """Periodic and final evals: a flat dict of scalars for the metrics."""
    return {}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
  return importlib.import_module(TASKS[name]).TASK
