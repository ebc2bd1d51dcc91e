"""CLIP in Flax linen, with the parameter tree of Hugging Face's FlaxCLIPModel.

Parameter paths match HF exactly (`vision_model/encoder/layers/0/self_attn/q_proj/kernel`,
`vision_model/pre_layrnorm`, `visual_projection/kernel`, `logit_scale`, ...), so HF
`flax_model.msgpack` files load as they are and PyTorch `model.safetensors` convert by rule
(models/hf.py). Pixels are NHWC. Params carry logical axis names for the sharding rules:

  vocab, embed (tower width), heads (attention features), mlp, proj (joint embedding), norm.

Embeddings returned by `encode_image` / `encode_text` are projected and unnormalised, like HF's
`get_image_features` / `get_text_features`, and always float32 whatever the compute dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 49408
  context_length: int = 77  # HF max_position_embeddings
  width: int = 512
  depth: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  act: str = "quick_gelu"
  eos_token_id: int = 49407  # 2 means HF's legacy rule: pool at argmax(input_ids)
  layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  act: str = "quick_gelu"
  num_channels: int = 3
  layer_norm_eps: float = 1e-5

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  projection_dim: int = 512
  logit_scale_init: float = math.log(1 / 0.07)

  def __post_init__(self):
    for name, tower in (("text", self.text), ("vision", self.vision)):
      if tower.width % tower.heads:
        raise ValueError(f"{name} width {tower.width} is not divisible by heads {tower.heads}")
      if tower.act not in ACTIVATIONS:
        raise ValueError(f"{name} act {tower.act!r} is not one of {sorted(ACTIVATIONS)}")
    if self.vision.image_size % self.vision.patch_size:
      raise ValueError(f"image_size {self.vision.image_size} is not a multiple of patch_size "
                       f"{self.vision.patch_size}")


def _text(width, depth, heads, **kw):
  return TextConfig(width=width, depth=depth, heads=heads, mlp_dim=4 * width, **kw)


def _vision(image, patch, width, depth, heads, **kw):
  return VisionConfig(image_size=image, patch_size=patch, width=width, depth=depth, heads=heads,
                      mlp_dim=4 * width, **kw)


# The OpenAI CLIP ViTs (the architectures behind the hub ids in configs/), and tiny test sizes.
ARCHITECTURES = {
    "b32": CLIPConfig(_text(512, 12, 8), _vision(224, 32, 768, 12, 12), 512),
    "b16": CLIPConfig(_text(512, 12, 8), _vision(224, 16, 768, 12, 12), 512),
    "l14": CLIPConfig(_text(768, 12, 12), _vision(224, 14, 1024, 24, 16), 768),
    "l14_336": CLIPConfig(_text(768, 12, 12), _vision(336, 14, 1024, 24, 16), 768),
    # The CPU demo's model (~1.7M params): 64 px images of the synthetic counting world.
    "demo": CLIPConfig(_text(128, 4, 4, vocab_size=1000, context_length=16, eos_token_id=999),
                       _vision(64, 8, 128, 4, 4), 128),
    "tiny": CLIPConfig(_text(64, 2, 2, vocab_size=1000, context_length=16, eos_token_id=999),
                       _vision(64, 16, 96, 2, 3), 48),
}


def _init(std, names):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


_zeros = lambda *names: nn.with_logical_partitioning(nn.initializers.zeros_init(), names)
_ones = lambda *names: nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def attention_implementation(dtype, head_dim: int, masked: bool) -> str | None:
  """`jax.nn.dot_product_attention`'s implementation for this backend: cuDNN's fused kernel on
  a GPU where it applies (16-bit inputs, head_dim a multiple of 8 up to 128, no mask beyond the
  causal one), XLA's (None) everywhere else, the CPU included."""
  if (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128 and not masked):
    return "cudnn"
  return None


def constrain(x, names: tuple[str | None, ...]):
  """Pins activation `x`'s sharding by logical names, one per dimension ("batch", "length",
  "act_embed", "act_heads", "act_mlp"), where the caller set a mesh and logical rules
  (sharding.activation_sharding: the train step); elsewhere (evals, export, tests) a no-op. A
  dimension its mesh axes do not divide (an odd micro-batch) is left to XLA."""
  rules, mesh = nn.get_logical_axis_rules(), jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  axes = []
  for dim, axis in zip(x.shape, nn.logical_to_mesh_axes(names, rules)):
    size = math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))
                     if a is not None)
    axes.append(axis if axis is not None and dim % size == 0 else None)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*axes))


