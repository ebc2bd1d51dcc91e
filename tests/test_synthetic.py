"""Synthetic counting world: deterministic, pixels agree with counts and centres, splits apart."""
import collections
import re

import grain
import numpy as np
import pytest
from scipy import ndimage

from countclip_jax.data import synthetic
from countclip_jax.data.synthetic import COLORS, SHAPES, Scene, SyntheticCounting, WorldConfig

EIGHT_CONNECTED = np.ones((3, 3), int)
NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def components(image, rgb):
  """Bounding boxes of the 8-connected components of pixels of exactly colour `rgb`."""
  labels, _ = ndimage.label((image == np.asarray(rgb)).all(-1), structure=EIGHT_CONNECTED)
  return ndimage.find_objects(labels)


def assert_pixels_match(image, centers, halves, rgb):
  """One component per object of colour `rgb`, each holding exactly one centre, near its middle."""
  boxes = components(image, rgb)
  assert len(boxes) == len(centers)
  for rows, cols in boxes:
    inside = [(cols.start - .5 <= x <= cols.stop + .5) and (rows.start - .5 <= y <= rows.stop + .5)
              for x, y in centers]
    assert sum(inside) == 1
    (x, y), half = centers[inside.index(True)], halves[inside.index(True)]
    # Triangles, stars and hearts are not symmetric top to bottom: allow 20% of the size.
    assert abs((cols.start + cols.stop) / 2 - x) <= 1 + 0.2 * half
    assert abs((rows.start + rows.stop) / 2 - y) <= 1 + 0.2 * half


def render_object_by_object(scene):
  """The definition render() must match: the background, then each object's object_mask."""
  image = np.empty((scene.image_size, scene.image_size, 3), np.uint8)
  image[:] = np.clip(np.rint(synthetic._background(scene)), 0, 255).astype(np.uint8)
  for shape, color, center, half in zip(scene.shapes, scene.colors, scene.centers,
                                        scene.half_sizes):
    rows, cols, mask = synthetic.object_mask(shape, center, float(half), scene.image_size)
    image[rows, cols][mask] = COLORS[color]
  return image


@pytest.mark.parametrize("image_size,n", [(48, 60), (64, 200), (97, 40), (224, 10)])
def test_render_draws_each_objects_mask(image_size, n):
  world = SyntheticCounting(WorldConfig(image_size=image_size, distractor_prob=0.7), size=n)
  for i in range(n):
    scene = world.scene(i)
    np.testing.assert_array_equal(synthetic.render(scene), render_object_by_object(scene))
  # Objects cut by the border (as the dense world places them) are drawn as their masks say.
  scene = world.scene(0)
  at_edges = Scene(**{**scene.__dict__, "centers": np.array(
      [[1.0, 1.0], [image_size - 1.5, 2.0], [3.0, image_size - 0.5],
       [image_size - 1.0, image_size - 1.0], [image_size / 2, 0.2]], np.float32)[
          :len(scene.shapes)]})
  np.testing.assert_array_equal(synthetic.render(at_edges), render_object_by_object(at_edges))


def test_deterministic_by_seed_split_and_index():
  a = SyntheticCounting(WorldConfig(), "train", seed=3, size=100)
  b = SyntheticCounting(WorldConfig(), "train", seed=3, size=100)
  order = [7, 2, 99, 7]
  for i, j in zip(order, reversed(order)):  # access order does not matter
    for key in ("image", "count", "shape", "color", "centers", "caption_with_number",
                "caption_without_number", "num_distractors"):
      np.testing.assert_array_equal(a[i][key], b[i][key])
    assert a[-1]["caption_with_number"] == a[99]["caption_with_number"]
  other_seed = SyntheticCounting(WorldConfig(), "train", seed=4, size=100)
  assert not np.array_equal(a[7]["image"], other_seed[7]["image"])


