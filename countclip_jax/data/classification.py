"""tfds image-classification sets for zero-shot retention evals (cifar10, imagenet2012, ...).

  dataset, class_names = classification.load("tfds:cifar10:test", image_size=224)
  dataset[0]  # {"image": float32 (S, S, 3) CLIP-normalised, "label": int32, "valid": bool}

A spec is `tfds:NAME[:SPLIT]` with tfds's split syntax (`tfds:imagenet2012:validation[:10000]`);
the split defaults to test, else validation. The set must already be prepared in array_record
format (`tfds.data_source` reads it by index; nothing is downloaded here). Images are read as
bytes and decoded by data/images.py, so a corrupt one becomes `valid: False` (counted as
skipped by the eval), never a crash. Class names come from the label feature, or from a text
file (one per line) where the feature holds ids such as imagenet2012's WordNet synsets.
"""
from __future__ import annotations

import re

import grain
import numpy as np
from etils import epath

from countclip_jax.data import images

PREFIX = "tfds:"
IMAGE_KEY, LABEL_KEY = "image", "label"
_WORDNET_ID = re.compile(r"^n\d{8}$")


def parse_spec(spec: str) -> tuple[str, str]:
  """'tfds:NAME[:SPLIT]' -> (NAME, SPLIT or '')."""
  if not spec.startswith(PREFIX) or not spec[len(PREFIX):].split(":")[0]:
    raise ValueError(f"A tfds eval set is 'tfds:NAME[:SPLIT]' (e.g. tfds:cifar10:test), "
                     f"got {spec!r}")
  name, _, split = spec[len(PREFIX):].partition(":")
  return name, split


def class_names(features, names_file: str = "") -> list[str]:
  """Readable class names: the file's lines if given, else the label feature's names."""
  label = features[LABEL_KEY]
  if names_file:
    names = [l.strip() for l in epath.Path(names_file).read_text().splitlines() if l.strip()]
    if len(names) != label.num_classes:
      raise ValueError(f"{names_file} lists {len(names)} class names; the dataset has "
                       f"{label.num_classes} classes")
    return names
  names = [n.replace("_", " ") for n in label.names]
  if any(_WORDNET_ID.match(n) for n in names):
    raise ValueError("The dataset's labels are WordNet ids (n01440764, ...), not words a text "
                     "encoder can read; pass a class-names file, one name per line in label "
                     "order (eval.class_names / --class_names)")
  return names


class _Examples:
  """index -> {"image", "label", "valid"}; bad bytes give a blank image and valid False."""

  def __init__(self, source, image_size: int, where: str):
    self.source, self.image_size, self.where = source, image_size, where

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    ex = self.source[index]
    image, valid = images.preprocess_or_blank(lambda: bytes(ex[IMAGE_KEY]), self.image_size,
                                              f"{self.where} example {index}")
    return {"image": image, "label": np.int32(ex[LABEL_KEY]), "valid": valid}


def load(spec: str, image_size: int, *, data_dir: str = "",
         names_file: str = "") -> tuple[grain.MapDataset, list[str]]:
  """(random-access eval examples, class names) of a prepared tfds classification set."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow to import
  name, split = parse_spec(spec)
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"{spec}: tfds has no dataset {name!r}") from e
  if not builder.is_prepared():
    raise ValueError(
        f"{spec}: {name} is not prepared in {builder.data_dir}. Prepare it once where there is "
        f"internet (`tfds build {name} --file_format=array_record`) and point eval.tfds_data_dir "
        "(--tfds_data_dir) at that data dir")
  features = builder.info.features
  if IMAGE_KEY not in features or LABEL_KEY not in features:
    raise ValueError(f"{spec}: a classification set needs features {IMAGE_KEY!r} and "
                     f"{LABEL_KEY!r}; {name} has {sorted(features)}")
  if not split:
    split = next((s for s in ("test", "validation") if s in builder.info.splits), None)
    if split is None:
      raise ValueError(f"{spec}: no test or validation split; name one: tfds:{name}:SPLIT "
                       f"(splits: {sorted(builder.info.splits)})")
  try:
    source = builder.as_data_source(
        split=split, decoders={IMAGE_KEY: tfds.decode.SkipDecoding()})
  except NotImplementedError as e:  # prepared as tfrecord: no random access
    raise ValueError(f"{spec}: {name} was prepared as {builder.info.file_format}; evals read "
                     f"array_record (`tfds build {name} --file_format=array_record`)") from e
  names = class_names(features, names_file)
  return grain.MapDataset.source(_Examples(source, image_size, spec)), names