def fused_attention(q, k, v, mask, causal):
  """Attention over (B, T, heads, head_dim) with the backend's best kernel; jax checks cuDNN's
  constraints (version, layout, sizes) when it traces, and what it refuses runs on XLA's."""
  implementation = attention_implementation(q.dtype, q.shape[-1], mask is not None)
  if implementation is not None:
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                          implementation=implementation)
    except (NotImplementedError, ValueError, RuntimeError):
      pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)


class Attention(nn.Module):
  """HF CLIPAttention: q/k/v/out projections with biases, queries scaled by head_dim**-0.5.

  explain: compute the softmax probabilities explicitly (B, heads, N, N), add the zero
    perturbation 'attn_probs' to them (grads w.r.t. the 'perturbations' collection are then
    d out / d probs) and sow them in 'intermediates', for relevancy maps (explain.py). Off,
    `fused_attention` runs and no probabilities exist.
  """
  width: int
  heads: int
  depth: int  # of the tower, for the init scale
  dtype: Dtype
  param_dtype: Dtype
  explain: bool = False

  @nn.compact
  def __call__(self, x, mask=None, causal=False, query_at=None):
    """query_at: (B,) one query position per example, whose output alone is returned,
    (B, 1, width); every position is still a key and value (the causal mask then admits the
    keys up to the query's position)."""
    head_dim = self.width // self.heads
    in_std = self.width ** -0.5 * (2 * self.depth) ** -0.5

    def dense(name, std, out_names):
      return nn.Dense(self.width, name=name, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=_init(std, out_names), bias_init=_zeros(out_names[1]))

    heads = ("batch", "length", "act_heads", None)
    split = lambda t: constrain(t.reshape(t.shape[:-1] + (self.heads, head_dim)), heads)
    queries = x
    if query_at is not None:
      queries = take_positions(x, query_at)
      if causal:
        keep = jnp.arange(x.shape[1])[None, :] <= query_at[:, None]
        keep = keep[:, None, None, :]
        mask, causal = keep if mask is None else mask & keep, False
    q = split(dense("q_proj", in_std, ("embed", "heads"))(queries))
    k = split(dense("k_proj", in_std, ("embed", "heads"))(x))
    v = split(dense("v_proj", in_std, ("embed", "heads"))(x))
    if self.explain:
      y = self._explicit(q, k, v, mask, causal)
    else:
      y = fused_attention(q, k, v, mask, causal)
    y = constrain(y, heads).reshape(y.shape[:-2] + (self.width,))
    return dense("out_proj", self.width ** -0.5, ("heads", "embed"))(y)

  def _explicit(self, q, k, v, mask, causal):
    """dot_product_attention's XLA path written out (same scale, masks, f32 softmax), so the
    probabilities are a value we can perturb and sow."""
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    logits *= q.shape[-1] ** -0.5
    keep = jnp.ones(logits.shape[-2:], bool) if mask is None else mask
    if causal:
      keep = keep & jnp.tril(jnp.ones(logits.shape[-2:], bool))
    # jax's own large negative: masked probabilities come out exactly 0, as there and in HF.
    logits = jnp.where(keep, logits, -0.7 * jnp.finfo(logits.dtype).max)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = self.perturb("attn_probs", probs)
    self.sow("intermediates", "attn_probs", probs)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


class MLP(nn.Module):
  width: int
  mlp_dim: int
  depth: int
  act: str
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(self.mlp_dim, name="fc1", kernel_init=_init((2 * self.width) ** -0.5,
                 ("embed", "mlp")), bias_init=_zeros("mlp"), **kw)(x)
    x = constrain(ACTIVATIONS[self.act](x), ("batch", "length", "act_mlp"))
    std = self.width ** -0.5 * (2 * self.depth) ** -0.5
    return nn.Dense(self.width, name="fc2", kernel_init=_init(std, ("mlp", "embed")),
                    bias_init=_zeros("embed"), **kw)(x)


