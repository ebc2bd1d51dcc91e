"""CLIP-Count (Jiang et al. 2023) in Flax: a frozen CLIP that predicts density maps for a prompt.

The params tree is `{"backbone": <CLIP's tree, HF layout>, "prompts", "context", "interaction",
"decoder"}`: `models.load_pretrained(...)` params drop into `backbone` unchanged
(`init_from_clip`) and `train.freeze='^backbone/'` freezes it. The towers are re-run here, from
clip.py's blocks under clip.py's names, because the method changes what flows through them:

  vision  pixels at the crop size (e.g. 384) -> bilinear resize to CLIP's size (224) -> CLIP's
          embeddings -> pre_layrnorm -> layers. Deep visual prompt tuning: the input of layer
          i < prompt_depth is [cls, prompts[i] (n tokens), patches], prompts[i] replacing
          the previous layer's prompt outputs; after the last prompted layer they are dropped,
          so later layers and the head see CLIP's own 1+N tokens. Prompts pass through one
          shared Linear + dropout, as in CLIP-Count; unlike CLIP-Count (prompt 0 used twice,
          the last never), layer i gets prompt i, and layer 0's join after pre_layrnorm like
          every other layer's (CLIP-Count puts them through ln_pre).
  text    [sos, context (learned, CoOp), class name..., eot, pad...] -> CLIP's text encoder ->
          final_layer_norm -> text_projection on every token. Pooling "eot" reads the true
          end-of-text (shifted by the inserted context); "clip_count" reads the eot position
          of the ids *before* insertion, CLIP-Count's argmax(ids): two tokens early, so a
          causal tower never sees the class name's end (one-token names all pool to the same
          state). The cross-attention keys are the tokens up to and including the pooled one.

Then a new LayerNorm on the patch tokens, two projections (decoder width; CLIP's joint space
for the patch-text contrastive loss), `blocks` interaction blocks (self-attention over patches,
cross-attention to the text, MLP; block i > 0 first does x + GELU(conv3x3(x)) and a 2x
bilinear upsample), and a conv decoder (conv3x3 -> GroupNorm -> GELU per stage, 2x upsample,
the last stage resizing to the input; a 1x1 conv skip from interaction block i into stage i;
1x1 conv; a non-negative activation). Density targets are Gaussian dots x scale (60).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from countclip_jax.models.clip import (ARCHITECTURES, CLIPConfig, Encoder, EncoderLayer,
                                       VisionEmbeddings, _init, _layer_norm, _ones, _zeros,
                                       eot_positions, fused_attention, normalize, remat_layer)

Dtype = Any

POOLINGS = ("eot", "clip_count")
CROSS_ATTENTIONS = ("tokens", "pooled")
ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "softplus": jax.nn.softplus}


@dataclasses.dataclass(frozen=True)
class DensityConfig:
  prompt_tokens: int = 20  # visual prompt tokens per prompted layer (0: no VPT)
  prompt_depth: int = 10  # vision layers with prompts, from the first
  context_tokens: int = 2  # learned text context after the start token (0: none)
  pooling: str = "eot"  # "eot" (true end-of-text) | "clip_count" (the bug, for the ablation)
  cross_attention: str = "tokens"  # "tokens" (text token states) | "pooled" (CLIP-Count's one)
  width: int = 512  # interaction width
  heads: int = 8
  mlp_dim: int = 2048
  blocks: int = 2  # interaction blocks; block i > 0 doubles the grid
  decoder_widths: tuple[int, ...] = (256, 128, 64, 32)
  norm_groups: int = 8  # GroupNorm groups in the decoder
  input_size: int = 384  # the crop the model takes; resized to CLIP's image_size inside
  output_activation: str = "sigmoid"  # sigmoid (CLIP-Count) | relu | softplus
  # Ours, 0 = off (CLIP-Count): a trainable conv pathway of this width on the input pixels
  # (3x3 conv, then a 3x3 conv and 2x average pooling), added into the last decoder stage, so
  # the decoder sees shapes finer than a backbone patch.
  pixel_width: int = 0
  dropout: float = 0.1  # on the prompts and in the interaction blocks (train=True only)

  def __post_init__(self):
    for name in ("prompt_tokens", "prompt_depth", "context_tokens"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling {self.pooling!r} is not one of {POOLINGS}")
    if self.cross_attention not in CROSS_ATTENTIONS:
      raise ValueError(f"cross_attention {self.cross_attention!r} is not one of "
                       f"{CROSS_ATTENTIONS}")
    if self.output_activation not in ACTIVATIONS:
      raise ValueError(f"output_activation {self.output_activation!r} is not one of "
                       f"{sorted(ACTIVATIONS)}")
    if self.width <= 0 or self.width % self.heads or self.width % 2:
      raise ValueError(f"width {self.width} must be even and divisible by heads {self.heads}")
    if not self.decoder_widths or any(w <= 0 or w % self.norm_groups
                                      for w in self.decoder_widths):
      raise ValueError(f"decoder_widths {self.decoder_widths} must be non-empty multiples of "
                       f"norm_groups {self.norm_groups}")
    if not 1 <= self.blocks <= len(self.decoder_widths):
      # block i feeds decoder stage i through a skip, so there can be no more blocks than stages.
      raise ValueError(f"blocks must be in 1..{len(self.decoder_widths)} (decoder stages), "
                       f"got {self.blocks}")
    if self.pixel_width < 0 or self.pixel_width % self.norm_groups:
      raise ValueError(f"pixel_width {self.pixel_width} must be 0 or a positive multiple of "
                       f"norm_groups {self.norm_groups}")
    if self.input_size <= 0 or self.mlp_dim <= 0:
      raise ValueError(f"input_size and mlp_dim must be positive, got {self.input_size}, "
                       f"{self.mlp_dim}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

  def check(self, clip: CLIPConfig) -> None:
    """What depends on the backbone too."""
    if self.prompt_tokens and self.prompt_depth > clip.vision.depth:
      raise ValueError(f"prompt_depth {self.prompt_depth} exceeds the vision depth "
                       f"{clip.vision.depth}")
    if self.context_tokens + 3 > clip.text.context_length:
      raise ValueError(f"context_tokens {self.context_tokens} leave no room for sos, a token "
                       f"and eot in context length {clip.text.context_length}")


# CLIP-Count's model on ViT-B/16 (`ARCHITECTURES["b16"]`), minus its bugs.
CLIP_COUNT = DensityConfig()
# Seconds on a CPU, with `ARCHITECTURES["tiny"]` (64 px, 16 px patches: a 4x4 grid).
TINY = DensityConfig(prompt_tokens=2, prompt_depth=2, context_tokens=2, width=32, heads=2,
                     mlp_dim=64, decoder_widths=(16, 16, 8, 8), input_size=96)
# The CPU demo's head, on `ARCHITECTURES["demo"]` (64 px, 8 px patches: an 8x8 grid); prompts in
# every layer of its 4. ReLU out: a sigmoid caps each pixel at 1, and 50 dots x 60 need ~3000 of
# the 4096 pixels' mass (it undercounted, 15 of 25 objects on average). Two heads and three
# decoder stages (the last resizes 32 -> 64 px): a step 1.4x faster than four and four at batch
# 32, the 16x16 self-attention of block 1 being the costliest part (benchmarks/density_step.py).
DEMO = DensityConfig(prompt_tokens=4, prompt_depth=4, context_tokens=2, width=64, heads=2,
                     mlp_dim=128, decoder_widths=(32, 32, 16), input_size=64,
                     output_activation="relu")
PRESETS = {"clip_count": ("b16", CLIP_COUNT), "demo": ("demo", DEMO), "tiny": ("tiny", TINY)}


class TextFeatures(NamedTuple):
  """The text side, from `DensityCounter.encode_text`; leading dims (...) as the ids'."""
  states: jax.Array  # (..., S, P) projected token states (cross-attention keys)
  mask: jax.Array  # (..., S) bool, which states are keys (up to the pooled token)
  embed: jax.Array  # (..., P) the pooled, projected embedding, float32


