"""The density task's input pipeline: prompted images -> target density maps, as grain datasets.

A training batch (host-local numpy; B = train.batch_size / P rows, S = `crop_size(config, ...)`,
L = tokenizer.context_length, E = `num_other_prompts(config)`):
  {"image":         float32 (B, S, S, 3)    CLIP-normalised NHWC,
   "text":          int32 (B, L)            the prompted kind, prompt_template.format(name),
   "density":       float32 (B, S, S)       its target map x density.scale (sums to count x scale),
   "count":         float32 (B,)            objects of the prompted kind inside the crop,
   "other_text":    int32 (B, E, L)         prompts of other kinds (padding rows: the empty text),
   "other_density": float32 (B, E, S, S)    their maps x scale (all zero for an absent kind),
   "other_valid":   bool (B, E)}            False for padding rows
Prompts are tokenized with plain truncation, a whole batch per call.

Sources (density.source):
  synthetic  the dense world (data/dense_synthetic.py) rendered at S = density.synthetic.image_size
             (0: the model's), never cropped (a crop would only cut objects out). Other rows: the
             world's absent kind first (E >= 1; with probability
             density.synthetic.hard_absent_prob instead an absent kind of a colour present,
             which only its shape tells apart), then other kinds present, in random order,
             then padding.
  fsc147, carpk, shanghaitech_a, shanghaitech_b  the published trees under density.data_dir
             (data/counting_datasets.py). Each image is resized to height S = density.crop_size
             (FSC-147's images_384_VarV2 already are 384 high: then nothing moves), its points
             with it; then a random S x S crop, padded at the bottom/right with CLIP's mean
             colour where the image is narrower (0 after normalisation). Other rows: classes of
             other images of the split, zero maps (FSC-147 annotates one class an image, so this
             assumes the others absent); CARPK and ShanghaiTech have one class, so only padding.
Both flip left-right with probability 1/2 (image and points; maps are made after). Maps are
made from the points in the crop (density.density_map: each object adds exactly 1 x scale), and
"adaptive" sigmas from the neighbours in the whole (resized) image, so a crop does not change them.

The design is pipeline.py's: one stream of global batches (examples -> shuffle -> repeat,
reshuffled each epoch -> random_map -> batch), cut into per-process batches of which process p
takes every P-th. So global batch i is a pure function of (config, i) whatever the process count,
and a resume at step s passes start=s. A real image that does not decode is replaced by the next
one (logged, and counted in `skipped_images()` of that process).

Eval: `eval_dataset` gives random-access examples: synthetic ones at the model's size, real ones
as paths + points (full images are of any size: `eval_image` decodes and resizes one for a
sliding-window eval).
"""
from __future__ import annotations

import threading
from typing import Sequence

import grain
import numpy as np
from absl import logging

from countclip_jax.data import counting_datasets
from countclip_jax.data import dense_synthetic
from countclip_jax.data import density
from countclip_jax.data import images
from countclip_jax.data import pipeline
from countclip_jax.text import tokenizer as tokenizer_lib

SOURCES = ("synthetic", "fsc147", "carpk", "shanghaitech_a", "shanghaitech_b")
# Seed streams (train.seed, TASK_STREAM, k): pipeline.py's contrastive streams use 0 there, so a
# run switching tasks does not replay the same shuffle.
TASK_STREAM = 1
# Pixels padded in where a real image is narrower than the crop: the mean colour normalises to
# ~0, what zero-padding the model's input would give, rather than a black bar.
PAD_COLOR = np.rint(images.CLIP_MEAN * 255).astype(np.uint8)
# A real eval split for "heldout" (the synthetic world's name for its eval split).
EVAL_SPLIT = "test"

_skipped = 0  # bad training images this process replaced (in its worker processes: theirs)
_skipped_lock = threading.Lock()


def skipped_images() -> int:
  """How many undecodable images this process has skipped so far."""
  return _skipped


# ---------------------------------------------------------------------------------------------
# Config.

def is_synthetic(config) -> bool:
  source = config.density.source
  if source not in SOURCES:
    raise ValueError(f"config.density.source must be one of {SOURCES}, got {source!r}.")
  return source == "synthetic"


def crop_size(config, image_size: int) -> int:
  """S, the side of training images and maps: the world's size (synthetic) or crop_size."""
  size = (config.density.synthetic.image_size or image_size if is_synthetic(config)
          else config.density.crop_size)
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ValueError(f"The density task's image size must be a positive int, got {size!r} "
                     "(density.crop_size, or density.synthetic.image_size / the model's).")
  return size


