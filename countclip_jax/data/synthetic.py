"""Procedural counting world: images of N objects of one kind, with known counts and positions.

Every example is a pure function of (seed, split, index), so `SyntheticCounting` is a random-access
source for `grain.MapDataset.source(...)`:

  world = SyntheticCounting(WorldConfig(image_size=64), split="train", seed=0, size=10_000)
  ex = world[3]  # image, count, shape, color, centers, caption_with_number, ...

An example is sampled as a `Scene` (object kinds, centres, sizes, background) and then drawn by
`render(scene)`, so tests can check the pixels against the geometry. Objects are axis-aligned,
drawn with exact palette colours (no anti-aliasing) and kept `margin` pixels apart, so each one is
a single 8-connected component. Distractors differ from the counted kind in shape AND colour, and
captions name only the counted kind. Counts are balanced: `count = min_count + index % n`.
"""
from __future__ import annotations

import dataclasses
import operator
import re

import numpy as np

# Saturated, mutually distinct colours; backgrounds are low-saturation greys, so no background
# pixel can take a palette colour exactly.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 25),
    "green": (20, 165, 45),
    "blue": (30, 80, 240),
    "yellow": (250, 220, 0),
    "purple": (140, 40, 210),
    "orange": (255, 125, 0),
    "pink": (255, 105, 200),
    "cyan": (0, 210, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "ring",
                           "heart")
_PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
# Private on purpose (text/numbers.py owns the public table): only the words captions need.
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                 9: "nine", 10: "ten"}
TEMPLATES_WITH_NUMBER = (
    "a photo of {number} {color} {shapes}",
    "{number} {color} {shapes}",
    "a picture of {number} {color} {shapes}",
    "an image of {number} {color} {shapes}",
    "there are {number} {color} {shapes} in the image",
)
# No word here may hint at the count ("a few", "a pair of", "many"): pretraining on these must
# teach colours and shapes, not numbers.
TEMPLATES_WITHOUT_NUMBER = (
    "a photo of {color} {shapes}",
    "some {color} {shapes}",
    "a picture of {color} {shapes}",
    "an image of {color} {shapes}",
    "there are {color} {shapes} in the image",
    "a group of {color} {shapes}",
)
TEXTURES = ("noise", "stripes", "checker", "gradient")
SPLITS = {"train": 0, "heldout": 1}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """What the world may contain. Sizes are fractions of `image_size`, so a config scales."""
  image_size: int = 64
  min_count: int = 2
  max_count: int = 10
  shapes: tuple[str, ...] = SHAPES
  colors: tuple[str, ...] = tuple(COLORS)
  min_object_size: float = 0.09    # object width as a fraction of the image (~6 px at 64)
  max_object_size: float = 0.22    # (~14 px at 64); shrunk for crowded scenes so they fit
  margin: float = 0.03             # empty gap between objects (at least 2 px: never touching)
  distractor_prob: float = 0.3     # chance that a scene has distractors of another kind
  max_distractors: int = 3         # per scene; 0 turns distractors off
  textured_prob: float = 0.5       # chance of a textured (vs plain) background

  def __post_init__(self):
    if not 2 <= self.min_count <= self.max_count <= 10:
      raise ValueError(f"WorldConfig needs 2 <= min_count <= max_count <= 10 (number words two.."
                       f"ten), got min_count={self.min_count}, max_count={self.max_count}")
    if self.image_size < 32:
      raise ValueError(f"WorldConfig.image_size must be >= 32, got {self.image_size}")
    for name, known, given in (("shapes", SHAPES, self.shapes), ("colors", COLORS, self.colors)):
      unknown = [g for g in given if g not in known]
      if unknown or len(set(given)) < 2:
        raise ValueError(f"WorldConfig.{name} needs >= 2 distinct names from {list(known)}; "
                         f"got {list(given)} (unknown: {unknown})")
    if not 0 < self.min_object_size <= self.max_object_size < 0.5:
      raise ValueError("WorldConfig needs 0 < min_object_size <= max_object_size < 0.5, got "
                       f"{self.min_object_size}, {self.max_object_size}")
    if self.max_distractors < 0:
      raise ValueError(f"WorldConfig.max_distractors must be >= 0, got {self.max_distractors}")
    for name in ("distractor_prob", "textured_prob"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
  """Everything `render` needs. Objects [0, count) are the counted kind, the rest distractors."""
  image_size: int
  count: int
  shapes: tuple[str, ...]     # per object
  colors: tuple[str, ...]     # per object
  centers: np.ndarray         # float32 (n, 2), pixel (x, y); pixel (i, j) has centre (j+.5, i+.5)
  half_sizes: np.ndarray      # float32 (n,), half the side of each object's square box
  background: np.ndarray      # float32 (3,), base RGB
  texture: str                # "plain" or one of TEXTURES
  texture_seed: int


def sample_scene(config: WorldConfig, rng: np.random.Generator, count: int) -> Scene:
  """Draws a scene with `count` objects of one kind, plus maybe distractors of another."""
  s = config.image_size
  shape, color = rng.choice(config.shapes), rng.choice(config.colors)
  n_distract = 0
  if config.max_distractors > 0 and rng.random() < config.distractor_prob:
    n_distract = int(rng.integers(1, config.max_distractors + 1))
  d_shape = rng.choice([x for x in config.shapes if x != shape])
  d_color = rng.choice([x for x in config.colors if x != color])
  n = count + n_distract
  margin = max(2.0, config.margin * s)
  lo = max(6.0, config.min_object_size * s)
  # Crowded scenes get smaller objects: boxes plus margins take at most ~40% of the image.
  hi = min(config.max_object_size * s, np.sqrt(0.4 * s * s / n) - margin)
  half = rng.uniform(lo, max(lo, hi), n) / 2
  centers = _place(rng, half, s, margin)  # may shrink `half` in place
  if rng.random() < config.textured_prob:
    texture = str(rng.choice(TEXTURES))
  else:
    texture = "plain"
  background = rng.uniform(80, 180) + rng.uniform(-15, 15, 3)
  return Scene(image_size=s, count=count,
               shapes=(str(shape),) * count + (str(d_shape),) * n_distract,
               colors=(str(color),) * count + (str(d_color),) * n_distract,
               centers=centers.astype(np.float32), half_sizes=half.astype(np.float32),
               background=background.astype(np.float32), texture=texture,
               texture_seed=int(rng.integers(2**31)))


def _place(rng: np.random.Generator, half: np.ndarray, s: int, margin: float) -> np.ndarray:
  """Centres such that boxes stay inside the image and `margin` apart (largest placed first).

  Boxes that cannot be placed shrink; objects can never end up touching or overlapping.
  """
  centers = np.zeros((len(half), 2))
  placed: list[int] = []
  for i in np.argsort(-half):
    for _ in range(60):
      cand = rng.uniform(half[i] + 1, s - half[i] - 1, (32, 2))
      if placed:
        p = np.asarray(placed)
        gap = np.abs(cand[:, None, :] - centers[p][None]) - half[i] - half[p][None, :, None]
        ok = (gap.max(-1) >= margin).all(-1)  # separated along x or along y, from every box
      else:
        ok = np.ones(len(cand), bool)
      if ok.any():
        centers[i] = cand[np.argmax(ok)]
        placed.append(i)
        break
      half[i] = max(3.0, half[i] * 0.9)
    else:
      raise RuntimeError(f"Could not place {len(half)} objects in a {s}px image; lower "
                         "max_count or max_object_size.")
  return centers


# ---------------------------------------------------------------------------------------------
# Rendering: each shape is a boolean function of box coordinates (u, v) in [-1, 1], v pointing
# down, evaluated at the pixel centres of the object's box only.

def _polygon(u, v, verts):
  """Even-odd point-in-polygon test, vectorised over points and edges."""
  x0, y0 = verts[:, 0], verts[:, 1]
  x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
  u, v = u[..., None], v[..., None]
  crosses = (y0 > v) != (y1 > v)
  dy = np.where(y1 == y0, 1.0, y1 - y0)
  return ((crosses & (u < x0 + (v - y0) * (x1 - x0) / dy)).sum(-1) % 2) == 1


def _star_vertices(points=5, inner=0.5):
  angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
  radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
  verts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)
  verts[:, 1] += (1 - verts[:, 1].max()) / 2  # centre vertically in the box
  return verts


