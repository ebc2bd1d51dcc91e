"""The two losses of the method: CLIP's contrastive loss and the counting loss.

Both take L2-normalised embeddings. Under `jax.jit` with the batch sharded over devices, the
`B x B` logits of `clip_loss` stay sharded by rows (each device holds `B/n x B`): the
image->text term reduces along rows, the text->image term along columns, so the matrix is never
transposed or gathered onto one device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array | float,
              logits_sharding=None) -> jax.Array:
  """Symmetric InfoNCE over the batch: pair i's image and text are positives, all else negative.

  Args:
    image_emb, text_emb: (B, D), L2-normalised.
    scale: the logit multiplier, exp(logit_scale).
    logits_sharding: optional sharding for the (B, B) logits, e.g. rows over the data axes.
  Returns: scalar, the mean of the image->text and text->image cross-entropies.
  """
  logits = scale * (image_emb @ text_emb.T)
  if logits_sharding is not None:
    logits = jax.lax.with_sharding_constraint(logits, logits_sharding)
  positives = scale * jnp.sum(image_emb * text_emb, axis=-1)
  image_to_text = jax.nn.logsumexp(logits, axis=1) - positives
  text_to_image = jax.nn.logsumexp(logits, axis=0) - positives
  return (jnp.mean(image_to_text) + jnp.mean(text_to_image)) / 2


def counting_loss(image_emb: jax.Array, text_emb: jax.Array, cf_text_emb: jax.Array,
                  mask: jax.Array | None = None, scale: jax.Array | float = 1.0):
  """The counting loss of Paiss et al. with K counterfactual captions per image.

  L = -log( e^{s cos(i,t)} / (e^{s cos(i,t)} + sum_k e^{s cos(i,t_cf_k)}) ), averaged over the
  examples where `mask` is set (0, not NaN, when none is).

  Args:
    image_emb: (B, D) normalised images; text_emb: (B, D) their true captions.
    cf_text_emb: (B, K, D) the same captions with a wrong number (K=1 in the paper).
    mask: (B,) which rows are counting examples (default: all).
    scale: s; 1.0 is the paper's raw cosine, exp(logit_scale) the model's own temperature.
  Returns: (loss, accuracy) — accuracy is the share of masked rows whose true caption scores
    above every counterfactual.
  """
  if mask is None:
    mask = jnp.ones(image_emb.shape[:1], jnp.float32)
  mask = mask.astype(jnp.float32)
  positive = scale * jnp.sum(image_emb * text_emb, axis=-1)  # (B,)
  negatives = scale * jnp.einsum("bd,bkd->bk", image_emb, cf_text_emb)  # (B, K)
  all_logits = jnp.concatenate([positive[:, None], negatives], axis=1)
  per_example = jax.nn.logsumexp(all_logits, axis=1) - positive
  correct = (positive > jnp.max(negatives, axis=1)).astype(jnp.float32)
  denominator = jnp.maximum(jnp.sum(mask), 1.0)
  return jnp.sum(per_example * mask) / denominator, jnp.sum(correct * mask) / denominator
