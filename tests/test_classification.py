"""data/classification.py: tfds classification sets for zero-shot evals, read without TensorFlow."""
import types

import numpy as np
import pytest

from countclip_jax.data import classification, images
from conftest import TFDS_COLOURS, TFDS_RGB


def test_spec_parsing():
  assert classification.parse_spec("tfds:cifar10") == ("cifar10", "")
  assert classification.parse_spec("tfds:imagenet2012:validation[:5000]") == (
      "imagenet2012", "validation[:5000]")
  for bad in ("cifar10", "tfds:", "tfds::test"):
    with pytest.raises(ValueError, match=r"'tfds:NAME\[:SPLIT\]'"):
      classification.parse_spec(bad)


def test_prepared_set_reads_as_clip_inputs_and_marks_bad_images(tfds_colours_dir):
  data_dir, labels = tfds_colours_dir
  dataset, names = classification.load("tfds:tiny_colours", 32, data_dir=data_dir)
  assert names == list(TFDS_COLOURS) and len(dataset) == len(labels)
  examples = [dataset[i] for i in range(len(dataset))]
  assert sorted(int(e["label"]) for e in examples) == sorted(labels)
  # Every image is CLIP's input at the size asked for; the one whose bytes are no image is
  # marked invalid, not raised.
  pixels = {c: images.normalize(np.array(rgb, np.uint8)) for c, rgb in TFDS_RGB.items()}
  seen = []
  for e in examples:
    assert e["image"].shape == (32, 32, 3)
    if e["valid"]:
      colour = next(c for c, p in pixels.items() if np.allclose(e["image"], p, atol=1e-5))
      seen.append((colour, TFDS_COLOURS[e["label"]]))
  assert len(seen) == len(labels) - 1
  assert sorted(seen) == sorted([(c, c) for c in TFDS_COLOURS] * 3 + [("red", "blue")])
  # tfds's split syntax passes through.
  assert len(classification.load("tfds:tiny_colours:test[:4]", 32, data_dir=data_dir)[0]) == 4


def test_unprepared_unknown_and_unsplit_sets_fail_clearly(tfds_colours_dir, tmp_path):
  with pytest.raises(ValueError, match="not prepared in .*tfds build tiny_colours "
                                       "--file_format=array_record"):
    classification.load("tfds:tiny_colours", 32, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="tfds has no dataset 'no_such_set'"):
    classification.load("tfds:no_such_set", 32, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown split 'train'"):
    classification.load("tfds:tiny_colours:train", 32, data_dir=tfds_colours_dir[0])


def label_feature(names):
  return {"label": types.SimpleNamespace(names=names, num_classes=len(names))}


def test_class_names_from_the_feature_or_a_file(tmp_path):
  assert classification.class_names(label_feature(["aquarium_fish", "bee"])) == [
      "aquarium fish", "bee"]
  with pytest.raises(ValueError, match="WordNet ids .* class-names file"):
    classification.class_names(label_feature(["n01440764", "n01443537"]))
  names = tmp_path / "names.txt"
  names.write_text("tench\ngoldfish\n\n")
  assert classification.class_names(label_feature(["n01440764", "n01443537"]),
                                     str(names)) == ["tench", "goldfish"]
  with pytest.raises(ValueError, match="lists 2 class names; the dataset has 3 classes"):
    classification.class_names(label_feature(["a", "b", "c"]), str(names))
