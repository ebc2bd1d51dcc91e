"""sharding.py: mesh shapes from config, param shardings from logical axes."""
import dataclasses

import jax
import ml_collections
import numpy as np
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


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What mesh_utils reads of a TPU device of a multislice job."""
  id: int
  slice_index: int
  process_index: int
  platform: str = "cpu"  # (a "tpu" one would need its physical coords too)
  device_kind: str = "fake"


def test_a_multislice_mesh_crosses_slices_only_on_the_dcn_axis():
  devices = [FakeDevice(i, slice_index=i // 4, process_index=i // 2) for i in range(8)]
  cfg = ml_collections.ConfigDict(dict(data=2, fsdp=4, model=1, dcn_data=2))
  grid = sharding.device_grid(cfg, devices)
  assert grid.shape == (2, 4, 1)
  # Each data row is one slice: fsdp's all-gathers stay on ICI, one gradient reduce on DCN.
  assert [{d.slice_index for d in row.flat} for row in grid] == [{0}, {1}]
  assert sharding.device_grid(mesh_config(2, 4, 1), devices) is None  # one slice: make_mesh
  for bad, message in ((dict(dcn_data=3), "must be >= 1 and divide"),
                       (dict(dcn_data=0), "must be >= 1 and divide"),
                       (dict(dcn_data=2, dcn_fsdp=2), "Cannot lay out")):  # 4 slices, not 2
    with pytest.raises(ValueError, match=message):
      sharding.device_grid(ml_collections.ConfigDict(dict(data=2, fsdp=4, model=1, **bad)),
                           devices)


def test_activations_are_pinned_only_under_the_activation_rules():
  from countclip_jax.models import clip
  mesh = sharding.make_mesh(mesh_config(2, 2, 2))

  def f(x):
    return clip.constrain(x * 2, ("batch", "length", "act_mlp")).sum()

  x = np.ones((4, 3, 6), np.float32)
  plain = jax.jit(f).lower(x).as_text()
  with sharding.activation_sharding(mesh):
    pinned = jax.jit(f).lower(x).as_text()
    odd = jax.jit(f).lower(np.ones((3, 3, 5), np.float32)).as_text()  # nothing divides: left
  assert "sharding_constraint" not in plain
  # batch over data x fsdp, length replicated, the MLP dimension over model
  assert '[{"data", "fsdp"}, {}, {"model"}]' in pinned, pinned
  assert '[{}, {}, {}]' in odd, odd
