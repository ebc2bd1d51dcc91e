"""Dense counting world: pixels agree with every kind's count and centres; minorities, absent
kinds, prompts the demo tokenizer knows; deterministic; the existing world untouched."""
import collections
import hashlib

import grain
import numpy as np
import pytest
from scipy import ndimage

from countclip_jax.data import dense_synthetic as dense
from countclip_jax.data import synthetic
from countclip_jax.data.dense_synthetic import DenseConfig, DenseCounting
from countclip_jax.data.synthetic import COLORS
from test_synthetic import render_object_by_object

EIGHT = np.ones((3, 3), bool)


def check_scene(ex, scene, config):
  """Everything an example claims, against the pixels and the geometry."""
  s, image = config.image_size, ex["image"]
  assert image.shape == (s, s, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image, render_object_by_object(scene.as_scene()))
  # The kinds partition the objects; the flat fields are the prompted kind's.
  assert len(ex["kinds"]) == len(scene.kinds) == len(set(scene.kinds))
  assert config.min_kinds <= len(scene.kinds) <= config.max_kinds
  assert sum(int(k["count"]) for k in ex["kinds"]) == ex["num_objects"] <= config.max_objects
  main = ex["kinds"][ex["prompted"]]
  for key in ("prompt", "color", "shape", "count"):
    assert ex[key] == main[key]
  np.testing.assert_array_equal(ex["centers"], main["centers"])
  assert ex["minority"] == (ex["count"] < max(k["count"] for k in ex["kinds"]))
  # Boxes inside the image, and at least the margin apart (so objects never touch).
  c, h = scene.centers.astype(float), scene.half_sizes.astype(float)
  assert (c - h[:, None] >= 1 - 1e-4).all() and (c + h[:, None] <= s - 1 + 1e-4).all()
  gap = (np.abs(c[:, None] - c[None]) - h[:, None, None] - h[None, :, None]).max(-1)
  np.fill_diagonal(gap, np.inf)
  assert gap.min() >= max(dense.MIN_GAP, config.margin * s) - 1e-4
  assert h.min() >= dense.MIN_WIDTH / 2 - 1e-6
  # Each object's mask is all its kind's colour, no two masks touch, and no other pixel has a
  # kind's colour: the image holds exactly the objects listed, no more.
  owner = np.full((s, s), -1)
  for kind in ex["kinds"]:
    rgb = COLORS[kind["color"]]
    assert kind["centers"].shape == (kind["count"], 2) and kind["centers"].dtype == np.float32
    assert kind["prompt"] == (kind["color"] if config.names == "color" else
                              f"{kind['color']} {synthetic._PLURALS[kind['shape']]}")
    for center in kind["centers"]:
      j = int(np.flatnonzero((scene.centers == center).all(1))[0])
      rows, cols, mask = synthetic.object_mask(kind["shape"], center, float(h[j]), s)
      assert mask.sum() >= 4 and (image[rows, cols][mask] == rgb).all()
      near = ndimage.binary_dilation(np.pad(mask, 1), EIGHT)
      region = np.pad(owner, 1, constant_values=-1)[rows.start:rows.stop + 2,
                                                    cols.start:cols.stop + 2]
      assert (region[near] == -1).all(), "objects touch"
      owner[rows, cols][mask] = j
      if kind["shape"] != "ring":  # a ring's centre is its hole
        assert tuple(image[int(center[1]), int(center[0])]) == rgb
  for color in {k["color"] for k in ex["kinds"]}:
    painted = (image == COLORS[color]).all(-1)
    ours = [j for j, kd in enumerate(scene.kind_of) if scene.kinds[kd][0] == color]
    assert painted.sum() == np.isin(owner, ours).sum()
    if not any(scene.kinds[scene.kind_of[j]][1] == "ring" for j in ours):
      assert ndimage.label(painted, EIGHT)[1] == len(ours)  # one piece per object
  # The absent kind really is absent (and its colour too, unless a present kind shares it).
  assert scene.absent not in scene.kinds
  assert ex["absent_prompt"] == dense.prompt(*scene.absent, config.names)
  if config.names == "color":  # a colour names one kind: none shared, the absent one's neither
    assert len({c for c, _ in scene.kinds} | {scene.absent[0]}) == len(scene.kinds) + 1
    assert not ex["absent_shares_color"]
  assert ex["absent_prompt"] not in [k["prompt"] for k in ex["kinds"]]
  if scene.absent[0] not in [k["color"] for k in ex["kinds"]]:
    assert not (image == COLORS[scene.absent[0]]).all(-1).any()


