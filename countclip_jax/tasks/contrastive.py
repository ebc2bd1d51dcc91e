"""The counting fine-tune of Paiss et al.: L = L_clip + λ L_count on CLIP (models/clip.py).

Batch layout: data/pipeline.py's {"count": {...}, "general": {...}}.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from countclip_jax import checkpoints, losses, models, sharding
from countclip_jax.data import images
from countclip_jax.data import pipeline
from countclip_jax.models import hf
from countclip_jax.models.clip import CLIP, normalize
from countclip_jax import tasks

# CLIP's clamp of the learned temperature (exp(logit_scale) <= 100).
MAX_LOGIT_SCALE = math.log(100.0)


class Contrastive(tasks.Task):

  def validate(self, config, num_devices: int) -> None:
    t, c = config.train, config.count
    if not 0.0 <= c.fraction <= 1.0:
      raise ValueError(f"count.fraction (p) must be in [0, 1], got {c.fraction}")
    if not 1 <= c.num_counterfactuals <= 8:
      raise ValueError(f"count.num_counterfactuals (K) must be 1..8, got {c.num_counterfactuals}")
    if c.scale != "learned" and not (isinstance(c.scale, (int, float)) and c.scale > 0):
      raise ValueError(f"count.scale must be a positive number or 'learned', got {c.scale!r}")
    if c.lam < 0:
      raise ValueError(f"count.lam (λ) must be >= 0, got {c.lam}")
    if not config.model.init and config.model.arch not in models.ARCHITECTURES:
      raise ValueError(f"model.arch {config.model.arch!r} is not one of "
                       f"{sorted(models.ARCHITECTURES)} (or set model.init)")
    data, fsdp, _ = sharding.mesh_shape(config.mesh, num_devices)
    parallel = data * fsdp * t.grad_accum
    counting, general = pipeline.split_sizes(t.batch_size, c.fraction)
    for name, size in (("counting", counting), ("general", general)):
      if size % parallel:
        raise ValueError(
            f"train.batch_size {t.batch_size} with count.fraction {c.fraction} gives {size} "
            f"{name} examples, not divisible by mesh.data*mesh.fsdp*train.grad_accum = "
            f"{data}*{fsdp}*{t.grad_accum}; pick a batch size and fraction that split evenly")
    from countclip_jax import evaluate  # pylint: disable=g-import-not-at-top
    try:
      evaluate.check_datasets(config.eval.datasets, config.eval.countbench_dir)
    except ValueError as e:
      raise ValueError(f"eval.datasets: {e}") from e

  def build_model(self, config, tokenizer):
    """Pretrained from model.init, or the architecture sized to the tokenizer (vocabulary, eos
    id, context length) for a run from scratch."""
    dtype = tasks.DTYPES[config.model.dtype]
    if config.model.init:
      return models.load_pretrained(config.model.init, dtype=dtype, remat=config.model.remat,
                                    scan_layers=config.model.scan_layers)
    arch = models.ARCHITECTURES[config.model.arch]
    text = dataclasses.replace(arch.text, vocab_size=tokenizer.vocab_size,
                               eos_token_id=tokenizer.eos_token_id,
                               context_length=tokenizer.context_length)
    return CLIP(dataclasses.replace(arch, text=text), dtype=dtype, remat=config.model.remat,
                scan_layers=config.model.scan_layers), None

  def model_from_workdir(self, config, workdir):
    from countclip_jax import export  # pylint: disable=g-import-not-at-top
    return export.load_model(workdir).clone(dtype=tasks.DTYPES[config.model.dtype],
                                            remat=config.model.remat,
                                            scan_layers=config.model.scan_layers)

  def init_params(self, model, rng):
    return models.init_params(model, rng)

  def logical_axes(self, model):
    return models.logical_axes(model)

  def text_config(self, model):
    return model.config.text

  def model_files(self, model):
    return {checkpoints.MODEL_CONFIG: hf.config_to_hf(model.config).to_json_string()}

  def batch_shardings(self, mesh):
    s = lambda ndim: sharding.batch_sharding(mesh, ndim)
    return {"count": {"image": s(4), "text": s(2), "cf_text": s(3), "number": s(1),
                      "cf_number": s(2)},
            "general": {"image": s(4), "text": s(2)}}

  couples_examples = True  # InfoNCE: every other pair of the batch is a negative

  def loss_fn(self, params, batch, step, *, model, config, mesh):
    del step
    return loss_fn(params, batch, model, config.count,
                   NamedSharding(mesh, P(sharding.BATCH_AXES, None)))

  def features(self, params, batch, *, model, config):
    return features(params, batch, model, counterfactual_gradients=bool(config.count.lam))

  def loss_from_features(self, params, features, step, *, model, config, mesh):
    del step, model
    return loss_from_features(params, features, config.count,
                              NamedSharding(mesh, P(sharding.BATCH_AXES, None)))

  def constrain(self, params):
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], None, MAX_LOGIT_SCALE)}

  def train_iterator(self, config, tokenizer, model, *, start):
    return pipeline.train_iterator(config, tokenizer, model.config.vision.image_size, start=start)

  def evaluate(self, config, model, params, tokenizer, workdir, step):
    from countclip_jax import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.evaluate_during_training(config, model, params, tokenizer, workdir, step)


def features(params, batch, model: CLIP, counterfactual_gradients: bool = True) -> dict:
  """The normalised embeddings of a batch, per example: what the losses see.

  counterfactual_gradients=False (λ = 0, where the counting loss is only measured): the
  counterfactual captions are encoded in a pass of their own under stop_gradient, so the step
  runs no backward pass for them (at K = 8 their backward is ~a fifth of the step's FLOPs).
  """
  apply = lambda method, x: model.apply({"params": params}, x, method=method)
  count, general = batch["count"], batch["general"]
  num_count, k, length = count["cf_text"].shape
  num_general = general["text"].shape[0]
  cf_ids = count["cf_text"].reshape(num_count * k, length)
  encode_text = lambda ids: normalize(apply("encode_text", ids))
  if counterfactual_gradients:
    # One text-encoder pass over true captions and counterfactuals: token ids are cheap to move
    # between devices, and one big matmul beats three small ones.
    texts = encode_text(jnp.concatenate([count["text"], general["text"], cf_ids]))
    cf = texts[num_count + num_general:]
  else:
    texts = encode_text(jnp.concatenate([count["text"], general["text"]]))
    cf = jax.lax.stop_gradient(encode_text(cf_ids))
  encode_image = lambda x: normalize(apply("encode_image", images.normalize_on_device(x)))
  return {"count_image": encode_image(count["image"]),  # images stay in two passes
          "general_image": encode_image(general["image"]),
          "count_text": texts[:num_count],
          "general_text": texts[num_count:num_count + num_general],
          "cf_text": cf.reshape(num_count, k, texts.shape[-1])}


def loss_from_features(params, f: dict, count_config, logits_sharding=None):
  """L_clip over all pairs + λ L_count over the counting pairs; returns (loss, metrics)."""
  num_count = f["count_image"].shape[0]
  images = jnp.concatenate([f["count_image"], f["general_image"]])
  texts = jnp.concatenate([f["count_text"], f["general_text"]])
  scale = jnp.exp(params["logit_scale"].astype(jnp.float32))
  clip = losses.clip_loss(images, texts, scale, logits_sharding)
  metrics = {"clip_loss": clip, "logit_scale": scale}
  loss = clip
  if num_count:
    # With λ = 0 the counting terms are only measured, so no gradient flows through them.
    guard = (lambda x: x) if count_config.lam else jax.lax.stop_gradient
    s = scale if count_config.scale == "learned" else float(count_config.scale)
    count_loss, count_acc = losses.counting_loss(
        guard(f["count_image"]), guard(f["count_text"]), guard(f["cf_text"]), scale=guard(s))
    loss = loss + count_config.lam * count_loss
    metrics.update(count_loss=count_loss, count_accuracy=count_acc)
  return loss, {"loss": loss, **metrics}


def loss_fn(params, batch, model: CLIP, count_config, logits_sharding=None):
  return loss_from_features(
      params, features(params, batch, model, counterfactual_gradients=bool(count_config.lam)),
      count_config, logits_sharding)


TASK = Contrastive()
