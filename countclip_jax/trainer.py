"""The one training loop of every task (tasks/): train state, the sharded step, the loop.

`train_and_evaluate(config, workdir)` reads top to bottom like big_vision's trainers: mesh,
tokenizer and model, input, optimizer and shardings, checkpoint (resume or init), the jitted
step, the loop with its metrics, checkpoints and evals.
"""
from __future__ import annotations

import functools
import math
import os
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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from countclip_jax import accumulation, checkpoints, cli, preflight, sharding, tasks
from countclip_jax.data import pipeline
from countclip_jax.models import clip
from countclip_jax.metric_writer import MetricWriter
from countclip_jax.text.tokenizer import Tokenizer

DTYPES = tasks.DTYPES


# ----------------------------------------------------------------------------- config checks

def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Fails fast, before anything is compiled, with a message naming the field: the loop's
  fields here, the task's in its own `validate`."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  t = config.train
  if config.model.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
  ranges = {  # field: (test, the rule); a nan fails every comparison, so every rule
      "train.steps": (t.steps >= 1, ">= 1"), "train.batch_size": (t.batch_size >= 1, ">= 1"),
      "train.grad_accum": (t.grad_accum >= 1, ">= 1"),
      "train.log_every": (t.log_every >= 1, ">= 1"),
      "train.lr": (math.isfinite(t.lr) and t.lr > 0, "a finite number > 0"),
      "train.warmup_steps": (t.warmup_steps >= 0, ">= 0"),
      "train.end_lr_fraction": (0 <= t.end_lr_fraction <= 1, "in [0, 1]"),
      "train.weight_decay": (math.isfinite(t.weight_decay) and t.weight_decay >= 0, ">= 0"),
      "train.b1": (0 <= t.b1 < 1, "in [0, 1)"), "train.b2": (0 <= t.b2 < 1, "in [0, 1)"),
      "train.eps": (math.isfinite(t.eps) and t.eps > 0, "a finite number > 0"),
      "train.grad_clip": (math.isfinite(t.grad_clip) and t.grad_clip >= 0, ">= 0 (0: off)"),
      "train.max_nonfinite": (t.max_nonfinite >= 1, ">= 1"),
      "checkpoint.every_steps": (config.checkpoint.every_steps >= 1, ">= 1"),
      "checkpoint.max_to_keep": (config.checkpoint.max_to_keep >= 1, ">= 1"),
      "eval.every_steps": (config.eval.every_steps >= 0, ">= 0 (0: at the end only)"),
      "eval.batch_size": (config.eval.batch_size >= 1, ">= 1"),
      "data.context_length": (config.data.context_length >= 3, ">= 3 (bos, a token, eos)"),
      "data.num_workers": (config.data.num_workers >= 0, ">= 0"),
      "data.num_threads": (config.data.num_threads >= -1, ">= 0, or -1 (the host's cores)"),
      "data.prefetch_buffer_size": (config.data.prefetch_buffer_size >= 1, ">= 1"),
      "data.device_prefetch": (config.data.device_prefetch >= 0, ">= 0 (0: none)"),
  }
  for name, (ok, rule) in ranges.items():
    if not ok:
      section, field = name.split(".")
      raise ValueError(f"{name} must be {rule}, got {config[section][field]!r}")
  remat = config.model.remat
  if not (isinstance(remat, bool) or remat in clip.REMAT_POLICIES):
    raise ValueError(f"model.remat must be True, False or one of {clip.REMAT_POLICIES}, got "
                     f"{remat!r}")
  if not isinstance(config.model.scan_layers, bool):
    raise ValueError(f"model.scan_layers must be True or False, got "
                     f"{config.model.scan_layers!r}")
  if config.profile.start_step < 0 or config.profile.steps < 1:
    raise ValueError(f"profile.start_step must be >= 0 (0: off) and profile.steps >= 1, got "
                     f"{config.profile.start_step} and {config.profile.steps}")
  sharding.dcn_shape(config.mesh, sharding.mesh_shape(config.mesh, num_devices))
  if t.freeze:
    try:
      re.compile(t.freeze)
    except re.error as e:
      raise ValueError(f"train.freeze {t.freeze!r} is not a regular expression: {e}") from e
  tasks.get(config.task).validate(config, num_devices)


