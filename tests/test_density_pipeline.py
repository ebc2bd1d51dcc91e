"""The density task's input pipeline: layout, exact targets, determinism, sharding, real trees.

Tiny worlds (32 px, a dozen images) and an offline tokenizer; a batch's rows are matched back to
the world's examples by their pixels, so targets are checked against the geometry, not the code.
"""
import json
import logging
import os

import numpy as np
import pytest
from absl import flags
from PIL import Image

from configs import common
from countclip_jax.data import density
from countclip_jax.data import density_pipeline as dp
from countclip_jax.data import images
from countclip_jax.data import synthetic
from countclip_jax.text.tokenizer import build_tokenizer

S, B, L, WORLD = 32, 4, 16, 12


@pytest.fixture(scope="module")
def tok():
  return build_tokenizer(synthetic.vocabulary(), L)


def _config(**density_fields):
  c = common.base()
  c.train.batch_size = B
  c.density.synthetic.size = WORLD
  c.density.synthetic.max_count = 10  # what a 32 px world holds (capacity 14)
  for key, value in density_fields.items():
    setattr(c.density, key, value)
  return c


def _dataset(config, tok, p=0, n=1):
  return dp.train_dataset(config, tok, S, process_index=p, process_count=n)


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def world():
  return dp.dense_world(_config(), S)


def _source(world, image):
  """(world index, flipped) of the example whose pixels a batch row shows."""
  for j in range(len(world)):
    pixels = images.normalize(world[j]["image"])
    for flipped in (False, True):
      if np.array_equal(pixels[:, ::-1] if flipped else pixels, image):
        return j, flipped
  raise AssertionError("A batch image is none of the world's, flipped or not.")


def _flip(points, flipped):
  return density.hflip(np.zeros((S, S)), points)[1] if flipped else points


# ---------------------------------------------------------------------------------------------
# Synthetic source