@pytest.mark.parametrize("image_size,n", [(64, 120), (224, 20)])
def test_counts_and_centres_match_the_pixels(image_size, n):
  world = SyntheticCounting(WorldConfig(image_size=image_size, distractor_prob=0.5), size=n)
  textures = collections.Counter()
  for i in range(n):
    ex = world[i]
    scene = world.scene(i)
    textures[scene.texture] += 1
    np.testing.assert_array_equal(synthetic.render(scene), ex["image"])
    assert ex["image"].shape == (image_size, image_size, 3) and ex["image"].dtype == np.uint8
    assert ex["centers"].shape == (ex["count"], 2) and ex["centers"].dtype == np.float32
    assert_pixels_match(ex["image"], ex["centers"], scene.half_sizes, COLORS[ex["color"]])
    if ex["num_distractors"]:
      assert_pixels_match(ex["image"], scene.centers[ex["count"]:], scene.half_sizes[ex["count"]:],
                          COLORS[scene.colors[-1]])
  assert textures["plain"] and len(textures) > 2  # both kinds of background were checked


def test_objects_never_touch_on_plain_background():
  world = SyntheticCounting(WorldConfig(textured_prob=0.0, distractor_prob=1.0), size=50)
  for i in range(50):
    scene = world.scene(i)
    image = world[i]["image"]
    background = np.clip(np.rint(scene.background), 0, 255).astype(np.uint8)
    foreground = (image != background).any(-1)
    _, n = ndimage.label(foreground, structure=EIGHT_CONNECTED)
    assert n == len(scene.shapes) > scene.count


def test_backgrounds_are_low_contrast_and_far_from_every_palette_colour():
  world = SyntheticCounting(WorldConfig(textured_prob=1.0), size=40)
  palette = np.asarray(list(COLORS.values()), float)
  for i in range(40):
    scene = world.scene(i)
    background = np.rint(synthetic._background(scene)).reshape(-1, 3)
    assert np.ptp(background, 0).max() <= 50  # texture amplitude <= 25 levels either way
    assert np.linalg.norm(background[:, None] - palette[None], axis=-1).min() > 60


def test_distractors_differ_in_shape_and_colour():
  world = SyntheticCounting(WorldConfig(distractor_prob=1.0, max_distractors=2), size=60)
  for i in range(60):
    scene = world.scene(i)
    ex = world[i]
    assert 1 <= ex["num_distractors"] <= 2
    assert set(scene.shapes[scene.count:]) == {scene.shapes[-1]} != {ex["shape"]}
    assert set(scene.colors[scene.count:]) == {scene.colors[-1]} != {ex["color"]}
    assert scene.colors[-1] not in ex["caption_with_number"].split()
    assert synthetic._PLURALS[scene.shapes[-1]] not in ex["caption_with_number"].split()


def test_render_uses_pixel_x_y_centres():
  scene = Scene(image_size=64, count=1, shapes=("square",), colors=("red",),
                centers=np.array([[10.0, 40.0]], np.float32),
                half_sizes=np.array([4.0], np.float32),
                background=np.full(3, 128, np.float32), texture="plain", texture_seed=0)
  image = synthetic.render(scene)
  assert tuple(image[40, 10]) == COLORS["red"]  # row = y, column = x
  assert tuple(image[10, 40]) == (128, 128, 128)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_one_component_at_every_size(shape):
  rng = np.random.default_rng(0)
  for half in np.linspace(3, 25, 23):
    cx, cy = 32 + rng.uniform(0, 1, 2)
    _, _, mask = synthetic.object_mask(shape, (cx, cy), half, 64)
    _, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
    assert n == 1, (shape, half)


def test_shapes_are_distinct_at_small_size():
  masks = {s: synthetic.object_mask(s, (32.0, 32.0), 4.0, 64)[2] for s in SHAPES}
  for a in SHAPES:
    for b in SHAPES:
      if a < b:
        assert masks[a].shape != masks[b].shape or (masks[a] != masks[b]).sum() >= 4, (a, b)


