"""Input pipelines: grain datasets -> per-host batches -> global jax.Arrays; eval batches.

A training batch (host-local numpy; B = train.batch_size, P processes, p = count.fraction,
C = round(p B) / P counting rows, G = B / P - C general rows, K = count.num_counterfactuals,
S = image size, L = tokenizer.context_length):
  {"count":   {"image": uint8 (C, S, S, 3), "text": int32 (C, L), "cf_text": int32 (C, K, L),
               "number": int32 (C,), "cf_number": int32 (C, K)},
   "general": {"image": uint8 (G, S, S, 3), "text": int32 (G, L)}}
Images are RGB NHWC pixels; the train step CLIP-normalises them on the devices
(images.normalize_on_device: a quarter of the bytes to stack and move, no float work on the
host); eval examples are normalised float32 on the host. `cf_text[i, k]` is `text[i]`'s
caption with its number word swapped for `cf_number[i, k]`, never equal to `number[i]`: K = 1
draws one wrong number, K = 8 takes all eight (ascending).

Per set: examples -> shuffle -> repeat (reshuffled each epoch) -> per-example random_map
(decode, crop, counterfactual numbers): an endless stream. `train_rows` lays this process's
rows of every global batch out one after another (a MapDataset of examples, `Rows`);
`iterate` has data.num_threads threads prepare runs of them in parallel and batches them on
the iterator (stack + tokenize the whole batch at once). So batch i is a pure function of
(config, process, i): the same seed gives the same batches, whatever the thread timing, and
`train_dataset(...)[i]` is the same batch at random access. The data position is the step: a
resume at step s asks for `train_iterator(..., start=s)`, on any process count (no iterator
state is saved; `it.get_state()` / `it.set_state()` still work for other uses).

Sources (config.data.source): "synthetic" (both sets from the procedural world's train split,
rendered at the model's size; counting rows say the number, general rows do not), "records"
(data.records.counting / .general, written by data.prepare), "tfds" (general pairs from
`tfds.data_source(data.tfds.name)`, counting pairs from data.records.counting). All processes
draw from one stream of global batches and process p keeps rows [p B/P, (p + 1) B/P) of each:
P processes train on exactly the batches of one process. config.data.augment (random resized
crop) applies to records and tfds images; the synthetic world is already random
per example, and a crop could cut a counted object out. config.data.balance_numbers makes the
numbers take turns in the counting rows (a uniform mix, each number reshuffled on its own).

Eval: `synthetic_eval_dataset` / `countbench_eval_dataset` (random-access examples) and
`eval_batches` (fixed-size batches, the last padded, with a `valid` mask).
"""
from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np
from absl import logging
from PIL import Image

from countclip_jax.data import images
from countclip_jax.data import records
from countclip_jax.data import synthetic
from countclip_jax.text import numbers
from countclip_jax.text import tokenizer as tokenizer_lib

# The procedural world is fixed; train.seed changes the order and augmentation, not the world,
# so held-out evals of runs with different seeds see the same images.
WORLD_SEED = 0
# A record whose image fails to decode at train time (prepare validated it; storage may not
# have kept it) is replaced by the next one, at most this many times.
MAX_BAD_IMAGES_IN_A_ROW = 16
# HF fast tokenizers set truncation/padding on a shared Rust object per call: grain's threads
# must not call one at the same time ("Already borrowed").
_TOKENIZER_LOCK = threading.Lock()


def split_sizes(batch_size: int, fraction: float, process_count: int = 1) -> tuple[int, int]:
  """(counting rows, general rows) per process: round(p B) / P and (B - round(p B)) / P.

  Python's round (half to even: round(0.25 * 10) = 2), so the trainer can recompute it.
  """
  if not 0 <= fraction <= 1:
    raise ValueError(f"count.fraction must be in [0, 1], got {fraction}.")
  if process_count < 1 or batch_size < 1 or batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the "
                     f"process count {process_count}.")
  count = round(fraction * batch_size)
  general = batch_size - count
  if count % process_count or general % process_count:
    raise ValueError(f"round(count.fraction * train.batch_size) = round({fraction} * {batch_size})"
                     f" = {count} counting and {general} general examples must each divide by "
                     f"the process count {process_count}.")
  return count // process_count, general // process_count