def num_other_prompts(config) -> int:
  """E: density.other_prompts, or for -1 the source's default (2 synthetic, 0 real)."""
  e = config.density.other_prompts
  if isinstance(e, bool) or not isinstance(e, int) or e < -1:
    raise ValueError(f"config.density.other_prompts must be an int >= 0 (-1: the source's "
                     f"default), got {e!r}.")
  return (2 if is_synthetic(config) else 0) if e == -1 else e


def _sigma(config):
  sigma = config.density.sigma
  if sigma == "adaptive":
    return sigma
  if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
    raise ValueError(f"config.density.sigma must be a number > 0 or 'adaptive', got {sigma!r}.")
  return float(sigma)


def _scale(config) -> float:
  scale = config.density.scale
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
    raise ValueError(f"config.density.scale must be a number > 0, got {scale!r}.")
  return float(scale)


def _hard_absent_prob(config) -> float:
  p = config.density.synthetic.hard_absent_prob
  if not 0 <= p <= 1:
    raise ValueError(f"config.density.synthetic.hard_absent_prob must be in [0, 1], got {p!r}.")
  return float(p)


def _template(config) -> str:
  template = config.density.prompt_template
  try:
    ok = template.format("x") != template  # a template without "{}" would drop the name
  except (AttributeError, IndexError, KeyError, ValueError):
    ok = False
  if not ok:
    raise ValueError("config.density.prompt_template must hold one '{}' for the class name, "
                     f"got {template!r}.")
  return template


# ---------------------------------------------------------------------------------------------
# Sources: random-access examples {"image": uint8 (h, w, 3), "prompt": str (the class name),
# "points": float32 (n, 2), "sigmas": float32 (n,) or None, "others": [(name, points, sigmas)],
# "absent": [names]}. "others" are kinds present (their own maps), "absent" kinds with none.

def dense_world(config, image_size: int, split: str = "train",
                size: int | None = None) -> dense_synthetic.DenseCounting:
  """The dense world of config.density.synthetic, at crop_size(config, image_size)."""
  s, side = config.density.synthetic, crop_size(config, image_size)
  defaults = dense_synthetic.DenseConfig()
  # Small worlds hold fewer objects (capacity); max_count beyond that still fails, by name.
  room = min(defaults.max_objects, dense_synthetic.capacity(side, defaults.margin))
  world = dense_synthetic.DenseConfig(
      image_size=side, max_count=s.max_count, minority_prob=s.minority_prob, names=s.names,
      max_objects=max(room, s.max_count + defaults.min_kinds - 1))
  return dense_synthetic.DenseCounting(world, split=split, seed=pipeline.WORLD_SEED,
                                       size=s.size if size is None else size)


def _kind_sigmas(points: np.ndarray, sigma) -> np.ndarray | None:
  return density.adaptive_sigmas(points).astype(np.float32) if sigma == "adaptive" else None


class _DenseExamples:
  """The dense world's examples in the source format."""

  def __init__(self, world: dense_synthetic.DenseCounting, sigma, hard_absent: bool = False):
    self.world, self.sigma = world, sigma
    # Listed only when _PrepareRow may draw one: otherwise they would cost every example.
    self.hard_absent = hard_absent and world.config.names == "color_shape"

  def __len__(self) -> int:
    return len(self.world)

  def __getitem__(self, index: int) -> dict:
    ex = self.world[index]
    prompted = int(ex["prompted"])
    others = [(k["prompt"], k["centers"], _kind_sigmas(k["centers"], self.sigma))
              for i, k in enumerate(ex["kinds"]) if i != prompted]
    hard = []
    if self.hard_absent:  # absent kinds of a colour in the image: only shape tells them apart
      present = {(k["color"], k["shape"]) for k in ex["kinds"]}
      hard = [dense_synthetic.prompt(color, shape) for color in sorted({c for c, _ in present})
              for shape in self.world.config.shapes if (color, shape) not in present]
    return {"image": ex["image"], "prompt": ex["prompt"], "points": ex["centers"],
            "sigmas": _kind_sigmas(ex["centers"], self.sigma), "others": others,
            "absent": [ex["absent_prompt"]], "hard_absent": hard}


def read_split(config, split: str) -> list[counting_datasets.CountingImage]:
  """The real set's annotated images of `split` (annotations only; images stay on disk)."""
  source, root = config.density.source, config.density.data_dir
  if not root:
    raise ValueError(f"config.density.source is {source!r} but config.density.data_dir is empty.")
  if source == "fsc147":
    return counting_datasets.read_fsc147(root, split)
  if source == "carpk":
    return counting_datasets.read_carpk(root, split)
  return counting_datasets.read_shanghaitech(root, source[-1].upper(), split)


