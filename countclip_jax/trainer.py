"""Fine-tuning CLIP with L = L_clip + λ L_count: train state, the sharded step, the loop.

`train_and_evaluate(config, workdir)` reads top to bottom like big_vision's trainers: mesh,
tokenizer and model, input, optimizer and shardings, checkpoint (resume or init), the jitted
step, the loop with its metrics, checkpoints and evals.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from countclip_jax import checkpoints, losses, models, sharding
from countclip_jax.data import pipeline
from countclip_jax.metric_writer import MetricWriter
from countclip_jax.models import hf
from countclip_jax.models.clip import CLIP, normalize
from countclip_jax.text.tokenizer import Tokenizer

MAX_LOGIT_SCALE = math.log(100.0)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------- config checks

def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Fails fast, before anything is compiled, with a message naming the field."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  t, c = config.train, config.count
  if not 0.0 <= c.fraction <= 1.0:
    raise ValueError(f"count.fraction (p) must be in [0, 1], got {c.fraction}")
  if not 1 <= c.num_counterfactuals <= 8:
    raise ValueError(f"count.num_counterfactuals (K) must be 1..8, got {c.num_counterfactuals}")
  if c.scale != "learned" and not (isinstance(c.scale, (int, float)) and c.scale > 0):
    raise ValueError(f"count.scale must be a positive number or 'learned', got {c.scale!r}")
  if c.lam < 0:
    raise ValueError(f"count.lam (λ) must be >= 0, got {c.lam}")
  if config.model.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
  if not config.model.init and config.model.arch not in models.ARCHITECTURES:
    raise ValueError(f"model.arch {config.model.arch!r} is not one of "
                     f"{sorted(models.ARCHITECTURES)} (or set model.init)")
  for name in ("steps", "batch_size", "grad_accum", "log_every"):
    if t[name] < 1:
      raise ValueError(f"train.{name} must be >= 1, got {t[name]}")
  if config.checkpoint.every_steps < 1:
    raise ValueError(f"checkpoint.every_steps must be >= 1, got {config.checkpoint.every_steps}")
  data, fsdp, model = sharding.mesh_shape(config.mesh, num_devices)
  parallel = data * fsdp * t.grad_accum
  counting, general = pipeline.split_sizes(t.batch_size, c.fraction)
  for name, size in (("counting", counting), ("general", general)):
    if size % parallel:
      raise ValueError(
          f"train.batch_size {t.batch_size} with count.fraction {c.fraction} gives {size} "
          f"{name} examples, not divisible by mesh.data*mesh.fsdp*train.grad_accum = "
          f"{data}*{fsdp}*{t.grad_accum}; pick a batch size and fraction that split evenly")
  if t.freeze:
    re.compile(t.freeze)
  from countclip_jax import evaluate  # pylint: disable=g-import-not-at-top
  try:
    evaluate.check_datasets(config.eval.datasets, config.eval.countbench_dir)
  except ValueError as e:
    raise ValueError(f"eval.datasets: {e}") from e


# ----------------------------------------------------------------------------- model

def build_model(config, tokenizer: Tokenizer):
  """(model, params or None): pretrained from model.init, or the architecture sized to the
  tokenizer (vocabulary, eos id, context length) for a run from scratch."""
  dtype = DTYPES[config.model.dtype]
  if config.model.init:
    model, params = models.load_pretrained(config.model.init, dtype=dtype,
                                           remat=config.model.remat)
    if tokenizer.context_length > model.config.text.context_length:
      raise ValueError(f"data.context_length {tokenizer.context_length} exceeds the model's "
                       f"{model.config.text.context_length}")
    return model, params
  arch = models.ARCHITECTURES[config.model.arch]
  text = dataclasses.replace(arch.text, vocab_size=tokenizer.vocab_size,
                             eos_token_id=tokenizer.eos_token_id,
                             context_length=tokenizer.context_length)
  return CLIP(dataclasses.replace(arch, text=text), dtype=dtype,
              remat=config.model.remat), None


# ----------------------------------------------------------------------------- optimizer

def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def decays(path: str, leaf) -> bool:
  """Weight decay on matrices only: not norms, biases, embeddings, class token, logit scale."""
  return path.endswith("/kernel")


def make_optimizer(config, params_shapes) -> tuple[optax.GradientTransformation, Any]:
  t = config.train
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=min(t.warmup_steps, t.steps),
      decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.end_lr_fraction)
  decay_mask = jax.tree_util.tree_map_with_path(lambda p, x: decays(_path(p), x), params_shapes)
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                  mask=decay_mask))
  if t.freeze:
    frozen = re.compile(t.freeze)
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if frozen.search(_path(p)) else "train", params_shapes)
    if "train" not in jax.tree_util.tree_leaves(labels):
      raise ValueError(f"train.freeze {t.freeze!r} freezes every parameter")
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


# ----------------------------------------------------------------------------- state

@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite: jax.Array  # consecutive steps whose loss or gradient was not finite
  skipped: jax.Array  # all steps skipped so far


def new_state(params, tx) -> TrainState:
  """Step 0: fresh optimizer state, no skipped steps."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), nonfinite=zero,
                    skipped=zero)


