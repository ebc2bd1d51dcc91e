"""Images: bytes -> RGB -> CLIP's float32 (S, S, 3), robust to bad bytes.

`decode` raises `BadImageError` (a ValueError) for anything it cannot turn into an RGB image --
empty or truncated files, non-images, decompression bombs, strips of extreme aspect ratio -- so
that callers count and skip the example (by `BadImageError.reason`) instead of crashing a run.

Two rules turn bytes into RGB pixels:

* Eval (`decode_for_eval`, `to_rgb_for_eval`, and `preprocess` without `rng`, which evaluate,
  classification, CountBench, retrieve and explain use): exactly transformers' slow PIL processor
  `CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S})` on
  `PIL.Image.open(bytes)` (transformers 5's plain `CLIPImageProcessor` is its torchvision
  backend, another resize implementation): the full-size decode (no JPEG `draft`), its
  `convert_to_rgb` (an image with an alpha band or a `transparency` key, RGB and L included, is
  composited on white; any other mode is `convert("RGB")`, which clips 16-bit greys), shorter
  side to S (bicubic, `int(S * long / short)`), centre crop S, * 1/255, CLIP's mean and std. So
  a `--hf` baseline scores the pixels transformers would give it (tests/test_images.py holds the
  two within 1e-5 on JPEG and PNG bytes; measured: identical).
* Training (`decode`, `to_rgb`, and `preprocess` with `rng`; with augmentation off, data/
  pipeline.py takes `decode`'s image to `resize_crop_box`, the same square resampled from the
  source crop alone): JPEGs may decode at 1/2..1/8 scale
  (`min_size`, several times faster on large photos), alpha bands and transparent palette
  entries are composited on white (a tRNS colour on RGB or L is not), and 16-bit greys are
  scaled, not clipped.

Arrays are HWC (NHWC batched), like the model's inputs.
"""
from __future__ import annotations

import io
import math
import struct
from typing import Callable, Sequence

import numpy as np
from absl import logging
from PIL import Image
from PIL import JpegImagePlugin

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
# PIL's own threshold. Decoding 89M pixels takes ~270 MB as RGB; larger is almost surely a bomb.
MAX_PIXELS = 89_478_485
# Longer side / shorter side. Resizing the shorter side to S makes S * S * ratio pixels before the
# centre crop, so a 164-byte 1x20000 PNG (well under MAX_PIXELS) became 224 x 4,480,000 at 224 px:
# 14 s and 4.1 GB for one image. At most 20:1 bounds the resized image to 20 * S * S pixels
# (1M, 3 MB at 224); a strip past 20:1 (a banner, a divider) is no photo of countable objects.
MAX_ASPECT_RATIO = 20
# Crops keep at least 90% of the image by default: a smaller crop can cut counted objects out.
CROP_SCALE = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


class BadImageError(ValueError):
  """Bytes that are not a decodable image (or exceed a limit): count it and skip it.

  `reason` is a short fixed phrase to count skips by: "extreme aspect ratio", else "bad image".
  """

  def __init__(self, message: str, reason: str = "bad image"):
    super().__init__(message)
    self.reason = reason


def check_aspect_ratio(width: int, height: int,
                       max_aspect_ratio: float = MAX_ASPECT_RATIO) -> None:
  """Raises BadImageError("extreme aspect ratio ...") past `max_aspect_ratio`: from the size
  alone, so that a strip is refused before it is decoded or resized."""
  if min(width, height) <= 0:
    raise BadImageError(f"Image of {width}x{height} has no pixels.")
  ratio = max(width, height) / min(width, height)
  if ratio > max_aspect_ratio:
    raise BadImageError(f"extreme aspect ratio: {width}x{height} is {ratio:.4g}:1, over "
                        f"max_aspect_ratio={max_aspect_ratio:g} (resizing its shorter side would "
                        f"make {ratio:.4g} times the pixels of the crop).",
                        reason="extreme aspect ratio")