def test_splits_are_disjoint():
  train = SyntheticCounting(WorldConfig(), "train", seed=0, size=300)
  heldout = SyntheticCounting(WorldConfig(), "heldout", seed=0, size=300)
  hashes = [{w[i]["image"].tobytes() for i in range(300)} for w in (train, heldout)]
  assert len(hashes[0]) == len(hashes[1]) == 300
  assert not hashes[0] & hashes[1]
  centres = [{tuple(w.scene(i).centers[0]) for i in range(300)} for w in (train, heldout)]
  assert not centres[0] & centres[1]
  with pytest.raises(ValueError, match="split"):
    SyntheticCounting(WorldConfig(), "test")


def test_counts_are_balanced_over_the_range():
  world = SyntheticCounting(WorldConfig(min_count=3, max_count=6), size=40)
  counts = collections.Counter(int(world[i]["count"]) for i in range(40))
  assert counts == {3: 10, 4: 10, 5: 10, 6: 10}
  assert set(collections.Counter(world[i]["shape"] for i in range(40))) == set(SHAPES)


def test_captions_state_the_number_only_when_asked():
  world = SyntheticCounting(WorldConfig(), size=45)
  templates_seen = set()
  for i in range(45):
    ex = world[i]
    plural = synthetic._PLURALS[ex["shape"]]
    with_words = ex["caption_with_number"].split()
    without_words = ex["caption_without_number"].split()
    assert NUMBER_WORDS[ex["count"] - 2] in with_words
    assert [w for w in with_words if w in NUMBER_WORDS] == [NUMBER_WORDS[ex["count"] - 2]]
    assert not set(without_words) & set(NUMBER_WORDS)
    for words in (with_words, without_words):
      assert words[-2:] == [ex["color"], plural] or words[-5:-3] == [ex["color"], plural]
    templates_seen.add(re.sub(r"\b(%s)\b" % "|".join(NUMBER_WORDS), "N", ex["caption_with_number"])
                       .replace(ex["color"], "C").replace(plural, "S"))
  assert len(templates_seen) == len(synthetic.TEMPLATES_WITH_NUMBER)
  with_all, without_all = synthetic.captions(3, "red", "star")
  assert "a photo of three red stars" in with_all
  assert {"a photo of red stars", "some red stars"} <= set(without_all)
  assert synthetic.captions(2, "blue", "cross")[0][1] == "two blue crosses"


def test_vocabulary_covers_every_caption_and_builds_a_tokenizer():
  from countclip_jax.text.tokenizer import build_tokenizer
  vocab = synthetic.vocabulary()
  assert {"three", "red", "stars", "photo", "some"} <= set(vocab)
  for count in range(2, 11):
    for color in COLORS:
      for shape in SHAPES:
        for caption in sum(synthetic.captions(count, color, shape), []):
          assert set(caption.split()) <= set(vocab), caption
  tokenizer = build_tokenizer(vocab, context_length=16)
  assert all(len(tokenizer.tokens(w)) == 1 for w in vocab)


def test_grain_map_dataset_source():
  world = SyntheticCounting(WorldConfig(), size=20)
  ds = grain.MapDataset.source(world)
  assert len(ds) == 20
  np.testing.assert_array_equal(ds[5]["image"], world[5]["image"])
  counts = sorted(int(x) for x in ds.shuffle(seed=1).map(lambda ex: ex["count"]))
  assert counts == sorted(int(world[i]["count"]) for i in range(20))
  with pytest.raises(IndexError):
    world[20]


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="min_count"):
    WorldConfig(min_count=1)
  with pytest.raises(ValueError, match="max_count"):
    WorldConfig(max_count=11)
  with pytest.raises(ValueError, match="hexagon"):
    WorldConfig(shapes=("circle", "hexagon"))
  with pytest.raises(ValueError, match="max_distractors"):
    WorldConfig(max_distractors=-1)
  no_distractors = WorldConfig(max_distractors=0, distractor_prob=1.0)
  assert SyntheticCounting(no_distractors)[0]["num_distractors"] == 0
  with pytest.raises(ValueError, match="colors"):
    WorldConfig(colors=("red",))