def ensemble_templates(text: TextFeatures) -> TextFeatures:
  """One text per image from T templates ("a photo of {}.", "{} in the wild", ...).

  The template axis is the one just before the sequence axis: ids (B, T, L) ->
  `encode_text` -> this -> `__call__(pixels, text=...)`. The pooled embedding is CLIP's prompt
  ensemble, the mean of the normalised embeddings, renormalised, at the templates' mean norm
  (the pooled key is unnormalised, so its scale is kept); the keys are the union of the
  templates' tokens (one cross-attention over all of them).
  """
  states = text.states.reshape(text.states.shape[:-3] + (-1, text.states.shape[-1]))
  mask = text.mask.reshape(text.mask.shape[:-2] + (-1,))
  norm = jnp.mean(jnp.linalg.norm(text.embed, axis=-1), axis=-1, keepdims=True)
  embed = normalize(jnp.mean(normalize(text.embed), axis=-2)) * norm
  return TextFeatures(states, mask, embed)


# ----------------------------------------------------------------------------- backbone

class _TextEmbeddings(nn.Module):
  """clip.TextEmbeddings' params, with the context inserted between the two lookups."""
  cfg: Any
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, input_ids, context):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(c.vocab_size, c.width, name="token_embedding",
                 embedding_init=_init(0.02, ("vocab", "embed")), **kw)(input_ids)
    if context is not None:
      ctx = jnp.broadcast_to(context.astype(x.dtype), (x.shape[0],) + context.shape)
      x = jnp.concatenate([x[:, :1], ctx, x[:, 1:]], axis=1)[:, :c.context_length]
    positions = nn.Embed(c.context_length, c.width, name="position_embedding",
                         embedding_init=_init(0.02, (None, "embed")), **kw)
    return x + positions(jnp.arange(x.shape[1]))[None]


