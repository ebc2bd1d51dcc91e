"""Points -> density maps, and the geometry that keeps points and pixels together.

A density map is a float32 (H, W) image whose sum is the number of annotated objects: one
Gaussian per point, each normalised to mass 1 over the pixels that are *inside the image*, so a
point in a corner still adds exactly 1 (a truncated kernel is renormalised, not cut). Points are
(x, y) in pixels with pixel (i, j) covering [j, j+1) x [i, i+1), centre (j+0.5, i+0.5), as
`synthetic.Scene.centers`.

  d = density_map(points, 384, 576)                    # sigma 1, CLIP-Count's target (x 60 there)
  d = density_map(points, 384, 576, sigma="adaptive")  # MCNN's geometry-adaptive kernels
  image, points = random_crop_flip(image, points, 384, rng)  # then density_map(points, 384, 384)

Scaling (CLIP-Count multiplies its targets by 60) is `scale=`; the default 1 keeps sum == count.
numpy only (scipy's k-d tree for adaptive sigmas): this runs in input workers, not under jit.
"""
from __future__ import annotations

import numpy as np

# Defaults for sigma="adaptive". MCNN: sigma_i = 0.3 * mean distance to the 3 nearest neighbours.
# The clamp keeps duplicates (distance 0) visible and lone objects in sparse images from being
# smeared over the whole frame; a single point has no neighbours and gets SIGMA_SINGLE.
K_NEIGHBOURS, BETA = 3, 0.3
SIGMA_MIN, SIGMA_MAX, SIGMA_SINGLE = 1.0, 16.0, 8.0
TRUNCATE = 4.0  # kernels extend +-4 sigma (at least +-1 pixel), as scipy.ndimage.gaussian_filter
_CHUNK = 1024   # points per matmul: bounds memory at ~CHUNK * (H + W) * 4 bytes


def as_points(points) -> np.ndarray:
  """Anything (n, 2)-shaped -> float32 (n, 2); raises ValueError for other shapes or NaNs."""
  p = np.asarray(points, np.float32)
  if p.size == 0:
    return np.zeros((0, 2), np.float32)
  if p.ndim != 2 or p.shape[1] != 2:
    raise ValueError(f"points must be (n, 2) (x, y) pairs, got shape {p.shape}")
  if not np.isfinite(p).all():
    raise ValueError(f"points contain {int((~np.isfinite(p)).any(1).sum())} non-finite rows")
  return p


def inside(points, height: int, width: int) -> np.ndarray:
  """bool (n,): 0 <= x <= width and 0 <= y <= height. Closed on purpose: annotators put points
  exactly on the far edge (x == width), and such an object is still in the image."""
  p = as_points(points)
  return (p[:, 0] >= 0) & (p[:, 0] <= width) & (p[:, 1] >= 0) & (p[:, 1] <= height)


def clip_points(points, height: int, width: int) -> np.ndarray:
  """Points clamped into the image: for annotation slop just past the border (ShanghaiTech has
  some), on the full image, before cropping. Use only where every point is a real object."""
  p = as_points(points).copy()
  p[:, 0] = np.clip(p[:, 0], 0, width)
  p[:, 1] = np.clip(p[:, 1], 0, height)
  return p


def adaptive_sigmas(points, k: int = K_NEIGHBOURS, beta: float = BETA, *,
                    sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                    sigma_single: float = SIGMA_SINGLE) -> np.ndarray:
  """float64 (n,): beta * mean distance to the k nearest other points, clamped to
  [sigma_min, sigma_max]; fewer than k others: all of them; no others: sigma_single."""
  p = as_points(points).astype(np.float64)
  n = len(p)
  if n < 2:
    return np.full(n, float(sigma_single))
  from scipy import spatial  # pylint: disable=g-import-not-at-top  # only adaptive needs it
  k_eff = min(int(k), n - 1)
  dist, _ = spatial.cKDTree(p).query(p, k=k_eff + 1)  # column 0 is the point itself
  return np.clip(beta * dist[:, 1:].mean(axis=1), sigma_min, sigma_max)


def _axis_weights(coord: np.ndarray, sigma: np.ndarray, size: int, truncate: float
                  ) -> np.ndarray:
  """float32 (n, size): per point, a 1-D Gaussian at the pixel centres, zero beyond the
  truncation radius, each row summing to 1 over the pixels of the image (the renormalised
  border). float32 halves the time; rows still sum to 1 within ~1e-6."""
  coord, sigma = coord.astype(np.float32), sigma.astype(np.float32)
  d = (np.arange(size, dtype=np.float32) + 0.5)[None, :] - coord[:, None]
  q = 0.5 * (d / sigma[:, None]) ** 2
  # Relative to the nearest pixel centre (always within 0.5 px, inside the radius), so that a
  # tiny sigma cannot underflow every weight of a row to 0.
  q -= q.min(axis=1, keepdims=True)
  radius = np.maximum(truncate * sigma, 1.0)[:, None]
  w = np.where(np.abs(d) <= radius, np.exp(-q), 0.0)
  return w / w.sum(axis=1, keepdims=True)