@pytest.mark.parametrize("config,indices", [
    # Counts 1..49 in steps of 2, 50 (all), then five more full scenes (50-56 objects) at 64 px.
    (DenseConfig(), list(range(0, 50, 2)) + list(range(49, 300, 50))),
    (DenseConfig(image_size=96, max_count=100, max_objects=dense.capacity(96)), [49, 99, 150]),
    (DenseConfig(image_size=32, max_count=10, max_objects=dense.capacity(32)), range(20)),
    (DenseConfig(names="color"), list(range(0, 50, 7)) + [49, 99]),
])
def test_pixels_agree_with_every_kind(config, indices):
  world = DenseCounting(config, size=1000)
  textures, minority, sizes = collections.Counter(), 0, []
  for i in indices:
    ex, scene = world[i], world.scene(i)
    check_scene(ex, scene, config)
    textures[scene.texture] += 1
    minority += bool(ex["minority"])
    sizes.append(2 * scene.half_sizes.min())
  if config == DenseConfig():
    assert textures["plain"] and len(textures) > 2 and minority
    assert max(world[i]["count"] for i in indices) == 50
    assert min(sizes) < 4.5 < max(sizes)  # crowded scenes did shrink, sparse ones did not


def test_deterministic_by_seed_split_and_index():
  a = DenseCounting(DenseConfig(), "train", seed=3, size=100)
  b = DenseCounting(DenseConfig(), "train", seed=3, size=100)
  order = [7, 2, 99, 7]
  for i, j in zip(order, reversed(order)):  # access order does not matter
    x, y = a[i], b[i]
    assert x.keys() == y.keys()
    for key in x:
      if key != "kinds":
        np.testing.assert_array_equal(x[key], y[key])
    for kx, ky in zip(x["kinds"], y["kinds"], strict=True):
      for key in kx:
        np.testing.assert_array_equal(kx[key], ky[key])
  np.testing.assert_array_equal(a[-1]["image"], a[99]["image"])
  for other in (DenseCounting(DenseConfig(), "train", seed=4, size=100),
                DenseCounting(DenseConfig(), "heldout", seed=3, size=100)):
    assert not np.array_equal(a[7]["image"], other[7]["image"])
  with pytest.raises(IndexError):
    a[100]
  with pytest.raises(ValueError, match="split"):
    DenseCounting(DenseConfig(), "test")


def test_splits_are_disjoint_and_grain_reads_the_world():
  train, heldout = (DenseCounting(DenseConfig(), split, size=25) for split in ("train", "heldout"))
  hashes = [{w[i]["image"].tobytes() for i in range(25)} for w in (train, heldout)]
  assert len(hashes[0]) == len(hashes[1]) == 25 and not hashes[0] & hashes[1]
  ds = grain.MapDataset.source(train)
  assert len(ds) == 25
  np.testing.assert_array_equal(ds[5]["centers"], train[5]["centers"])


def test_counts_are_balanced_and_minorities_come_at_the_configured_rate():
  config = DenseConfig(min_count=3, max_count=22, minority_prob=0.5)  # all may be outnumbered
  world = DenseCounting(config, size=200)
  scenes = [world.scene(i) for i in range(200)]
  assert collections.Counter(s.counts[s.prompted] for s in scenes) == {c: 10 for c in range(3, 23)}
  rate = np.mean([s.minority for s in scenes])
  assert 0.38 <= rate <= 0.62, rate  # 0.5 +- 3.4 sigma
  assert collections.Counter(len(s.kinds) for s in scenes).keys() == {1, 2, 3}
  assert len({s.kinds[s.prompted] for s in scenes}) > 40  # kinds vary (64 possible)
  for prob in (0.0, 1.0):
    full = DenseCounting(DenseConfig(minority_prob=prob), size=100)
    for i in range(0, 100, 3):  # counts 1..50: 2 * count + 1 <= 56 objects allows a minority
      s = full.scene(i)
      assert s.minority == (prob == 1 and 2 * s.counts[s.prompted] + 1 <= 56), (i, s.counts)
  assert not any(DenseCounting(DenseConfig(max_kinds=1), size=20).scene(i).minority
                 for i in range(0, 20, 4))


