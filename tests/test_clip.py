"""models/clip.py: architecture presets, HF parameter layout, logical axes, dtypes, remat, scan."""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countclip_jax import models
from countclip_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name, expected", [
    # Parameter counts of the OpenAI checkpoints as transformers' CLIPModel reports them.
    ("b32", 151_277_313), ("b16", 149_620_737), ("l14", 427_616_513), ("l14_336", 427_944_193)])
def test_presets_have_the_openai_parameter_counts(name, expected):
  assert count(models.param_shapes(CLIP(models.ARCHITECTURES[name]))) == expected


def test_parameter_paths_are_hf_flax_layout():
  shapes = models.param_shapes(CLIP(models.ARCHITECTURES["tiny"]))
  paths = {"/".join(p) for p in flax.traverse_util.flatten_dict(shapes)}
  for path in [
      "logit_scale", "visual_projection/kernel", "text_projection/kernel",
      "vision_model/embeddings/class_embedding", "vision_model/embeddings/patch_embedding/kernel",
      "vision_model/embeddings/position_embedding/embedding", "vision_model/pre_layrnorm/scale",
      "vision_model/post_layernorm/bias",
      "vision_model/encoder/layers/1/self_attn/q_proj/kernel",
      "text_model/embeddings/token_embedding/embedding",
      "text_model/encoder/layers/0/mlp/fc2/bias", "text_model/encoder/layers/0/layer_norm1/scale",
      "text_model/final_layer_norm/scale"]:
    assert path in paths, path
  assert "visual_projection/bias" not in paths
  assert shapes["vision_model"]["embeddings"]["patch_embedding"]["kernel"].shape == (16, 16, 3, 96)


def test_every_param_has_logical_axes_of_its_rank():
  model = CLIP(models.ARCHITECTURES["tiny"])
  shapes, axes = models.param_shapes(model), models.logical_axes(model)
  flat_axes = flax.traverse_util.flatten_dict(axes)
  for path, shape in flax.traverse_util.flatten_dict(shapes).items():
    assert len(flat_axes[path]) == len(shape.shape), path
  assert flat_axes[("text_model", "embeddings", "token_embedding", "embedding")] == \
      jax.sharding.PartitionSpec("vocab", "embed")
  assert flat_axes[("vision_model", "encoder", "layers", "0", "mlp", "fc1", "kernel")] == \
      jax.sharding.PartitionSpec("embed", "mlp")


def tiny_inputs(config, batch=2):
  pixels = jax.random.normal(jax.random.key(1), (batch, config.vision.image_size,
                                                 config.vision.image_size, 3))
  ids = np.full((batch, config.text.context_length), config.text.eos_token_id, np.int32)
  ids[:, 0], ids[:, 1:4] = config.text.eos_token_id - 1, [[5, 6, 7]]
  return pixels, ids


def test_bf16_compute_keeps_fp32_params_and_outputs():
  config = models.ARCHITECTURES["tiny"]
  model = CLIP(config, dtype=jnp.bfloat16)
  params = models.init_params(model, jax.random.key(0))
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  out = model.apply({"params": params}, *tiny_inputs(config))
  assert out.image_embeds.dtype == out.text_embeds.dtype == jnp.float32
  ref = CLIP(config).apply({"params": params}, *tiny_inputs(config))
  np.testing.assert_allclose(out.logits_per_image, ref.logits_per_image, atol=0.3)


@pytest.mark.parametrize("remat", [True, "dots_with_no_batch_dims_saveable"])
def test_remat_changes_nothing_but_memory(remat):
  config = models.ARCHITECTURES["tiny"]
  params = models.init_params(CLIP(config), jax.random.key(0))
  inputs = tiny_inputs(config)
  loss = lambda model: jax.value_and_grad(
      lambda p: model.apply({"params": p}, *inputs).logits_per_image.sum())(params)
  (plain, g_plain), (remat, g_remat) = loss(CLIP(config)), loss(CLIP(config, remat=remat))
  np.testing.assert_allclose(plain, remat, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         g_plain, g_remat)