class _TextTower(nn.Module):
  """clip.TextTransformer's params; returns every token's state and where to pool."""
  cfg: Any
  pooling: str
  dtype: Dtype
  param_dtype: Dtype
  remat: bool | str = False  # see clip.REMAT_POLICIES

  @nn.compact
  def __call__(self, input_ids, attention_mask, context):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if input_ids.shape[-1] > c.context_length:
      raise ValueError(f"input_ids length {input_ids.shape[-1]} exceeds the model's context "
                       f"length {c.context_length}")
    n = 0 if context is None else context.shape[0]
    x = _TextEmbeddings(c, name="embeddings", **kw)(input_ids, context)
    length = x.shape[1]  # ids + context, cut to the context length (the cut tail is padding)
    mask = None
    if attention_mask is not None:
      keep = attention_mask.astype(bool)
      keep = jnp.concatenate([keep[:, :1], jnp.ones((keep.shape[0], n), bool), keep[:, 1:]],
                             axis=1)[:, :length]
      mask = keep[:, None, None, :]
    x = Encoder(c, remat=self.remat, name="encoder", **kw)(x, mask, causal=True)
    x = _layer_norm("final_layer_norm", c.layer_norm_eps, **kw)(x)
    eos = eot_positions(input_ids, c.eos_token_id)
    # "clip_count" reads the eot slot of the ids before the context went in.
    pos = jnp.minimum(eos + (n if self.pooling == "eot" else 0), length - 1)
    return x, pos


class _PromptedLayers(nn.Module):
  """clip.LayerCollection's params (`layers/{i}`), with deep visual prompts."""
  cfg: Any
  dtype: Dtype
  param_dtype: Dtype
  remat: bool | str = False  # see clip.REMAT_POLICIES

  @nn.compact
  def __call__(self, x, prompts):
    layer_cls = remat_layer(EncoderLayer, self.remat)
    depth, n = (0, 0) if prompts is None else prompts.shape[:2]
    cls_and_patches = lambda x, m: jnp.concatenate([x[:, :1], x[:, 1 + m:]], axis=1)
    for i in range(self.cfg.depth):
      if i < depth:  # layer i's prompts replace what layer i-1 made of its own
        p = jnp.broadcast_to(prompts[i].astype(x.dtype), (x.shape[0], n, x.shape[-1]))
        x = jnp.concatenate([x[:, :1], p, x[:, 1 + (n if i else 0):]], axis=1)
      elif i == depth and n:
        x = cls_and_patches(x, n)
      x = layer_cls(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=str(i))(x, None, False)
    return cls_and_patches(x, n) if depth == self.cfg.depth and n else x