# ----------------------------------------------------------------------------- optimizer

def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def decays(path: str, leaf) -> bool:
  """Weight decay on matrices only: not norms, biases, embeddings, class token, logit scale."""
  return path.endswith("/kernel")


def layer_paths(path: str, leaf) -> list[str]:
  """The HF paths a param stands for: its own, or one per layer (`.../layers/{i}/...`) for a
  stacked param of model.scan_layers, so train.freeze means the same in both layouts."""
  head, sep, rest = path.partition("/layers/")
  if not sep or rest.split("/")[0].isdigit():
    return [path]
  return [f"{head}/layers/{i}/{rest}" for i in range(leaf.shape[0])]


def freeze_labels(pattern: str, params_shapes):
  """"frozen" or "train" per param: frozen where `pattern` matches its path (every layer's path
  for a stacked param, which cannot be frozen in part)."""
  frozen = re.compile(pattern)

  def label(key_path, leaf):
    path = _path(key_path)
    matches = {bool(frozen.search(p)) for p in layer_paths(path, leaf)}
    if len(matches) > 1:
      raise ValueError(f"train.freeze {pattern!r} freezes some layers of {path}, which "
                       "model.scan_layers stacks into one array: freeze whole towers, or set "
                       "model.scan_layers=False to freeze single layers")
    return "frozen" if matches.pop() else "train"
  labels = jax.tree_util.tree_map_with_path(label, params_shapes)
  if "train" not in jax.tree_util.tree_leaves(labels):
    raise ValueError(f"train.freeze {pattern!r} freezes every parameter")
  return labels


def stop_frozen_gradients(pattern: str, params):
  """`params` with jax.lax.stop_gradient on those train.freeze matches: their gradients are
  zeros, not computed."""
  if not pattern:
    return params
  return jax.tree_util.tree_map(lambda x, label: jax.lax.stop_gradient(x) if label == "frozen"
                                else x, params, freeze_labels(pattern, params))


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
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               freeze_labels(t.freeze, params_shapes))
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


def param_shapes(task: tasks.Task, model):
  """The params' ShapeDtypeStructs, without allocating anything."""
  return jax.eval_shape(functools.partial(task.init_params, model), jax.random.key(0))


def state_layout(task: tasks.Task, model, tx, mesh) -> tuple[TrainState, TrainState]:
  """(shapes, shardings) of the train state, without allocating anything."""
  shapes = param_shapes(task, model)
  state_shapes = jax.eval_shape(functools.partial(new_state, tx=tx), shapes)
  param_shardings = sharding.param_shardings(mesh, task.logical_axes(model), shapes)
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

def make_train_step(task: tasks.Task, model, tx, schedule, config, mesh,
                    shardings: TrainState):
  """The jitted step: explicit in/out shardings, donated state, micro-batches by scan
  (accumulation.py)."""
  # Frozen params enter the loss as constants: their (discarded) weight gradients are never
  # computed, and grad_norm measures what trains.
  gradients = accumulation.grad_fn(task, model, config, mesh, constants=functools.partial(
      stop_frozen_gradients, config.train.freeze))

  def step(state: TrainState, batch):
    grads, metrics = gradients(state.params, batch, state.step)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = task.constrain(optax.apply_updates(state.params, updates))
    # The step is kept only if everything it makes is finite, so no checkpoint holds a nan. A
    # finite gradient norm means finite squares, so finite Adam moments; the new params can
    # still be nan from a finite gradient (lr = nan), and a sum is nan or inf if any of its
    # terms is. Three scalars, then, where a test of every leaf of params and moments read
    # three trees (and made B/32's step compile ~1.7x slower on XLA:CPU).
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.sum(params)))
    # One conditional picks the whole tree: a select per leaf compiles ~3x slower on XLA:CPU.
    params, opt_state = jax.lax.cond(finite, lambda: (params, opt_state),
                                     lambda: (state.params, state.opt_state))
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state,
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
        skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step),
               "skipped": (~finite).astype(jnp.float32), "nonfinite_run": new_state.nonfinite}
    return new_state, metrics

  return InMesh(jax.jit(step, in_shardings=(shardings, task.batch_shardings(mesh)),
                        out_shardings=(shardings, NamedSharding(mesh, P())),
                        donate_argnums=(0,), compiler_options=_compiler_options(mesh)), mesh)