def state_layout(model: CLIP, tx, mesh) -> tuple[TrainState, TrainState]:
  """(shapes, shardings) of the train state, without allocating anything."""
  shapes = models.param_shapes(model)
  state_shapes = jax.eval_shape(functools.partial(new_state, tx=tx), shapes)
  param_shardings = sharding.param_shardings(mesh, models.logical_axes(model), shapes)
  return state_shapes, state_shardings(mesh, state_shapes, param_shardings)


def state_shardings(mesh, state_shapes: TrainState, param_shardings) -> TrainState:
  """Optimizer moments are sharded like their params (matched by path); scalars replicated."""
  by_path = {tuple(p): s for p, s in flax.traverse_util.flatten_dict(param_shardings).items()}
  replicated = NamedSharding(mesh, P())

  def for_leaf(key_path, leaf):
    names = []
    for k in reversed(key_path):  # the trailing dict keys are the param's path
      if not isinstance(k, jax.tree_util.DictKey):
        break
      names.insert(0, k.key)
    found = by_path.get(tuple(names))
    return found if found is not None and len(found.spec) == leaf.ndim else replicated

  opt = jax.tree_util.tree_map_with_path(for_leaf, state_shapes.opt_state)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt,
                    nonfinite=replicated, skipped=replicated)


# ----------------------------------------------------------------------------- the step

def batch_shardings(mesh) -> dict:
  s = lambda ndim: sharding.batch_sharding(mesh, ndim)
  return {"count": {"image": s(4), "text": s(2), "cf_text": s(3), "number": s(1),
                    "cf_number": s(2)},
          "general": {"image": s(4), "text": s(2)}}


def loss_fn(params, batch, model: CLIP, count_config, logits_sharding=None):
  """L_clip over all pairs + λ L_count over the counting pairs; returns (loss, metrics)."""
  apply = lambda method, x: model.apply({"params": params}, x, method=method)
  count, general = batch["count"], batch["general"]
  num_count, k, length = count["cf_text"].shape
  num_general = general["text"].shape[0]
  # One text-encoder pass over true captions and counterfactuals: token ids are cheap to move
  # between devices, and one big matmul beats three small ones. Images stay in two passes.
  all_texts = normalize(apply("encode_text", jnp.concatenate(
      [count["text"], general["text"], count["cf_text"].reshape(num_count * k, length)])))
  texts, cf = all_texts[:num_count + num_general], all_texts[num_count + num_general:]
  images = normalize(jnp.concatenate([apply("encode_image", count["image"]),
                                      apply("encode_image", general["image"])]))
  scale = jnp.exp(params["logit_scale"].astype(jnp.float32))
  clip = losses.clip_loss(images, texts, scale, logits_sharding)
  metrics = {"clip_loss": clip, "logit_scale": scale}
  loss = clip
  if num_count:
    # With λ = 0 the counting terms are only measured, so no gradient flows through them.
    guard = (lambda x: x) if count_config.lam else jax.lax.stop_gradient
    s = scale if count_config.scale == "learned" else float(count_config.scale)
    count_loss, count_acc = losses.counting_loss(
        guard(images[:num_count]), guard(texts[:num_count]), guard(cf.reshape(num_count, k, -1)),
        scale=guard(s))
    loss = loss + count_config.lam * count_loss
    metrics.update(count_loss=count_loss, count_accuracy=count_acc)
  return loss, {"loss": loss, **metrics}