def _layer_norm(name, eps, dtype, param_dtype):
  return nn.LayerNorm(epsilon=eps, name=name, dtype=dtype, param_dtype=param_dtype,
                      scale_init=_ones("norm"), bias_init=_zeros("norm"))


RESIDUAL = ("batch", "length", "act_embed")  # the residual stream between layers


def take_positions(x, positions):
  """(B, T, D) -> (B, 1, D): each example's token at its position."""
  return jnp.take_along_axis(x, positions[:, None, None], axis=1)


class EncoderLayer(nn.Module):
  """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  cfg: TextConfig | VisionConfig
  dtype: Dtype
  param_dtype: Dtype
  explain: bool = False  # see Attention

  @nn.compact
  def __call__(self, x, mask, causal, pooled_at=None):
    """pooled_at: (B,) positions whose outputs alone are computed, (B, 1, width): the last
    layer where only the pooled token is read (see Encoder)."""
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = constrain(x, RESIDUAL)
    h = _layer_norm("layer_norm1", c.layer_norm_eps, **kw)(x)
    if pooled_at is not None:
      x = take_positions(x, pooled_at)
    x = x + Attention(c.width, c.heads, c.depth, name="self_attn", explain=self.explain,
                      **kw)(h, mask, causal, pooled_at)
    h = _layer_norm("layer_norm2", c.layer_norm_eps, **kw)(x)
    return constrain(x + MLP(c.width, c.mlp_dim, c.depth, c.act, name="mlp", **kw)(h), RESIDUAL)


# model.remat: False, True (each layer keeps only its input: least memory, one more forward), or
# a jax.checkpoint_policies name, e.g. "dots_with_no_batch_dims_saveable" (keeps the weight
# matmuls' outputs: less recompute for more memory).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


def remat_layer(layer_cls, remat: bool | str):
  """`layer_cls`, rematerialised as `remat` says (see REMAT_POLICIES); its 4th call argument
  (causal) is static."""
  if not remat:
    return layer_cls
  name = "nothing_saveable" if remat is True else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat must be a bool or one of {REMAT_POLICIES}, got {remat!r}")
  return nn.remat(layer_cls, static_argnums=(3,), policy=getattr(jax.checkpoint_policies, name))


class LayerCollection(nn.Module):
  """The `layers/0 ... layers/N-1` level of HF's tree; optional rematerialisation per layer."""
  cfg: TextConfig | VisionConfig
  dtype: Dtype
  param_dtype: Dtype
  remat: bool | str = False  # see REMAT_POLICIES
  explain: bool = False  # see Attention

  @nn.compact
  def __call__(self, x, mask=None, causal=False, pooled_at=None):
    layer_cls = remat_layer(EncoderLayer, self.remat)
    for i in range(self.cfg.depth):
      last = i == self.cfg.depth - 1
      x = layer_cls(self.cfg, self.dtype, self.param_dtype, self.explain,
                    name=str(i))(x, mask, causal, pooled_at if last else None)
    return x


def scanned_layers(cfg, dtype, param_dtype, remat: bool | str, x, mask, causal):
  """The encoder's layers as one `nn.scan` over a (rematerialised) EncoderLayer: one layer body
  is traced and compiled whatever the depth. Params are stacked, `layers/<name>` with a leading
  `layers` axis of size depth (models/hf.py converts to and from HF's `layers/{i}`)."""
  def body(layer, h, m):
    return layer(h, m, causal), None

  scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(nn.broadcast,), length=cfg.depth,
                 metadata_params={nn.PARTITION_NAME: "layers"})
  layer = remat_layer(EncoderLayer, remat)(cfg, dtype, param_dtype, name="layers")
  return scan(layer, x, mask)[0]