class InMesh:
  """A jitted function called and lowered under sharding.activation_sharding(mesh), so that
  its trace pins the model's activations (models/clip.py `constrain`)."""

  def __init__(self, jitted, mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with sharding.activation_sharding(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with sharding.activation_sharding(self.mesh):
      return self.jitted.lower(*args)


def _compiler_options(mesh) -> dict | None:
  """XLA:CPU's default copy insertion copies both Adam moments every step (the parameter update
  and the in-place moment update both read the old moments): 1.2 GB at B/32. Its region
  analysis orders the reads before the in-place writes instead (benchmarks/train_step.py,
  docs/PERFORMANCE.md). Other backends keep their defaults."""
  if mesh.devices.flat[0].platform == "cpu":
    return {"xla_cpu_copy_insertion_use_region_analysis": True}
  return None


def init_state(task: tasks.Task, model, tx, params, rng, mesh,
               shardings: TrainState) -> TrainState:
  """The train state on the mesh: random params (init jitted with out_shardings, so big models
  never sit whole on one device) or loaded ones placed shard by shard."""
  if params is None:
    params = jax.jit(functools.partial(task.init_params, model),
                     out_shardings=shardings.params)(rng)
  else:
    params = jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x[i])),
        params, shardings.params)
  return jax.jit(functools.partial(new_state, tx=tx), out_shardings=shardings)(params)


# ----------------------------------------------------------------------------- the run

def load_tokenizer(config, workdir: epath.Path) -> tuple[Tokenizer, str]:
  """(the run's tokenizer, where it came from), checked; reads only. The workdir's own copy
  (WORKDIR/tokenizer) wins, so resumes, evals and exports use exactly the same one."""
  from countclip_jax.text.tokenizer import build_tokenizer  # pylint: disable=g-import-not-at-top
  source, where = preflight.tokenizer_source(config, workdir)
  if source is None:
    from countclip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    tokenizer = build_tokenizer(synthetic.vocabulary(), config.data.context_length)
  else:
    tokenizer = Tokenizer.from_pretrained(source, config.data.context_length)
    where = f"{where} ({source})"
  preflight.check_tokenizer(tokenizer, where)
  return tokenizer, where


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"countclip_jax:{name}")


def prepare_workdir(task: tasks.Task, model, config, workdir: epath.Path, tokenizer,
                    resume_step: int | None) -> None:
  """The run's first writes, after every check passed: the record of this start, and (on a
  fresh workdir) the tokenizer and model files. Process 0 writes; the others wait for it."""
  _barrier("preflight")  # every process has read what it needs before anything changes
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    preflight.record_start(workdir, config, resume_step)
    if not (workdir / preflight.TOKENIZER / "tokenizer.json").exists():
      tokenizer.save(str(workdir / preflight.TOKENIZER))
    for name, text in task.model_files(model).items():  # export and eval rebuild from these
      if resume_step is None or not (workdir / name).exists():
        (workdir / name).write_text(text)
  _barrier("workdir")


def use_compilation_cache(setting: str) -> str | None:
  """Points JAX's persistent compilation cache at `setting` (train.compilation_cache); returns
  the directory, or None when off."""
  if setting == "auto":  # on CPU compiling is quick and cache entries are large
    if jax.default_backend() == "cpu":
      return None
    setting = os.path.expanduser("~/.cache/countclip_jax/xla")
  if setting:
    jax.config.update("jax_compilation_cache_dir", setting)
  return setting or None


