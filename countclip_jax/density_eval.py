"""The density task's evals: counts from maps, CLIP-Count's sliding window, prompt sensitivity.

Synthetic world (held-out dense scenes): MAE and RMSE of the prompted kind's count; the same
split by whether the prompted kind is the minority of its image (FSC-147-S's question: does the
prompt choose what is counted?); and the mean count predicted for a kind that is absent (~0
if the prompt matters), also split by whether a kind of the absent one's colour is present
(then only the shape tells them apart). Real sets (FSC-147, CARPK, ShanghaiTech): CLIP-Count's
protocol, each full image (resized to the training height) right-padded and covered by square
windows at a stride, overlapping predictions averaged, count = sum / scale; MAE and RMSE; each
process reads its share of the images (`eval_real`). Results go to
OUT/density<tag>.json with a PNG of a few examples (image, target, prediction).
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from countclip_jax import eval_mesh
from countclip_jax.data import density_pipeline, images, pipeline

SHOWN = 6  # examples drawn in the PNG
WINDOW_BATCH = 8  # sliding windows per call


@functools.lru_cache(maxsize=8)
def _predict_fn(model, rows, replicated):
  """Jitted (params, pixels (N, S, S, 3), ids (N, K, L), example (N,)) -> (density (N, K, S, S)
  float32 with `rows` sharding like the batch; its sums (N, K) and the examples' indices,
  `replicated`). Cached per model and mesh: training's periodic evals reuse the compile."""
  def predict(params, pixels, ids, example):
    density = model.apply({"params": params}, pixels, ids)["density"].astype(jnp.float32)
    return density, density.sum(axis=(-2, -1)), example
  return jax.jit(predict, out_shardings=(rows, replicated, replicated))


@functools.lru_cache(maxsize=8)
def _whole_fn(replicated):
  """Jitted identity onto `replicated`: a batch-sharded array whole on every process."""
  return jax.jit(lambda x: x, out_shardings=replicated)


def _predictor(model, mesh: eval_mesh.EvalMesh):
  return _predict_fn(model, mesh.rows(4), mesh.replicated)


def sliding_window(predict, image: np.ndarray, size: int, stride: int) -> np.ndarray:
  """CLIP-Count's test-time protocol: `image` (size, W, 3), W of any width, right-padded with
  zeros to cover `size` x `size` windows at `stride` (the last one flush with the padding);
  `predict` maps (n, size, size, 3) windows to (n, size, size) maps; overlapping predictions
  are averaged. Returns the (size, W) map."""
  windows, starts = cut_windows(image, size, stride)
  return blend(np.asarray(predict(windows)), starts, image.shape[1])


def cut_windows(image: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, list[int]]:
  """sliding_window's windows (n, size, size, 3) of the right-padded image, and their left
  edges."""
  height, width = image.shape[:2]
  if height != size:
    raise ValueError(f"sliding_window needs images {size} high, got {image.shape}")
  if not 0 < stride <= size:
    raise ValueError(f"window stride must be in 1..{size}, got {stride}")
  padded_width = size + max(0, math.ceil((width - size) / stride)) * stride
  padded = np.zeros((size, padded_width, 3), np.float32)
  padded[:, :width] = image
  starts = list(range(0, padded_width - size + 1, stride))
  return np.stack([padded[:, x:x + size] for x in starts]), starts


def blend(maps: np.ndarray, starts: list[int], width: int) -> np.ndarray:
  """The windows' (n, size, size) maps -> the (size, width) map, overlaps averaged."""
  size = maps.shape[1]
  padded_width = starts[-1] + size
  total, weight = np.zeros((size, padded_width)), np.zeros((1, padded_width))
  for x, m in zip(starts, maps):
    total[:, x:x + size] += m
    weight[:, x:x + size] += 1
  return (total / weight)[:, :width].astype(np.float32)


def _errors(predicted, true) -> dict:
  predicted, true = np.asarray(predicted, np.float64), np.asarray(true, np.float64)
  if not len(true):
    return {"mae": None, "rmse": None, "n": 0}
  err = predicted - true
  return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
          "n": int(len(true))}


