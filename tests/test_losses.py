"""losses.py against the formulas computed by hand in numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countclip_jax import losses


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_logsumexp(x, axis):
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def test_clip_loss_is_symmetric_infonce():
  rng = np.random.RandomState(0)
  img, txt = unit(rng.randn(6, 5)), unit(rng.randn(6, 5))
  scale = 7.5
  logits = scale * img @ txt.T
  i2t = np.mean(np_logsumexp(logits, 1) - np.diag(logits))
  t2i = np.mean(np_logsumexp(logits.T, 1) - np.diag(logits))
  np.testing.assert_allclose(losses.clip_loss(img, txt, scale), (i2t + t2i) / 2, rtol=1e-5)


def test_clip_loss_prefers_matched_pairs():
  rng = np.random.RandomState(1)
  img = unit(rng.randn(4, 8))
  assert losses.clip_loss(img, img, 20.0) < 0.01
  assert losses.clip_loss(img, img[::-1], 20.0) > 1.0


@pytest.mark.parametrize("k", [1, 8])
def test_counting_loss_is_the_papers_formula(k):
  rng = np.random.RandomState(k)
  img, txt, cf = unit(rng.randn(5, 4)), unit(rng.randn(5, 4)), unit(rng.randn(5, k, 4))
  mask = np.array([1, 0, 1, 1, 0], np.float32)
  for scale in (1.0, 30.0):
    pos = np.exp(scale * np.sum(img * txt, -1))
    neg = np.sum(np.exp(scale * np.einsum("bd,bkd->bk", img, cf)), -1)
    per_example = -np.log(pos / (pos + neg))
    loss, acc = losses.counting_loss(img, txt, cf, mask, scale)
    np.testing.assert_allclose(loss, np.sum(per_example * mask) / 3, rtol=1e-5)
    wins = np.sum(img * txt, -1) > np.max(np.einsum("bd,bkd->bk", img, cf), -1)
    np.testing.assert_allclose(acc, np.sum(wins * mask) / 3)


def test_counting_loss_is_zero_not_nan_without_counting_examples():
  img = unit(np.ones((3, 4)))
  loss, acc = losses.counting_loss(img, img, img[:, None], np.zeros(3), 1.0)
  assert float(loss) == 0.0 and float(acc) == 0.0
  grads = jax.grad(lambda x: losses.counting_loss(x, img, img[:, None], np.zeros(3))[0])(img)
  assert np.all(np.isfinite(grads)) and np.all(grads == 0)


def test_counting_loss_gradient_pushes_the_true_caption_up():
  rng = np.random.RandomState(3)
  img, txt, cf = unit(rng.randn(4, 6)), unit(rng.randn(4, 6)), unit(rng.randn(4, 1, 6))
  grad = jax.grad(lambda t: losses.counting_loss(img, t, cf, scale=5.0)[0])(jnp.asarray(txt))
  stepped = unit(np.asarray(txt - 0.1 * grad))
  before = np.sum(img * txt, -1) - np.sum(img * cf[:, 0], -1)
  after = np.sum(img * stepped, -1) - np.sum(img * cf[:, 0], -1)
  assert np.all(after > before)  # a gradient step widens each true-vs-counterfactual margin
  cf_grad = jax.grad(lambda c: losses.counting_loss(img, txt, c, scale=5.0)[0])(jnp.asarray(cf))
  assert np.all(np.einsum("bd,bkd->bk", img, cf_grad) > 0)  # and pushes counterfactuals down