def test_a_jammed_scene_starts_again_with_small_objects():
  # Objects asked 12.8 px wide: 50 of them cannot fit, so they shrink to the floor and fit.
  config = DenseConfig(min_count=50, min_object_size=0.2, max_object_size=0.22)
  world = DenseCounting(config, size=3)
  for i in range(3):
    scene = world.scene(i)
    assert scene.half_sizes.max() < 0.2 * 64 / 2
    check_scene(world[i], scene, config)


def test_prompts_use_only_the_demo_tokenizers_words():
  from countclip_jax.text.tokenizer import build_tokenizer
  vocab = synthetic.vocabulary()
  tokenizer = build_tokenizer(vocab, context_length=16)
  word_ids = {w: tokenizer.tokens(w) for w in vocab}
  assert all(len(ids) == 1 for ids in word_ids.values())
  every = dense.prompts()
  assert len(every) == 64 and "red circles" in every and "blue crosses" in every
  for text in every:
    assert set(text.split()) <= set(vocab), text
    assert tokenizer.tokens(text) == sum((word_ids[w] for w in text.split()), []), text
  world = DenseCounting(DenseConfig(), size=30)
  for i in range(0, 30, 3):
    ex = world[i]
    assert {k["prompt"] for k in ex["kinds"]} | {ex["absent_prompt"]} <= set(every)
  # One-word names: each a single token of the demo tokenizer.
  colors = dense.prompts(DenseConfig(names="color"))
  assert colors == list(COLORS) and all(len(tokenizer.tokens(c)) == 1 for c in colors)


@pytest.mark.parametrize("field,kwargs", [
    ("image_size", dict(image_size=16)),
    ("min_count", dict(min_count=0)),
    ("min_count", dict(min_count=30, max_count=20)),
    ("max_objects", dict(max_count=60, max_objects=60)),  # 60 do not fit at 64 px
    ("max_objects", dict(max_count=50, max_objects=40)),
    ("max_objects", dict(image_size=32)),                 # 50 objects at 32 px
    ("max_objects", dict(min_kinds=8, max_kinds=8)),      # 50 + 7 others > 56
    ("min_kinds", dict(min_kinds=0)),
    ("max_kinds", dict(shapes=("circle",), colors=("red", "blue"), max_kinds=2)),
    ("shapes", dict(shapes=("circle", "hexagon"))),
    ("colors", dict(colors=())),
    ("colors", dict(colors=("red", "red"))),
    ("min_object_size", dict(min_object_size=0.3)),
    ("margin", dict(margin=-0.1)),
    ("minority_prob", dict(minority_prob=1.5)),
    ("textured_prob", dict(textured_prob=-0.1)),
    ("names", dict(names="shape")),
    ("max_kinds", dict(names="color", colors=("red", "blue"), max_kinds=2)),
])
def test_config_errors_name_the_field(field, kwargs):
  with pytest.raises(ValueError, match=f"DenseConfig.{field}:"):
    DenseConfig(**kwargs)


def test_config_accepts_its_limits():
  assert dense.capacity(64) >= DenseConfig().max_objects >= 56
  DenseConfig(max_objects=dense.capacity(64))
  DenseConfig(shapes=("circle",), colors=("red", "blue"), max_kinds=1)
  DenseConfig(image_size=96, max_count=100, max_objects=dense.capacity(96))


def test_the_existing_world_is_unchanged():
  # Pinned before this module existed: the demo's numbers depend on these pixels.
  h = hashlib.sha256()
  for split in ("train", "heldout"):
    world = synthetic.SyntheticCounting(synthetic.WorldConfig(), split, seed=0, size=1000)
    for i in (0, 1, 2, 3, 7, 500, 999):
      ex = world[i]
      h.update(ex["image"].tobytes())
      h.update(ex["centers"].tobytes())
      h.update(ex["caption_with_number"].encode())
  assert h.hexdigest() == "d14510293f8ad33d8ab521ab3aab3e42550f88be07e30b2a0973605a1c7b421a"