class _Profile:
  """A trace of steps [start, start + steps) into WORKDIR/profile (profile.start_step > 0)."""

  def __init__(self, config, workdir: epath.Path):
    self.start = config.profile.start_step
    self.stop = self.start + config.profile.steps
    self.directory, self.running = str(workdir / "profile"), False

  def before(self, step: int) -> None:
    if self.start and step == self.start and jax.process_index() == 0:
      jax.profiler.start_trace(self.directory)
      self.running = True

  def after(self, step: int, outputs) -> None:
    if self.running and step == self.stop - 1:
      self.close(outputs)

  def close(self, outputs=None) -> None:
    if self.running:
      jax.block_until_ready(outputs)  # the traced steps' device work ends inside the trace
      jax.profiler.stop_trace()
      self.running = False
      logging.info("Profile of steps %d..%d in %s", self.start, self.stop - 1, self.directory)


def _nonfinite_message(count: int, when: str, manager, workdir) -> str:
  manager.wait_until_finished()
  latest = manager.latest_step()
  kept = (f"the newest checkpoint, step {latest}, holds only finite values" if latest is not None
          else "no checkpoint was written")
  return (f"{count} consecutive non-finite steps (loss, gradient or update) {when}: stopping; "
          f"{kept} ({checkpoints.checkpoint_dir(str(workdir))})")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) to config.train.steps; returns the last logged metrics.

  Raises cli.UserError, with the workdir untouched, for anything wrong with the config, the
  init directory, the tokenizer or a resume's compatibility.
  """

  # ---- Preflight: everything that can be checked is, before the first write.
  sharding.initialize_distributed()
  workdir = epath.Path(workdir)
  with cli.user_errors(ValueError, FileNotFoundError, NotADirectoryError):
    validate(config)
    # Before anything compiles: JAX opens its cache at the first compile and keeps it.
    if (cache := use_compilation_cache(config.train.compilation_cache)) is not None:
      logging.info("Compilation cache: %s", cache)
    task = tasks.get(config.task)
    preflight.check_init(config.model.init)
    resume_step, changed = checkpoints.latest_step(str(workdir)), {}
    if resume_step is not None:  # a resume: the checkpoint holds the weights
      changed = preflight.check_resume(workdir, config,
                                       preflight.RESUME_FIELDS + task.resume_fields)
    tokenizer, tokenizer_source = load_tokenizer(config, workdir)
    if resume_step is not None:
      model, pretrained = task.model_from_workdir(config, str(workdir)), None
    else:
      model, pretrained = task.build_model(config, tokenizer)
    preflight.check_text_fits(tokenizer, task.text_config(model), tokenizer_source)
    shapes = param_shapes(task, model)
    tx, schedule = make_optimizer(config, shapes)
  preflight.log_changes(changed)
  logging.info("Config:\n%s", config)
  prepare_workdir(task, model, config, workdir, tokenizer, resume_step)
  primary = jax.process_index() == 0

  # ---- Mesh.
  mesh = sharding.make_mesh(config.mesh)
  logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())
  manager = checkpoints.create_manager(str(workdir), config.checkpoint.every_steps,
                                       config.checkpoint.max_to_keep,
                                       config.checkpoint.async_save)

  # ---- Shardings.
  logging.info("Model: %s params", f"{sum(x.size for x in jax.tree_util.tree_leaves(shapes)):,}")
  state_shapes, shardings = state_layout(task, model, tx, mesh)

  # ---- Checkpoint: resume where a previous run of this workdir stopped, or start. The data
  # position is the step (batch i is a pure function of i), so any process count resumes it.
  abstract = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings)
  restored = checkpoints.restore_or_none(manager, abstract)
  if restored is not None:
    start, state = restored
    logging.info("Resuming at step %d", start)
  else:
    start = 0
    state = init_state(task, model, tx, pretrained, jax.random.key(config.train.seed), mesh,
                       shardings)
  del pretrained

  # ---- The step.
  train_step = make_train_step(task, model, tx, schedule, config, mesh, shardings)

  # ---- Input: this process's share of every global batch from `start` on, placed on the
  # devices data.device_prefetch batches ahead of the step.
  train_iter = pipeline.DevicePrefetch(task.train_iterator(config, tokenizer, model, start=start),
                                       task.batch_shardings(mesh), config.data.device_prefetch)
  evaluate = lambda step: writer.write(step, task.evaluate(
      config, model, state.params, tokenizer, str(workdir), step), prefix="eval")

  # ---- Loop.
  writer = MetricWriter(str(workdir))
  watch = checkpoints.PreemptionWatch()
  t = config.train
  progress = tqdm.tqdm(total=t.steps, initial=start, disable=not primary, unit="step",
                       dynamic_ncols=True)
  profile = _Profile(config, workdir)
  last_logged, last_time, last_step, previous_nonfinite = {}, time.perf_counter(), start, None
  not_stepping = 0.0  # seconds since the last log spent saving checkpoints
  step = start
  try:
    for step in range(start + 1, t.steps + 1):
      profile.before(step)
      batch = next(train_iter)
      state, metrics = train_step(state, batch)
      profile.after(step, metrics)
      # Read the previous step's counter while this one runs: no stall of the device queue.
      if previous_nonfinite is not None and int(previous_nonfinite) >= t.max_nonfinite:
        raise FloatingPointError(_nonfinite_message(t.max_nonfinite, f"before step {step}",
                                                    manager, workdir))
      previous_nonfinite = metrics["nonfinite_run"]  # (state's own buffer is donated)
      if step == start + 1:  # examples/s leave out the compilation
        jax.block_until_ready(metrics)
        last_time, last_step = time.perf_counter(), step
      if step % t.log_every == 0 or step == t.steps:
        last_logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
        stepping = time.perf_counter() - last_time - not_stepping
        if step > last_step:  # step time and rate leave out compilation, saves and evals
          last_logged["step_seconds"] = stepping / (step - last_step)
          last_logged["examples_per_sec"] = t.batch_size / last_logged["step_seconds"]
          progress.set_postfix(loss=f"{last_logged['loss']:.3f}",
                               ex_s=f"{last_logged['examples_per_sec']:.0f}")
        last_time, last_step, not_stepping = time.perf_counter(), step, 0.0
        writer.write(step, last_logged)
      progress.update(1)
      # The interval save; on a pod Orbax also saves here at the step all processes agreed to
      # stop at after a preemption notice.
      saving = time.perf_counter()
      saved = checkpoints.save(manager, step, state)
      not_stepping += time.perf_counter() - saving
      if watch.preempted(manager, step):
        if not saved:
          checkpoints.save(manager, step, state, force=True)
        logging.warning("Preempted at step %d: checkpoint %d saved; exiting (the next start "
                        "resumes from it).", step, step)
        break
      if config.eval.every_steps and step % config.eval.every_steps == 0 and step < t.steps:
        evaluate(step)
        last_time = time.perf_counter()  # nor the evals
    else:
      if int(state.nonfinite) >= t.max_nonfinite:
        raise FloatingPointError(_nonfinite_message(t.max_nonfinite, "at the end", manager,
                                                    workdir))
      if manager.latest_step() != step:
        checkpoints.save(manager, step, state, force=True)
      if config.eval.datasets:
        evaluate(step)
  finally:
    profile.close()
    manager.wait_until_finished()
    manager.close()
    train_iter.close()  # its thread, and grain's worker processes when data.num_workers > 0
    progress.close()
    writer.close()
    watch.close()
  logging.info("Done at step %d. Checkpoints: %s; metrics: %s", step,
               checkpoints.checkpoint_dir(str(workdir)), workdir / "metrics.jsonl")
  return last_logged
