"""trainer.py: the sharded step equals the one-device step; guards, accumulation, freezing."""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from countclip_jax import accumulation, models, sharding, tasks, trainer
from countclip_jax.tasks import contrastive
from countclip_jax.data import pipeline
from countclip_jax.text.tokenizer import build_tokenizer

WORDS = ["a photo of two three four five six seven eight nine ten red blue stars circles"]


@pytest.fixture(scope="module")
def tokenizer():
  return build_tokenizer(WORDS, context_length=16)


def fake_batch(config, tokenizer, image_size, seed=0):
  """A batch in the pipeline's layout, with random pixels and real token ids."""
  rng = np.random.RandomState(seed)
  counting, general = pipeline.split_sizes(config.train.batch_size, config.count.fraction)
  k = config.count.num_counterfactuals
  words = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
  numbers = rng.randint(2, 11, size=counting)
  cf_numbers = np.array([[m for m in range(2, 11) if m != n][:k] for n in numbers], np.int32)
  texts = lambda nums: tokenizer([f"a photo of {words[n - 2]} red stars" for n in nums])
  image = lambda n: rng.randn(n, image_size, image_size, 3).astype(np.float32)
  return {
      "count": {"image": image(counting), "text": texts(numbers),
                "cf_text": texts(cf_numbers.reshape(-1)).reshape(counting, k, -1),
                "number": numbers.astype(np.int32), "cf_number": cf_numbers.reshape(counting, k)},
      "general": {"image": image(general),
                  "text": tokenizer(["a photo of blue circles"] * general)}}


def setup(config, tokenizer, mesh_cfg=None, devices=None, check=True):
  if mesh_cfg is not None:
    config.mesh.data, config.mesh.fsdp, config.mesh.model = mesh_cfg
  devices = jax.devices() if devices is None else devices
  if check:
    trainer.validate(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  task = contrastive.TASK
  model, _ = task.build_model(config, tokenizer)
  tx, schedule = trainer.make_optimizer(config, trainer.param_shapes(task, model))
  _, shardings = trainer.state_layout(task, model, tx, mesh)
  state = trainer.init_state(task, model, tx, None, jax.random.key(0), mesh, shardings)
  step = trainer.make_train_step(task, model, tx, schedule, config, mesh, shardings)
  place = lambda b: jax.tree_util.tree_map(
      lambda x, s: jax.device_put(x, s), b, task.batch_shardings(mesh))
  return model, state, step, place


def run_steps(config, tokenizer, mesh_cfg, devices=None, steps=2):
  model, state, step, place = setup(config, tokenizer, mesh_cfg, devices)
  for i in range(steps):
    state, metrics = step(state, place(fake_batch(config, tokenizer,
                                                  model.config.vision.image_size, seed=i)))
  return jax.device_get(state.params), jax.device_get(metrics)


def small_config():
  config = tiny.get_config()
  config.train.batch_size = 16
  config.count.fraction = 0.5
  return config


def test_sharded_step_equals_one_device(tokenizer):
  ref_params, ref_metrics = run_steps(small_config(), tokenizer, (1, 1, 1), jax.devices()[:1])
  for mesh_cfg in [(4, 2, 1), (2, 2, 2)]:  # every axis (8-way data parallel: test_main)
    params, metrics = run_steps(small_config(), tokenizer, mesh_cfg)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["count_loss"], ref_metrics["count_loss"], rtol=1e-5)
    # Adam normalises the update, so equal params alone would hide a gradient-scale error.
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           params, ref_params)