_STAR = _star_vertices()
_TRIANGLE = np.array([[0.0, -1.0], [1.0, 0.85], [-1.0, 0.85]])


def _heart(u, v):
  x, y = u * 1.2, -(v * 1.25 - 0.15)
  return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


_SHAPE_FNS = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.85,
    "triangle": lambda u, v: _polygon(u, v, _TRIANGLE),
    "star": lambda u, v: _polygon(u, v, _STAR),
    "cross": lambda u, v: np.minimum(np.abs(u), np.abs(v)) <= 0.36,
    "diamond": lambda u, v: np.abs(u) / 0.75 + np.abs(v) <= 1.0,
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.3),
    "heart": _heart,
}
assert set(_SHAPE_FNS) == set(SHAPES)


def object_mask(shape: str, center, half: float, image_size: int):
  """(rows, cols, mask): the object's box as slices and its boolean mask inside them."""
  cx, cy = float(center[0]), float(center[1])
  c0, c1 = max(0, int(np.floor(cx - half))), min(image_size, int(np.ceil(cx + half)) + 1)
  r0, r1 = max(0, int(np.floor(cy - half))), min(image_size, int(np.ceil(cy + half)) + 1)
  u = (np.arange(c0, c1) + 0.5 - cx)[None, :] / half
  v = (np.arange(r0, r1) + 0.5 - cy)[:, None] / half
  u, v = np.broadcast_arrays(u, v)
  inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
  return slice(r0, r1), slice(c0, c1), _SHAPE_FNS[shape](u, v) & inside


def render(scene: Scene) -> np.ndarray:
  """Scene -> uint8 (image_size, image_size, 3): the background, then each object's
  `object_mask` in its colour.

  object_mask's arithmetic on every object's box at once (a window as wide as the widest box;
  pixels past a box fail |u| <= 1), one shape function call per shape: a few array ops a
  scene, not a dozen an object (the world is rendered on the training host, beside the step).
  """
  s = scene.image_size
  image = np.empty((s, s, 3), np.uint8)
  image[:] = np.clip(np.rint(_background(scene)), 0, 255).astype(np.uint8)
  c = scene.centers.astype(np.float64)
  h = scene.half_sizes.astype(np.float64)[:, None]
  start = np.floor(c - h).astype(np.int64)
  k = int((np.ceil(c + h).astype(np.int64) + 1 - start).max())
  cols = start[:, 0, None] + np.arange(k)  # (n, k)
  rows = start[:, 1, None] + np.arange(k)
  u = ((cols + 0.5 - c[:, 0, None]) / h)[:, None, :]
  v = ((rows + 0.5 - c[:, 1, None]) / h)[:, :, None]
  u, v = np.broadcast_arrays(u, v)  # (n, k, k)
  mask = ((np.abs(u) <= 1) & (np.abs(v) <= 1) & ((cols >= 0) & (cols < s))[:, None, :]
          & ((rows >= 0) & (rows < s))[:, :, None])
  shapes = np.asarray(scene.shapes)
  for shape in set(scene.shapes):
    sel = shapes == shape
    mask[sel] &= _SHAPE_FNS[shape](u[sel], v[sel])
  o, y, x = np.nonzero(mask)
  palette = np.array([COLORS[color] for color in scene.colors], np.uint8)
  image[rows[o, y], cols[o, x]] = palette[o]
  return image