def eval_synthetic(config, model, mesh: eval_mesh.EvalMesh, tokenizer) -> tuple[dict, dict]:
  """(results, examples to draw) on the dense world's held-out split, each process reading and
  predicting its share of each batch (eval_mesh.py)."""
  predict = _predictor(model, mesh)
  scale = config.density.scale
  dataset = density_pipeline.eval_dataset(config, model.clip_config.vision.image_size)
  true, pred, absent, minority, shares, shown = [], [], [], [], [], None
  for batch in mesh.batches(dataset, "density"):
    with pipeline._TOKENIZER_LOCK:  # pylint: disable=protected-access
      ids = tokenizer([*map(str, batch["prompt"]), *map(str, batch["absent_prompt"])])
    n = len(batch["valid"])
    ids = np.stack([ids[:n], ids[n:]], axis=1)
    maps, sums, example = predict(mesh.params, mesh.place(batch["image"]), mesh.place(ids),
                                  mesh.place(batch["example"]))
    rows = mesh.gather_fields({k: batch[k] for k in ("example", "valid", "count", "minority",
                                                     "absent_shares_color")})
    valid = rows["valid"].astype(bool)
    counts = eval_mesh.in_example_order(sums, example, rows["example"][valid]) / scale
    true += rows["count"][valid].tolist()
    pred += counts[:, 0].tolist()
    absent += counts[:, 1].tolist()
    minority += rows["minority"][valid].tolist()
    shares += rows["absent_shares_color"][valid].tolist()
    if shown is None:  # this process's first rows (process 0's: the dataset's first examples)
      local = eval_mesh.local_rows(maps)[:SHOWN]
      shown = {"image": np.asarray(batch["image"][:SHOWN]), "target": np.asarray(
          batch["density"][:SHOWN]), "pred": local[:, 0] / scale,
               "title": [f"{p}: {t:.0f} / {c:.1f}" for p, t, c in zip(
                   batch["prompt"][:SHOWN], batch["count"][:SHOWN],
                   local[:, 0].sum(axis=(-2, -1)) / scale)]}
  true, pred, minority = np.asarray(true), np.asarray(pred), np.asarray(minority, bool)
  absent, shares = np.asarray(absent), np.asarray(shares, bool)
  mean = lambda x: float(np.mean(x)) if len(x) else None
  results = {**_errors(pred, true), "mean_count": float(np.mean(true)),
             "mean_predicted": float(np.mean(pred)),
             "majority": _errors(pred[~minority], true[~minority]),
             "minority": _errors(pred[minority], true[minority]),
             "absent_mean": float(np.mean(absent)),
             # Split by whether a kind in the image has the absent kind's colour.
             "absent_mean_color_present": mean(absent[shares]),
             "absent_mean_color_absent": mean(absent[~shares])}
  return results, shown


def window_predictor(model, mesh: eval_mesh.EvalMesh, ids: np.ndarray):
  """For sliding_window: (n, S, S, 3) windows -> (n, S, S) maps for one prompt (`ids`: (1, 1, L)
  tokens), in calls of WINDOW_BATCH windows (rounded to the mesh; the last call padded, so any
  image width compiles once) split over the devices. Every process passes the same windows."""
  predict, per_call = _predictor(model, mesh), mesh.round_up(WINDOW_BATCH)
  ids = mesh.place_everywhere(np.repeat(ids, per_call, 0))
  example = mesh.place_everywhere(np.arange(per_call, dtype=np.int32))
  whole = _whole_fn(mesh.replicated)  # the windows' maps are small

  def windows(w):
    out = []
    for j in range(0, len(w), per_call):
      chunk = w[j:j + per_call]
      padded = np.concatenate([chunk, np.zeros((per_call - len(chunk),) + chunk.shape[1:],
                                               chunk.dtype)])
      maps, _, _ = predict(mesh.params, mesh.place_everywhere(padded), ids, example)
      out.append(np.asarray(whole(maps))[:len(chunk), 0])
    return np.concatenate(out)
  return windows


