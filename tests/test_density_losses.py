"""density_losses.py: each loss against its formula written out in numpy."""
import jax
import jax.numpy as jnp
import numpy as np

from countclip_jax import density_losses as L

RNG = np.random.RandomState(0)
# Jitted: one compile per call beats compiling each eager op on a busy 2-core CPU.
contrastive = jax.jit(L.patch_text_contrastive_loss,
                      static_argnames=("threshold", "temperature"))
positives = jax.jit(L.patch_positives, static_argnums=(1, 2))


def test_count_is_the_sum_over_the_scale():
  maps = RNG.rand(2, 3, 5, 7).astype(np.float32)
  np.testing.assert_allclose(L.count(maps), maps.sum(axis=(2, 3)) / 60, rtol=1e-6)
  np.testing.assert_allclose(L.count(maps, scale=2.0), maps.sum(axis=(2, 3)) / 2, rtol=1e-6)


def test_density_mse_is_the_pixel_mean_averaged_over_maps():
  pred, target = RNG.rand(3, 6, 8).astype(np.float32), 60 * RNG.rand(3, 6, 8).astype(np.float32)
  np.testing.assert_allclose(L.density_mse(pred, target), np.mean((pred - target) ** 2),
                             rtol=1e-6)
  weights = np.array([1.0, 0.0, 1.0], np.float32)
  per_map = ((pred - target) ** 2).mean(axis=(1, 2))
  np.testing.assert_allclose(L.density_mse(pred, target, weights),
                             (per_map[0] + per_map[2]) / 2, rtol=1e-6)
  assert float(L.density_mse(pred, target, np.zeros(3))) == 0.0


def test_patch_positives_cover_every_pixel_of_an_uneven_grid():
  density = np.zeros((1, 10, 10), np.float32)
  density[0, 9, 0] = 0.5  # 10 px on a 3x3 grid: rows 0-3, 4-6, 7-9 -> patch (2, 0)
  density[0, 3, 4] = 0.05  # -> patch (0, 1)
  np.testing.assert_array_equal(np.flatnonzero(positives(density, 3)[0]), [1, 6])
  np.testing.assert_array_equal(np.flatnonzero(positives(density, 3, 0.1)[0]), [6])
  maps = RNG.rand(2, 13, 11).astype(np.float32) * (RNG.rand(2, 13, 11) > 0.97)
  want = np.zeros((2, 4, 4), bool)
  for r in range(4):
    for c in range(4):
      rows, cols = np.arange(13) * 4 // 13 == r, np.arange(11) * 4 // 11 == c
      want[:, r, c] = maps[:, rows][:, :, cols].max(axis=(1, 2)) > 0
  np.testing.assert_array_equal(positives(maps, 4), want.reshape(2, 16))


def _contrastive_numpy(patches, text, positive, temperature):
  losses = []
  for p, t, pos in zip(patches, text, positive):
    if pos.any():
      sim = p @ t / np.linalg.norm(p, axis=1) / np.linalg.norm(t) / temperature
      losses.append(-np.log(np.exp(sim)[pos].sum() / np.exp(sim).sum()))
  return np.mean(losses) if losses else 0.0


def test_patch_text_contrastive_loss_is_multi_positive_infonce():
  patches, text = RNG.randn(3, 4, 5).astype(np.float32), RNG.randn(3, 5).astype(np.float32)
  target = np.zeros((3, 8, 8), np.float32)  # 2x2 patches of 4x4 pixels
  target[0, 1, 1], target[0, 6, 6] = 1.0, 0.2  # patches 0 and 3
  target[1, 2, 5] = 0.3  # patch 1; image 2 has no object and is left out
  positive = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
  got = contrastive(patches, text, target)
  np.testing.assert_allclose(got, _contrastive_numpy(patches, text, positive, 0.07), rtol=1e-5)
  # CLIP-Count's ContrastiveLoss written out: the same up to its 1e-5 terms.
  sim = np.exp(np.einsum("bnp,bp->bn", patches / np.linalg.norm(patches, axis=-1,
                                                                  keepdims=True),
                         text / np.linalg.norm(text, axis=-1, keepdims=True)) / 0.07)
  pos, neg = (sim * positive).sum(1) + 1e-5, (sim * ~positive).sum(1) + 1e-5
  np.testing.assert_allclose(got, np.mean(-np.log(pos / (pos + neg))[:2]), rtol=1e-4)
  higher = contrastive(patches, text, target, threshold=0.25)
  np.testing.assert_allclose(higher, _contrastive_numpy(
      patches, text, positive & np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0] * 4], bool), 0.07),
                             rtol=1e-5)
  weighted = contrastive(patches, text, target, temperature=0.5,
                                           weights=np.array([0.0, 1.0, 1.0]))
  np.testing.assert_allclose(weighted, _contrastive_numpy(patches[1:2], text[1:2],
                                                          positive[1:2], 0.5), rtol=1e-5)
  grads = jax.jit(jax.grad(L.patch_text_contrastive_loss))(patches, text, target)
  assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads[2]).max()) == 0.0
  assert float(contrastive(patches, text, np.zeros_like(target))) == 0.0