class Encoder(nn.Module):
  cfg: TextConfig | VisionConfig
  dtype: Dtype
  param_dtype: Dtype
  remat: bool | str = False  # see REMAT_POLICIES
  explain: bool = False  # see Attention
  scan_layers: bool = False  # see scanned_layers

  @nn.compact
  def __call__(self, x, mask=None, causal=False, pooled_at=None):
    """The layers' output, (B, T, width); with pooled_at ((B,) positions) only those tokens',
    (B, width). The last layer then runs its queries, attention output and MLP for the pooled
    tokens alone (keys and values still come from every token): the same numbers, and where
    only the pooled token is read (encode_image, encode_text) 5/6 of a layer's matmuls fewer
    per tower, a fifth of the demo's 4-layer towers. Under scan_layers every token is computed
    and the pooled ones taken."""
    if self.scan_layers:
      if self.explain:
        raise ValueError("explain needs the per-layer layout: clone with scan_layers=False and "
                         "convert the params with models.hf.unstack_layers")
      x = scanned_layers(self.cfg, self.dtype, self.param_dtype, self.remat, x, mask, causal)
      return x if pooled_at is None else take_positions(x, pooled_at)[:, 0]
    x = LayerCollection(self.cfg, self.dtype, self.param_dtype, self.remat, self.explain,
                        name="layers")(x, mask, causal, pooled_at)
    return x if pooled_at is None else x[:, 0]


class TextEmbeddings(nn.Module):
  cfg: TextConfig
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, input_ids):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = nn.Embed(c.vocab_size, c.width, name="token_embedding",
                      embedding_init=_init(0.02, ("vocab", "embed")), **kw)(input_ids)
    positions = nn.Embed(c.context_length, c.width, name="position_embedding",
                         embedding_init=_init(0.02, (None, "embed")), **kw)
    return tokens + positions(jnp.arange(input_ids.shape[-1]))[None]


class TextTransformer(nn.Module):
  cfg: TextConfig
  dtype: Dtype
  param_dtype: Dtype
  remat: bool | str = False  # see REMAT_POLICIES
  explain: bool = False  # see Attention
  scan_layers: bool = False  # see scanned_layers

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, states=False):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if input_ids.shape[-1] > c.context_length:
      raise ValueError(f"input_ids length {input_ids.shape[-1]} exceeds the model's context "
                       f"length {c.context_length}")
    x = TextEmbeddings(c, name="embeddings", **kw)(input_ids)
    mask = None
    if attention_mask is not None:  # padding keys are masked; the causal mask is added inside.
      mask = attention_mask.astype(bool)[:, None, None, :]
    # Every token's state for text_states and for explain (whose relevancy reads every
    # layer's full attention); otherwise the last layer computes the eos token's alone.
    pooled, eos_pos = not (states or self.explain), eot_positions(input_ids, c.eos_token_id)
    x = Encoder(c, remat=self.remat, explain=self.explain, scan_layers=self.scan_layers,
                name="encoder", **kw)(x, mask, True, eos_pos if pooled else None)
    x = _layer_norm("final_layer_norm", c.layer_norm_eps, **kw)(x)
    if states:  # every token's state (CLIP.text_states), not the eos-pooled one
      return x
    return x if pooled else take_positions(x, eos_pos)[:, 0]


def eot_positions(input_ids, eos_token_id: int):
  """The position each caption is pooled at, as HF does: the first eos (padding may also be
  eos), or for HF's legacy configs (eos_token_id 2) the largest id, which is eos."""
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class VisionEmbeddings(nn.Module):
  cfg: VisionConfig
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, pixels):
    c = self.cfg
    if pixels.shape[1:] != (c.image_size, c.image_size, c.num_channels):
      raise ValueError(f"pixels must be NHWC (B, {c.image_size}, {c.image_size}, "
                       f"{c.num_channels}), got {pixels.shape}")
    patches = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=c.patch_size,
                      padding="VALID", use_bias=False, name="patch_embedding", dtype=self.dtype,
                      param_dtype=self.param_dtype,
                      kernel_init=_init(0.02, (None, None, None, "embed")))(pixels)
    patches = patches.reshape(patches.shape[0], c.num_patches, c.width)  # (B may be 0)
    cls = self.param("class_embedding", _init(c.width ** -0.5, ("embed",)), (c.width,),
                     self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, c.width))
    x = jnp.concatenate([cls, patches], axis=1)
    positions = nn.Embed(c.num_patches + 1, c.width, name="position_embedding",
                         embedding_init=_init(0.02, (None, "embed")), dtype=self.dtype,
                         param_dtype=self.param_dtype)
    return x + positions(jnp.arange(c.num_patches + 1))[None]