def _num_counterfactuals(k) -> int:
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(numbers.NUMBERS) - 1:
    raise ValueError(f"count.num_counterfactuals must be an int in 1..{len(numbers.NUMBERS) - 1}"
                     f" (1 = the paper, 8 = every wrong number), got {k!r}.")
  return k


def _process(process_index, process_count) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index must be in [0, process_count={count}), got {index}.")
  return index, count


def _seed(*entropy: int) -> int:
  """A 32-bit seed (grain's range) for one stream: (train.seed, process, stream id)."""
  return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Sources: random-access examples {"image", "caption", "number"}. "image" is a uint8 (S, S, 3)
# array already at size (synthetic; only normalised) or a PIL image (resized, cropped, maybe
# augmented). "number" is the stated count, 0 for general pairs.

@dataclasses.dataclass
class _Examples:
  dataset: grain.MapDataset    # the examples of one set (all of them, or a process's shard)
  numbers: np.ndarray          # int32 (len(dataset),), the count of each example (0: general)


class _SyntheticExamples:
  """The world's examples [start, stop) with the caption with or without the number."""

  def __init__(self, world: synthetic.SyntheticCounting, start: int, stop: int, counting: bool):
    self.world, self.start, self.stop, self.counting = world, start, stop, counting

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> dict:
    ex = self.world[self.start + index]
    if self.counting:
      return {"image": ex["image"], "caption": ex["caption_with_number"], "number": ex["count"]}
    return {"image": ex["image"], "caption": ex["caption_without_number"], "number": 0}


def synthetic_world(config, image_size: int, split: str = "train",
                    size: int | None = None) -> synthetic.SyntheticCounting:
  """The procedural world of config.data.synthetic at the model's image size."""
  s = config.data.synthetic
  world = synthetic.WorldConfig(image_size=image_size, distractor_prob=s.distractor_prob,
                                textured_prob=s.textured_prob)
  return synthetic.SyntheticCounting(world, split=split, seed=WORLD_SEED,
                                     size=s.size if size is None else size)


def _synthetic(config, image_size: int, counting: bool) -> _Examples:
  # The train split is cut in two, the counting part in proportion p: the two sets never share
  # an image (a shared one would be a false negative in the CLIP loss) and are used up at the
  # same rate.
  world = synthetic_world(config, image_size)
  n, p = len(world), config.count.fraction
  cut = n if p >= 1 else 0 if p <= 0 else min(max(round(n * p), 1), n - 1)
  start, stop = (0, cut) if counting else (cut, n)
  span = world.config.max_count - world.config.min_count + 1
  counts = (world.config.min_count + np.arange(start, stop) % span if counting
            else np.zeros(stop - start))
  return _Examples(grain.MapDataset.source(_SyntheticExamples(world, start, stop, counting)),
                   counts.astype(np.int32))


class _DecodedRecords(grain.MapDataset):
  """ArrayRecord examples with decoded images; a bad image is replaced by the next record.

  A MapDataset over the records' source, not a source itself: grain then measures the record
  bytes it reads, not (~50 us an example) the decoded example.
  """

  def __init__(self, source: grain.MapDataset, min_size: int):
    super().__init__(source)
    self.source, self.min_size = source, min_size

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    for i in range(index, index + MAX_BAD_IMAGES_IN_A_ROW):
      record = records.decode(self.source[i % len(self)])
      try:
        image = images.decode(record["image"], min_size=self.min_size)
      except images.BadImageError as e:
        logging.warning("Skipping record %d (key %r): %s", i % len(self), record["key"], e)
        continue
      return {"image": image, "caption": record["caption"], "number": record["number"]}
    raise images.BadImageError(f"{MAX_BAD_IMAGES_IN_A_ROW} bad images in a row from record "
                               f"{index} on: are these ArrayRecord shards from data.prepare?")


def _min_decode_size(image_size: int, augment: bool) -> int:
  # As images.preprocess: JPEGs decode at reduced scale while a crop still has enough pixels.
  return math.ceil(image_size / math.sqrt(images.CROP_SCALE[0])) if augment else image_size


def _records(pattern: str, field: str, image_size: int, augment: bool) -> _Examples:
  if not pattern:
    raise ValueError(f"config.{field} is empty: give the ArrayRecord glob written by "
                     "`python -m countclip_jax.data.prepare`.")
  source, paths = records.data_source(pattern)
  decoded = _DecodedRecords(grain.MapDataset.source(source), _min_decode_size(image_size, augment))
  return _Examples(decoded, records.numbers(paths))