def test_prompt_contrast_loss():
  pred = RNG.rand(2, 3, 4, 4).astype(np.float32)
  target = 60 * RNG.rand(2, 3, 4, 4).astype(np.float32) / 16
  target[:, 2] = 0  # the third extra prompt of each image names an absent kind
  valid = np.array([[1, 1, 1], [1, 0, 1]], bool)
  mse = ((pred - target) ** 2).mean(axis=(2, 3))
  counts = (pred.sum(axis=(2, 3)) - target.sum(axis=(2, 3))) / 60
  np.testing.assert_allclose(L.prompt_contrast_loss(pred, target, valid, weight=0.5),
                             0.5 * mse[valid].mean(), rtol=1e-6)
  np.testing.assert_allclose(
      L.prompt_contrast_loss(pred, target, valid, count_weight=2.0),
      (mse + 2.0 * counts ** 2)[valid].mean(), rtol=1e-6)
  # An absent kind: the count term is the predicted count squared.
  absent = L.prompt_contrast_loss(pred[:, 2:], target[:, 2:], count_weight=1.0, weight=1.0)
  np.testing.assert_allclose(absent, np.mean(mse[:, 2] + (pred[:, 2].sum(axis=(1, 2)) / 60)
                                             ** 2), rtol=1e-6)
  np.testing.assert_allclose(L.prompt_contrast_loss(pred, target), mse.mean(), rtol=1e-6)
  assert float(L.prompt_contrast_loss(pred, target, np.zeros((2, 3), bool))) == 0.0


def test_count_loss():
  pred = RNG.rand(3, 2, 4, 4).astype(np.float32)
  true = np.array([[0.0, 1.0], [2.0, 0.5], [3.0, 0.0]], np.float32)
  err = pred.sum(axis=(2, 3)) / 60 - true
  np.testing.assert_allclose(L.count_loss(pred, true), np.mean(err ** 2), rtol=1e-6)
  np.testing.assert_allclose(L.count_loss(pred, true, scale=10.0),
                             np.mean((pred.sum(axis=(2, 3)) / 10 - true) ** 2), rtol=1e-6)
  weights = np.array([[1, 0], [1, 1], [0, 0]], bool)
  np.testing.assert_allclose(L.count_loss(pred, true, weights=weights),
                             np.mean(err[weights] ** 2), rtol=1e-6)


def test_the_task_loss_adds_the_weighted_terms():
  import ml_collections
  from countclip_jax.tasks import density as task
  pred = RNG.rand(2, 3, 4, 4).astype(np.float32)

  class Model:  # what loss_fn needs of models/density.py: maps for 1 + E prompts an image
    def apply(self, variables, image, ids):
      assert ids.shape == (2, 3, 5)
      return {"density": pred}
  batch = {"image": np.zeros((2, 4, 4, 3), np.float32), "text": np.zeros((2, 5), np.int32),
           "other_text": np.zeros((2, 2, 5), np.int32),
           "density": 60 * RNG.rand(2, 4, 4).astype(np.float32) / 16,
           "count": np.array([1.0, 2.0], np.float32),
           "other_density": np.zeros((2, 2, 4, 4), np.float32),
           "other_valid": np.array([[1, 1], [1, 0]], bool)}
  d = ml_collections.ConfigDict({"contrastive_only_steps": 0, "contrastive_weight": 0.0,
                                 "prompt_contrast_weight": 0.5, "count_weight": 0.1,
                                 "scale": 60.0})
  loss, metrics = task.loss_fn(None, batch, np.int32(5), Model(), d)
  mse = np.mean((pred[:, 0] - batch["density"]) ** 2)
  counted = np.mean((pred[:, 0].sum(axis=(1, 2)) / 60 - batch["count"]) ** 2)
  extra = np.mean((pred[:, 1:] ** 2).mean(axis=(2, 3)) + 0.1 * (pred[:, 1:].sum(axis=(2, 3)) / 60)
                  ** 2, where=batch["other_valid"])
  np.testing.assert_allclose(metrics["count_loss"], counted, rtol=1e-6)
  np.testing.assert_allclose(loss, mse + 0.1 * counted + 0.5 * extra, rtol=1e-6)
  d.count_weight = 0.0  # CLIP-Count's loss: no count term anywhere
  loss, metrics = task.loss_fn(None, batch, np.int32(5), Model(), d)
  assert "count_loss" not in metrics
  np.testing.assert_allclose(loss, mse + 0.5 * np.mean((pred[:, 1:] ** 2).mean(axis=(2, 3)),
                                                       where=batch["other_valid"]), rtol=1e-6)
