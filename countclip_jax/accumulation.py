"""Gradients of one global batch in `train.grad_accum` micro-batches, at the memory of one.

Two forms, chosen by the task:

- A loss that couples the examples of a batch (InfoNCE: every other pair is a negative) keeps
  the objective of the whole batch by caching features (GradCache, Gao et al. 2021; open_clip's
  `--accum-freq`): (1) every micro-batch's features, forward only; (2) the loss of the whole
  batch on them, with its gradient w.r.t. the features; (3) micro-batch by micro-batch, the
  features again with their pullback, fed that gradient. Loss and gradients equal one batch of B
  (up to float order) for one more forward pass; only B/A examples' activations are live.
- Any other loss (a mean of per-example terms) takes the mean of the micro-batch gradients.

A micro-batch takes every A-th row, so each device keeps its own rows of the sharded batch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from countclip_jax import tasks

# (params, batch, step) -> (grads, metrics)
GradFn = Callable[[Any, Any, jax.Array], tuple[Any, dict]]


def micro_batches(tree, accum: int):
  """(B, ...) -> (A, B/A, ...), micro-batch a holding rows a, a + A, a + 2A, ..."""
  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0)
  return jax.tree_util.tree_map(split, tree)


def _tree_add(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


def grad_fn(task: tasks.Task, model, config, mesh,
            constants: Callable[[Any], Any] = lambda params: params) -> GradFn:
  """`constants` maps the params to what the loss sees, inside the differentiated functions
  (the trainer's stops the gradients of frozen params there)."""
  accum = config.train.grad_accum
  loss = lambda p, *a: task.loss_fn(constants(p), *a, model=model, config=config, mesh=mesh)
  loss_and_grad = jax.value_and_grad(loss, has_aux=True)

  def one_batch(params, batch, step):
    (_, metrics), grads = loss_and_grad(params, batch, step)
    return grads, metrics

  def mean_of_micro_batches(params, batch, step):
    micro = micro_batches(batch, accum)
    shapes = jax.eval_shape(one_batch, params, jax.tree_util.tree_map(lambda x: x[0], micro),
                            step)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(lambda acc, m: (_tree_add(acc, one_batch(params, m, step)), None),
                            zeros, micro)
    return jax.tree_util.tree_map(lambda x: x / accum, total)

  def cached_features(params, batch, step):
    micro = micro_batches(batch, accum)
    features = lambda p, m: task.features(constants(p), m, model=model, config=config)
    per_micro = jax.lax.map(lambda m: features(params, m), micro)  # (A, B/A, ...) leaves
    whole = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), per_micro)
    whole_loss = lambda p, f: task.loss_from_features(constants(p), f, step, model=model,
                                                      config=config, mesh=mesh)
    (_, metrics), (direct, feature_grads) = jax.value_and_grad(
        whole_loss, argnums=(0, 1), has_aux=True)(params, whole)
    feature_grads = jax.tree_util.tree_map(lambda g, x: g.reshape(x.shape), feature_grads,
                                           per_micro)

    def backward(grads, xs):
      m, g = xs
      _, pullback = jax.vjp(lambda p: features(p, m), params)
      return _tree_add(grads, pullback(g)[0]), None

    # `direct`: the loss's own use of the params (e.g. the temperature), not via the features.
    grads, _ = jax.lax.scan(backward, direct, (micro, feature_grads))
    return grads, metrics

  if accum == 1:
    return one_batch
  return cached_features if task.couples_examples else mean_of_micro_batches