def _background(scene: Scene) -> np.ndarray:
  """Float (s, s, 3) or (3,): base colour plus a low-contrast grey texture (+-25 levels)."""
  if scene.texture == "plain":
    return scene.background
  s, rng = scene.image_size, np.random.default_rng(scene.texture_seed)
  y, x = np.mgrid[0:s, 0:s] / s
  if scene.texture == "noise":  # smooth value noise: bilinear upsampling of a coarse grid
    g = int(rng.integers(4, 10))
    grid = rng.uniform(-1, 1, (g + 1, g + 1))
    gy, gx = y * g, x * g
    i, j = gy.astype(int), gx.astype(int)
    fy, fx = gy - i, gx - j
    field = ((1 - fy) * ((1 - fx) * grid[i, j] + fx * grid[i, j + 1])
             + fy * ((1 - fx) * grid[i + 1, j] + fx * grid[i + 1, j + 1]))
  elif scene.texture == "stripes":
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.25)
    field = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
  elif scene.texture == "checker":
    cells = int(rng.integers(3, 9))
    field = ((np.floor(x * cells) + np.floor(y * cells)) % 2) * 2 - 1
  elif scene.texture == "gradient":
    angle = rng.uniform(0, 2 * np.pi)
    field = 2 * (x * np.cos(angle) + y * np.sin(angle)) - (np.cos(angle) + np.sin(angle))
  else:
    raise ValueError(f"Unknown texture {scene.texture!r}; expected 'plain' or one of {TEXTURES}")
  amplitude = rng.uniform(10, 25)
  return scene.background + amplitude * np.clip(field, -1, 1)[..., None]


# ---------------------------------------------------------------------------------------------
# Captions and the dataset.

def captions(count: int, color: str, shape: str) -> tuple[list[str], list[str]]:
  """All captions of a scene: (with the number word, without any number word)."""
  words = dict(number=_NUMBER_WORDS[count], color=color, shapes=_PLURALS[shape])
  return ([t.format(**words) for t in TEMPLATES_WITH_NUMBER],
          [t.format(**words) for t in TEMPLATES_WITHOUT_NUMBER])


def vocabulary() -> list[str]:
  """Every word any caption can contain, sorted: feed to text.tokenizer.build_tokenizer."""
  words = set(_NUMBER_WORDS.values()) | set(COLORS) | set(_PLURALS.values())
  for t in TEMPLATES_WITH_NUMBER + TEMPLATES_WITHOUT_NUMBER:
    words |= set(re.sub(r"\{\w+\}", " ", t).split())
  return sorted(words)


class SyntheticCounting:
  """Random-access counting dataset; `world[i]` depends only on (config, seed, split, i).

  Splits draw from different seed streams (SeedSequence entropy (seed, split id, index)), so
  train and heldout never share an example.
  """

  def __init__(self, config: WorldConfig = WorldConfig(), split: str = "train", seed: int = 0,
               size: int = 10_000):
    if split not in SPLITS:
      raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLITS)}")
    if size < 1 or seed < 0:
      raise ValueError(f"SyntheticCounting needs size >= 1 and seed >= 0, got {size}, {seed}")
    self.config, self.split, self.seed, self.size = config, split, seed, size

  def __len__(self) -> int:
    return self.size

  def scene(self, index: int) -> Scene:
    """The scene of example `index` (what `world[index]["image"]` renders)."""
    return sample_scene(self.config, *self._rng_and_count(index))

  def __getitem__(self, index: int) -> dict:
    rng, count = self._rng_and_count(index)
    scene = sample_scene(self.config, rng, count)
    shape, color = scene.shapes[0], scene.colors[0]
    with_number, without_number = captions(scene.count, color, shape)
    return {
        "image": render(scene),
        "count": np.int32(scene.count),
        "shape": shape,
        "color": color,
        "centers": scene.centers[:scene.count],
        "num_distractors": np.int32(len(scene.shapes) - scene.count),
        "caption_with_number": with_number[rng.integers(len(with_number))],
        "caption_without_number": without_number[rng.integers(len(without_number))],
    }

  def _rng_and_count(self, index: int) -> tuple[np.random.Generator, int]:
    index = operator.index(index)
    if not -self.size <= index < self.size:
      raise IndexError(f"index {index} out of range for {self.split} split of size {self.size}")
    index %= self.size
    n = self.config.max_count - self.config.min_count + 1
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], index]))
    return rng, self.config.min_count + index % n