def test_an_unknown_remat_policy_is_refused():
  config = models.ARCHITECTURES["tiny"]
  with pytest.raises(ValueError, match="model.remat must be a bool or one of"):
    models.init_params(CLIP(config, remat="dots"), jax.random.key(0))


def test_text_pools_at_the_first_eos():
  config = models.ARCHITECTURES["tiny"]
  model = CLIP(config)
  params = models.init_params(model, jax.random.key(0))
  eos = config.text.eos_token_id
  a = np.array([[998, 5, 6, eos] + [eos] * 12], np.int32)
  b = np.array([[998, 5, 6, eos] + [7] * 12], np.int32)  # causal: later tokens cannot matter
  encode = lambda ids: model.apply({"params": params}, ids, method="encode_text")
  np.testing.assert_allclose(encode(a), encode(b), atol=1e-6)
  c = np.array([[998, 5, 9, eos] + [eos] * 12], np.int32)
  assert not np.allclose(encode(a), encode(c))


def test_bad_inputs_and_configs_fail_clearly():
  config = models.ARCHITECTURES["tiny"]
  model = CLIP(config)
  params = models.init_params(model, jax.random.key(0))
  with pytest.raises(ValueError, match=r"pixels must be NHWC \(B, 64, 64, 3\)"):
    model.apply({"params": params}, jnp.zeros((1, 3, 64, 64)), method="encode_image")
  with pytest.raises(ValueError, match="exceeds the model's context length 16"):
    model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32), method="encode_text")
  with pytest.raises(ValueError, match="not divisible by heads"):
    CLIPConfig(text=TextConfig(width=10, heads=3))
  with pytest.raises(ValueError, match="act 'relu6'"):
    CLIPConfig(vision=VisionConfig(act="relu6"))
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=30))


def test_attention_uses_cudnn_only_on_a_gpu_where_it_applies(monkeypatch):
  from countclip_jax.models import clip  # pylint: disable=g-import-not-at-top
  bf16 = jnp.bfloat16
  assert clip.attention_implementation(bf16, 64, False) is None  # this CPU: XLA's
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert clip.attention_implementation(bf16, 64, False) == "cudnn"
  assert clip.attention_implementation(jnp.float16, 128, False) == "cudnn"
  for args in [(jnp.float32, 64, False), (bf16, 64, True), (bf16, 160, False), (bf16, 36, False)]:
    assert clip.attention_implementation(*args) is None, args
  # Where jax refuses cuDNN when it traces (here: no cuDNN at all), XLA's kernel runs instead.
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 4, 16), bf16)
  np.testing.assert_array_equal(clip.fused_attention(q, k, v, None, True),
                                jax.nn.dot_product_attention(q, k, v, is_causal=True))


def test_scanned_layers_are_stacked_per_tower_with_a_layers_axis():
  config = models.ARCHITECTURES["tiny"]
  model = CLIP(config, scan_layers=True)
  shapes, axes = models.param_shapes(model), models.logical_axes(model)
  layers = shapes["vision_model"]["encoder"]["layers"]
  assert layers["self_attn"]["q_proj"]["kernel"].shape == (2, 96, 96)  # (depth, in, out)
  assert axes["vision_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"] == \
      jax.sharding.PartitionSpec("layers", "embed", "mlp")
  # Same parameters as the per-layer model, only stacked.
  assert count(shapes) == count(models.param_shapes(CLIP(config)))
  unrolled = models.param_shapes(CLIP(config))
  assert jax.tree_util.tree_structure(models.unstack_layers(shapes)) == \
      jax.tree_util.tree_structure(unrolled)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_compute_what_the_unrolled_ones_do(remat):
  """Per-layer params, stacked: the same outputs and (unstacked) the same gradients."""
  config = models.ARCHITECTURES["tiny"]
  params = models.init_params(CLIP(config), jax.random.key(0))
  stacked = models.stack_layers(params)
  pixels, ids = tiny_inputs(config)
  mask = (np.arange(ids.shape[1]) < 6).astype(np.int32)[None].repeat(2, 0)

  def loss(model, p):
    return model.apply({"params": p}, pixels, ids, mask).logits_per_image.sum()
  plain, g_plain = jax.value_and_grad(functools.partial(loss, CLIP(config)))(params)
  scanned, g_scanned = jax.value_and_grad(
      functools.partial(loss, CLIP(config, remat=remat, scan_layers=True)))(stacked)
  np.testing.assert_allclose(scanned, plain, atol=1e-5)  # (a sum of logits of either sign)
  g_scanned = models.unstack_layers(g_scanned)
  # Layer 1's grads differ from layer 0's: a scan that applied one layer twice would fail.
  layers = g_plain["text_model"]["encoder"]["layers"]
  assert not np.allclose(layers["0"]["mlp"]["fc1"]["kernel"], layers["1"]["mlp"]["fc1"]["kernel"])
  # (float32 rounding: scan's body is fused differently from the unrolled layers; the absolute
  # slack follows each leaf's scale: a near-zero entry of a leaf reaching ~40 moved 1.1e-5 on an
  # Intel Xeon, family 6 model 167)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 + 1e-6 * float(np.max(np.abs(b)))), g_scanned, g_plain)


