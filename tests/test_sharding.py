"""sharding.py: mesh shapes from config, param shardings from logical axes."""
import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from countclip_jax import models, sharding


def mesh_config(data=-1, fsdp=1, model=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, model=model))


def test_eight_host_devices_are_simulated():
  assert jax.device_count() == 8  # conftest sets XLA_FLAGS before JAX starts


@pytest.mark.parametrize("cfg, expected", [
    ((-1, 1, 1), (8, 1, 1)), ((4, 2, 1), (4, 2, 1)), ((-1, 2, 2), (2, 2, 2)),
    ((1, -1, 1), (1, 8, 1))])
def test_mesh_shape(cfg, expected):
  assert sharding.mesh_shape(mesh_config(*cfg), 8) == expected
  assert tuple(sharding.make_mesh(mesh_config(*cfg)).shape.values()) == expected


@pytest.mark.parametrize("cfg, message", [
    ((-1, -1, 1), "At most one mesh axis may be -1"),
    ((3, -1, 1), "8 devices cannot be split"),
    ((2, 2, 1), "needs 4 devices, there are 8"),
    ((0, 1, 1), "positive or -1")])
def test_bad_mesh_configs(cfg, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(mesh_config(*cfg), 8)


def test_param_shardings_follow_the_rules_and_replicate_uneven_dims():
  model = models.CLIP(models.ARCHITECTURES["tiny"])  # vocab 1000, widths 64/96, mlp 256/384
  mesh = sharding.make_mesh(mesh_config(2, 2, 2))
  shardings = sharding.param_shardings(mesh, models.logical_axes(model),
                                       models.param_shapes(model))
  layer = shardings["vision_model"]["encoder"]["layers"]["0"]
  assert layer["mlp"]["fc1"]["kernel"].spec == P("fsdp", "model")
  assert layer["self_attn"]["out_proj"]["kernel"].spec == P("model", "fsdp")
  assert layer["layer_norm1"]["scale"].spec == P(None)
  assert shardings["logit_scale"].spec == P()
  embed = shardings["text_model"]["embeddings"]["token_embedding"]["embedding"]
  assert embed.spec == P("model", "fsdp")
  odd = models.CLIP(models.ARCHITECTURES["tiny"].__class__(
      text=models.ARCHITECTURES["tiny"].text.__class__(vocab_size=545, width=64, heads=2,
                                                       depth=1, mlp_dim=128, context_length=8),
      vision=models.ARCHITECTURES["tiny"].vision, projection_dim=48))
  odd_shardings = sharding.param_shardings(mesh, models.logical_axes(odd),
                                           models.param_shapes(odd))
  # 545 is not divisible by the model axis (2): that dimension is replicated instead.
  assert odd_shardings["text_model"]["embeddings"]["token_embedding"]["embedding"].spec == \
      P(None, "fsdp")