def test_the_step_pins_the_activations_of_every_layer(tokenizer):
  """sharding.ACTIVATION_RULES reach the model inside the jitted step (models/clip.py
  `constrain`): the batch over data x fsdp, heads and MLP over model."""
  config = small_config()
  model, state, step, place = setup(config, tokenizer, (2, 2, 2))
  text = step.lower(state, place(fake_batch(config, tokenizer,
                                            model.config.vision.image_size))).as_text()
  constraints = [line for line in text.splitlines() if "sdy.sharding_constraint" in line]
  for layout in ('[{"data", "fsdp"}, {}, {}]',  # the residual stream
                 '[{"data", "fsdp"}, {}, {"model"}, {}]',  # q, k, v and attention out, by head
                 '[{"data", "fsdp"}, {}, {"model"}]'):  # the MLP's hidden layer
    assert any(layout in line for line in constraints), layout


def test_a_scanned_sharded_step_equals_the_unrolled_one(tokenizer):
  """model.scan_layers on a 2x2x2 mesh (the stacked `layers` axis under the sharding rules)
  against per-layer layers on one device, from the same weights: loss, gradient norm and
  params after the step."""
  ref_config = small_config()
  # The first step at lr 1e-4, not warmup's 0: Adam moves every param by about lr, and a
  # gradient near 0 makes its direction float32 noise, so 1e-5 is a tenth of a step.
  ref_config.train.warmup_steps, ref_config.train.lr = 0, 1e-4
  ref_model, ref_state, ref_step, ref_place = setup(ref_config, tokenizer, (1, 1, 1),
                                                    jax.devices()[:1])
  config = small_config()
  config.train.warmup_steps, config.train.lr = 0, 1e-4
  config.model.scan_layers = True
  model, state, step, place = setup(config, tokenizer, (2, 2, 2))
  assert model.scan_layers and not ref_model.scan_layers
  initial = jax.device_get(ref_state.params)
  stacked = models.stack_layers(initial)
  state = state.replace(params=jax.device_put(
      stacked, jax.tree_util.tree_map(lambda x: x.sharding, state.params)))
  batch = fake_batch(config, tokenizer, model.config.vision.image_size)
  ref_state, ref_metrics = ref_step(ref_state, ref_place(batch))
  state, metrics = step(state, place(batch))
  for key in ("loss", "count_loss", "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  after = jax.device_get(ref_state.params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                         models.unstack_layers(jax.device_get(state.params)), after)
  # The step moved the layers (lr > 0), so equal params above say something.
  moved = lambda tree: tree["text_model"]["encoder"]["layers"]["1"]["mlp"]["fc1"]["kernel"]
  assert np.abs(moved(after) - moved(initial)).max() > 5e-5


def test_freeze_means_the_same_paths_with_scanned_layers():
  assert trainer.layer_paths("text_model/encoder/layers/mlp/fc1/kernel",
                             jax.ShapeDtypeStruct((2, 4, 4), jnp.float32)) == [
      "text_model/encoder/layers/0/mlp/fc1/kernel", "text_model/encoder/layers/1/mlp/fc1/kernel"]
  assert trainer.layer_paths("text_model/encoder/layers/0/mlp/fc1/kernel", None) == [
      "text_model/encoder/layers/0/mlp/fc1/kernel"]
  tiny_arch = models.ARCHITECTURES["tiny"]
  shapes = models.param_shapes(models.CLIP(tiny_arch, scan_layers=True))
  unrolled = models.param_shapes(models.CLIP(tiny_arch))
  flat = lambda tree: {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}
  for pattern in ("^vision_model/", "^text_model/encoder/layers/[0-9]+/", "layers/[01]/mlp/"):
    scanned = flat(trainer.freeze_labels(pattern, shapes))
    expected = flat(trainer.freeze_labels(pattern, unrolled))
    got = {p: label for path, label in scanned.items()
           for p in trainer.layer_paths(path, flat(shapes)[path])}
    assert got == expected and "frozen" in got.values(), pattern
  # One layer of a stacked array cannot be frozen alone: refused, naming the param.
  with pytest.raises(ValueError, match="freezes some layers of .*encoder/layers/.*scan_layers"):
    trainer.freeze_labels("layers/0/", shapes)
  trainer.freeze_labels("layers/0/", unrolled)  # per layer: fine


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: every real preset's
def test_metrics_and_learning(tokenizer, dtype):
  config = small_config()
  config.model.dtype = dtype
  config.train.lr = 3e-3
  model, state, step, place = setup(config, tokenizer, (2, 1, 1), jax.devices()[:2])
  batch = place(fake_batch(config, tokenizer, model.config.vision.image_size))
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert set(metrics) >= {"loss", "clip_loss", "count_loss", "count_accuracy", "grad_norm",
                          "lr", "logit_scale", "skipped"}
  np.testing.assert_allclose(
      metrics["loss"], metrics["clip_loss"] + config.count.lam * metrics["count_loss"],
      rtol=1e-6)
  assert losses[-1] < losses[0] and np.all(np.isfinite(losses))  # it fits one batch
  assert int(state.step) == 8
  # Params (and so checkpoints) stay float32 whatever the compute dtype.
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {np.dtype("float32")}


def test_lambda_zero_sends_no_gradient_through_the_counting_terms(tokenizer):
  """λ = 0 measures the counting loss but trains on L_clip alone; λ = 1 does not."""
  config = small_config()
  model, state, _, _ = setup(config, tokenizer, (1, 1, 1), jax.devices()[:1])
  params = jax.device_get(state.params)
  batch = fake_batch(config, tokenizer, model.config.vision.image_size)
  def grads(lam, term="loss"):  # jitted: op by op, the tiny model's grads take ~5 s each
    config.count.lam = lam
    loss = lambda p: contrastive.loss_fn(p, batch, model, config.count)[1][term]
    return jax.jit(jax.grad(loss))(params)
  def metrics_at(lam):
    config.count.lam = lam
    return jax.jit(lambda p: contrastive.loss_fn(p, batch, model, config.count)[1])(params)
  clip_only = grads(0.0, "clip_loss")
  jax.tree_util.tree_map(np.testing.assert_array_equal, grads(0.0), clip_only)
  metrics, trained = metrics_at(0.0), metrics_at(1.0)
  for name in ("count_loss", "count_accuracy"):  # still measured, as when it is trained
    np.testing.assert_allclose(metrics[name], trained[name], rtol=1e-5)
  assert float(metrics["count_loss"]) > 0
  differs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), grads(1.0),
                                   clip_only)
  assert max(jax.tree_util.tree_leaves(differs)) > 1e-4