class _TfdsExamples:
  """tfds image-text examples: "image" (uint8 array or encoded bytes) and the first caption of
  "caption", "text" or "captions"/"captions.text"."""

  def __init__(self, source, name: str):
    self.source, self.name = source, name

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    ex = self.source[index]
    image = ex["image"]
    image = (images.decode(image) if isinstance(image, bytes)
             else images.to_rgb(Image.fromarray(np.asarray(image).squeeze())))
    caption = next((ex[k] for k in ("caption", "text", "captions") if k in ex), None)
    if isinstance(caption, dict):
      caption = caption.get("text")
    if isinstance(caption, (list, tuple, np.ndarray)):
      caption = caption[0] if len(caption) else ""
    if isinstance(caption, (bytes, np.bytes_)):
      caption = caption.decode("utf-8")
    if not isinstance(caption, str):
      raise ValueError(f"tfds {self.name} example {index} has no caption under 'caption', "
                       f"'text' or 'captions'; its features are {sorted(ex)}.")
    return {"image": image, "caption": caption, "number": 0}


def _tfds(config) -> _Examples:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow; tfds only
  name, split = config.data.tfds.name, config.data.tfds.split
  if not name:
    raise ValueError("config.data.source is 'tfds' but config.data.tfds.name is empty.")
  source = tfds.data_source(name, split=split)
  return _Examples(grain.MapDataset.source(_TfdsExamples(source, name)),
                   np.zeros(len(source), np.int32))


def _sources(config, image_size: int, need_count: bool, need_general: bool):
  """(counting examples or None, general examples or None) for config.data.source."""
  kind, augment = config.data.source, config.data.augment
  if kind == "synthetic":
    return (_synthetic(config, image_size, True) if need_count else None,
            _synthetic(config, image_size, False) if need_general else None)
  if kind not in ("records", "tfds"):
    raise ValueError(f"config.data.source must be synthetic, records or tfds; got {kind!r}.")
  count = (_records(config.data.records.counting, "data.records.counting", image_size, augment)
           if need_count else None)
  if not need_general:
    return count, None
  if kind == "tfds":
    return count, _tfds(config)
  return count, _records(config.data.records.general, "data.records.general", image_size, augment)


# ---------------------------------------------------------------------------------------------
# Example -> batch.

class _Lookup:
  """index -> dataset[index] (a class, not a lambda: grain pickles it for worker processes)."""

  def __init__(self, dataset):
    self.dataset = dataset

  def __call__(self, index):
    return self.dataset[int(index)]


# Rows per endless stream. grain's repeat() without a count is sys.maxsize long, and a mix of
# several such streams (or a batch of one row of it) overflows len(); this many rows is as
# endless in practice, and the same for every stream, so the mix interleaves as before.
STREAM_ROWS = 2**56