class _PromptedEncoder(nn.Module):
  cfg: Any
  dtype: Dtype
  param_dtype: Dtype
  remat: bool | str = False  # see clip.REMAT_POLICIES

  @nn.compact
  def __call__(self, x, prompts):
    return _PromptedLayers(self.cfg, self.dtype, self.param_dtype, self.remat,
                           name="layers")(x, prompts)


class _VisionTower(nn.Module):
  """clip.VisionTransformer's params; returns the last tokens (prompts dropped) and the head."""
  cfg: Any
  dtype: Dtype
  param_dtype: Dtype
  remat: bool | str = False  # see clip.REMAT_POLICIES

  @nn.compact
  def __call__(self, pixels, prompts):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = VisionEmbeddings(c, name="embeddings", **kw)(pixels.astype(self.dtype))
    x = _layer_norm("pre_layrnorm", c.layer_norm_eps, **kw)(x)  # sic: HF's name
    x = _PromptedEncoder(c, remat=self.remat, name="encoder", **kw)(x, prompts)
    return x, _layer_norm("post_layernorm", c.layer_norm_eps, **kw)(x[:, 0])


class _Backbone(nn.Module):
  """Exactly clip.CLIP's parameter tree, run the CLIP-Count way."""
  config: CLIPConfig
  pooling: str
  dtype: Dtype
  param_dtype: Dtype
  remat: bool | str = False  # see clip.REMAT_POLICIES

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.text_model = _TextTower(c.text, self.pooling, remat=self.remat, **kw)
    self.vision_model = _VisionTower(c.vision, remat=self.remat, **kw)
    proj = lambda width: dict(use_bias=False, kernel_init=_init(width ** -0.5, ("embed", "proj")))
    self.visual_projection = nn.Dense(c.projection_dim, **proj(c.vision.width), **kw)
    self.text_projection = nn.Dense(c.projection_dim, **proj(c.text.width), **kw)
    # Unused here; kept so that the tree is CLIP's (and a fine-tuned backbone exports as CLIP).
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(
            c.logit_scale_init), ()), (), self.param_dtype)

  def image(self, pixels, prompts):
    tokens, cls = self.vision_model(pixels, prompts)
    return tokens, self.visual_projection(cls).astype(jnp.float32)

  def text(self, input_ids, attention_mask, context):
    states, pos = self.text_model(input_ids, attention_mask, context)
    states = self.text_projection(states)
    embed = jnp.take_along_axis(states, pos[:, None, None], axis=1)[:, 0]
    mask = jnp.arange(states.shape[1])[None] <= pos[:, None]
    return TextFeatures(states, mask, embed.astype(jnp.float32))


# ----------------------------------------------------------------------------- head

def _dense(features, names, name, kw):
  init = nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names)
  return nn.Dense(features, name=name, kernel_init=init, bias_init=_zeros(names[-1]), **kw)


def _conv(features, size, names, name, kw):
  # No kernel here shards its input channels over fsdp and its outputs over model: XLA's SPMD
  # partitioner (jax 0.10.2, CPU) gets the input gradient of such a conv wrong when the batch
  # is split over fsdp too (tests/test_density_model.py's sharded test catches it).
  init = nn.with_logical_partitioning(nn.initializers.xavier_normal(), (None, None) + names)
  return nn.Conv(features, (size, size), padding="SAME", name=name, kernel_init=init,
                 bias_init=_zeros(names[-1]), **kw)


def _upsample(x, shape):
  return jax.image.resize(x, (x.shape[0],) + tuple(shape) + (x.shape[-1],), "bilinear")


def _sincos_1d(width, length):
  """CLIP-Count's fixed 1-D sin-cos position code of the patch sequence."""
  pos = np.arange(length)[:, None]
  freq = np.exp(np.arange(0, width, 2) * -(np.log(10000.0) / width))
  code = np.zeros((length, width), np.float32)
  code[:, 0::2], code[:, 1::2] = np.sin(pos * freq), np.cos(pos * freq)
  return code