def test_lambda_zero_runs_no_backward_pass_for_the_counterfactuals(tokenizer):
  """The counterfactual captions' backward, run for nothing at λ = 0, is left out of the step."""
  config = small_config()
  config.count.num_counterfactuals = 8
  model, state, _, _ = setup(config, tokenizer, (1, 1, 1), jax.devices()[:1])
  params = jax.device_get(state.params)
  batch = fake_batch(config, tokenizer, model.config.vision.image_size)
  def flops(lam):
    config.count.lam = lam
    grad = jax.jit(jax.grad(lambda p: contrastive.loss_fn(p, batch, model, config.count)[0]))
    return grad.lower(params).compile().cost_analysis()["flops"]
  trained, measured = flops(1.0), flops(0.0)  # tiny: 1.27e9 and 0.62e9
  assert measured < 0.8 * trained, (measured, trained)


def test_non_finite_loss_skips_the_update(tokenizer):
  config = small_config()
  model, state, step, place = setup(config, tokenizer, (1, 1, 1), jax.devices()[:1])
  good = fake_batch(config, tokenizer, model.config.vision.image_size)
  bad = jax.tree_util.tree_map(np.copy, good)
  bad["general"]["image"][0, 0, 0, 0] = np.nan
  state, _ = step(state, place(good))
  before = jax.device_get(state.params)
  state, metrics = step(state, place(bad))
  state, metrics = step(state, place(bad))
  assert float(metrics["skipped"]) == 1.0
  assert int(state.nonfinite) == 2 and int(state.skipped) == 2 and int(state.step) == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  state, _ = step(state, place(good))
  assert int(state.nonfinite) == 0 and int(state.skipped) == 2