def load_image(data: bytes, points, height: int) -> tuple[np.ndarray, np.ndarray]:
  """Image bytes + its points -> (uint8 (height, w', 3), points) resized to `height` (bicubic,
  aspect kept). Points past the border are clamped in first: annotations are real objects
  (ShanghaiTech has some just outside). Raises images.BadImageError for undecodable bytes."""
  image = images.decode(data, min_size=height)  # a JPEG decodes at reduced scale if it can
  w, h = image.size
  points = density.clip_points(points, h, w)
  new = (max(1, round(w * height / h)), height)
  if new != image.size:
    image = image.resize(new, images.Image.BICUBIC)
  return np.asarray(image), density.resize_points(points, (h, w), (new[1], new[0]))


def _note_skipped(index: int, name: str, error: Exception):
  global _skipped
  with _skipped_lock:
    _skipped += 1
  logging.warning("Skipping density image %d (%s), %d skipped so far: %s", index, name,
                  _skipped, error)


class _RealExamples:
  """Decoded real images; one that does not decode is replaced by the next (pipeline's rule)."""

  def __init__(self, records: Sequence[counting_datasets.CountingImage], height: int, sigma):
    self.records, self.height, self.sigma = list(records), height, sigma
    self.classes = sorted({r.class_name for r in self.records})

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    for i in range(index, index + pipeline.MAX_BAD_IMAGES_IN_A_ROW):
      record = self.records[i % len(self)]
      try:
        image, points = load_image(record.read(), record.points, self.height)
      except (images.BadImageError, OSError) as e:
        _note_skipped(i % len(self), record.image_path, e)
        continue
      absent = [c for c in self.classes if c != record.class_name]
      return {"image": image, "prompt": record.class_name, "points": points,
              "sigmas": _kind_sigmas(points, self.sigma), "others": [], "absent": absent}
    raise images.BadImageError(f"{pipeline.MAX_BAD_IMAGES_IN_A_ROW} bad images in a row from "
                               f"example {index} of {self.records[index].image_path} on.")


def _examples(config, image_size: int) -> grain.MapDataset:
  sigma = _sigma(config)
  if is_synthetic(config):
    return grain.MapDataset.source(_DenseExamples(dense_world(config, image_size), sigma,
                                                  hard_absent=_hard_absent_prob(config) > 0))
  records = read_split(config, "train")
  if not records:
    raise ValueError(f"No train images in {config.density.data_dir}.")
  return grain.MapDataset.source(_RealExamples(records, crop_size(config, image_size), sigma))


# ---------------------------------------------------------------------------------------------
# Example -> training row -> batch.

def _pad(image: np.ndarray, size: int) -> np.ndarray:
  """At least size x size: PAD_COLOR added at the bottom/right (points do not move)."""
  h, w = image.shape[:2]
  if h >= size and w >= size:
    return image
  canvas = np.empty((max(h, size), max(w, size), 3), np.uint8)
  canvas[:] = PAD_COLOR
  canvas[:h, :w] = image
  return canvas


def _window(shape, size: int, rng: np.random.Generator) -> tuple[int, int, bool]:
  """(top, left, flip) of a uniformly placed size x size crop, flipped with probability 1/2,
  drawn as density.random_crop_flip draws them. A size x size image gives (0, 0, flip)."""
  top = int(rng.integers(0, shape[0] - size + 1))
  left = int(rng.integers(0, shape[1] - size + 1))
  return top, left, bool(rng.random() < 0.5)


def _move(points, sigmas, top: int, left: int, size: int, flip: bool):
  """Points (and their sigmas) into the crop window: density.crop's half-open rule (a point on
  the far edge belongs to the next window), then density.hflip's x -> size - x."""
  p = density.as_points(points) - np.array([left, top], np.float32)
  keep = (p[:, 0] >= 0) & (p[:, 0] < size) & (p[:, 1] >= 0) & (p[:, 1] < size)
  p = p[keep]
  if flip:
    p[:, 0] = size - p[:, 0]
  return p, None if sigmas is None else np.asarray(sigmas)[keep]


