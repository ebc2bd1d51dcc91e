"""models/density.py: CLIP-Count on clip.py's backbone, its tree, its text fixes, its sharding.

Compiling is what costs here (a 2-core CPU), so params come from numpy rather than a jitted
random init, every jit skips LLVM's optimisations, and tests share shapes to share compiles.
"""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from countclip_jax import density_losses, models, sharding
from countclip_jax.models import density as D

CLIP_TINY = models.ARCHITECTURES["tiny"]  # 64 px, 16 px patches (4x4), text: eos 999, L 16
EOS, BOS = 999, 998
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})


def make(**overrides):
  return D.DensityCounter(CLIP_TINY, dataclasses.replace(D.TINY, **overrides))


def random_params(shapes, seed=0):
  """Random params for a shape tree: LayerNorm scales near 1, the rest ~ 1/sqrt(fan in)."""
  rng = np.random.RandomState(seed)
  def leaf(path, s):
    name, fan_in = path[-1].key, max(int(np.prod(s.shape[:-1])), 1)
    if name == "scale":
      return jnp.asarray(1 + 0.1 * rng.randn(*s.shape), s.dtype)
    return jnp.asarray(rng.randn(*s.shape) * (0.1 if name == "bias" else fan_in ** -0.5),
                       s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def ids_for(*names, length=12):
  """One row per class name (a list of token ids): [bos, name..., eos, eos...]."""
  ids = np.full((len(names), length), EOS, np.int32)
  ids[:, 0] = BOS
  for row, name in zip(ids, names):
    row[1:1 + len(name)] = name
  return ids


def pixels(batch, size=96, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@functools.cache
def forward(model):
  return jit(lambda params, x, ids: model.apply({"params": params}, x, ids))


@pytest.fixture(scope="module")
def tiny():
  model = make()
  shapes = D.param_shapes(model)
  return model, random_params(shapes), shapes, D.logical_axes(model)


def test_configs_are_validated():
  for bad, message in [(dict(pooling="argmax"), "pooling"),
                       (dict(cross_attention="none"), "cross_attention"),
                       (dict(blocks=5), "blocks"), (dict(decoder_widths=(16, 12)), "norm_groups"),
                       (dict(heads=3), "divisible by heads"), (dict(prompt_tokens=-1), ">= 0"),
                       (dict(output_activation="exp"), "output_activation"),
                       (dict(pixel_width=12), "pixel_width"),
                       (dict(pixel_width=-8), "pixel_width")]:
    with pytest.raises(ValueError, match=message):
      dataclasses.replace(D.TINY, **bad)
  with pytest.raises(ValueError, match="prompt_depth 3 exceeds the vision depth 2"):
    D.param_shapes(make(prompt_depth=3))


def test_pixels_must_be_the_crop_size(tiny):
  model, _, shapes, axes = tiny
  with pytest.raises(ValueError, match=r"pixels must be NHWC \(B, 96, 96, 3\)"):
    jax.eval_shape(model.apply, {"params": shapes}, pixels(1, 64), ids_for([5]))


def test_output_activations_are_non_negative():
  x = jnp.linspace(-30.0, 30.0, 101)
  for name, act in D.ACTIVATIONS.items():
    assert bool(jnp.all(act(x) >= 0)) and float(act(x)[-1]) >= 1, name


def test_backbone_is_clips_tree_and_init_from_clip_drops_it_in(tiny):
  model, _, shapes, axes = tiny
  clip = models.CLIP(CLIP_TINY)
  clip_shapes = models.param_shapes(clip)
  assert set(shapes) == {"backbone", "prompts", "context", "interaction", "decoder"}
  assert jax.tree_util.tree_structure(shapes["backbone"]) == \
      jax.tree_util.tree_structure(clip_shapes)
  assert jax.tree_util.tree_map(lambda x: x.shape, shapes["backbone"]) == \
      jax.tree_util.tree_map(lambda x: x.shape, clip_shapes)
  assert axes["backbone"] == models.logical_axes(clip)
  # (eval_shape: the random init's compile alone takes a minute on this CPU.)
  backbone = random_params(clip_shapes, seed=7)
  params = jax.eval_shape(lambda b: D.init_from_clip(model, b, jax.random.key(0)), backbone)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes)
  flat = flax.traverse_util.flatten_dict(backbone)
  flat[("text_projection", "kernel")] = jnp.zeros((64, 47))
  with pytest.raises(ValueError, match="text_projection"):
    D.init_from_clip(model, flax.traverse_util.unflatten_dict(flat), jax.random.key(0))


def test_every_param_has_logical_axes_of_its_rank(tiny):
  model, _, shapes, axes = tiny
  flat_axes = flax.traverse_util.flatten_dict(axes)
  for path, shape in flax.traverse_util.flatten_dict(shapes).items():
    assert len(flat_axes[path]) == len(shape.shape), path


def test_without_prompts_or_context_the_towers_are_clips(tiny):
  # explain keeps every token's states in the last layer (encode_* pool it there otherwise)
  model = make(prompt_tokens=0, context_tokens=0, input_size=64)
  clip = models.CLIP(CLIP_TINY, explain=True)
  params = {k: v for k, v in tiny[1].items() if k not in ("prompts", "context")}
  x, ids = pixels(2, 64), ids_for([5, 6, 7], [8])
  mask = (np.arange(ids.shape[1]) < np.array([[5], [3]])).astype(np.int32)

  @jit
  def ours(params):
    patches, image = model.apply({"params": params}, x, method="encode_image")
    return patches, image, model.apply({"params": params}, ids, mask, method="encode_text")

  @jit
  def clips(params):
    run = lambda *a, **kw: clip.apply({"params": params}, *a, capture_intermediates=True,
                                      mutable=["intermediates"], **kw)
    image, vision = run(x, method="encode_image")
    text, states = run(ids, mask, method="encode_text")
    return (image, vision["intermediates"]["vision_model"]["encoder"]["__call__"][0], text,
            states["intermediates"]["text_model"]["final_layer_norm"]["__call__"][0])

  patches, image, text = ours(params)
  want_image, want_tokens, want_text, want_states = clips(params["backbone"])
  np.testing.assert_allclose(image, want_image, atol=1e-5)
  np.testing.assert_allclose(patches, want_tokens[:, 1:], atol=1e-5)
  np.testing.assert_allclose(text.embed, want_text, atol=1e-5)
  np.testing.assert_allclose(
      text.states, want_states @ params["backbone"]["text_projection"]["kernel"], atol=1e-5)
  np.testing.assert_array_equal(text.mask, np.arange(12)[None] <= np.array([[4], [2]]))


def test_k_prompts_per_image_shapes_and_equal_one_call_per_prompt(tiny):
  model, params, _, _ = tiny
  x = pixels(4)
  names = [[5, 6], [5, 7], [8]]  # the first two differ only in their last token
  ids = np.stack([ids_for(*names)] * 4)  # (4, 3, L)
  out = forward(model)(params, x, ids)
  assert out["density"].shape == (4, 3, 96, 96) and out["density"].dtype == jnp.float32
  assert float(out["density"].min()) >= 0
  assert out["patch_embeds"].shape == (4, 16, 48)  # 4x4 patches, the prompts dropped
  assert out["text_embed"].shape == (4, 3, 48) and out["image_embed"].shape == (4, 48)
  # Token cross-attention with eot pooling reads the whole name.
  assert float(jnp.abs(out["density"][:, 0] - out["density"][:, 1]).max()) > 1e-4
  for k in range(3):
    one = forward(model)(params, x, ids[:, k])
    np.testing.assert_allclose(out["density"][:, k], one["density"], atol=1e-5)


def test_the_pixel_pathway_reaches_every_prompts_map_of_its_own_image():
  model = make(pixel_width=8)
  shapes = D.param_shapes(model)
  assert {"pixel_0", "pixel_1", "pixel_skip", "pixel_skip_norm"} <= set(shapes["decoder"])
  params = random_params(shapes)
  x, ids = pixels(2), np.stack([ids_for([5], [6, 7], [8])] * 2)  # 2 images x 3 prompts
  out = forward(model)(params, x, ids)
  for k in range(3):  # the per-image features are repeated in the prompts' order
    one = forward(model)(params, x, ids[:, k])
    np.testing.assert_allclose(out["density"][:, k], one["density"], atol=1e-5)
  # Image 1's pixels never move image 0's maps (no mixing across the batch in the repeat).
  moved = forward(model)(params, x.at[1, 40, 40].add(5.0), ids)["density"] - out["density"]
  assert float(jnp.abs(moved[0]).max()) == 0 and float(jnp.abs(moved[1]).max()) > 0
  # The pathway is connected: its first conv gets a gradient.
  grad = jit(jax.grad(lambda p: model.apply({"params": p}, x, ids)["density"].sum()))(params)
  assert float(jnp.abs(grad["decoder"]["pixel_0"]["kernel"]).min()) > 0


def test_clip_count_pooling_cannot_tell_one_token_names_apart(tiny):
  model, params, _, _ = tiny  # pooling changes no param
  x = pixels(4, seed=4)
  x = x.at[1].set(x[0])
  ids = ids_for([5], [6], [5], [6])
  buggy = forward(make(pooling="clip_count"))(params, x, ids)
  ours = forward(model)(params, x, ids)
  # Two context tokens after sos: CLIP-Count pools at the old eot slot, now the 2nd context
  # token, and with a causal tower it has seen only sos and the context. Identical pooled
  # embeddings also mean identical maps with cross_attention="pooled".
  np.testing.assert_allclose(buggy["text_embed"][0], buggy["text_embed"][1], atol=1e-6)
  np.testing.assert_allclose(buggy["density"][0], buggy["density"][1], atol=1e-6)
  assert float(jnp.abs(ours["text_embed"][0] - ours["text_embed"][1]).max()) > 1e-3
  assert float(jnp.abs(ours["density"][0] - ours["density"][1]).max()) > 1e-4
  pooled = forward(make(cross_attention="pooled"))(params, x, ids)["density"]  # one key
  assert pooled.shape == (4, 96, 96) and float(jnp.abs(pooled[0] - pooled[1]).max()) > 1e-4


def test_an_ensemble_of_one_template_repeated_is_that_template(tiny):
  model, params, _, _ = tiny
  x, ids = pixels(4), ids_for([5], [6, 7], [8], [9])

  @jit
  def ensembled(params, templates):
    text = model.apply({"params": params}, templates, method="encode_text")
    ensemble = D.ensemble_templates(text)
    return ensemble, model.apply({"params": params}, x, text=ensemble)["density"]

  ensemble, got = ensembled(params, np.stack([ids] * 3, axis=1))
  assert ensemble.states.shape[:2] == ensemble.mask.shape == (4, 3 * 14)  # 12 ids + 2 context
  want = forward(model)(params, x, ids)
  np.testing.assert_allclose(ensemble.embed, want["text_embed"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, want["density"], atol=1e-5)
  _, mixed = ensembled(params, np.stack([ids, ids_for([8], [9], [5], [6]), ids], axis=1))
  assert float(jnp.abs(mixed - want["density"]).max()) > 1e-4


def test_dropout_in_training(tiny):
  # (The other tests pass no dropout rng: were dropout on in eval, they would fail.)
  model = make(prompt_tokens=0)  # the interaction blocks' dropout alone
  params = {k: v for k, v in tiny[1].items() if k != "prompts"}
  run = jit(lambda params, rng: model.apply({"params": params}, pixels(4), ids_for(*[[5]] * 4),
                                            train=True, rngs={"dropout": rng})["density"])
  assert float(jnp.abs(run(params, jax.random.key(0)) -
                       run(params, jax.random.key(1))).max()) > 1e-4
  prompts = D._VisualPrompts(2, 3, 8, 4, 0.5, jnp.float32, jnp.float32)
  variables = prompts.init(jax.random.key(0), False)
  draw = lambda seed: prompts.apply(variables, True, rngs={"dropout": jax.random.key(seed)})
  assert float(jnp.abs(draw(0) - draw(1)).max()) > 0
  np.testing.assert_array_equal(prompts.apply(variables, False), prompts.apply(variables, False))


def test_remat_traces(tiny):
  shapes = tiny[2]
  model = D.DensityCounter(CLIP_TINY, D.TINY, remat=True)
  loss = lambda p: jnp.sum(model.apply({"params": p}, pixels(1), ids_for([5]))["density"])
  grads = jax.eval_shape(jax.grad(loss), shapes)
  assert jax.tree_util.tree_map(lambda x: x.shape, grads) == \
      jax.tree_util.tree_map(lambda x: x.shape, shapes)


def test_sharded_forward_and_gradients_equal_one_device(tiny):
  model, params, shapes, axes = tiny
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, model=2)))
  shardings = sharding.param_shardings(mesh, axes, shapes)
  trainable_shardings = {k: v for k, v in shardings.items() if k != "backbone"}
  assert any(s.spec != jax.sharding.PartitionSpec(*[None] * len(s.spec))
             for s in jax.tree_util.tree_leaves(trainable_shardings)), "nothing is sharded"
  x, ids = pixels(4), ids_for([5], [6, 7], [8], [5, 9])
  target = 60 * jax.random.uniform(jax.random.key(2), (4, 96, 96)) / 96 ** 2

  def density_and_grads(params, x, ids, target):
    def loss(trainable):
      density = model.apply({"params": {**params, **trainable}}, x, ids)["density"]
      return density_losses.density_mse(density, target), density
    trainable = {k: v for k, v in params.items() if k != "backbone"}
    (_, density), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    return density, grads

  batch = lambda ndim: sharding.batch_sharding(mesh, ndim)
  sharded = jit(density_and_grads, in_shardings=(shardings, batch(4), batch(2), batch(3)),
                out_shardings=(batch(3), trainable_shardings))
  got_density, got = sharded(jax.device_put(params, shardings), x, ids, target)
  want_density, want = jit(density_and_grads)(params, x, ids, target)
  np.testing.assert_allclose(got_density, want_density, atol=1e-5)
  assert got["prompts"]["tokens"].sharding.spec == trainable_shardings["prompts"]["tokens"].spec
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # Every layer's prompts and the context get a gradient (CLIP-Count's indexing never used
  # its last layer's prompts).
  per_layer = jnp.abs(want["prompts"]["tokens"]).sum(axis=(1, 2))
  assert per_layer.shape == (2,) and bool(jnp.all(per_layer > 0)), per_layer
  assert float(jnp.abs(want["context"]).sum()) > 0
