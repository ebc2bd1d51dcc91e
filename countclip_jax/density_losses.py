"""The losses of the density task (models/density.py): CLIP-Count's two and our prompt contrast.

Targets are density maps already multiplied by the scale: Gaussian dots that each sum to 1,
times SCALE (60, CLIP-Count's and CounTR's), so that a sigmoid output can reach the peaks;
the count of a map is its sum / SCALE.

A batch for all three terms (what the trainer feeds; K extra prompts per image, K may be 0):

  pixels  (B, H, W, 3)
  ids     (B, 1+K, L)     slot 0: the annotated kind (e.g. the FSC-147 class); slots 1..K:
                          other kinds *for the same image*: present ones (another annotated
                          kind of this image) and absent ones (a kind not in it)
  density (B, 1+K, H, W)  scaled targets: each kind's own map; zeros for an absent kind
  valid   (B, 1+K)        slot 0 always; False for unused extra slots

  out = model.apply(v, pixels, ids)            # density (B, 1+K, H, W); ViT once per image
  loss = density_mse(out["density"][:, 0], density[:, 0])
       + w_contrast * patch_text_contrastive_loss(out["patch_embeds"], out["text_embed"][:, 0],
                                                  density[:, 0])
       + w_count * count_loss(out["density"][:, 0], counts)
       + prompt_contrast_loss(out["density"][:, 1:], density[:, 1:], valid[:, 1:], weight=lam,
                              count_weight=w_count)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SCALE = 60.0


def count(density: jax.Array, scale: float = SCALE) -> jax.Array:
  """(..., H, W) scaled maps -> (...) counts."""
  return jnp.sum(density, axis=(-2, -1)) / scale


def _weighted_mean(values, weights):
  if weights is None:
    return jnp.mean(values)
  weights = jnp.broadcast_to(weights.astype(jnp.float32), values.shape)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def density_mse(pred: jax.Array, target: jax.Array, weights: jax.Array | None = None):
  """CLIP-Count's loss: the mean over pixels of (pred - target)^2, averaged over the maps.

  Args:
    pred, target: (..., H, W), target scaled (Gaussian map x SCALE).
    weights: optional (...) per map (e.g. which rows are real); 0 when all are 0.
  """
  per_map = jnp.mean(jnp.square(pred - target), axis=(-2, -1))
  return _weighted_mean(per_map, weights)


def count_loss(pred: jax.Array, true_count: jax.Array, scale: float = SCALE,
               weights: jax.Array | None = None):
  """Ours (CLIP-Count has no such term): the squared count error (sum(pred) / scale - count)^2,
  averaged over the maps. The pixel MSE hardly sees mass spread thinly over the whole map
  (a count of 10 spread over 64x64 pixels costs 0.02 a pixel), which is exactly a wrong count.

  Args:
    pred: (..., H, W) scaled maps; true_count: (...) counts; weights: optional (...) per map.
  """
  return _weighted_mean(jnp.square(count(pred, scale) - true_count), weights)


def patch_positives(density: jax.Array, grid: int, threshold: float = 0.0) -> jax.Array:
  """(B, H, W) target maps -> (B, grid*grid) bool, row-major: is the map's maximum inside the
  patch above `threshold`. Pixel (y, x) belongs to patch (y*grid//H, x*grid//W), so every
  pixel counts even when `grid` does not divide H (384 px on a 14x14 grid). CLIP-Count
  instead nearest-resizes the map to 224 and max-pools 16x16, which skips pixels."""
  b, h, w = density.shape
  rows, cols = jnp.arange(h) * grid // h, jnp.arange(w) * grid // w
  x = jax.ops.segment_max(jnp.moveaxis(density, 1, 0), rows, grid)  # (g, B, W)
  x = jax.ops.segment_max(jnp.moveaxis(x, 2, 0), cols, grid)  # (g_col, g_row, B)
  return jnp.transpose(x, (2, 1, 0)).reshape(b, grid * grid) > threshold


def patch_text_contrastive_loss(patch_embeds: jax.Array, text_embed: jax.Array,
                                target: jax.Array, threshold: float = 0.0,
                                temperature: float = 0.07, weights: jax.Array | None = None):
  """CLIP-Count's patch-text contrast: patches holding objects should match the text.

  Per image, with s_n = cos(patch_n, text) / temperature and P the positive patches (target
  density above `threshold` inside the patch, `patch_positives`):
    L = -log( sum_{n in P} e^{s_n} / sum_n e^{s_n} ) = logsumexp_n s_n - logsumexp_{n in P} s_n,
  the multi-positive InfoNCE of CLIP-Count's ContrastiveLoss (normalize=False, its default),
  here in log space without its 1e-5 terms, and averaged only over the images with at least
  one positive patch (CLIP-Count averages over all, so an empty image would cost -log 1e-5).

  Args:
    patch_embeds: (B, N, P), N = grid^2, from the model (unnormalised).
    text_embed: (B, P) the prompt's pooled embedding (unnormalised).
    target: (B, H, W) the scaled target map.
    weights: optional (B,) to leave rows out (e.g. padding).
  Returns: scalar; 0 when no image has a positive.
  """
  grid = int(round(patch_embeds.shape[1] ** 0.5))
  positive = jax.lax.stop_gradient(patch_positives(target, grid, threshold))
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
  sim = jnp.einsum("bnp,bp->bn", unit(patch_embeds), unit(text_embed)) / temperature
  has_positive = jnp.any(positive, axis=1)
  # A row without positives is left out below; it reads all its patches here, as an all -inf
  # row would make the gradient NaN (0 * NaN) even though its loss is discarded.
  pos_lse = jax.nn.logsumexp(jnp.where(positive | ~has_positive[:, None], sim, -jnp.inf), axis=1)
  per_image = jnp.where(has_positive, jax.nn.logsumexp(sim, axis=1) - pos_lse, 0.0)
  keep = has_positive.astype(jnp.float32)
  if weights is not None:
    keep = keep * weights.astype(jnp.float32)
  return jnp.sum(per_image * keep) / jnp.maximum(jnp.sum(keep), 1.0)


def prompt_contrast_loss(pred: jax.Array, target: jax.Array, valid: jax.Array | None = None,
                         weight: float = 1.0, count_weight: float = 0.0, scale: float = SCALE):
  """Our prompt contrast: the same image asked for other kinds must count only those.

  For each extra prompt (b, k): the pixel MSE against its target (the kind's own map if
  present, zeros if absent) plus, if count_weight, the squared count error
  ((sum pred - sum target) / scale)^2 (for an absent kind: the predicted count squared);
  averaged over the valid prompts, times `weight`.

  Args:
    pred, target: (B, K, H, W) the model's maps for the extra prompts and their targets.
    valid: (B, K) which extra slots hold a prompt (default all).
  Returns: scalar; 0 when nothing is valid.
  """
  per_map = jnp.mean(jnp.square(pred - target), axis=(-2, -1))
  if count_weight:
    per_map = per_map + count_weight * jnp.square(count(pred, scale) - count(target, scale))
  return weight * _weighted_mean(per_map, valid)