class _VisualPrompts(nn.Module):
  depth: int
  tokens: int
  width: int
  patch_size: int
  dropout: float
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, train):
    # VPT's init (uniform, Xavier-like over the patch embedding's fan) and CLIP-Count's
    # shared projection (kaiming normal, fan out).
    bound = (6.0 / (3 * self.patch_size ** 2 + self.width)) ** 0.5
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    tokens = self.param("tokens", nn.with_logical_partitioning(uniform, (None, None, "embed")),
                        (self.depth, self.tokens, self.width), self.param_dtype)
    proj = nn.Dense(self.width, name="proj", dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        ("mlp", "embed")), bias_init=_zeros("embed"))
    return nn.Dropout(self.dropout)(proj(tokens), deterministic=not train)


class _Attention(nn.Module):
  """Multi-head attention of x (queries) over y (keys and values), with biases."""
  width: int
  heads: int
  kv_axis: str
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x, y, mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.width // self.heads))
    q = split(_dense(self.width, ("embed", "heads"), "q_proj", kw)(x))
    k = split(_dense(self.width, (self.kv_axis, "heads"), "k_proj", kw)(y))
    v = split(_dense(self.width, (self.kv_axis, "heads"), "v_proj", kw)(y))
    out = fused_attention(q, k, v, mask, False)
    return _dense(self.width, ("heads", "embed"), "out_proj", kw)(
        out.reshape(out.shape[:-2] + (self.width,)))


class _Block(nn.Module):
  """CLIP-Count's ConvCrossAttentionBlock: [conv + 2x up,] self-attn, cross-attn, MLP."""
  cfg: DensityConfig
  upsample: bool
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x, keys, key_mask, train):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gelu = functools.partial(jax.nn.gelu, approximate=False)  # torch's nn.GELU
    drop = lambda h: nn.Dropout(c.dropout)(h, deterministic=not train)
    if self.upsample:  # (B, h, w, C) -> (B, 2h, 2w, C)
      x = x + gelu(_conv(c.width, 3, (None, "embed"), "conv", kw)(x))
      x = _upsample(x, (2 * x.shape[1], 2 * x.shape[2]))
    b, h, w, _ = x.shape
    x = x.reshape(b, h * w, c.width)
    attn = lambda name, kv_axis: _Attention(c.width, c.heads, kv_axis, name=name, **kw)
    y = _layer_norm("norm0", 1e-5, **kw)(x)
    x = x + drop(attn("self_attn", "embed")(y, y))
    y = _layer_norm("norm1", 1e-5, **kw)(x)
    x = x + drop(attn("cross_attn", "proj")(y, keys, key_mask[:, None, None, :]))
    y = _layer_norm("norm2", 1e-5, **kw)(x)
    y = drop(gelu(_dense(c.mlp_dim, ("embed", "mlp"), "fc1", kw)(y)))
    x = x + drop(_dense(c.width, ("mlp", "embed"), "fc2", kw)(y))
    return x.reshape(b, h, w, c.width)