class VisionTransformer(nn.Module):
  cfg: VisionConfig
  dtype: Dtype
  param_dtype: Dtype
  remat: bool | str = False  # see REMAT_POLICIES
  explain: bool = False  # see Attention
  scan_layers: bool = False  # see scanned_layers

  @nn.compact
  def __call__(self, pixels):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = VisionEmbeddings(c, name="embeddings", **kw)(pixels.astype(self.dtype))
    x = _layer_norm("pre_layrnorm", c.layer_norm_eps, **kw)(x)  # sic: HF's name
    pooled = not self.explain  # as in TextTransformer; the class token is at position 0
    x = Encoder(c, remat=self.remat, explain=self.explain, scan_layers=self.scan_layers,
                name="encoder", **kw)(x, None, False,
                                      jnp.zeros(x.shape[:1], jnp.int32) if pooled else None)
    return _layer_norm("post_layernorm", c.layer_norm_eps, **kw)(x if pooled else x[:, 0])


class Output(NamedTuple):
  image_embeds: jax.Array  # (B, P) projected, unnormalised
  text_embeds: jax.Array  # (T, P)
  logits_per_image: jax.Array  # (B, T) = exp(logit_scale) * cos


class CLIP(nn.Module):
  """CLIP with HF FlaxCLIPModel parameter names. bf16 compute: dtype=jnp.bfloat16."""
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool | str = False  # see REMAT_POLICIES
  # Explicit attention probabilities, perturbed and sown (see Attention); explain.py sets it
  # on a clone. Training and eval keep the fused attention.
  explain: bool = False
  # The encoder layers under nn.scan with stacked params (scanned_layers): compile time flat in
  # depth, the usual layout on TPU. Checkpoints in and out keep HF's per-layer names
  # (models/hf.py converts at load and export).
  scan_layers: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
              explain=self.explain, scan_layers=self.scan_layers)
    self.text_model = TextTransformer(c.text, **kw)
    self.vision_model = VisionTransformer(c.vision, **kw)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda width: dict(use_bias=False, kernel_init=_init(width ** -0.5, ("embed", "proj")))
    self.visual_projection = nn.Dense(c.projection_dim, **proj(c.vision.width), **kw)
    self.text_projection = nn.Dense(c.projection_dim, **proj(c.text.width), **kw)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(
            c.logit_scale_init), ()), (), self.param_dtype)

  def encode_image(self, pixels):
    return self.visual_projection(self.vision_model(pixels)).astype(jnp.float32)

  def encode_text(self, input_ids, attention_mask=None):
    return self.text_projection(self.text_model(input_ids, attention_mask)).astype(jnp.float32)

  def text_states(self, input_ids, attention_mask=None):
    """(T, L, text width) per-token states after the final LayerNorm, unprojected: HF
    CLIPTextModel's last_hidden_state, what Stable Diffusion 1.x cross-attends to."""
    return self.text_model(input_ids, attention_mask, states=True).astype(jnp.float32)

  def __call__(self, pixels, input_ids, attention_mask=None) -> Output:
    image, text = self.encode_image(pixels), self.encode_text(input_ids, attention_mask)
    cos = normalize(image) @ normalize(text).T
    return Output(image, text, jnp.exp(self.logit_scale.astype(jnp.float32)) * cos)


def normalize(x, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def init_params(model: CLIP, rng: jax.Array):
  """Random params (unboxed, HF layout) for `model`."""
  c = model.config
  pixels = jnp.zeros((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels))
  ids = jnp.zeros((1, c.text.context_length), jnp.int32)
  return nn.unbox(model.init(rng, pixels, ids)["params"])


def param_shapes(model: CLIP):
  """The params' ShapeDtypeStructs, without allocating anything."""
  return jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))


def logical_axes(model: CLIP):
  """The logical axis names of every param (a tree of PartitionSpec), without allocating."""
  c = model.config
  pixels = jax.ShapeDtypeStruct((1, c.vision.image_size, c.vision.image_size,
                                 c.vision.num_channels), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, c.text.context_length), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), pixels, ids)["params"]
  return nn.get_partition_spec(boxed)