def test_a_non_finite_update_is_skipped_though_loss_and_gradient_are_finite(tokenizer):
  """lr = nan (validation refuses it; here it is forced) makes every update nan from a finite
  loss and gradient: the guard must keep the old params and optimizer state."""
  config = small_config()
  config.train.lr, config.train.warmup_steps = float("nan"), 0
  model, state, step, place = setup(config, tokenizer, (1, 1, 1), jax.devices()[:1], check=False)
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = step(state, place(fake_batch(config, tokenizer,
                                                model.config.vision.image_size)))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["skipped"]) == 1.0 and int(state.skipped) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get((state.params, state.opt_state)), before)


def test_a_gradient_too_large_to_square_is_skipped(tokenizer):
  """λ = 1e30: loss and every gradient finite, but their squares (Adam's second moment) are
  not. The guard reads no moment: the gradient norm, a sum of those squares, must stop it."""
  config = small_config()
  config.count.lam, config.train.warmup_steps = 1e30, 0  # lr > 0 at step 0: params would move
  model, state, step, place = setup(config, tokenizer, (1, 1, 1), jax.devices()[:1], check=False)
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = step(state, place(fake_batch(config, tokenizer,
                                                model.config.vision.image_size)))
  assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["skipped"]) == 1.0
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get((state.params, state.opt_state)), before)


class _PerMicroBatch(contrastive.Contrastive):
  couples_examples = False  # what accumulation once did: InfoNCE within each micro-batch


def _accumulated_grads(task, config, tokenizer, accum, mesh_cfg, devices):
  config.train.grad_accum = accum
  model, state, _, place = setup(config, tokenizer, mesh_cfg, devices)
  mesh = sharding.make_mesh(config.mesh, devices)
  grads = jax.jit(accumulation.grad_fn(task, model, config, mesh))
  batch = place(fake_batch(config, tokenizer, model.config.vision.image_size))
  return jax.device_get(grads(state.params, batch, state.step))


def test_accumulation_keeps_the_whole_batch_objective(tokenizer, mesh_cfg=(2, 1, 1), n=2):
  """grad_accum=4 (cached features) gives the loss and gradients of the whole batch of 16 (on
  a data=2 mesh: each device keeps its rows): each pair keeps 15 negatives, not the 3 of its
  micro-batch."""
  def grads(accum, task=contrastive.TASK):
    config = small_config()
    config.model.dtype = "float32"
    return _accumulated_grads(task, config, tokenizer, accum, mesh_cfg, jax.devices()[:n])
  (whole, whole_metrics), (cached, cached_metrics) = grads(1), grads(4)
  for name in ("loss", "clip_loss", "count_loss", "count_accuracy"):
    np.testing.assert_allclose(cached_metrics[name], whole_metrics[name], rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  jax.tree_util.tree_map(close, cached, whole)
  # The comparison can fail: per-micro-batch InfoNCE has other gradients.
  per_micro, _ = grads(4, _PerMicroBatch())
  differs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), per_micro, whole)
  assert max(jax.tree_util.tree_leaves(differs)) > 1e-3


class _MeanSquares(tasks.Task):
  """A loss that is a mean over examples: micro-batch gradients average to the whole batch's."""

  def loss_fn(self, params, batch, step, *, model, config, mesh):
    loss = jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
    return loss, {"loss": loss}


def test_accumulation_of_a_mean_loss_averages_micro_batches():
  config = small_config()
  rng = np.random.RandomState(0)
  batch = {"x": rng.randn(16, 3).astype(np.float32), "y": rng.randn(16).astype(np.float32)}
  params = {"w": np.float32([0.5, -1.0, 2.0])}
  def grads(accum):
    config.train.grad_accum = accum
    return jax.jit(accumulation.grad_fn(_MeanSquares(), None, config, None))(params, batch, 0)
  (whole, _), (mean, metrics) = grads(1), grads(4)
  np.testing.assert_allclose(mean["w"], whole["w"], rtol=1e-6)
  by_hand = np.mean([2 * batch["x"][i::4].T @ (batch["x"][i::4] @ params["w"] - batch["y"][i::4])
                     / 4 for i in range(4)], axis=0)
  np.testing.assert_allclose(mean["w"], by_hand, rtol=1e-5)
  assert np.isfinite(metrics["loss"])