def eval_real(config, model, mesh: eval_mesh.EvalMesh, tokenizer) -> tuple[dict, dict]:
  """(results, examples to draw) with the sliding window over a real set's eval split.

  Process p of P reads images p, p + P, ... (its share), one at a time, and streams their
  windows, each row with its image's prompt; every call takes WINDOW_BATCH windows (rounded to
  the mesh) of which each process gives its block, padded, until no process has any left, so
  windows of several images share a call. An image's maps are blended as soon as all its
  windows are back; the counts are gathered by image index, so P processes give the
  one-process results.
  """
  size, stride = config.density.crop_size, config.density.eval_window_stride
  scale = config.density.scale
  dataset = density_pipeline.eval_dataset(config, model.clip_config.vision.image_size)
  index, count = mesh.block or (0, 1)
  local_rows = mesh.round_up(WINDOW_BATCH) // count
  share = range(index, len(dataset), count)
  pending, counts, skipped = {}, {}, 0

  def own_windows():
    nonlocal skipped
    for i in share:
      ex = dataset[i]
      image, points = density_pipeline.eval_image(ex, config)
      if image is None:
        skipped += 1
        continue
      windows, starts = cut_windows(image, size, stride)
      pending[i] = (ex, image, points, starts, [])
      ids = tokenizer([ex["prompt"]])[0]
      for window in windows:
        yield i, window, ids

  stream, shown = own_windows(), None
  predict, whole = _predictor(model, mesh), _whole_fn(mesh.replicated)
  example = np.arange(local_rows, dtype=np.int32)
  while True:
    chunk = list(itertools.islice(stream, local_rows))
    # Every process makes the same calls: until none has windows left (with mesh.block None
    # every process streams the same windows).
    if not any(eval_mesh.gather_objects(bool(chunk)) if mesh.block else [chunk]):
      break
    pixels = np.zeros((local_rows, size, size, 3), np.float32)
    ids = np.zeros((local_rows, 1, tokenizer.context_length), np.int32)
    for r, (_, window, prompt_ids) in enumerate(chunk):
      pixels[r], ids[r, 0] = window, prompt_ids
    maps, _, _ = predict(mesh.params, mesh.place(pixels), mesh.place(ids), mesh.place(example))
    mine = eval_mesh.local_rows(maps) if mesh.block else np.asarray(whole(maps))
    for (i, _, _), m in zip(chunk, mine[:len(chunk), 0]):
      ex, image, points, starts, maps_of = pending[i]
      maps_of.append(m)
      if len(maps_of) < len(starts):
        continue
      full = blend(np.stack(maps_of), starts, image.shape[1])
      del pending[i]
      counts[i] = (len(points), float(full.sum()) / scale)
      if shown is None:  # this process's first image (process 0's: the split's first)
        from countclip_jax.data import density  # pylint: disable=g-import-not-at-top
        shown = {"image": image[None], "pred": full[None] / scale,
                 "target": density.density_map(points, *image.shape[:2])[None],
                 "title": [f"{ex['prompt']}: {len(points)} / {counts[i][1]:.1f}"]}
  logging.info("eval density: this process read %d of %d examples", len(share), len(dataset))
  local = {"counts": sorted(counts.items()), "skipped": skipped}
  parts = eval_mesh.gather_objects(local) if mesh.block else [local]
  every = sorted((i, c) for part in parts for i, c in part["counts"])
  true, pred = [c[0] for _, c in every], [c[1] for _, c in every]
  return {**_errors(pred, true), "mean_count": float(np.mean(true)) if true else None,
          "skipped": sum(part["skipped"] for part in parts)}, shown


def plot(shown: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(shown["title"])
  fig, axes = plt.subplots(3, n, figsize=(2.2 * n, 6.6), squeeze=False)
  rgb = np.clip(shown["image"] * images.CLIP_STD + images.CLIP_MEAN, 0, 1)
  for j in range(n):
    for row, (picture, label) in enumerate([(rgb[j], shown["title"][j]),
                                            (shown["target"][j], "target"),
                                            (shown["pred"][j], "predicted")]):
      axes[row, j].imshow(picture, cmap=None if row == 0 else "magma")
      axes[row, j].set_title(label, fontsize=7)
      axes[row, j].axis("off")
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def run(config, model, params, tokenizer, out_dir: str, tag: str = "") -> dict:
  """The eval of config.density.source; writes OUT/density<tag>.json and .png."""
  mesh = eval_mesh.EvalMesh(params, config.eval.batch_size)
  if density_pipeline.is_synthetic(config):
    results, shown = eval_synthetic(config, model, mesh, tokenizer)
  else:
    results, shown = eval_real(config, model, mesh, tokenizer)
  if jax.process_index() == 0:
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"density{tag}.json").write_text(json.dumps(results, indent=1))
    if shown is not None:
      plot(shown, os.fspath(out / f"density{tag}.png"))
  return results


def scalars(results: dict) -> dict:
  """Flat numbers for metrics.jsonl / TensorBoard: density/mae, density/minority/mae, ..."""
  flat = {}
  for key, value in results.items():
    if isinstance(value, dict):
      flat.update({f"density/{key}/{k}": v for k, v in value.items() if v is not None})
    elif value is not None:
      flat[f"density/{key}"] = value
  return flat