def _endless(dataset: grain.MapDataset) -> grain.MapDataset:
  """The dataset repeated (each epoch in its own order) to exactly STREAM_ROWS rows."""
  return dataset.repeat(-(-STREAM_ROWS // len(dataset)))[:STREAM_ROWS]


def _stream(examples: _Examples, seed: int, balance: bool, where: str) -> grain.MapDataset:
  """An infinite, per-epoch reshuffled stream of `examples`; with `balance` the numbers take
  turns (a uniform mix over the numbers present), each number reshuffled on its own."""
  if len(examples.dataset) == 0:
    raise ValueError(f"No {where} examples (an empty set).")
  if not balance:
    return _endless(examples.dataset.shuffle(seed))
  present = sorted(set(examples.numbers.tolist()))
  missing = sorted(set(numbers.NUMBERS) - set(present))
  if missing:
    logging.warning("Balanced sampling: no %s examples of %s on this process.", where, missing)
  streams = [_endless(grain.MapDataset.source(np.flatnonzero(examples.numbers == n))
                     .shuffle((seed + i) % 2**32)) for i, n in enumerate(present)]
  return grain.MapDataset.mix(streams).map(_Lookup(examples.dataset))


def _pixels(image, size: int, rng: np.random.Generator | None) -> np.ndarray:
  """uint8 (S, S, 3), a training image before normalisation: the step normalises on the
  devices (images.normalize_on_device), so the host neither computes nor copies 4-byte floats
  (the normalising look-up took 0.6-1.4 ms an example at 224 px on this repo's 2 shared cores,
  and a float image is 4x the bytes to stack and move)."""
  if isinstance(image, np.ndarray):  # the synthetic world renders at the model's size
    if image.shape != (size, size, 3):
      raise ValueError(f"Synthetic image of shape {image.shape}, expected {(size, size, 3)}.")
    return image
  if rng is None:  # augment off: decoded by the training rule already; resize the crop box only
    return np.asarray(images.resize_crop_box(image, size))
  return np.asarray(images.random_resized_crop(image, size, rng))


def counterfactual_numbers(number: int, k: int, rng: np.random.Generator) -> np.ndarray:
  """int32 (k,): k distinct numbers of two..ten other than `number` (all eight when k = 8)."""
  wrong = [n for n in numbers.NUMBERS if n != number]
  if k == len(wrong):
    return np.asarray(wrong, np.int32)
  return np.asarray(rng.choice(wrong, size=k, replace=False), np.int32)


class _PrepareCounting:
  def __init__(self, size: int, augment: bool, k: int):
    self.size, self.augment, self.k = size, augment, k

  def __call__(self, ex: dict, rng: np.random.Generator) -> dict:
    number = int(ex["number"])
    return {"image": _pixels(ex["image"], self.size, rng if self.augment else None),
            "caption": ex["caption"], "number": number,
            "cf_number": counterfactual_numbers(number, self.k, rng)}


class _PrepareGeneral:
  def __init__(self, size: int, augment: bool):
    self.size, self.augment = size, augment

  def __call__(self, ex: dict, rng: np.random.Generator) -> dict:
    return {"image": _pixels(ex["image"], self.size, rng if self.augment else None),
            "caption": ex["caption"]}


def _cut(ids: np.ndarray, texts: Sequence[str], tokenizer: tokenizer_lib.Tokenizer
         ) -> np.ndarray:
  """bool (N,): rows of `ids` (`texts` tokenized) that truncation cut. A row that fills the
  context (eos last, a token before it: exact whether pad is eos, OpenAI's vocabulary, or not)
  may also have fit exactly; only those rows are tokenized again, whole, to tell."""
  eos = tokenizer.eos_token_id
  cut = (ids[:, -1] == eos) & (ids[:, -2] != eos)
  if cut.any():
    rows = np.flatnonzero(cut)
    cut[rows] = [len(t) > tokenizer.context_length - 2
                 for t in tokenizer.tokens([texts[i] for i in rows])]
  return cut


def tokenize_counting(tokenizer: tokenizer_lib.Tokenizer, captions: Sequence[str],
                      counts: Sequence[int], cf_numbers: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(text int32 (N, L), cf_text int32 (N, K, L)) for counting captions and their swaps.

  A caption that (or one of whose swaps) is longer than the context is cut by `fit_caption`
  around its number word first, so that truncation never removes the word the counting loss is
  about; one that fits, exactly or not, is kept whole.
  """
  captions = list(captions)
  n, k = cf_numbers.shape

  def swaps(rows):
    return [numbers.swap_count(captions[i], int(m), int(counts[i]))
            for i in rows for m in cf_numbers[i]]

  with _TOKENIZER_LOCK:
    swapped = swaps(range(n))
    text, cf_text = tokenizer(captions), tokenizer(swapped).reshape(n, k, -1)
    cut = np.flatnonzero(_cut(text, captions, tokenizer)
                         | _cut(cf_text.reshape(n * k, -1), swapped, tokenizer).reshape(n, k)
                         .any(1))
    for i in cut:
      try:
        captions[i] = tokenizer_lib.fit_caption(tokenizer, captions[i], int(counts[i]))
      except ValueError as e:  # the number word alone does not fit: keep plain truncation
        logging.warning("Counting caption kept truncated: %s", e)
    if len(cut):
      text[cut] = tokenizer([captions[i] for i in cut])
      cf_text[cut] = tokenizer(swaps(cut)).reshape(len(cut), k, -1)
  return text, cf_text


class _CountingBatch:
  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, examples: Sequence[dict]) -> dict:
    counts = np.asarray([e["number"] for e in examples], np.int32)
    cf_numbers = np.stack([e["cf_number"] for e in examples]).astype(np.int32)
    text, cf_text = tokenize_counting(self.tokenizer, [e["caption"] for e in examples], counts,
                                      cf_numbers)
    return {"image": np.stack([e["image"] for e in examples]), "text": text, "cf_text": cf_text,
            "number": counts, "cf_number": cf_numbers}


class _GeneralBatch:
  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, examples: Sequence[dict]) -> dict:
    with _TOKENIZER_LOCK:  # general captions: plain truncation to the context
      text = self.tokenizer([e["caption"] for e in examples])
    return {"image": np.stack([e["image"] for e in examples]), "text": text}


def _empty(kind: str, size: int, k: int, length: int) -> dict:
  image = np.zeros((0, size, size, 3), np.uint8)
  if kind == "general":
    return {"image": image, "text": np.zeros((0, length), np.int32)}
  return {"image": image, "text": np.zeros((0, length), np.int32),
          "cf_text": np.zeros((0, k, length), np.int32), "number": np.zeros((0,), np.int32),
          "cf_number": np.zeros((0, k), np.int32)}


class _Batch:
  """This process's rows of one global batch (its C counting rows, then its G general ones) ->
  the batch dict; a side without rows gets empty arrays."""

  def __init__(self, tokenizer, count: int, general: int, image_size: int, k: int):
    self.count, self.general = count, general
    self.count_fn, self.general_fn = _CountingBatch(tokenizer), _GeneralBatch(tokenizer)
    length = tokenizer.context_length
    self.empty_count = _empty("count", image_size, k, length)
    self.empty_general = _empty("general", image_size, k, length)

  def __call__(self, rows: Sequence[dict]) -> dict:
    rows = list(rows)
    c = self.count
    return {"count": self.count_fn(rows[:c]) if c else self.empty_count,
            "general": self.general_fn(rows[c:]) if self.general else self.empty_general}


class _ProcessRows(grain.MapDataset):
  """Row j of this process's batches -> the example it holds.

  Part k (e.g. counting, general) gives each global batch P * n_k consecutive examples of its
  stream, cut into local batches of n_k; process p holds local batch b P + p of every part in
  its batch b: rows [0, n_0) from part 0, then n_1 from part 1, ... So the rows are the same
  whatever the process count, and a process reads only its own. (A MapDataset over the parts,
  not a `MapDataset.source`: grain measures every source read, ~0.1 ms an example.)
  """

  def __init__(self, parts: Sequence[grain.MapDataset], sizes: Sequence[int],
               process_index: int, process_count: int):
    super().__init__(list(parts))
    self.parts, self.sizes = list(parts), list(sizes)
    self.process_index, self.process_count = process_index, process_count
    self.rows = sum(sizes)
    # Endless in practice; capped so that len() stays an int64 (see STREAM_ROWS).
    self.num_batches = min(STREAM_ROWS // n for n in sizes) // process_count

  def __len__(self) -> int:
    return self.num_batches * self.rows

  def __getitem__(self, j):
    if isinstance(j, slice):
      return self.slice(j)
    b, r = divmod(int(j), self.rows)
    local = b * self.process_count + self.process_index
    for part, n in zip(self.parts, self.sizes):
      if r < n:
        return part[local * n + r]
      r -= n
    raise IndexError(j)  # unreachable: r < self.rows


@dataclasses.dataclass
class Rows:
  """A task's training input, one example a row: `dataset` holds this process's rows, batch
  after batch (`batch_rows` each); `batch_fn` turns one batch's rows into the batch."""
  dataset: grain.MapDataset
  batch_rows: int
  batch_fn: Any

  def batches(self) -> grain.MapDataset:
    """The MapDataset of batches: random access to batch i (tests, tools)."""
    return self.dataset.batch(self.batch_rows, batch_fn=self.batch_fn)


def process_rows(parts: Sequence[grain.MapDataset], sizes: Sequence[int], batch_fn,
                 process_index: int, process_count: int) -> Rows:
  """Rows of endless example streams `parts`, n_k = sizes[k] of part k a local batch (parts of
  size 0 left out), for process `process_index` of `process_count` (see _ProcessRows)."""
  kept = [(part, n) for part, n in zip(parts, sizes) if n]
  rows = _ProcessRows([p for p, _ in kept], [n for _, n in kept], process_index, process_count)
  return Rows(rows, rows.rows, batch_fn)


def train_rows(config, tokenizer: tokenizer_lib.Tokenizer, image_size: int, *,
               process_index: int | None = None, process_count: int | None = None) -> Rows:
  """This process's training examples, one a row (each decoded, cropped, normalised and given
  its counterfactual numbers on its own), and how a batch's rows become the batch."""
  process_index, process_count = _process(process_index, process_count)
  c, g = split_sizes(config.train.batch_size, config.count.fraction, process_count)
  k = _num_counterfactuals(config.count.num_counterfactuals)
  count_examples, general_examples = _sources(config, image_size, c > 0, g > 0)
  seed, augment = config.train.seed, config.data.augment
  # The global batch must not depend on the process count: every process builds the same
  # streams (seeds (seed, 0, stream), as one process always had); random_map draws each
  # example's randomness from its place in its stream, so any process or thread gets the same.
  parts = [None, None]
  if c:
    stream = _stream(count_examples, _seed(seed, 0, 0), config.data.balance_numbers, "counting")
    parts[0] = stream.random_map(_PrepareCounting(image_size, augment, k), seed=_seed(seed, 0, 1))
  if g:
    stream = _stream(general_examples, _seed(seed, 0, 2), False, "general")
    parts[1] = stream.random_map(_PrepareGeneral(image_size, augment), seed=_seed(seed, 0, 3))
  return process_rows(parts, (c, g), _Batch(tokenizer, c, g, image_size, k), process_index,
                      process_count)


def train_dataset(config, tokenizer: tokenizer_lib.Tokenizer, image_size: int, *,
                  process_index: int | None = None, process_count: int | None = None
                  ) -> grain.MapDataset:
  """The infinite MapDataset of this process's training batches (see the module docstring):
  batch i at random access, exactly what `train_iterator` yields i-th."""
  return train_rows(config, tokenizer, image_size, process_index=process_index,
                    process_count=process_count).batches()


def train_iterator(config, tokenizer: tokenizer_lib.Tokenizer, image_size: int, *,
                   process_index: int | None = None, process_count: int | None = None,
                   num_threads: int | None = None, start: int = 0) -> grain.DatasetIterator:
  """An infinite iterator of this process's training batches from global batch `start` on.

  Batch i is a pure function of i whatever the process count, so a resume at step s passes
  start=s instead of restoring an iterator state (which would tie it to the process count).
  num_threads: None = config.data.num_threads; see `iterate`.
  """
  return iterate(train_rows(config, tokenizer, image_size, process_index=process_index,
                            process_count=process_count), config, start, num_threads)


def host_threads(config) -> int:
  """config.data.num_threads, with -1 = this process's cores (shared out among the
  data.num_workers worker processes, when there are)."""
  threads = config.data.num_threads
  if threads != -1:
    return threads
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, (cores or 1) // max(1, config.data.num_workers))


def iterate(rows: Rows, config, start: int, num_threads: int | None = None
            ) -> grain.DatasetIterator:
  """Batches `start`, `start` + 1, ... of `rows`: what each task's train_iterator returns.

  In this process (data.num_workers = 0), `num_threads` threads (None: `host_threads`; 0: the
  caller's thread) prepare runs of consecutive rows (`rows_per_task`) in parallel, up to
  data.prefetch_buffer_size batches ahead, and the caller's thread stacks and tokenizes each
  batch (the trainer's device prefetch thread does that). Decoding, resizing and the record
  read release the GIL, so threads scale with cores (the synthetic world's rendering holds
  it). With data.num_workers > 0, that many worker processes (each with num_threads threads)
  make whole batches, for per-example Python work that does not scale on threads: grain gives
  each worker a slice of what precedes `to_iter_dataset`, so batching after it would mix rows
  of different batches. Workers need absl flags parsed (absl.app.run does it);
  `it.close()` stops them.
  """
  threads = host_threads(config) if num_threads is None else num_threads
  ahead = config.data.prefetch_buffer_size
  if config.data.num_workers:
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads and
                                max(threads, ahead))
    ds = rows.batches()[start:].to_iter_dataset(options).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.data.num_workers))
    return iter(ds)
  task = rows_per_task(rows.batch_rows, threads, ahead)
  options = grain.ReadOptions(num_threads=threads,
                              prefetch_buffer_size=threads and ahead * rows.batch_rows // task)
  tasks = rows.dataset[start * rows.batch_rows:].batch(task, batch_fn=list)
  flattened = lambda runs: rows.batch_fn([row for run in runs for row in run])
  return iter(tasks.to_iter_dataset(options).batch(rows.batch_rows // task, drop_remainder=True,
                                                   batch_fn=flattened))


# A thread's task is a run of consecutive rows, not one row: grain's thread pool costs a future
# and a hand-over per task (~0.15 ms of CPU an example at 224 px, ~0.3 ms at the demo's 64 px:
# benchmarks/input_pipeline.py, docs/PERFORMANCE.md).
MAX_ROWS_PER_TASK = 16


def rows_per_task(batch_rows: int, threads: int, ahead: int) -> int:
  """Rows one thread prepares at a time: the most (up to MAX_ROWS_PER_TASK) that divide a
  batch and still leave the prefetch buffer two tasks per thread, so no thread waits."""
  return max(d for d in range(1, MAX_ROWS_PER_TASK + 1)
             if batch_rows % d == 0 and (d == 1 or ahead * batch_rows // d >= 2 * threads))


def global_batch(batch, sharding) -> Any:
  """Host-local numpy batch -> the same tree of global jax.Arrays (leading dims × processes).

  sharding: one jax.sharding.Sharding for every leaf, or a tree of them that is a prefix of
  `batch` (e.g. {"count": s1, "general": s2}). Leaves must be numeric (drop eval strings first).
  """
  def place(path, s, x):
    try:
      return jax.make_array_from_process_local_data(s, x)
    except Exception as e:
      raise ValueError(f"Cannot place batch leaf {jax.tree_util.keystr(path)} of local shape "
                       f"{np.shape(x)} with {s}: {e}") from e

  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  if is_sharding(sharding):
    return jax.tree_util.tree_map_with_path(lambda p, x: place(p, sharding, x), batch)
  return jax.tree_util.tree_map_with_path(
      lambda p, s, sub: jax.tree_util.tree_map_with_path(
          lambda q, x: place(p + q, s, x), sub), sharding, batch, is_leaf=is_sharding)


class DevicePrefetch:
  """An iterator of host batches, as global jax.Arrays placed `depth` batches ahead by a thread.

  While the step on batch i runs, the thread pulls batch i + 1 from `batches` (for a grain
  iterator of rows: stacks and tokenizes it) and places it (`global_batch`), so neither waits
  for the other. The order is `batches`' order: batch i is still a function of i. depth 0: in
  the caller's thread, no thread at all. `close()` stops the thread, then closes `batches`
  (grain's worker processes, when there are).
  """

  def __init__(self, batches, sharding, depth: int):
    self.batches, self.sharding = batches, sharding
    self.error = None  # what ended the stream (StopIteration included), raised again and again
    self.stopping = threading.Event()
    self.queue = queue.Queue(maxsize=max(depth, 1))
    self.thread = None
    if depth > 0:
      self.thread = threading.Thread(target=self._fill, name="device-prefetch", daemon=True)
      self.thread.start()

  def _place(self):
    return global_batch(next(self.batches), self.sharding)

  def _fill(self) -> None:
    while not self.stopping.is_set():
      try:
        item = (self._place(), None)
      except BaseException as e:  # pylint: disable=broad-except  # re-raised by __next__
        item = (None, e)
      while not self.stopping.is_set():  # a full queue waits for the step, or for close()
        try:
          self.queue.put(item, timeout=0.1)
          break
        except queue.Full:
          pass
      if item[1] is not None:
        return

  def __iter__(self):
    return self

  def __next__(self):
    if self.error is None and self.thread is None:
      try:
        return self._place()
      except BaseException as e:
        self.error = e
    if self.error is None:
      batch, self.error = self.queue.get()
      if self.error is None:
        return batch
    raise self.error

  def close(self, timeout: float = 120.0) -> None:
    self.stopping.set()
    if self.thread is not None:
      self.thread.join(timeout)  # it finishes the batch it is making
      if self.thread.is_alive():  # e.g. a grain worker died under it: closing may free it
        logging.warning("Device prefetch thread still in next() after %.0f s; closing its "
                        "iterator under it.", timeout)
    if hasattr(self.batches, "close"):
      self.batches.close()


# ---------------------------------------------------------------------------------------------
# Evaluation.

class _SyntheticEval:
  def __init__(self, world, image_size):
    self.world, self.image_size = world, image_size

  def __len__(self) -> int:
    return len(self.world)

  def __getitem__(self, index: int) -> dict:
    ex = self.world[index]
    return {"image": images.normalize(_pixels(ex["image"], self.image_size, None)),
            "number": ex["count"],
            "color": ex["color"], "shape": ex["shape"], "caption": ex["caption_with_number"],
            "general_caption": ex["caption_without_number"], "valid": True}


def synthetic_eval_dataset(config, image_size: int, split: str = "heldout",
                           size: int | None = None) -> grain.MapDataset:
  """Random-access eval examples of the world (default size: config.eval.size), each
  {"image": float32 (S, S, 3) normalised, "number": int32 count, "color": str, "shape": str,
   "caption": str (with the number word), "general_caption": str (without), "valid": True}."""
  world = synthetic_world(config, image_size, split, config.eval.size if size is None else size)
  return grain.MapDataset.source(_SyntheticEval(world, image_size))


class _CountBenchEval:
  def __init__(self, examples, image_size):
    self.examples, self.image_size = examples, image_size

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index: int) -> dict:
    ex = self.examples[index]
    image, valid = images.preprocess_or_blank(ex.read, self.image_size,
                                              f"CountBench example {ex.index} ({ex.url})")
    return {"image": image, "number": np.int32(ex.number), "caption": ex.text,
            "index": np.int32(ex.index), "valid": valid}


def countbench_eval_dataset(source: str, image_size: int) -> tuple[grain.MapDataset, int]:
  """(CountBench examples, number without an image) from data/countbench.py's cache or parquet.

  Each example: {"image": float32 (S, S, 3), "number": int32, "caption": str, "index": int32
  (CountBench entry), "valid": bool (False when the cached image does not decode)}.
  """
  from countclip_jax.data import countbench  # pylint: disable=g-import-not-at-top
  examples, missing = countbench.load_examples(source)
  return grain.MapDataset.source(_CountBenchEval(examples, image_size)), missing


class _EvalRows:
  """Row j of this process's padded eval shard -> example (or padding, valid False).

  Global batch b holds examples [b B, (b + 1) B) in order; process p holds rows
  [p B/P, (p + 1) B/P) of it, so global arrays list the examples in dataset order.
  """

  def __init__(self, dataset, batch_size: int, process_index: int, process_count: int):
    self.dataset = dataset
    self.batch_size, self.local = batch_size, batch_size // process_count
    self.process_index = process_index
    self.num_batches = math.ceil(len(dataset) / batch_size)
    first = dataset[0]
    self.padding = {k: np.zeros_like(np.asarray(v)) for k, v in first.items()}
    self.padding["valid"] = np.bool_(False)

  def __len__(self) -> int:
    return self.num_batches * self.local

  def __getitem__(self, j: int) -> dict:
    b, r = divmod(j, self.local)
    g = b * self.batch_size + self.process_index * self.local + r
    if g >= len(self.dataset):
      return {**self.padding, "example": np.int32(-1)}
    ex = self.dataset[g]
    return {**ex, "valid": np.bool_(ex.get("valid", True)), "example": np.int32(g)}


def eval_batches(dataset, batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = 2) -> Iterator[dict]:
  """Fixed-size eval batches of a random-access dataset of dicts, the last one padded.

  batch_size is global: each process yields ceil(N / batch_size) batches of batch_size / P
  rows, the same number on every process. Each batch holds the dataset's fields stacked
  (leading dim batch_size / P) plus "valid": bool (False for padding and for examples whose
  own "valid" is False) and "example": int32 (index in `dataset`, -1 for padding).
  """
  process_index, process_count = _process(process_index, process_count)
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"eval batch_size={batch_size} must be a positive multiple of the process "
                     f"count {process_count}.")
  if len(dataset) == 0:
    return iter(())
  rows = _EvalRows(dataset, batch_size, process_index, process_count)
  ds = grain.MapDataset.source(rows).batch(rows.local)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=num_threads)))
