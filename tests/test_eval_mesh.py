"""Evals over a mesh (countclip_jax/eval_mesh.py) on this process's 8 simulated devices: the
batch splits over the devices, fields come back in example order, and sharded params embed
exactly like params on the host. Two processes: tests/test_multihost.py."""
import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from countclip_jax import eval_mesh, evaluate, models, sharding
from countclip_jax.data import synthetic
from countclip_jax.text.tokenizer import build_tokenizer


def host_params():
  return {"w": np.ones((4, 3), np.float32)}


def test_host_params_are_replicated_over_the_local_devices_and_the_batch_rounded_up():
  mesh = eval_mesh.EvalMesh(host_params(), batch_size=30)
  assert mesh.mesh.devices.size == 8 and mesh.batch_size == 32 and mesh.block == (0, 1)
  assert mesh.params["w"].sharding.is_fully_replicated
  rows = mesh.place_everywhere(np.arange(32 * 2, dtype=np.float32).reshape(32, 2))
  assert [s.data.shape for s in rows.addressable_shards] == [(4, 2)] * 8  # no device has all
  np.testing.assert_array_equal(eval_mesh.local_rows(rows), np.arange(64).reshape(32, 2))
  assert mesh.round_up(1) == 8 and mesh.round_up(16) == 16


def test_gather_fields_orders_by_example_and_drops_padding():
  mesh = eval_mesh.EvalMesh(host_params(), batch_size=8)
  batch = {"example": np.array([3, 1, -1, 2]), "caption": np.array(["c", "a", "", "b"]),
           "valid": np.array([True, False, False, True])}
  fields = mesh.gather_fields(batch)
  assert fields["example"].tolist() == [1, 2, 3] and fields["caption"].tolist() == ["a", "b", "c"]
  assert fields["valid"].tolist() == [False, True, True]
  assert eval_mesh.gather_objects({"x": [1, "two"]}) == [{"x": [1, "two"]}]
  np.testing.assert_array_equal(
      eval_mesh.in_example_order(np.array([[30.], [10.], [0.], [20.]]), batch["example"],
                                 np.array([1, 2, 3])), [[10.], [20.], [30.]])


def test_batches_pad_the_last_one_and_say_which_rows_are_examples():
  mesh = eval_mesh.EvalMesh(host_params(), batch_size=8)
  dataset = [{"x": np.float32(i)} for i in range(11)]
  batches = list(mesh.batches(dataset, "test"))
  assert [b["example"].tolist() for b in batches] == [list(range(8)), [8, 9, 10, -1, -1, -1,
                                                                       -1, -1]]


@pytest.fixture(scope="module")
def tiny_clip():
  tokenizer = build_tokenizer(synthetic.vocabulary(), context_length=16)
  arch = models.ARCHITECTURES["tiny"]
  model = models.CLIP(dataclasses.replace(arch, text=dataclasses.replace(
      arch.text, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id)))
  return model, models.init_params(model, jax.random.key(0)), tokenizer


def test_params_sharded_over_fsdp_and_model_embed_like_params_on_the_host(tiny_clip):
  model, params, tokenizer = tiny_clip
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "model": 2}))
  shardings = sharding.param_shardings(mesh, models.logical_axes(model),
                                       jax.eval_shape(lambda: params))
  sharded = evaluate.Embedder(model, jax.device_put(params, shardings), tokenizer, batch_size=6)
  host = evaluate.Embedder(model, jax.device_get(params), tokenizer, batch_size=6)
  assert sharded.mesh.mesh is mesh and sharded.batch_size == 8  # data x fsdp = 4 batch devices
  assert any(not leaf.sharding.is_fully_replicated
             for leaf in jax.tree_util.tree_leaves(sharded.params))
  size = model.config.vision.image_size
  pixels = np.random.default_rng(0).normal(size=(11, size, size, 3)).astype(np.float32)
  texts = ["two red circles", "three blue stars", "a photo"]
  np.testing.assert_allclose(sharded.images(pixels), host.images(pixels), atol=1e-5)
  np.testing.assert_allclose(sharded.texts(texts), host.texts(texts), atol=1e-5)
  # The dataset stream: each batch's embeddings in example order, the same either way.
  dataset = [{"image": p, "valid": True} for p in pixels]
  emb, fields, skipped = evaluate.embedded_dataset(sharded, dataset, "test")
  assert fields["example"].tolist() == list(range(11)) and skipped == 0
  np.testing.assert_allclose(emb, host.images(pixels), atol=1e-5)
