"""Dense counting world: dozens of objects of several kinds; one kind is prompted ("red circles").

The density-counting counterpart of `synthetic`: a scene holds 1..3 kinds (kind = colour +
shape), each with its own count; the prompted kind is sometimes outnumbered by another. Every
example is a pure function of (config, seed, split, index), so `DenseCounting` is a random-access
source for `grain.MapDataset.source(...)`:

  world = DenseCounting(DenseConfig(), split="train", seed=0, size=10_000)
  ex = world[3]  # image, prompt, count, centers (+ every kind), minority, absent_prompt

Exact centres come out, not density maps: those are made later from `centers`. Prompts are
"{colour} {plural shape}" and count exactly the objects of that kind; no shape-only prompts
("circles"), so the kinds partition the objects and every prompt uses only words of
`synthetic.vocabulary()` (the demo tokenizer). With `names="color"` the kinds of a scene have
distinct colours and a prompt is the colour word alone ("red"): one-token names, as 53 of
FSC-147's 89 training classes are, which is where CLIP-Count's early pooling loses the name.
The palette, shapes, backgrounds and drawing are `synthetic`'s, so a backbone trained there
sees the same objects, only smaller and more of them.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np

from countclip_jax.data import synthetic
from countclip_jax.data.synthetic import COLORS, SHAPES, SPLITS, TEXTURES

# Jammed scenes shrink objects down to this width (px), what 50+ objects at 64 px need. Shapes
# are hard to tell apart this small: at 4-4.5 px the masks of circle/square, star/diamond and
# triangle/star coincide in 10-28% of draws, and a 4 px ring breaks into two arcs in 9%.
MIN_WIDTH = 4.0
NAMES = ("color_shape", "color")  # what a prompt names: DenseConfig.names
MIN_GAP = 1.1  # px between boxes: more than one, so a background pixel always separates objects
_Q = 0.25      # raster step (px) of candidate centres; each centre is jittered within its cell
_TRIES = 8     # uniform guesses per object before scanning the raster for free cells
_PACKING = 0.42  # objects / (side / pitch)^2 that every placement reaches (see capacity)


def capacity(image_size: int, margin: float = 0.02) -> int:
  """How many objects `_place` fits in every scene at `image_size` (at MIN_WIDTH, if need be).

  Random placement jams well below a lattice's (side / pitch)^2 objects. At 64 px (capacity 57)
  400 placements of 58 objects of 4.5 px (shrinking to 4 when stuck) never jammed, 3% of 60 did;
  the retry, every object at 4 px, never jammed up to 62 (0.5% at 64). 0.42 of the lattice
  holds at 32-128 px too (there objects start larger, so at capacity the retry does the work).
  """
  gap = max(MIN_GAP, margin * image_size)
  return int(_PACKING * ((image_size - 2 + gap) / (MIN_WIDTH + gap + _Q / 2)) ** 2)


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  """What the dense world may contain. Sizes are fractions of `image_size`, as in WorldConfig."""
  image_size: int = 64
  min_count: int = 1             # objects of the prompted kind: min_count + index % range
  max_count: int = 50
  max_objects: int = 56          # all kinds together; at most capacity(image_size, margin)
  min_kinds: int = 1             # kinds (colour, shape) present per scene
  max_kinds: int = 3
  minority_prob: float = 0.5     # where possible, chance that another kind outnumbers the prompted
  shapes: tuple[str, ...] = SHAPES
  colors: tuple[str, ...] = tuple(COLORS)
  min_object_size: float = 0.07  # width as a fraction of the image (4.5 px at 64; MIN_WIDTH floor)
  max_object_size: float = 0.22  # (14 px at 64) shrunk for crowded scenes so they fit
  margin: float = 0.02           # gap between objects (1.3 px at 64; MIN_GAP floor)
  textured_prob: float = 0.5
  names: str = "color_shape"     # prompts "red circles" | "color": "red" (kinds differ in colour)

  def __post_init__(self):
    def fail(field, need):
      raise ValueError(f"DenseConfig.{field}: needs {need}; got {field}={getattr(self, field)!r}")
    if self.image_size < 32:
      fail("image_size", ">= 32")
    if not 0 <= self.margin < 0.5:
      fail("margin", "0 <= margin < 0.5")
    if not 0 < self.min_object_size <= self.max_object_size < 0.5:
      fail("min_object_size",
           f"0 < min_object_size <= max_object_size={self.max_object_size} < 0.5")
    for field, known in (("shapes", SHAPES), ("colors", COLORS)):
      given = getattr(self, field)
      if not given or len(set(given)) < len(given) or set(given) - set(known):
        fail(field, f"distinct names from {list(known)}")
    if not 1 <= self.min_kinds <= self.max_kinds:
      fail("min_kinds", f"1 <= min_kinds <= max_kinds={self.max_kinds}")
    if self.names not in NAMES:
      fail("names", f"one of {list(NAMES)}")
    kinds = len(self.colors) * (len(self.shapes) if self.names == "color_shape" else 1)
    if self.max_kinds >= kinds:
      fail("max_kinds", f"< {kinds} kinds of {self.names!r} names (one is kept absent)")
    if not 1 <= self.min_count <= self.max_count:
      fail("min_count", f"1 <= min_count <= max_count={self.max_count}")
    room = capacity(self.image_size, self.margin)
    if not self.max_count + self.min_kinds - 1 <= self.max_objects <= room:
      fail("max_objects", f"max_count + min_kinds - 1 = {self.max_count + self.min_kinds - 1}"
           f" <= max_objects <= {room} (what fits at image_size={self.image_size}; raise it)")
    for field in ("minority_prob", "textured_prob"):
      if not 0 <= getattr(self, field) <= 1:
        fail(field, "a probability in [0, 1]")


@dataclasses.dataclass(frozen=True, eq=False)
class DenseScene:
  """Everything `render` needs. Objects are grouped by kind: kind_of is non-decreasing."""
  image_size: int
  kinds: tuple[tuple[str, str], ...]  # (colour, shape) of each kind present
  counts: tuple[int, ...]             # objects of each kind
  prompted: int                       # index into kinds
  absent: tuple[str, str]             # a (colour, shape) with no object in the scene
  kind_of: np.ndarray                 # int32 (n,): each object's kind
  centers: np.ndarray                 # float32 (n, 2), pixel (x, y), as synthetic.Scene
  half_sizes: np.ndarray              # float32 (n,)
  background: np.ndarray              # float32 (3,)
  texture: str
  texture_seed: int

  @property
  def minority(self) -> bool:
    return self.counts[self.prompted] < max(self.counts)

  def as_scene(self) -> synthetic.Scene:
    """The same objects as a synthetic.Scene, prompted kind first (count = its objects)."""
    order = np.argsort(self.kind_of != self.prompted, kind="stable")
    return synthetic.Scene(
        image_size=self.image_size, count=self.counts[self.prompted],
        shapes=tuple(self.kinds[k][1] for k in self.kind_of[order]),
        colors=tuple(self.kinds[k][0] for k in self.kind_of[order]),
        centers=self.centers[order], half_sizes=self.half_sizes[order],
        background=self.background, texture=self.texture, texture_seed=self.texture_seed)


def prompt(color: str, shape: str, names: str = "color_shape") -> str:
  if names == "color":
    return color
  return f"{color} {synthetic._PLURALS[shape]}"  # pylint: disable=protected-access


def prompts(config: DenseConfig = DenseConfig()) -> list[str]:
  """Every prompt the config can produce (for checking a tokenizer covers them)."""
  if config.names == "color":
    return list(config.colors)
  return [prompt(c, s) for c in config.colors for s in config.shapes]


def _kind_counts(config: DenseConfig, rng: np.random.Generator, count: int):
  """Counts of the other kinds. A minority scene has one kind with more than `count` objects;
  otherwise every other kind has at most `count`. The total stays <= max_objects."""
  room = config.max_objects - count
  low = max(2, config.min_kinds)
  minority = (config.max_kinds >= 2 and room - count - 1 >= low - 2
              and rng.random() < config.minority_prob)
  if minority:
    n_kinds = min(int(rng.integers(low, config.max_kinds + 1)), room - count + 1)
  else:
    n_kinds = min(int(rng.integers(config.min_kinds, config.max_kinds + 1)), room + 1)
  others = []
  for j in range(n_kinds - 1):
    later = n_kinds - 2 - j  # kinds still to draw, one object each at least
    lo, hi = (count + 1, room - later) if minority and j == 0 else (1, min(count, room - later))
    others.append(int(rng.integers(lo, hi + 1)))
    room -= others[-1]
  return others


def sample_scene(config: DenseConfig, rng: np.random.Generator, count: int) -> DenseScene:
  """Draws a scene with `count` objects of the prompted kind, plus other kinds."""
  s = config.image_size
  others = _kind_counts(config, rng, count)
  order = rng.permutation(len(others) + 1)  # kinds in random order; the prompted one is kind 0
  counts = [([count] + others)[k] for k in order]
  if config.names == "color":  # a colour names a kind: no two kinds share one
    colors = rng.choice(len(config.colors), len(counts) + 1, replace=False)
    shapes = rng.integers(len(config.shapes), size=len(counts) + 1)
    kinds = [(config.colors[c], config.shapes[k]) for c, k in zip(colors, shapes)]
  else:
    pairs = rng.choice(len(config.colors) * len(config.shapes), len(counts) + 1, replace=False)
    kinds = [(config.colors[p // len(config.shapes)], config.shapes[p % len(config.shapes)])
             for p in pairs]
  kind_of = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  n = len(kind_of)
  margin = max(MIN_GAP, config.margin * s)
  lo = max(MIN_WIDTH, config.min_object_size * s)
  # As synthetic: crowded scenes get smaller objects (boxes and margins ~40% of the image).
  hi = min(config.max_object_size * s, np.sqrt(0.4 * s * s / n) - margin)
  half = rng.uniform(lo, max(lo, hi), n) / 2
  centers = _place(rng, half, s, margin)
  for _ in range(2):  # a jam (rare below capacity): start again with every object at the floor
    if centers is None:
      half[:] = MIN_WIDTH / 2
      centers = _place(rng, half, s, margin)
  if centers is None:
    raise RuntimeError(f"Could not place {n} objects in a {s}px image; lower max_objects.")
  texture = str(rng.choice(TEXTURES)) if rng.random() < config.textured_prob else "plain"
  background = rng.uniform(80, 180) + rng.uniform(-15, 15, 3)
  return DenseScene(
      image_size=s, kinds=tuple(kinds[:-1]), counts=tuple(counts),
      prompted=int(np.argmin(order)), absent=kinds[-1], kind_of=kind_of,
      centers=centers.astype(np.float32), half_sizes=half.astype(np.float32),
      background=background.astype(np.float32), texture=texture,
      texture_seed=int(rng.integers(2**31)))


def _place(rng: np.random.Generator, half: np.ndarray, s: int, margin: float):
  """Centres with boxes inside the image (1 px in) and `margin` apart, or None on a jam.

  synthetic._place's rule (largest first, shrink what does not fit), but drawn from the free
  space itself: `clear` holds, on a raster of candidate centres, the Chebyshev distance to the
  nearest placed box, so near-full scenes still find the last free spots instead of giving up
  after many rejected guesses. A few uniform guesses place each object while the image is
  sparse; once they miss, a scan lists the free cells, and later objects guess among those
  (free for a box that size means free for any smaller one), rescanning when they run out.
  So the choice is uniform over the free cells, or over those free for a slightly larger box.
  Shrinking `half[i]` shrinks every later object to at most that, so sizes stay in order.
  """
  n, g = len(half), math.ceil(s / _Q)
  grid = (np.arange(g) + 0.5) * _Q
  clear = np.full((g, g), np.inf, np.float32)  # [y, x]; float32 halves the memory traffic
  flat = clear.reshape(-1)
  order = np.argsort(-half, kind="stable")
  hs = half[order].tolist()  # in placement order, non-increasing
  guesses, picks = rng.random((n, _TRIES, 2)), rng.random(n).tolist()
  jitter = rng.uniform(-_Q / 2, _Q / 2, (n, 2)).tolist()
  placed = []

  def limits(h):  # what a box of half side h needs: clearance, and the raster range inside
    return (h + margin + _Q / 2 + 1e-4,  # _Q/2: room for the jitter; 1e-4: float32 rounding
            math.ceil((h + 1 + _Q / 2) / _Q - 0.5), math.floor((s - h - 1 - _Q / 2) / _Q - 0.5) + 1)

  # Every object's uniform guesses at once, as flat raster indices (a numpy call per object
  # costs more than the arithmetic). A shrink later only narrows what they could reach.
  h = np.asarray(hs)[:, None, None]
  a = np.ceil((h + 1 + _Q / 2) / _Q - 0.5)
  xy = (a + guesses * (np.floor((s - h - 1 - _Q / 2) / _Q - 0.5) + 1 - a)).astype(np.int64)
  sparse = xy[..., 1] * g + xy[..., 0]
  cells, cells_half = None, None  # once crowded: the cells free at the last scan, some now taken
  for rank in range(n):
    h = hs[rank]
    need, a, b = limits(h)
    if cells is None:
      guess = sparse[rank]
    else:
      guess = cells[(guesses[rank, :, 0] * len(cells)).astype(np.int64)]
    ok = flat[guess] >= need
    j = int(ok.argmax())
    pick = int(guess[j]) if ok[j] else None
    if pick is None and cells is not None:  # every guess was taken: drop the taken cells
      cells = cells[flat[cells] >= need]
    while pick is None:
      if cells is None or not len(cells) and cells_half != h:
        ys, xs = np.nonzero(clear[a:b, a:b] >= need)
        cells, cells_half = (ys + a) * g + xs + a, h
      if len(cells):
        pick = int(cells[int(picks[rank] * len(cells))])
      elif h <= MIN_WIDTH / 2:
        return None
      else:
        h = max(MIN_WIDTH / 2, 0.9 * h)
        hs[rank:] = [min(x, h) for x in hs[rank:]]
        need, a, b = limits(h)
    cx = (pick % g + 0.5) * _Q + jitter[rank][0]
    cy = (pick // g + 0.5) * _Q + jitter[rank][1]
    placed.append((cx, cy))
    # Only raster points within reach of a later (no larger) object's need can change validity.
    reach = h + (hs[rank + 1] if rank + 1 < n else 0) + margin + _Q
    x0, x1 = max(0, int((cx - reach) / _Q)), min(g, int((cx + reach) / _Q) + 2)
    y0, y1 = max(0, int((cy - reach) / _Q)), min(g, int((cy + reach) / _Q) + 2)
    dx, dy = np.abs(grid[x0:x1] - cx) - h, np.abs(grid[y0:y1] - cy) - h
    window = clear[y0:y1, x0:x1]
    np.minimum(window, np.maximum(dy[:, None], dx), out=window)
  half[order] = hs
  centers = np.empty((n, 2))
  centers[order] = placed
  return centers


def render(scene: DenseScene) -> np.ndarray:
  """Scene -> uint8 (s, s, 3), drawn as the counting world draws (synthetic.render)."""
  return synthetic.render(scene.as_scene())


class DenseCounting:
  """Random-access dense counting dataset; `world[i]` depends only on (config, seed, split, i).

  `world[i]` is a dict: "image" uint8 (s, s, 3); the prompted kind flat, for a grain pipeline:
  "prompt" str, "color", "shape", "count" int32, "centers" float32 (count, 2); "kinds": one dict
  per kind present (prompted one included) with the same five keys; "prompted" int32 index into
  kinds; "minority" bool (another kind has more objects); "absent_prompt" str (a kind with no
  object in the image: its count is 0); "absent_shares_color" bool (a kind present has its
  colour); "num_objects" int32.
  """

  def __init__(self, config: DenseConfig = DenseConfig(), split: str = "train", seed: int = 0,
               size: int = 10_000):
    if split not in SPLITS:
      raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLITS)}")
    if size < 1 or seed < 0:
      raise ValueError(f"DenseCounting needs size >= 1 and seed >= 0, got {size}, {seed}")
    self.config, self.split, self.seed, self.size = config, split, seed, size

  def __len__(self) -> int:
    return self.size

  def scene(self, index: int) -> DenseScene:
    index = operator.index(index)
    if not -self.size <= index < self.size:
      raise IndexError(f"index {index} out of range for {self.split} split of size {self.size}")
    index %= self.size
    n = self.config.max_count - self.config.min_count + 1
    # The trailing 1 keeps these streams apart from SyntheticCounting's (seed, split, index).
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], index, 1]))
    return sample_scene(self.config, rng, self.config.min_count + index % n)

  def __getitem__(self, index: int) -> dict:
    scene = self.scene(index)
    names = self.config.names
    kinds = [{"prompt": prompt(color, shape, names), "color": color, "shape": shape,
              "count": np.int32(n), "centers": scene.centers[scene.kind_of == k]}
             for k, ((color, shape), n) in enumerate(zip(scene.kinds, scene.counts))]
    return {
        "image": render(scene),
        **kinds[scene.prompted],
        "kinds": kinds,
        "prompted": np.int32(scene.prompted),
        "minority": np.bool_(scene.minority),
        "absent_prompt": prompt(*scene.absent, names),
        # Whether a kind in the scene has the absent kind's colour: then only shape tells them
        # apart, which at 4-8 px is where a counter confuses kinds.
        "absent_shares_color": np.bool_(any(c == scene.absent[0] for c, _ in scene.kinds)),
        "num_objects": np.int32(len(scene.kind_of)),
    }