class _PrepareRow:
  """Example -> a row: crop window and flip drawn from rng (random_crop_flip's order), the same
  for the image and every kind's points; maps made after, from the points in the window."""

  def __init__(self, size: int, sigma, scale: float, template: str, num_other: int,
               hard_absent_prob: float = 0.0):
    self.size, self.sigma, self.scale = size, sigma, scale
    self.template, self.num_other = template, num_other
    self.hard_absent_prob = hard_absent_prob

  def __call__(self, ex: dict, rng: np.random.Generator) -> dict:
    s = self.size
    image = _pad(np.asarray(ex["image"]), s)
    top, left, flip = _window(image.shape, s, rng)
    image = image[top:top + s, left:left + s]
    move = lambda points, sigmas: _move(points, sigmas, top, left, s, flip)
    points, sigmas = move(ex["points"], ex["sigmas"])
    prompts, maps = self._others(ex, move, rng)
    valid = np.arange(self.num_other) < len(prompts)
    pad = self.num_other - len(prompts)
    return {"image": images.normalize(image[:, ::-1] if flip else image),
            "prompt": self.template.format(ex["prompt"]),
            "density": self._map(points, sigmas), "count": np.float32(len(points)),
            "other_prompts": prompts + [""] * pad,  # "" tokenizes to bos, eos: a harmless text
            "other_density": np.stack(maps + [np.zeros((s, s), np.float32)] * pad)
                             if self.num_other else np.zeros((0, s, s), np.float32),
            "other_valid": valid}

  def _map(self, points, sigmas) -> np.ndarray:
    sigma = self.sigma if sigmas is None else sigmas
    return density.density_map(points, self.size, self.size, sigma, scale=self.scale)

  def _others(self, ex: dict, move, rng: np.random.Generator):
    """Up to E (prompt, map): one absent kind first (the negative every image has), then the
    kinds present (random order), then more absent kinds; the caller pads the rest. With
    probability hard_absent_prob the first is one of ex["hard_absent"] (if any) instead."""
    absent = [ex["absent"][i] for i in rng.permutation(len(ex["absent"]))]
    hard = ex.get("hard_absent") or []
    if hard and self.hard_absent_prob and rng.random() < self.hard_absent_prob:
      absent.insert(0, hard[int(rng.integers(len(hard)))])
    present = [ex["others"][i] for i in rng.permutation(len(ex["others"]))]
    zero = np.zeros((self.size, self.size), np.float32)
    rows = [(name, zero) for name in absent[:1]]
    rows += [(name, self._map(*move(points, sigmas))) for name, points, sigmas in present]
    rows += [(name, zero) for name in absent[1:]]
    rows = rows[:self.num_other]
    return [self.template.format(n) for n, _ in rows], [m for _, m in rows]