class _Interaction(nn.Module):
  """Patch tokens -> (per-block grids for the decoder, patch embeddings for the contrast)."""
  cfg: DensityConfig
  projection_dim: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, tokens, keys, key_mask, train):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, _ = tokens.shape
    side = int(round(n ** 0.5))
    # The new LayerNorm in place of ln_post (CLIP-Count's vpt_norm, eps 1e-6).
    tokens = _layer_norm("patch_norm", 1e-6, **kw)(tokens)
    contrast = _dense(self.projection_dim, ("embed", "proj"), "contrast_proj", kw)(tokens)
    x = _dense(c.width, (None, "embed"), "patch_proj", kw)(tokens)
    x = x + jnp.asarray(_sincos_1d(c.width, n), x.dtype)[None]
    # K prompts per image: the text batch is B*K; the vision work was done once per image.
    x = jnp.repeat(x, keys.shape[0] // b, axis=0).reshape(-1, side, side, c.width)
    grids = []
    for i in range(c.blocks):
      x = _Block(c, upsample=i > 0, name=f"block_{i}", **kw)(x, keys, key_mask, train)
      grids.append(x)
    return grids, contrast.astype(jnp.float32)


class _Decoder(nn.Module):
  cfg: DensityConfig
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, grids, out_shape, pixels=None):
    """pixels: (B, H, W, 3) the input, when cfg.pixel_width (grids hold B*K maps)."""
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gelu = functools.partial(jax.nn.gelu, approximate=False)
    norm = lambda name: nn.GroupNorm(c.norm_groups, epsilon=1e-5, name=name,
                                     scale_init=_ones("norm"), bias_init=_zeros("norm"), **kw)
    x = grids[0]
    last_stage = len(c.decoder_widths) - 1
    for s, width in enumerate(c.decoder_widths):
      if 0 < s < len(grids):  # the finer interaction output, at this stage's resolution
        x = x + gelu(norm(f"skip_{s}_norm")(_conv(x.shape[-1], 1, (None, "mlp"),
                                                  f"skip_{s}", kw)(grids[s])))
      if c.pixel_width and s == last_stage:  # once per image, then one copy per prompt
        p = gelu(_conv(c.pixel_width, 3, (None, "mlp"), "pixel_0", kw)(pixels))
        p = nn.avg_pool(gelu(_conv(c.pixel_width, 3, (None, "mlp"), "pixel_1", kw)(p)),
                        (2, 2), (2, 2))
        p = jnp.repeat(_upsample(p, x.shape[1:3]), x.shape[0] // p.shape[0], axis=0)
        x = x + gelu(norm("pixel_skip_norm")(_conv(x.shape[-1], 1, (None, "mlp"),
                                                   "pixel_skip", kw)(p)))
      x = gelu(norm(f"stage_{s}_norm")(_conv(width, 3, (None, "mlp"), f"stage_{s}", kw)(x)))
      last = s == len(c.decoder_widths) - 1
      x = _upsample(x, out_shape if last else (2 * x.shape[1], 2 * x.shape[2]))
    x = _conv(1, 1, ("mlp", None), "head", kw)(x)[..., 0].astype(jnp.float32)
    return ACTIVATIONS[c.output_activation](x)


# ----------------------------------------------------------------------------- model

class DensityCounter(nn.Module):
  """Density maps for (image, prompt). bf16 compute: dtype=jnp.bfloat16."""
  clip_config: CLIPConfig
  config: DensityConfig = CLIP_COUNT
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool | str = False  # per backbone layer: VPT backpropagates through the whole ViT

  def setup(self):
    c, clip, kw = self.config, self.clip_config, dict(dtype=self.dtype,
                                                      param_dtype=self.param_dtype)
    c.check(clip)
    self.backbone = _Backbone(clip, c.pooling, remat=self.remat, **kw)
    if c.prompt_tokens and c.prompt_depth:
      self.prompts = _VisualPrompts(c.prompt_depth, c.prompt_tokens, clip.vision.width,
                                    clip.vision.patch_size, c.dropout, **kw)
    if c.context_tokens:  # CoOp's init
      self.context = self.param("context", _init(0.02, (None, "embed")),
                                (c.context_tokens, clip.text.width), self.param_dtype)
    self.interaction = _Interaction(c, clip.projection_dim, **kw)
    self.decoder = _Decoder(c, **kw)

  def encode_text(self, input_ids, attention_mask=None) -> TextFeatures:
    """ids (..., L) -> TextFeatures with the same leading dims."""
    lead, length = input_ids.shape[:-1], input_ids.shape[-1]
    flat = lambda t: None if t is None else t.reshape(-1, length)
    context = self.context if self.config.context_tokens else None
    text = self.backbone.text(flat(input_ids), flat(attention_mask), context)
    return jax.tree_util.tree_map(lambda t: t.reshape(lead + t.shape[1:]), text)

  def encode_image(self, pixels, train=False):
    """(B, H, W, 3) crops -> ((B, N, vision width) last patch tokens, (B, P) image embedding).

    The image embedding is CLIP's (class token, post_layernorm, projection), under the prompts.
    """
    c, v = self.config, self.clip_config.vision
    if pixels.shape[1:] != (c.input_size, c.input_size, v.num_channels):
      raise ValueError(f"pixels must be NHWC (B, {c.input_size}, {c.input_size}, "
                       f"{v.num_channels}) (config.input_size), got {pixels.shape}")
    x = pixels.astype(self.dtype)
    if c.input_size != v.image_size:  # bilinear, antialiased when shrinking
      x = _upsample(x, (v.image_size, v.image_size))
    prompts = self.prompts(train) if c.prompt_tokens and c.prompt_depth else None
    tokens, image_embed = self.backbone.image(x, prompts)
    return tokens[:, 1:], image_embed

  def __call__(self, pixels, input_ids=None, attention_mask=None, *, text=None, train=False):
    """Density maps for each image and its prompt(s).

    Args:
      pixels: (B, H, W, 3) CLIP-normalised, H = W = config.input_size.
      input_ids: (B, L) one prompt per image, or (B, K, L) K prompts per image (the vision
        tower runs once per image); attention_mask alike (optional).
      text: instead of ids, TextFeatures from `encode_text` (e.g. `ensemble_templates`'d).
      train: dropout on (needs rngs={"dropout": ...}).
    Returns: dict of
      density: (B, H, W) or (B, K, H, W), float32, non-negative; count = sum / scale.
      patch_embeds: (B, N, P) patches in CLIP's joint space (for the patch-text contrast).
      text_embed: (B, P) or (B, K, P) the pooled text embedding; image_embed: (B, P).
    """
    if text is None:
      text = self.encode_text(input_ids, attention_mask)
    if self.config.cross_attention == "tokens":
      keys, key_mask = text.states, text.mask
    else:  # CLIP-Count's form: one key, so every attention weight is 1
      keys = text.embed[..., None, :].astype(self.dtype)
      key_mask = jnp.ones(keys.shape[:-1], bool)
    keys = keys.reshape((-1,) + keys.shape[-2:])
    key_mask = key_mask.reshape((-1, key_mask.shape[-1]))
    tokens, image_embed = self.encode_image(pixels, train)
    grids, patch_embeds = self.interaction(tokens, keys, key_mask, train)
    density = self.decoder(grids, pixels.shape[1:3],
                           pixels.astype(self.dtype) if self.config.pixel_width else None)
    density = density.reshape(text.embed.shape[:-1] + density.shape[1:])
    return dict(density=density, patch_embeds=patch_embeds, text_embed=text.embed,
                image_embed=image_embed)


# ----------------------------------------------------------------------------- params

def _init_inputs(model: DensityCounter, make):
  c, t = model.config, model.clip_config.text
  pixels = make((1, c.input_size, c.input_size, model.clip_config.vision.num_channels),
                jnp.float32)
  ids = make((1, t.context_length - c.context_tokens), jnp.int32)
  return pixels, ids


def init_params(model: DensityCounter, rng: jax.Array):
  """Random params (unboxed): a random CLIP backbone and a fresh head."""
  pixels, ids = _init_inputs(model, jnp.zeros)
  return nn.unbox(model.init(rng, pixels, ids)["params"])


def param_shapes(model: DensityCounter):
  """The params' ShapeDtypeStructs, without allocating anything."""
  return jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))