def make_train_step(model: CLIP, tx, schedule, config, mesh, shardings: TrainState):
  """The jitted step: explicit in/out shardings, donated state, grad accumulation by scan."""
  accum = config.train.grad_accum
  logits_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
  grad_fn = jax.value_and_grad(functools.partial(
      loss_fn, model=model, count_config=config.count, logits_sharding=logits_sharding),
      has_aux=True)

  def micro_batches(batch):
    # (B, ...) -> (A, B/A, ...) taking every A-th row, so each device keeps its own rows.
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0)
    return jax.tree_util.tree_map(split, batch)

  def step(state: TrainState, batch):
    if accum == 1:
      (_, metrics), grads = grad_fn(state.params, batch)
    else:
      def body(carry, micro):
        (_, m), g = grad_fn(state.params, micro)
        return jax.tree_util.tree_map(jnp.add, carry, (g, m)), None
      micro = micro_batches(batch)
      (_, metric_shapes), grad_shapes = jax.eval_shape(
          grad_fn, state.params, jax.tree_util.tree_map(lambda x: x[0], micro))
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                     (grad_shapes, metric_shapes))
      (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
      grads, metrics = jax.tree_util.tree_map(lambda x: x / accum, (grads, metrics))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = {**params, "logit_scale": jnp.clip(params["logit_scale"], None, MAX_LOGIT_SCALE)}
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
        skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step),
               "skipped": (~finite).astype(jnp.float32), "nonfinite_run": new_state.nonfinite}
    return new_state, metrics

  return jax.jit(step, in_shardings=(shardings, batch_shardings(mesh)),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,),
                 compiler_options=_compiler_options(mesh))


def _compiler_options(mesh) -> dict | None:
  """XLA:CPU's default copy insertion copies both Adam moments every step (the parameter update
  and the in-place moment update both read the old moments): 1.2 GB at B/32. Its region
  analysis orders the reads before the in-place writes instead (benchmarks/train_step.py,
  docs/PERFORMANCE.md). Other backends keep their defaults."""
  if mesh.devices.flat[0].platform == "cpu":
    return {"xla_cpu_copy_insertion_use_region_analysis": True}
  return None


def init_state(model, tx, params, rng, mesh, shardings: TrainState) -> TrainState:
  """The train state on the mesh: random params (init jitted with out_shardings, so big models
  never sit whole on one device) or loaded ones placed shard by shard."""
  if params is None:
    params = jax.jit(functools.partial(models.init_params, model),
                     out_shardings=shardings.params)(rng)
  else:
    params = jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x[i])),
        params, shardings.params)
  return jax.jit(functools.partial(new_state, tx=tx), out_shardings=shardings)(params)


# ----------------------------------------------------------------------------- the run

def make_tokenizer(config, workdir: epath.Path) -> Tokenizer:
  """The run's tokenizer, saved in WORKDIR/tokenizer so that resumes, evals and exports use
  exactly the same one."""
  from countclip_jax.text.tokenizer import build_tokenizer  # pylint: disable=g-import-not-at-top
  saved, length = workdir / "tokenizer", config.data.context_length
  if (saved / "tokenizer.json").exists():
    return Tokenizer.from_pretrained(str(saved), length)
  if config.data.tokenizer or config.model.init:
    tokenizer = Tokenizer.from_pretrained(config.data.tokenizer or config.model.init, length)
  elif config.data.source == "synthetic":
    from countclip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    tokenizer = build_tokenizer(synthetic.vocabulary(), length)
  else:
    raise ValueError("Set data.tokenizer (or model.init): a run from scratch on "
                     f"data.source={config.data.source!r} has no tokenizer")
  if jax.process_index() == 0:
    tokenizer.save(str(saved))
  return tokenizer