def test_an_accumulated_step_equals_the_whole_batch_step(tokenizer):
  """Through the trainer's step, at a learning rate that moves the params."""
  def one_step(accum):
    config = small_config()
    config.model.dtype = "float32"
    config.train.grad_accum, config.train.warmup_steps = accum, 0
    model, state, step, place = setup(config, tokenizer, (1, 1, 1), jax.devices()[:1])
    before = jax.device_get(state.params)
    state, metrics = step(state, place(fake_batch(config, tokenizer,
                                                  model.config.vision.image_size)))
    assert float(metrics["lr"]) > 0
    return before, jax.device_get(state.params), float(metrics["grad_norm"])
  before, whole, whole_norm = one_step(1)
  _, accumulated, accumulated_norm = one_step(2)
  moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), whole, before)
  assert max(jax.tree_util.tree_leaves(moved)) > 5e-4  # the comparison below is not vacuous
  np.testing.assert_allclose(accumulated_norm, whole_norm, rtol=1e-5)
  # Adam's first step is about lr * sign(g): float-order noise in a near-zero gradient moves
  # a param by up to ~lr (1e-3), so params are compared at a tenth of it (2e-5 failed by a hair
  # on an Intel Xeon, family 6 model 167) and the gradient norm tightly.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
                         accumulated, whole)


def test_frozen_params_stay_and_logit_scale_is_clamped(tokenizer):
  config = small_config()
  config.train.freeze = "^vision_model/"
  config.train.lr = 10.0  # huge, so the logit scale would leave [.., ln 100] without the clamp
  config.train.warmup_steps = 0
  model, state, step, place = setup(config, tokenizer, (1, 1, 1), jax.devices()[:1])
  # Far above ln 100: Adam's first step moves it by about lr (10) either way, so only the
  # clamp brings it back to ln 100.
  state = state.replace(params={**state.params,
                                "logit_scale": state.params["logit_scale"] * 0 + 20.0})
  before = jax.device_get(state.params)
  state, _ = step(state, place(fake_batch(config, tokenizer, model.config.vision.image_size)))
  after = jax.device_get(state.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, after["vision_model"],
                         before["vision_model"])
  assert not np.allclose(after["text_projection"]["kernel"], before["text_projection"]["kernel"])
  # The clamp ran.
  assert float(after["logit_scale"]) == pytest.approx(math.log(100.0), abs=1e-6)


def test_grad_norm_measures_only_what_trains(tokenizer):
  config = small_config()
  config.train.freeze = "^vision_model/"
  model, state, step, place = setup(config, tokenizer, (1, 1, 1), jax.devices()[:1])
  params = jax.device_get(state.params)
  batch = fake_batch(config, tokenizer, model.config.vision.image_size)
  _, metrics = step(state, place(batch))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  grads, _ = jax.jit(accumulation.grad_fn(contrastive.TASK, model, config, mesh))(params, batch, 0)
  trained = {k: v for k, v in grads.items() if k != "vision_model"}
  # The frozen tower's gradient is far from zero, so leaving it in would fail the check.
  assert float(optax.tree.norm(grads["vision_model"])) > 0.1 * float(optax.tree.norm(trained))
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(trained), rtol=1e-5)


def test_weight_decay_only_on_kernels():
  assert trainer.decays("vision_model/encoder/layers/0/mlp/fc1/kernel", None)
  for path in ["logit_scale", "text_model/embeddings/token_embedding/embedding",
               "vision_model/embeddings/class_embedding", "vision_model/pre_layrnorm/scale",
               "text_model/encoder/layers/0/mlp/fc1/bias"]:
    assert not trainer.decays(path, None), path