def logical_axes(model: DensityCounter):
  """The logical axis names of every param (a tree of PartitionSpec), without allocating."""
  pixels, ids = _init_inputs(model, jax.ShapeDtypeStruct)
  boxed = jax.eval_shape(model.init, jax.random.key(0), pixels, ids)["params"]
  return nn.get_partition_spec(boxed)


def init_from_clip(model: DensityCounter, clip_params, rng: jax.Array):
  """The full tree with `clip_params` (e.g. from `models.load_pretrained`) as the backbone and
  a fresh head; the random backbone is never materialised (jit drops it)."""
  expected = param_shapes(model)["backbone"]
  got = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), clip_params)
  want = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), expected)
  if got != want:
    flat = lambda t: {jax.tree_util.keystr(k): v for k, v in
                      jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: isinstance(
                          x, tuple))[0]}
    g, w = flat(got), flat(want)
    bad = sorted(k for k in g.keys() | w.keys() if g.get(k) != w.get(k))
    raise ValueError(f"clip_params do not match the backbone of {model.clip_config}: "
                     + ", ".join(f"{k}: {g.get(k)} != {w.get(k)}" for k in bad[:5]))
  head = jax.jit(lambda r: {k: v for k, v in init_params(model, r).items() if k != "backbone"})
  return {"backbone": clip_params, **head(rng)}


def for_architecture(name: str, **kw) -> DensityCounter:
  """`DensityCounter` for a preset in PRESETS ("clip_count": B/16, "tiny")."""
  arch, config = PRESETS[name]
  return DensityCounter(ARCHITECTURES[arch], config, **kw)