def save_config(config, workdir: epath.Path) -> None:
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) to config.train.steps; returns the last logged metrics."""
  from countclip_jax import evaluate  # pylint: disable=g-import-not-at-top

  # ---- Setup: fail on a bad config before anything is compiled.
  sharding.initialize_distributed()
  validate(config)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  save_config(config, workdir)
  primary = jax.process_index() == 0

  # ---- Mesh.
  mesh = sharding.make_mesh(config.mesh)
  logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())

  # ---- Tokenizer and model.
  tokenizer = make_tokenizer(config, workdir)
  model, pretrained = build_model(config, tokenizer)
  if primary:  # what export and eval need to rebuild the model from the checkpoints alone
    (workdir / checkpoints.MODEL_CONFIG).write_text(hf.config_to_hf(model.config).to_json_string())
  shapes = models.param_shapes(model)
  logging.info("Model: %s params", f"{sum(x.size for x in jax.tree_util.tree_leaves(shapes)):,}")

  # ---- Input: this process's share of every global batch.
  train_iter = pipeline.train_iterator(config, tokenizer, model.config.vision.image_size)

  # ---- Optimizer and shardings.
  tx, schedule = make_optimizer(config, shapes)
  state_shapes, shardings = state_layout(model, tx, mesh)

  # ---- Checkpoint: resume where a previous run of this workdir stopped, or start.
  manager = checkpoints.create_manager(str(workdir), config.checkpoint.every_steps,
                                       config.checkpoint.max_to_keep,
                                       config.checkpoint.async_save)
  abstract = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings)
  restored = checkpoints.restore_or_none(manager, abstract, train_iter)
  if restored is not None:
    start, state = restored
    logging.info("Resuming at step %d", start)
  else:
    start = 0
    state = init_state(model, tx, pretrained, jax.random.key(config.train.seed), mesh, shardings)
  del pretrained

  # ---- The step.
  train_step = make_train_step(model, tx, schedule, config, mesh, shardings)
  batch_sharding = batch_shardings(mesh)

  # ---- Loop.
  writer = MetricWriter(str(workdir))
  watch = checkpoints.PreemptionWatch()
  t = config.train
  progress = tqdm.tqdm(total=t.steps, initial=start, disable=not primary, unit="step",
                       dynamic_ncols=True)
  last_logged, last_time, last_step, previous_nonfinite = {}, time.perf_counter(), start, None
  step = start
  try:
    for step in range(start + 1, t.steps + 1):
      batch = pipeline.global_batch(next(train_iter), batch_sharding)
      state, metrics = train_step(state, batch)
      # Read the previous step's counter while this one runs: no stall of the device queue.
      if previous_nonfinite is not None and int(previous_nonfinite) >= t.max_nonfinite:
        raise FloatingPointError(
            f"{t.max_nonfinite} consecutive non-finite losses before step {step}; stopping "
            f"with the last good checkpoint in {checkpoints.checkpoint_dir(str(workdir))}")
      previous_nonfinite = metrics["nonfinite_run"]  # (state's own buffer is donated)
      if step % t.log_every == 0 or step == t.steps:
        now = time.perf_counter()
        last_logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last_logged["examples_per_sec"] = (step - last_step) * t.batch_size / (now - last_time)
        last_time, last_step = now, step
        writer.write(step, last_logged)
        progress.set_postfix(loss=f"{last_logged['loss']:.3f}",
                             ex_s=f"{last_logged['examples_per_sec']:.0f}")
      progress.update(1)
      checkpoints.save(manager, step, state, train_iter)
      if config.eval.every_steps and step % config.eval.every_steps == 0 and step < t.steps:
        writer.write(step, evaluate.evaluate_during_training(
            config, model, state.params, tokenizer, str(workdir), step), prefix="eval")
      if watch.preempted(manager, step):
        logging.warning("Preempted at step %d: checkpoint saved, exiting.", step)
        checkpoints.save(manager, step, state, train_iter, force=True)
        break
    else:
      if int(state.nonfinite) >= t.max_nonfinite:
        raise FloatingPointError(f"{t.max_nonfinite} consecutive non-finite losses at the end")
      if manager.latest_step() != step:
        checkpoints.save(manager, step, state, train_iter, force=True)
      if config.eval.datasets:
        writer.write(step, evaluate.evaluate_during_training(
            config, model, state.params, tokenizer, str(workdir), step), prefix="eval")
  finally:
    manager.wait_until_finished()
    progress.close()
    writer.close()
    watch.close()
  logging.info("Done at step %d. Checkpoints: %s; metrics: %s", step,
               checkpoints.checkpoint_dir(str(workdir)), workdir / "metrics.jsonl")
  return last_logged