class _Batch:
  """Rows -> the batch; every prompt of the batch in one tokenizer call."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, num_other: int):
    self.tokenizer, self.num_other = tokenizer, num_other

  def __call__(self, rows: Sequence[dict]) -> dict:
    n, e, length = len(rows), self.num_other, self.tokenizer.context_length
    texts = [r["prompt"] for r in rows] + [p for r in rows for p in r["other_prompts"]]
    with pipeline._TOKENIZER_LOCK:  # pylint: disable=protected-access  # shared with pipeline
      ids = self.tokenizer(texts)
    stack = lambda key, dtype: np.stack([r[key] for r in rows]).astype(dtype, copy=False)
    return {"image": stack("image", np.float32), "text": ids[:n],
            "density": stack("density", np.float32), "count": stack("count", np.float32),
            "other_text": ids[n:].reshape(n, e, length),
            "other_density": stack("other_density", np.float32),
            "other_valid": stack("other_valid", bool)}


def train_rows(config, tokenizer: tokenizer_lib.Tokenizer, image_size: int, *,
               process_index: int | None = None, process_count: int | None = None
               ) -> pipeline.Rows:
  """This process's training examples, one a row (pipeline.Rows; see the module docstring).

  image_size: the model's; it sizes the synthetic world when density.synthetic.image_size is 0
  (real sets use density.crop_size).
  """
  # pylint: disable-next=protected-access
  process_index, process_count = pipeline._process(process_index, process_count)
  batch_size = config.train.batch_size
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the "
                     f"process count {process_count}.")
  e, seed = num_other_prompts(config), config.train.seed
  prepare = _PrepareRow(crop_size(config, image_size), _sigma(config), _scale(config),
                        _template(config), e, _hard_absent_prob(config))
  seed_of = lambda k: pipeline._seed(seed, TASK_STREAM, k)  # pylint: disable=protected-access
  # As pipeline.train_rows: every process builds the one stream of global batches cut into
  # local ones and takes every P-th (its rows of each global batch); only those are read.
  # pylint: disable-next=protected-access
  stream = pipeline._endless(_examples(config, image_size).shuffle(seed_of(0)))
  return pipeline.process_rows([stream.random_map(prepare, seed=seed_of(1))],
                               [batch_size // process_count], _Batch(tokenizer, e),
                               process_index, process_count)


def train_dataset(config, tokenizer: tokenizer_lib.Tokenizer, image_size: int, *,
                  process_index: int | None = None, process_count: int | None = None
                  ) -> grain.MapDataset:
  """The infinite MapDataset of this process's training batches: batch i at random access,
  exactly what `train_iterator` yields i-th."""
  return train_rows(config, tokenizer, image_size, process_index=process_index,
                    process_count=process_count).batches()


def train_iterator(config, tokenizer: tokenizer_lib.Tokenizer, image_size: int, *,
                   process_index: int | None = None, process_count: int | None = None,
                   num_threads: int | None = None, start: int = 0) -> grain.DatasetIterator:
  """An infinite iterator of this process's batches from global batch `start` (a resume's step)
  on. num_threads (None: config.data.num_threads), data.num_workers and data.prefetch_buffer_size
  as pipeline.iterate (workers need absl flags parsed; `it.close()` stops them)."""
  return pipeline.iterate(train_rows(config, tokenizer, image_size, process_index=process_index,
                                     process_count=process_count), config, start, num_threads)


# ---------------------------------------------------------------------------------------------
# Evaluation.

class _DenseEval:
  def __init__(self, world: dense_synthetic.DenseCounting, template: str, sigma):
    self.world, self.template, self.sigma = world, template, sigma

  def __len__(self) -> int:
    return len(self.world)

  def __getitem__(self, index: int) -> dict:
    ex, s = self.world[index], self.world.config.image_size
    return {"image": images.normalize(ex["image"]), "prompt": self.template.format(ex["prompt"]),
            "count": np.float32(ex["count"]),
            "density": density.density_map(ex["centers"], s, s, self.sigma),
            "minority": np.bool_(ex["minority"]),
            "absent_prompt": self.template.format(ex["absent_prompt"]),
            "absent_shares_color": ex["absent_shares_color"], "valid": True}


class _RealEval:
  def __init__(self, records: Sequence[counting_datasets.CountingImage], template: str):
    self.records, self.template = list(records), template

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    r = self.records[index]
    return {"image_path": r.image_path, "name": r.name, "points": r.points,
            "count": np.float32(r.count), "class_name": r.class_name,
            "prompt": self.template.format(r.class_name)}


def eval_dataset(config, image_size: int, split: str = "heldout",
                 size: int | None = None) -> grain.MapDataset:
  """Random-access density eval examples; the first `size` (default: density.eval_size for the
  synthetic world, the whole split for real sets).

  synthetic: {"image": float32 (S, S, 3) normalised, "prompt": str, "count": float32,
    "density": float32 (S, S) unscaled (sums to count), "minority": bool, "absent_prompt": str,
    "valid": True}, S = crop_size(config, image_size); eval_batches can batch these.
  real sets (split "heldout" = EVAL_SPLIT, or a split of the set): {"image_path": str, "name":
    str, "points": float32 (n, 2) in the stored image's pixels, "count": float32, "class_name":
    str, "prompt": str}. Images are of any size, so none is decoded here: `eval_image` gives the
    full image at the training height for a sliding window (stride density.eval_window_stride).
  """
  template = _template(config)
  if is_synthetic(config):
    world = dense_world(config, image_size, split,
                        config.density.eval_size if size is None else size)
    return grain.MapDataset.source(_DenseEval(world, template, _sigma(config)))
  records = read_split(config, EVAL_SPLIT if split == "heldout" else split)
  return grain.MapDataset.source(_RealEval(records[:size], template))


def eval_image(example: dict, config) -> tuple[np.ndarray | None, np.ndarray]:
  """A real eval example -> (float32 (crop_size, w', 3) normalised, its points resized with it),
  as training sees images before the crop; (None, points as stored) when the file does not read
  or decode (logged), so that the eval counts it as skipped instead of crashing."""
  height = config.density.crop_size
  try:
    with open(example["image_path"], "rb") as f:
      image, points = load_image(f.read(), example["points"], height)
  except (images.BadImageError, OSError) as e:
    logging.warning("Density eval image %s skipped: %s", example["image_path"], e)
    return None, density.as_points(example["points"])
  return images.normalize(image), points