def test_stack_and_unstack_layers_are_inverse_and_idempotent():
  params = models.init_params(CLIP(models.ARCHITECTURES["tiny"]), jax.random.key(0))
  stacked = models.stack_layers(params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, models.stack_layers(stacked), stacked)
  jax.tree_util.tree_map(np.testing.assert_array_equal, models.unstack_layers(stacked), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, models.unstack_layers(params), params)


def test_scanned_layers_refuse_explain():
  config = models.ARCHITECTURES["tiny"]
  with pytest.raises(ValueError, match="explain needs the per-layer layout"):
    models.init_params(CLIP(config, scan_layers=True, explain=True), jax.random.key(0))


def test_the_last_layer_computes_the_pooled_tokens_alone():
  """encode_image / encode_text run the last layer for the class / eos token only: the same
  values and gradients as every token's states pooled afterwards, for less work."""
  config = models.ARCHITECTURES["tiny"]
  model = CLIP(config)
  params = models.init_params(model, jax.random.key(0))
  pixels, ids = tiny_inputs(config, batch=3)
  eos = config.text.eos_token_id
  ids[1, 2:] = [9, 10, eos] + [0] * (ids.shape[1] - 5)  # the eos elsewhere, pads after it
  ids[2, 1:] = 11  # no eos at all: pooled at position 0, as HF's argmax does
  mask = (ids != 0).astype(np.int32)
  apply = lambda p, method, *x: model.apply({"params": p}, *x, method=method)

  def full_text(p):  # every token's state, pooled afterwards
    states = apply(p, "text_states", ids, mask)
    pooled = np.take_along_axis(states, models.clip.eot_positions(ids, eos)[:, None, None], 1)
    return pooled[:, 0] @ p["text_projection"]["kernel"]

  def full_image(p):  # the scanned layout computes every token (stacked params)
    return CLIP(config, scan_layers=True).apply({"params": models.stack_layers(p)}, pixels,
                                                method="encode_image")

  for pooled, full in ((lambda p: apply(p, "encode_text", ids, mask), full_text),
                       (lambda p: apply(p, "encode_image", pixels), full_image)):
    np.testing.assert_allclose(pooled(params), full(params), atol=1e-5)
    g_pooled = jax.grad(lambda p: (pooled(p) ** 2).sum())(params)
    g_full = jax.grad(lambda p: (full(p) ** 2).sum())(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
                           g_pooled, g_full)
  flops = lambda f, *x: jax.jit(f).lower(*x).compile().cost_analysis()["flops"]
  # tiny has 2 layers a tower: the last one's queries, attention output and MLP for one token
  # of 16 leave well under 3/4 of the work. (XLA counts a scanned loop's body once, so the
  # per-layer text_states is the full reference.)
  assert flops(lambda p: apply(p, "encode_text", ids, mask), params) < 0.75 * flops(
      full_text, params)