@pytest.mark.parametrize("field, value, message", [
    ("count.fraction", 1.5, r"count.fraction \(p\) must be in \[0, 1\]"),
    ("count.fraction", -0.1, r"count.fraction \(p\) must be in \[0, 1\]"),
    ("train.batch_size", 12, "not divisible by mesh.data"),
    ("count.num_counterfactuals", 9, "must be 1..8"),
    ("count.scale", "big", "count.scale must be a positive number or 'learned'"),
    ("model.dtype", "float8", "model.dtype must be one of"),
    ("model.arch", "huge", "model.arch 'huge' is not one of"),
    ("eval.datasets", ("synthetic", "cifar10"), r"eval.datasets: Unknown eval dataset 'cifar10'"),
    ("eval.datasets", ("countbench",), "eval.datasets: The countbench eval needs a source"),
    ("eval.datasets", ("tfds:",), r"eval.datasets: A tfds eval set is 'tfds:NAME\[:SPLIT\]'"),
    ("train.lr", -1.0, "train.lr must be a finite number > 0, got -1.0"),
    ("train.lr", float("nan"), "train.lr must be a finite number > 0, got nan"),
    ("train.lr", float("inf"), "train.lr must be a finite number > 0"),
    ("train.b2", 1.0, r"train.b2 must be in \[0, 1\)"),
    ("train.eps", 0.0, "train.eps must be a finite number > 0"),
    ("train.end_lr_fraction", 2.0, r"train.end_lr_fraction must be in \[0, 1\]"),
    ("train.weight_decay", -0.1, "train.weight_decay must be >= 0"),
    ("train.max_nonfinite", 0, "train.max_nonfinite must be >= 1"),
    ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep must be >= 1"),
    ("data.context_length", 2, "data.context_length must be >= 3"),
    ("data.num_threads", -2, r"data.num_threads must be >= 0, or -1 \(the host's cores\)"),
    ("data.num_workers", -1, "data.num_workers must be >= 0"),
    ("data.prefetch_buffer_size", 0, "data.prefetch_buffer_size must be >= 1"),
    ("data.device_prefetch", -1, r"data.device_prefetch must be >= 0 \(0: none\)"),
    ("train.freeze", "([", "train.freeze '\\(\\[' is not a regular expression"),
])
def test_bad_configs_fail_fast(field, value, message):
  config = tiny.get_config()
  section, name = field.split(".")
  with config.unlocked():
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    trainer.validate(config, 8)


def test_unknown_config_key_is_refused():
  config = tiny.get_config()
  with pytest.raises(AttributeError, match="learning_rate"):
    config.train.learning_rate = 1e-3  # presets are locked: a typo is an error, not a new key


def test_uint8_batches_are_normalised_in_the_step(tokenizer):
  """The pipeline's uint8 images give the step the model input host-normalised floats give."""
  from countclip_jax.data import images  # pylint: disable=g-import-not-at-top
  config = small_config()
  model, state, step, place = setup(config, tokenizer, (1, 1, 1), jax.devices()[:1])
  size = model.config.vision.image_size
  pixels = fake_batch(config, tokenizer, size)
  rng = np.random.default_rng(0)
  for part in ("count", "general"):
    pixels[part]["image"] = rng.integers(0, 256, pixels[part]["image"].shape, np.uint8)
  floats = jax.tree_util.tree_map(lambda x: x, pixels)
  for part in ("count", "general"):
    floats[part]["image"] = images.normalize(pixels[part]["image"])
  _, from_floats = step(state, place(floats))
  state = setup(config, tokenizer, (1, 1, 1), jax.devices()[:1])[1]  # (the state was donated)
  _, from_pixels = step(state, place(pixels))
  for key in ("loss", "count_loss", "grad_norm"):
    np.testing.assert_allclose(from_pixels[key], from_floats[key], rtol=1e-5, err_msg=key)
