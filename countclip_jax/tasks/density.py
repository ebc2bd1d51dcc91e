"""CLIP-Count's density counting (models/density.py) on a frozen CLIP, through the one loop.

Batch layout: data/density_pipeline.py's {"image", "text", "density", "count", "other_text",
"other_density", "other_valid"}. The loss is density_losses.py's: the MSE of the prompted map,
optionally CLIP-Count's patch-text contrast, and our prompt contrast over the other prompts of
the same image (other kinds present: their own maps; absent kinds: zero maps). Freeze the
backbone with `train.freeze="^backbone/"`; `model.init` names it (a hub id, HF directory,
gs:// directory, or the workdir of a contrastive run of ours).
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from etils import epath

from countclip_jax import checkpoints, density_losses, models, sharding, tasks
from countclip_jax.data import density_pipeline
from countclip_jax.models import density as density_model
from countclip_jax.models import hf

DENSITY_CONFIG = "density_config.json"  # the head's DensityConfig, beside MODEL_CONFIG


def density_config(config, clip_config) -> density_model.DensityConfig:
  """The preset named by density.model, with the config's pooling, cross-attention and input
  size (the training crop; the backbone resizes it to its own image size)."""
  _, preset = density_model.PRESETS[config.density.model]
  size = density_pipeline.crop_size(config, clip_config.vision.image_size)
  pixel_width = config.density.pixel_width
  return dataclasses.replace(preset, pooling=config.density.pooling,
                             cross_attention=config.density.cross_attention, input_size=size,
                             pixel_width=preset.pixel_width if pixel_width < 0 else pixel_width)


def load_backbone(init: str):
  """(CLIP model, params) from a hub id / HF directory / gs:// directory, or a workdir of ours
  (its model_config.json and newest checkpoint)."""
  if (epath.Path(init) / checkpoints.MODEL_CONFIG).exists():
    from countclip_jax import export  # pylint: disable=g-import-not-at-top
    model, params, _ = export.load_run(init)
    return model, params
  return models.load_pretrained(init)


class Density(tasks.Task):

  resume_fields = ("density.model", "density.pooling", "density.cross_attention",
                   "density.crop_size", "density.scale", "density.synthetic.image_size")

  def validate(self, config, num_devices: int) -> None:
    d = config.density
    if config.model.scan_layers:
      raise ValueError("model.scan_layers is for the contrastive task: the density model's "
                       "backbone layers carry per-layer visual prompts and stay unrolled")
    if d.model not in density_model.PRESETS:
      raise ValueError(f"density.model must be one of {sorted(density_model.PRESETS)}, got "
                       f"{d.model!r}")
    if d.pooling not in density_model.POOLINGS:
      raise ValueError(f"density.pooling must be one of {density_model.POOLINGS}, got "
                       f"{d.pooling!r}")
    if d.cross_attention not in density_model.CROSS_ATTENTIONS:
      raise ValueError(f"density.cross_attention must be one of "
                       f"{density_model.CROSS_ATTENTIONS}, got {d.cross_attention!r}")
    for name in ("contrastive_weight", "prompt_contrast_weight", "count_weight"):
      if not d[name] >= 0:
        raise ValueError(f"density.{name} must be >= 0, got {d[name]}")
    density_pipeline.num_other_prompts(config)  # checks source and other_prompts
    if not density_pipeline.is_synthetic(config) and not epath.Path(d.data_dir or "/-").exists():
      raise ValueError(f"density.data_dir {d.data_dir!r} does not exist: give the root of the "
                       f"{d.source} tree (data/counting_datasets.py names its layout)")
    data, fsdp, _ = sharding.mesh_shape(config.mesh, num_devices)
    parallel = data * fsdp * config.train.grad_accum
    if config.train.batch_size % parallel:
      raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by "
                       f"mesh.data*mesh.fsdp*train.grad_accum = {data}*{fsdp}*"
                       f"{config.train.grad_accum}")
    if d.contrastive_only_steps and not d.contrastive_weight:
      raise ValueError("density.contrastive_only_steps needs density.contrastive_weight > 0 "
                       "(the pre-stage trains the patch-text contrast alone)")
    if config.eval.every_steps and d.eval_size < 1:
      raise ValueError(f"density.eval_size must be >= 1, got {d.eval_size}")

  def build_model(self, config, tokenizer):
    dtype = tasks.DTYPES[config.model.dtype]
    if config.model.init:
      clip, clip_params = load_backbone(config.model.init)
      clip_config = clip.config
    else:  # a random backbone of the preset's architecture, sized to the tokenizer
      arch, _ = density_model.PRESETS[config.density.model]
      arch = models.ARCHITECTURES[arch]
      clip_config = dataclasses.replace(arch, text=dataclasses.replace(
          arch.text, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
          context_length=tokenizer.context_length))
      clip_params = None
    model = density_model.DensityCounter(clip_config, density_config(config, clip_config),
                                         dtype=dtype, remat=config.model.remat)
    if clip_params is None:
      return model, None
    rng = jax.random.fold_in(jax.random.key(config.train.seed), 1)
    return model, jax.device_get(density_model.init_from_clip(model, clip_params, rng))

  def model_from_workdir(self, config, workdir):
    root = epath.Path(workdir)
    clip_config = hf.config_from_hf(json.loads((root / checkpoints.MODEL_CONFIG).read_text()))
    fields = json.loads((root / DENSITY_CONFIG).read_text())
    fields["decoder_widths"] = tuple(fields["decoder_widths"])
    return density_model.DensityCounter(clip_config, density_model.DensityConfig(**fields),
                                        dtype=tasks.DTYPES[config.model.dtype],
                                        remat=config.model.remat)

  def init_params(self, model, rng):
    return density_model.init_params(model, rng)

  def logical_axes(self, model):
    return density_model.logical_axes(model)

  def text_config(self, model):
    return model.clip_config.text

  def model_files(self, model):
    return {checkpoints.MODEL_CONFIG: hf.config_to_hf(model.clip_config).to_json_string(),
            DENSITY_CONFIG: json.dumps(dataclasses.asdict(model.config), indent=1)}

  def batch_shardings(self, mesh):
    s = lambda ndim: sharding.batch_sharding(mesh, ndim)
    return {"image": s(4), "text": s(2), "density": s(3), "count": s(1), "other_text": s(3),
            "other_density": s(4), "other_valid": s(2)}

  def loss_fn(self, params, batch, step, *, model, config, mesh):
    del mesh
    return loss_fn(params, batch, step, model, config.density)

  def train_iterator(self, config, tokenizer, model, *, start):
    return density_pipeline.train_iterator(config, tokenizer, model.clip_config.vision.image_size,
                                           start=start)

  def evaluate(self, config, model, params, tokenizer, workdir, step):
    from countclip_jax import density_eval  # pylint: disable=g-import-not-at-top
    results = density_eval.run(config, model, params, tokenizer,
                               str(epath.Path(workdir) / "eval"), tag=f"_step{step}")
    return density_eval.scalars(results)


def loss_fn(params, batch, step, model, d):
  """The prompted map's MSE (+ its count error, + patch-text contrast) + the prompt contrast;
  (loss, metrics).

  d: config.density. For its first `contrastive_only_steps` steps the patch-text contrast
  trains alone (CLIP-Count's pre-stage), then everything together.
  """
  ids = jnp.concatenate([batch["text"][:, None], batch["other_text"]], axis=1)  # (B, 1+E, L)
  # Dropout is off: the loop's step carries no rng (CLIP-Count's prompts use 0.1).
  out = model.apply({"params": params}, batch["image"], ids)
  pred = out["density"]  # (B, 1+E, S, S)
  mse = density_losses.density_mse(pred[:, 0], batch["density"])
  # 0 during the contrastive pre-stage: the maps' terms are measured, not trained.
  maps_on = (step >= d.contrastive_only_steps).astype(jnp.float32)
  loss, metrics = maps_on * mse, {"density_mse": mse}
  if d.count_weight:
    counted = density_losses.count_loss(pred[:, 0], batch["count"], d.scale)
    loss = loss + maps_on * d.count_weight * counted
    metrics["count_loss"] = counted
  if d.contrastive_weight:
    contrast = density_losses.patch_text_contrastive_loss(
        out["patch_embeds"], out["text_embed"][:, 0], batch["density"])
    loss = loss + d.contrastive_weight * contrast
    metrics["patch_text_loss"] = contrast
  if batch["other_text"].shape[1] and d.prompt_contrast_weight:
    prompt = density_losses.prompt_contrast_loss(pred[:, 1:], batch["other_density"],
                                                 batch["other_valid"],
                                                 count_weight=d.count_weight, scale=d.scale)
    loss = loss + maps_on * d.prompt_contrast_weight * prompt
    metrics["prompt_contrast_loss"] = prompt
  counts = density_losses.count(pred[:, 0], d.scale)
  metrics["count_mae"] = jnp.mean(jnp.abs(counts - batch["count"]))
  return loss, {"loss": loss, **metrics}


TASK = Density()