def decode(data: bytes, *, max_pixels: int = MAX_PIXELS, min_size: int | None = None,
           max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
  """Image bytes (any format PIL reads; the first frame of animations) -> RGB PIL image, by the
  training rule (`to_rgb`); `decode_for_eval` is transformers' rule.

  min_size: let libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale while both sides stay >= min_size
    (PIL `draft`): several times faster on large photos that are resized down anyway.
  Raises BadImageError for empty, truncated or unidentifiable bytes and for images of more than
  `max_pixels` pixels (checked from the header, before decoding; this replaces PIL's own
  `Image.MAX_IMAGE_PIXELS` check, so no DecompressionBombWarning is ever emitted), and, with
  reason "extreme aspect ratio", for a longer side over `max_aspect_ratio` times the shorter
  (also from the header: such a strip costs nothing to refuse).
  """
  return _decode(data, max_pixels, max_aspect_ratio, min_size, to_rgb)


def decode_for_eval(data: bytes, *, max_pixels: int = MAX_PIXELS,
                    max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
  """Image bytes -> the RGB image transformers' CLIPImageProcessorPil works on: the full-size
  decode (never a JPEG `draft`) converted by `to_rgb_for_eval`. The same guards and errors as
  `decode` (max_pixels and the aspect ratio from the header, BadImageError)."""
  return _decode(data, max_pixels, max_aspect_ratio, None, to_rgb_for_eval)


def _decode(data: bytes, max_pixels: int, max_aspect_ratio: float, min_size: int | None,
            convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
  data = bytes(data)
  if not data:
    raise BadImageError("Empty image (0 bytes).")
  try:
    image = _open(io.BytesIO(data))
  except Exception as e:  # PIL raises many types for bad bytes; all mean "not an image".
    raise BadImageError(f"Not a readable image ({len(data)} bytes starting {data[:12]!r}): "
                        f"{type(e).__name__}: {e}") from e
  width, height = image.size
  if width * height > max_pixels:
    raise BadImageError(f"Image of {width}x{height} = {width * height} pixels exceeds "
                        f"max_pixels={max_pixels} (decompression bomb guard).")
  check_aspect_ratio(width, height, max_aspect_ratio)
  try:
    if min_size and isinstance(image, JpegImagePlugin.JpegImageFile):
      image.draft(image.mode, (min_size, min_size))
    image.load()
    return convert(image)
  except Exception as e:
    raise BadImageError(f"Cannot decode {image.format} image {width}x{height} "
                        f"({len(data)} bytes): {type(e).__name__}: {e}") from e


def _open(fp: io.BytesIO) -> Image.Image:
  """`Image.open` without its pixel check, so that `decode` applies `max_pixels` instead.

  Plain `Image.open` cannot keep our guarantees: it runs `_decompression_bomb_check` on every
  image it identifies, which warns (DecompressionBombWarning) past `Image.MAX_IMAGE_PIXELS` and
  raises past twice that, before we see the size. `formats=` does not skip it; silencing the
  warning (`warnings.catch_warnings`) changes process-wide state, racy from the decode threads of
  retrieve and grain; setting `Image.MAX_IMAGE_PIXELS` (to None, or to our limit) is process-wide
  too -- it would turn off or move PIL's guard for all other code in the process, and a per-call
  `max_pixels` over 2 * MAX_IMAGE_PIXELS would still raise. So this is Image.open's own loop over
  the plugin registry (Image.ID in order, each format's accept() on the first 16 bytes, the
  factory, skipping the exceptions Image.open skips), without the check. Image.ID and Image.OPEN
  are the registry `Image.register_open` fills (Pillow 13 here); should a Pillow drop them,
  plain Image.open is used (then PIL's warning may show for images past its limit).
  """
  Image.init()
  formats, openers = getattr(Image, "ID", None), getattr(Image, "OPEN", None)
  if not isinstance(formats, list) or not isinstance(openers, dict):
    return Image.open(fp)
  prefix = fp.read(16)
  for fmt in formats:
    factory, accept = openers[fmt]
    accepted = accept(prefix) if accept else True
    if not accepted or isinstance(accepted, str):  # a str is a "looks like, but" message
      continue
    fp.seek(0)
    try:
      return factory(fp, "")
    except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open skips past
      continue
  raise Image.UnidentifiedImageError("cannot identify image file")


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB, by the training rule (`to_rgb_for_eval` is transformers' eval rule).

  Transparency (RGBA, LA, PA, P with a transparent colour) is composited on white, as a browser
  shows it on a white page: transparent product shots are common on the web, and the colour
  under a transparent pixel is arbitrary (often black), so dropping alpha would be wrong.
  16-bit and 32-bit integer greys (I;16*, I) are read as 16-bit (0..65535 -> 0..255); float
  greys (F) are clipped to 0..255; CMYK and YCbCr use PIL's conversion.
  """
  if image.mode == "RGB":
    return image
  if image.mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  elif image.mode.startswith("I"):
    pixels = np.asarray(image, dtype=np.float64) / 257.0
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
  elif image.mode == "F":
    image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8))
  if image.mode == "La":  # premultiplied; PIL converts it to LA only
    image = image.convert("LA")
  if image.mode in ("RGBA", "RGBa", "LA", "PA"):
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def to_rgb_for_eval(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB exactly as transformers' `image_transforms.convert_to_rgb` (5.x, what
  CLIPImageProcessorPil's do_convert_rgb runs): an image with an "A" band (RGBA, LA, PA) or a
  `transparency` entry (P, and RGB or L with a PNG tRNS colour) goes to RGBA and is composited
  on white; any other mode is PIL's `convert("RGB")` (16-bit and float greys clipped to 0..255,
  premultiplied La / RGBa not un-premultiplied: unlike `to_rgb`, on purpose, for parity).
  """
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy it


def resize_center_crop(image: Image.Image, size: int, *,
                       max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
  """Shorter side to `size` (bicubic), then the centre `size` x `size`, as CLIPImageProcessorPil:
  the longer side becomes `int(size * long / short)` (get_resize_output_image_size with
  default_to_square=False), PIL's resize without reducing_gap, the crop's corner at
  `(new - size) // 2`.

  The resized image has at most `max_aspect_ratio * size**2` pixels: past that ratio it raises
  BadImageError before resizing. (Cropping first, with `resize(box=...)`, bounds it to size**2
  but is not the processor's output: `resize_crop_box`, for training.)
  """
  new, (left, top) = _center_crop_geometry(image, size, max_aspect_ratio)
  if new != image.size:
    image = image.resize(new, Image.BICUBIC)
  return image.crop((left, top, left + size, top + size))


def _center_crop_geometry(image: Image.Image, size: int, max_aspect_ratio: float):
  """(the size the shorter side to `size` gives, the centre crop's corner in it), as
  CLIPImageProcessorPil computes them; BadImageError past `max_aspect_ratio`."""
  width, height = image.size
  check_aspect_ratio(width, height, max_aspect_ratio)
  if width <= height:
    new = (size, int(size * height / width))
  else:
    new = (int(size * width / height), size)
  return new, ((new[0] - size) // 2, (new[1] - size) // 2)


def resize_crop_box(image: Image.Image, size: int, *,
                    max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
  """`resize_center_crop`'s square, resampled from the source in one `resize(box=...)`: the
  training path (augment off). Only the crop's pixels are made (1.86 ms instead of 4.74 ms from
  a 384x288 JPEG at 224 px on this repo's CPU), at the cost of parity: the same box and filter,
  but PIL's two passes round differently from a box, so pixels differ from `resize_center_crop`
  (measured: <= 2 grey levels on 0.75 % of the pixels of benchmarks/input_pipeline.py's scenes;
  up to 24 on pixel noise barely shrunk, 230x319 -> 224; tests/test_images.py). An image no
  larger than the output gets `resize_center_crop`'s pixels. Eval keeps `resize_center_crop`:
  transformers' exact pixels.
  """
  width, height = image.size
  new, (left, top) = _center_crop_geometry(image, size, max_aspect_ratio)
  if new[0] >= width:  # at size (only the crop) or enlarged: resize_center_crop's pixels
    # (both passes of an enlargement from a box round differently: up to 14 levels on noise).
    return resize_center_crop(image, size, max_aspect_ratio=max_aspect_ratio)
  # The crop [left, left + size) of the image resized to `new`, in source pixels.
  sx, sy = width / new[0], height / new[1]
  return image.resize((size, size), Image.BICUBIC,
                      box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))


def random_resized_crop(image: Image.Image, size: int,
                        rng: np.random.Generator | int | None = None,
                        scale: tuple[float, float] = CROP_SCALE,
                        ratio: tuple[float, float] = CROP_RATIO) -> Image.Image:
  """A random crop of `scale` of the area and `ratio` aspect, resized (bicubic) to `size`.

  The algorithm of torchvision's RandomResizedCrop (ten tries, then a centre crop at the nearest
  allowed ratio), deterministic given `rng` (a numpy Generator or a seed).
  """
  rng = np.random.default_rng(rng)
  width, height = image.size
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      break
  else:
    aspect = width / height
    if aspect < min(ratio):
      w, h = width, int(round(width / min(ratio)))
    elif aspect > max(ratio):
      w, h = int(round(height * max(ratio))), height
    else:
      w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
  return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def _normalize(pixels: np.ndarray) -> np.ndarray:
  return ((np.asarray(pixels, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)


# normalize's value of each uint8 level, per channel: a uint8 image is then one table look-up a
# channel (np.take, which releases the GIL), 2.4x faster than the arithmetic and bit-identical
# to it (the table is that arithmetic).
_LEVELS = [np.ascontiguousarray(column)
           for column in _normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)).T]


def normalize(pixels: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) -> float32 scaled to [0, 1] and normalized by CLIP's mean and std."""
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8 or pixels.shape[-1:] != (3,):
    return _normalize(pixels)
  out = np.empty(pixels.shape, np.float32)
  for c, levels in enumerate(_LEVELS):
    np.take(levels, pixels[..., c], out=out[..., c], mode="wrap")  # wrap: no bounds check
  return out


def normalize_on_device(pixels):
  """A batch's images as the model takes them, inside a jitted step: uint8 pixels normalised
  like `normalize` (the same float32 arithmetic), float32 ones (already normalised) as they
  are. Training batches carry uint8 (data/pipeline.py); the host does no float work for them."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  # the rest is numpy and PIL
  if pixels.dtype != jnp.uint8:
    return pixels
  return (pixels.astype(jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def preprocess(image: Image.Image | bytes, size: int = 224, *,
               rng: np.random.Generator | int | None = None,
               scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
               max_pixels: int = MAX_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO
               ) -> np.ndarray:
  """Image or its bytes -> float32 (size, size, 3), CLIP-normalized.

  Without `rng`: CLIP's eval transform, transformers' CLIPImageProcessorPil at `size` on the
  image (bytes: on `PIL.Image.open(bytes)`): `decode_for_eval` / `to_rgb_for_eval` (full-size
  decode, HF's transparency rule), resize shorter side, centre crop. With `rng`: the training
  augmentation `random_resized_crop(scale, ratio)` on `decode` / `to_rgb` (JPEGs decoded at the
  smallest scale that keeps enough pixels, the training transparency rule). Bytes raise
  BadImageError when they do not decode. An image past `max_aspect_ratio` raises
  BadImageError("extreme aspect ratio ...") either way, with or without `rng`, so that an image
  gets one verdict whichever transform or input kind it meets.
  """
  augment = rng is not None
  if isinstance(image, Image.Image):
    check_aspect_ratio(*image.size, max_aspect_ratio)  # before converting all its pixels
    image = to_rgb(image) if augment else to_rgb_for_eval(image)
  elif augment:
    image = decode(image, max_pixels=max_pixels, min_size=math.ceil(size / math.sqrt(scale[0])),
                   max_aspect_ratio=max_aspect_ratio)
  else:
    image = decode_for_eval(image, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
  if augment:
    image = random_resized_crop(image, size, rng, scale, ratio)
  else:
    image = resize_center_crop(image, size, max_aspect_ratio=max_aspect_ratio)
  return normalize(np.asarray(image))


def preprocess_batch(images: Sequence[Image.Image | bytes], size: int = 224, *,
                     rng: np.random.Generator | int | None = None, **kwargs) -> np.ndarray:
  """`preprocess` over a batch -> float32 (N, size, size, 3); one `rng` draws all the crops."""
  rng = None if rng is None else np.random.default_rng(rng)
  out = np.empty((len(images), size, size, 3), np.float32)
  for i, image in enumerate(images):
    try:
      out[i] = preprocess(image, size, rng=rng, **kwargs)
    except BadImageError as e:
      raise BadImageError(f"Image {i} of the batch: {e}", e.reason) from e
  return out


def preprocess_or_blank(read: Callable[[], bytes], size: int, what: str
                        ) -> tuple[np.ndarray, bool]:
  """Eval input: (`preprocess(read(), size)`, True), or a blank image and False (logged) when
  the bytes cannot be read or decoded, so that an eval counts the image as skipped."""
  try:
    return preprocess(read(), size), True
  except (BadImageError, OSError, ValueError) as e:
    logging.warning("%s has no usable image: %s", what, e)
    return np.zeros((size, size, 3), np.float32), False