def density_map(points, height: int, width: int, sigma: float | str | np.ndarray = 1.0, *,
                k: int = K_NEIGHBOURS, beta: float = BETA, sigma_min: float = SIGMA_MIN,
                sigma_max: float = SIGMA_MAX, sigma_single: float = SIGMA_SINGLE,
                truncate: float = TRUNCATE, scale: float = 1.0, return_dropped: bool = False):
  """Points -> float32 (height, width) density map summing to `scale` * (points inside).

  sigma: a float (pixels), "adaptive" (`adaptive_sigmas(points, k, beta, ...)`, neighbours
    taken among all the points given, inside the image or not: they are real objects), or one
    sigma per point, (n,).
  Each point's Gaussian, truncated at +-truncate*sigma and at the image border, is renormalised
  to sum to 1 over the pixels it covers in the image, so the map sums to the count exactly (up to
  float rounding) even for points on edges and corners. It is separable, so the map is
  sum_i outer(ky_i, kx_i) = Ky^T @ Kx: one matmul, ~0.1 s for 1000 points on 384x576.
  Points outside `inside(points, height, width)` are dropped; `return_dropped=True` returns
  (map, number dropped). scale: multiplies the map (CLIP-Count trains on 60 x the density);
  divide predictions by it to read counts.
  """
  p = as_points(points)
  if isinstance(sigma, str):
    if sigma != "adaptive":
      raise ValueError(f"sigma must be a number, per-point array or 'adaptive', got {sigma!r}")
    sigmas = adaptive_sigmas(p, k, beta, sigma_min=sigma_min, sigma_max=sigma_max,
                             sigma_single=sigma_single)
  else:
    sigmas = np.broadcast_to(np.asarray(sigma, np.float64), (len(p),))
    if len(p) and not (sigmas > 0).all():
      raise ValueError(f"sigma must be > 0, got {sigma!r}")
  keep = inside(p, height, width)
  p, sigmas = p[keep], sigmas[keep]
  out = np.zeros((height, width), np.float32)
  for s in range(0, len(p), _CHUNK):
    ky = _axis_weights(p[s:s + _CHUNK, 1], sigmas[s:s + _CHUNK], height, truncate)
    kx = _axis_weights(p[s:s + _CHUNK, 0], sigmas[s:s + _CHUNK], width, truncate)
    out += ky.T @ kx
  out = out * np.float32(scale)
  return (out, int((~keep).sum())) if return_dropped else out


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in): the fraction of input pixel i that falls in output pixel o (columns sum to
  1), the two grids spanning the same extent. Conservative remapping along one axis."""
  step = n_out / n_in  # one input pixel's length in output pixels
  lo_in, hi_in = np.arange(n_in) * step, np.arange(1, n_in + 1) * step
  lo_out, hi_out = np.arange(n_out), np.arange(1, n_out + 1)
  overlap = (np.minimum(hi_in[None, :], hi_out[:, None])
             - np.maximum(lo_in[None, :], lo_out[:, None]))
  return np.clip(overlap, 0, None) / step


def resize_density(density: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """(..., h, w) -> float32 (..., out_h, out_w) with each pixel's mass spread over the output
  pixels it overlaps: sums are preserved exactly (and locally), up or down, any ratio. Unlike
  interpolate-then-rescale, no mass moves and an all-zero map stays zero."""
  d = np.asarray(density, np.float64)
  if d.ndim < 2 or min(out_h, out_w) < 1:
    raise ValueError(f"resize_density needs (..., h, w) and out sizes >= 1, got {d.shape} -> "
                     f"({out_h}, {out_w})")
  wy, wx = _area_weights(d.shape[-2], out_h), _area_weights(d.shape[-1], out_w)
  return (wy @ d @ wx.T).astype(np.float32)


def resize_points(points, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
  """Points of an (h, w) image -> points of that image resized to out_hw (edges map to edges,
  as PIL's and `resize_density`'s resampling grids)."""
  p = as_points(points).copy()
  p[:, 0] *= out_hw[1] / in_hw[1]
  p[:, 1] *= out_hw[0] / in_hw[0]
  return p


def crop(image: np.ndarray, points, top: int, left: int, height: int, width: int
         ) -> tuple[np.ndarray, np.ndarray]:
  """image[top:top+height, left:left+width] and its points: moved, and dropped unless inside the
  half-open window (so tiles of one image never both keep a point on their shared edge)."""
  image = np.asarray(image)
  if top < 0 or left < 0 or top + height > image.shape[0] or left + width > image.shape[1]:
    raise ValueError(f"crop ({top}, {left}, {height}, {width}) leaves the {image.shape[:2]} "
                     "image; pad first (random_crop_flip does)")
  p = as_points(points) - np.array([left, top], np.float32)
  keep = (p[:, 0] >= 0) & (p[:, 0] < width) & (p[:, 1] >= 0) & (p[:, 1] < height)
  return image[top:top + height, left:left + width], p[keep]


def hflip(image: np.ndarray, points) -> tuple[np.ndarray, np.ndarray]:
  """Mirror left-right: pixel j <-> width-1-j, so x -> width - x."""
  image = np.asarray(image)
  p = as_points(points).copy()
  p[:, 0] = image.shape[1] - p[:, 0]
  return image[:, ::-1], p


def random_crop_flip(image: np.ndarray, points, size: int | tuple[int, int],
                     rng: np.random.Generator | int | None = None, flip_prob: float = 0.5,
                     pad_value=0) -> tuple[np.ndarray, np.ndarray]:
  """A uniformly placed size x size (or (h, w)) crop, mirrored with probability flip_prob.

  An image smaller than the crop is padded at the bottom/right with pad_value first (points do
  not move). Deterministic given rng (a Generator or a seed). Returns (crop, its points).
  """
  rng = np.random.default_rng(rng)
  ch, cw = (size, size) if np.isscalar(size) else size
  image = np.asarray(image)
  ph, pw = max(0, ch - image.shape[0]), max(0, cw - image.shape[1])
  if ph or pw:
    pad = ((0, ph), (0, pw)) + ((0, 0),) * (image.ndim - 2)
    image = np.pad(image, pad, constant_values=pad_value)
  top = int(rng.integers(0, image.shape[0] - ch + 1))
  left = int(rng.integers(0, image.shape[1] - cw + 1))
  image, points = crop(image, points, top, left, ch, cw)
  if rng.random() < flip_prob:
    image, points = hflip(image, points)
  return image, points