def test_layout_and_targets_are_the_prompted_kinds(tok, world):
  config = _config(other_prompts=3)
  batch = _dataset(config, tok)[0]
  e, scale = 3, config.density.scale
  shapes = {"image": ((B, S, S, 3), np.float32), "text": ((B, L), np.int32),
            "density": ((B, S, S), np.float32), "count": ((B,), np.float32),
            "other_text": ((B, e, L), np.int32), "other_density": ((B, e, S, S), np.float32),
            "other_valid": ((B, e), np.bool_)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes
  np.testing.assert_allclose(batch["density"].sum((1, 2)), batch["count"] * scale, rtol=1e-3)
  for i in range(B):
    j, flipped = _source(world, batch["image"][i])
    ex = world[j]
    assert batch["count"][i] == ex["count"]
    np.testing.assert_array_equal(batch["text"][i], tok([ex["prompt"]])[0])
    want = density.density_map(_flip(ex["centers"], flipped), S, S, 1.0, scale=scale)
    np.testing.assert_allclose(batch["density"][i], want, atol=1e-5)
    # Other rows: the absent kind (zero map) first, then the other kinds present, then padding.
    others = [k for n, k in enumerate(ex["kinds"]) if n != ex["prompted"]]
    np.testing.assert_array_equal(batch["other_text"][i, 0], tok([ex["absent_prompt"]])[0])
    assert (batch["other_density"][i, 0] == 0).all()
    np.testing.assert_array_equal(batch["other_valid"][i], np.arange(e) < 1 + len(others))
    by_text = {tok([k["prompt"]])[0].tobytes(): k for k in others}
    for r in range(1, 1 + len(others)):
      k = by_text.pop(batch["other_text"][i, r].tobytes())
      want = density.density_map(_flip(k["centers"], flipped), S, S, 1.0, scale=scale)
      np.testing.assert_allclose(batch["other_density"][i, r], want, atol=1e-5)
    assert (batch["other_density"][i, 1 + len(others):] == 0).all()


def test_hard_absent_prompts_share_a_colour_with_a_kind_present(tok, world):
  """hard_absent_prob=1: every first other row names an absent kind of a colour in the image
  (a zero map); at 0 it is the world's own absent kind, as in the layout test."""
  config = _config()
  config.density.synthetic.hard_absent_prob = 1.0
  texts = {tok([p])[0].tobytes(): p for p in dp.dense_synthetic.prompts()}
  shared = 0
  for step in range(3):
    batch = _dataset(config, tok)[step]
    for i in range(B):
      ex = world[_source(world, batch["image"][i])[0]]
      present = {k["prompt"] for k in ex["kinds"]}
      colours = {k["color"] for k in ex["kinds"]}
      name = texts[batch["other_text"][i, 0].tobytes()]
      assert name not in present and name.split()[0] in colours
      assert (batch["other_density"][i, 0] == 0).all()
      shared += name != ex["absent_prompt"]
  assert shared >= 3 * B - 2  # the world's own absent kind is rarely one of those
  with pytest.raises(ValueError, match="hard_absent_prob"):
    config.density.synthetic.hard_absent_prob = 1.5
    _dataset(config, tok)[0]


def test_no_other_prompts_gives_empty_axes(tok):
  batch = _dataset(_config(other_prompts=0), tok)[1]
  assert batch["other_text"].shape == (B, 0, L) and batch["other_valid"].shape == (B, 0)
  assert batch["other_density"].shape == (B, 0, S, S)
  assert dp.num_other_prompts(_config()) == 2  # -1: the synthetic default


def test_template_and_adaptive_sigma(tok, world):
  config = _config(prompt_template="a photo of {}", sigma="adaptive", other_prompts=1)
  batch = _dataset(config, tok)[0]
  j, flipped = _source(world, batch["image"][0])
  np.testing.assert_array_equal(batch["text"][0], tok([f"a photo of {world[j]['prompt']}"])[0])
  points = _flip(world[j]["centers"], flipped)
  want = density.density_map(points, S, S, "adaptive", scale=60.0)
  np.testing.assert_allclose(batch["density"][0], want, atol=1e-5)


def _rows(batch):
  return list(zip(batch["image"], batch["density"]))


def test_flips_move_the_mass_with_the_image(tok, world):
  rows = [b for i in range(4) for b in _rows(_dataset(_config(), tok)[i])]
  seen = set()
  cols = np.arange(S) + 0.5
  for image, dens in rows:
    j, flipped = _source(world, image)
    seen.add(flipped)
    x = (dens.sum(0) * cols).sum() / dens.sum()
    unflipped = density.density_map(world[j]["centers"], S, S)
    x0 = (unflipped.sum(0) * cols).sum() / unflipped.sum()
    np.testing.assert_allclose(x, S - x0 if flipped else x0, atol=1e-3)
  assert seen == {False, True}  # 16 draws at 1/2


def test_same_config_same_batches_and_seed_changes_them(tok):
  config = _config()
  a, b = _dataset(config, tok), _dataset(config, tok)
  assert all(_equal(a[i], b[i]) for i in (0, 3))
  config.train.seed = 1
  assert not _equal(a[0], _dataset(config, tok)[0])


def test_global_batch_is_independent_of_the_process_count(tok):
  config = _config()
  one = _dataset(config, tok)
  halves = [_dataset(config, tok, p, 2) for p in (0, 1)]
  for i in (0, 2):
    joined = {k: np.concatenate([h[i][k] for h in halves]) for k in one[i]}
    assert _equal(joined, one[i]) and len(halves[0][i]["count"]) == B // 2


def test_epochs_are_reshuffled(tok, world):
  config = _config(other_prompts=0)
  order = [_source(world, im)[0] for i in range(2 * WORLD // B)
           for im in _dataset(config, tok)[i]["image"]]
  assert sorted(order[:WORLD]) == sorted(order[WORLD:]) == list(range(WORLD))
  assert order[:WORLD] != order[WORLD:]


def test_start_skips_batches(tok):
  config = _config()
  it = dp.train_iterator(config, tok, S, process_index=0, process_count=1, num_threads=1,
                         start=2)
  ds = _dataset(config, tok)
  assert _equal(next(it), ds[2]) and _equal(next(it), ds[3])


def test_config_errors_name_the_field(tok):
  for field, value in (("source", "coco"), ("sigma", 0.0), ("scale", -1.0),
                       ("prompt_template", "no slot"), ("other_prompts", -2)):
    with pytest.raises(ValueError, match=field):
      _dataset(_config(**{field: value}), tok)[0]


def test_eval_dataset_synthetic():
  ds = dp.eval_dataset(_config(), S, size=5)
  assert len(ds) == 5
  ex = ds[2]
  heldout = dp.dense_world(_config(), S, "heldout", 5)[2]
  np.testing.assert_array_equal(ex["image"], images.normalize(heldout["image"]))
  assert ex["prompt"] == heldout["prompt"] and ex["absent_prompt"] == heldout["absent_prompt"]
  assert ex["count"] == heldout["count"] and ex["valid"] and ex["minority"] == heldout["minority"]
  assert ex["density"].shape == (S, S)
  np.testing.assert_allclose(ex["density"].sum(), ex["count"], rtol=1e-4)  # unscaled


# ---------------------------------------------------------------------------------------------
# Real sets, on a tiny FSC-147 tree: dots on a black image, so with a tiny sigma the map is
# non-zero exactly on the dots that the crop shows.

DOT = (255, 255, 255)
FSC_IMAGES = {  # name: (width, height, class, dots (x, y) pixel)
    "1.png": (48, S, "apples", [(3, 4), (20, 30), (40, 10), (47, 0)]),
    "2.png": (20, S, "sea shells", [(1, 1), (19, 31), (10, 5)]),  # narrower: padded
    "3.png": (64, 2 * S, "hot air balloons", [(8, 8), (40, 50), (62, 2)]),  # halved
}


def _fsc_tree(root, bad="4.png"):
  points = {n: [[x + 0.5, y + 0.5] for x, y in dots] for n, (_, _, _, dots) in FSC_IMAGES.items()}
  annotations = {n: {"points": p, "box_examples_coordinates": []} for n, p in points.items()}
  annotations[bad] = {"points": [[1, 1]], "box_examples_coordinates": []}
  names = [*FSC_IMAGES, bad]
  with open(os.path.join(root, "annotation_FSC147_384.json"), "w") as f:
    json.dump(annotations, f)
  with open(os.path.join(root, "Train_Test_Val_FSC_147.json"), "w") as f:
    json.dump({"train": names, "val": [], "test": names[:2]}, f)
  with open(os.path.join(root, "ImageClasses_FSC147.txt"), "w") as f:
    f.write("".join(f"{n}\t{FSC_IMAGES.get(n, (0, 0, 'cars'))[2]}\n" for n in names))
  os.makedirs(os.path.join(root, "images_384_VarV2"))
  for name, (w, h, _, dots) in FSC_IMAGES.items():
    pixels = np.zeros((h, w, 3), np.uint8)
    for x, y in dots:
      pixels[y, x] = DOT
    Image.fromarray(pixels).save(os.path.join(root, "images_384_VarV2", name))
  with open(os.path.join(root, "images_384_VarV2", bad), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n not really")


def _real_config(root, **fields):
  return _config(source="fsc147", data_dir=str(root), crop_size=S, **fields)


def test_real_crops_keep_dots_and_maps_together(tmp_path, tok, caplog):
  _fsc_tree(tmp_path)
  before = dp.skipped_images()
  config = _real_config(tmp_path, sigma=1e-3, other_prompts=4)
  dot = images.normalize(np.array(DOT, np.uint8))
  pad = images.normalize(dp.PAD_COLOR)
  black = images.normalize(np.zeros(3, np.uint8))
  with caplog.at_level(logging.WARNING):
    batches = [_dataset(config, tok)[i] for i in range(4)]
  assert "Skipping density image" in caplog.text and "4.png" in caplog.text
  assert dp.skipped_images() > before
  classes = {c for _, _, c, _ in FSC_IMAGES.values()} | {"cars"}  # the bad image's class too
  for batch in batches:
    assert batch["image"].shape == (B, S, S, 3) and batch["density"].shape == (B, S, S)
    np.testing.assert_allclose(batch["density"].sum((1, 2)), 60 * batch["count"], rtol=1e-3)
    for i in range(B):
      prompt = [c for c in classes if (tok([c])[0] == batch["text"][i]).all()]
      assert len(prompt) == 1 and prompt != ["cars"]
      on_dot = (batch["image"][i] == dot).all(-1)
      if prompt == ["hot air balloons"]:  # halved (bicubic): each dot's mass on a bright pixel
        assert (batch["image"][i][batch["density"][i] > 0] > black + 0.3).all()
      else:  # at its size: the map is non-zero exactly on the dots in the crop
        assert (on_dot == (batch["density"][i] > 0)).all() and on_dot.sum() == batch["count"][i]
      # Other rows: the other images' classes, assumed absent (E = 4 > 3 other classes).
      others = {tok([c])[0].tobytes() for c in classes - set(prompt)}
      assert {t.tobytes() for t in batch["other_text"][i, :3]} == others
      np.testing.assert_array_equal(batch["other_valid"][i], [True, True, True, False])
      assert (batch["other_density"][i] == 0).all()
  assert any((b["image"] == pad).all(-1).any() for b in batches)  # the narrow image was padded
  seen = {c for b in batches for t in b["text"] for c in classes if (tok([c])[0] == t).all()}
  assert seen == classes - {"cars"}  # every good image, the bad one never


def test_real_resize_to_height_and_eval(tmp_path, tok):
  _fsc_tree(tmp_path)
  config = _real_config(tmp_path)
  ds = dp.eval_dataset(config, 224)  # "heldout": FSC-147's test split
  assert len(ds) == 2 and ds[0]["prompt"] == "apples" and ds[0]["count"] == 4
  image, points = dp.eval_image(ds[0], config)
  assert image.shape == (S, 48, 3)
  np.testing.assert_allclose(points, ds[0]["points"])
  big = dp.eval_dataset(config, 224, split="train")[2]
  image, points = dp.eval_image(big, config)  # 64 x 64 -> 32 x 32, points halved
  assert image.shape == (S, S, 3)
  np.testing.assert_allclose(points, np.asarray(big["points"]) / 2)
  bad = dp.eval_dataset(config, 224, split="train")[3]
  assert dp.eval_image(bad, config)[0] is None


# ---------------------------------------------------------------------------------------------
# Worker processes

@pytest.fixture
def parsed_flags():
  """grain's workers read absl flags (absl.app.run parses them in a real run)."""
  if flags.FLAGS.is_parsed():
    yield
    return
  flags.FLAGS.mark_as_parsed()
  try:
    yield
  finally:
    flags.FLAGS.unparse_flags()


@pytest.mark.usefixtures("parsed_flags")
def test_worker_processes_give_the_same_batches(tok):
  config = _config()
  config.data.num_workers = 2
  it = dp.train_iterator(config, tok, S, process_index=0, process_count=1, num_threads=1)
  try:
    first = next(it)
  finally:
    it.close()
  assert _equal(first, _dataset(_config(), tok)[0])
