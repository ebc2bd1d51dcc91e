"""Image decoding and CLIP preprocessing: odd modes, bad bytes, bombs, crops, parity with HF."""
import functools
import io
import json
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from countclip_jax.data import images


def _encode(image, fmt="PNG", **kwargs):
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _png_header_only(width, height):
  """A PNG whose header claims width x height: what a decompression bomb looks like to open()."""
  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


def _pixel(data, xy=(0, 0)):
  image = images.decode(data)
  assert image.mode == "RGB"
  return image.getpixel(xy)


def test_rgb_and_grey():
  assert _pixel(_encode(Image.new("RGB", (8, 8), (10, 200, 30)))) == (10, 200, 30)
  assert _pixel(_encode(Image.new("L", (8, 8), 77))) == (77, 77, 77)
  assert _pixel(_encode(Image.new("1", (8, 8), 1))) == (255, 255, 255)


def test_alpha_is_composited_on_white():
  rgba = Image.new("RGBA", (3, 1))
  rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (255, 0, 0, 128)])
  data = _encode(rgba)
  assert _pixel(data, (0, 0)) == (255, 255, 255)  # transparent: white, not the hidden red
  assert _pixel(data, (1, 0)) == (0, 0, 255)
  assert _pixel(data, (2, 0)) == (255, 127, 127)  # half transparent red on white
  assert _pixel(_encode(Image.new("LA", (4, 4), (0, 0)))) == (255, 255, 255)
  assert _pixel(_encode(Image.new("LA", (4, 4), (50, 255)))) == (50, 50, 50)


def test_palette_with_and_without_transparency():
  p = Image.new("P", (4, 4), 1)
  p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
  assert _pixel(_encode(p)) == (200, 100, 50)
  assert _pixel(_encode(p, transparency=1)) == (255, 255, 255)
  assert _pixel(_encode(p, "GIF", transparency=0)) == (200, 100, 50)


def test_animated_gif_first_frame():
  frames = [Image.new("P", (4, 4), i) for i in (1, 2)]
  for f in frames:
    f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
  data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
  assert _pixel(data) == (255, 0, 0)


def test_sixteen_bit_and_float_grey():
  i16 = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
  assert i16.mode == "I;16"
  data = _encode(i16)
  assert [_pixel(data, (x, 0))[0] for x in range(3)] == [0, 128, 255]
  i32 = Image.fromarray(np.array([[0, 65535]], np.int32))
  assert i32.mode == "I"
  assert [_pixel(_encode(i32, "TIFF"), (x, 0))[0] for x in range(2)] == [0, 255]
  f = Image.fromarray(np.array([[-5.0, 100.4, 300.0]], np.float32))
  assert [_pixel(_encode(f, "TIFF"), (x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_cmyk_and_ycbcr():
  red = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
  assert _pixel(_encode(red, "TIFF")) == (255, 0, 0)
  r, g, b = _pixel(_encode(red, "JPEG", quality=95))
  assert r > 230 and g < 25 and b < 25
  ycc = Image.new("RGB", (4, 4), (30, 60, 90)).convert("YCbCr")
  assert np.abs(np.subtract(images.to_rgb(ycc).getpixel((0, 0)), (30, 60, 90))).max() <= 2


@pytest.mark.parametrize("data, match", [
    (b"", "Empty image"),
    (b"\x00" * 100, "Not a readable image"),
    (b"<html>404 Not Found</html>", "Not a readable image"),
])
def test_not_an_image(data, match):
  with pytest.raises(images.BadImageError, match=match):
    images.decode(data)


def test_truncated_jpeg():
  pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8)
  data = _encode(Image.fromarray(pixels), "JPEG")
  images.decode(data)
  with pytest.raises(images.BadImageError, match="Cannot decode JPEG.*truncated"):
    images.decode(data[:len(data) // 2])
  assert issubclass(images.BadImageError, ValueError)  # callers may catch ValueError


def test_pixel_limit():
  data = _encode(Image.new("RGB", (100, 100)))
  assert images.decode(data, max_pixels=10_000).size == (100, 100)
  with pytest.raises(images.BadImageError, match="10000 pixels exceeds max_pixels=9999"):
    images.decode(data, max_pixels=9999)


@pytest.mark.parametrize("side", [12_000, 100_000])  # over PIL's warning / error threshold
def test_decompression_bomb(side):
  data = _png_header_only(side, side)
  assert len(data) < 200
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no PIL warning leaks, nor does PIL's exception
    with pytest.raises(images.BadImageError, match=f"{side * side} pixels exceeds max_pixels"):
      images.decode(data)


def test_pixel_limit_replaces_pils(monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  data = _encode(Image.new("RGB", (20, 20)))
  with pytest.raises(Image.DecompressionBombError):
    Image.open(io.BytesIO(data))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    filters = list(warnings.filters)
    assert images.decode(data).size == (20, 20)
    assert images.decode_for_eval(data).size == (20, 20)
    assert images.preprocess(data, 8).shape == (8, 8, 3)
    assert warnings.filters == filters  # no process-wide warning state touched (threads)
  assert Image.MAX_IMAGE_PIXELS == 100  # nor PIL's own limit


def test_jpeg_draft_decodes_smaller():
  y, x = np.mgrid[0:1200, 0:1600]
  pixels = np.stack([x % 256, y % 256, (x + y) // 16 % 256], -1).astype(np.uint8)
  data = _encode(Image.fromarray(pixels), "JPEG", quality=95)
  assert images.decode(data).size == (1600, 1200)
  assert images.decode(data, min_size=224).size == (400, 300)  # 1/4 scale; 1/8 would be < 224
  # Training may decode at reduced scale; eval never does (transformers' pixels, below).
  fast = images.normalize(np.asarray(images.resize_center_crop(
      images.decode(data, min_size=224), 224)))
  full = images.preprocess(data, 224)
  assert 0 < np.abs(fast - full).mean() < 0.05
  assert images.decode_for_eval(data).size == (1600, 1200)
  np.testing.assert_array_equal(full, images.preprocess(images.decode(data), 224))


def test_preprocess_matches_hugging_face():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  processor = CLIPImageProcessorPil()
  rng = np.random.default_rng(1)
  for shape in [(240, 320, 3), (500, 231, 3), (100, 90, 3)]:
    image = Image.fromarray(rng.integers(0, 256, shape, np.uint8))
    expected = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    out = images.preprocess(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)


def _photo(width, height, seed=0):
  """Smooth gradients plus noise: JPEG-realistic detail, so that a reduced-scale decode shows."""
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
  noise = np.random.default_rng(seed).integers(-40, 40, (height, width, 3))
  return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _rgba_partly_transparent():
  rgba = np.dstack([np.asarray(_photo(300, 200)),
                    np.random.default_rng(1).integers(0, 256, (200, 300)).astype(np.uint8)])
  rgba[:50, :, 3] = 0  # a fully transparent band; the rest partly
  rgba[50:80, :, 3] = 255
  return _encode(Image.fromarray(rgba, "RGBA"))


def _rgb_png_with_trns():
  rgb = _photo(260, 240).quantize(8).convert("RGB")  # few colours: the key covers many pixels
  return _encode(rgb, transparency=rgb.getpixel((130, 120)))


def _grey_png_with_trns():
  grey = _photo(250, 300).convert("L")
  return _encode(grey, transparency=int(np.median(np.asarray(grey))))  # a tRNS grey level


# Bytes as evals read them. The JPEGs include a 4:3 photo that decodes at 1/4 or 1/8 scale with a
# draft, odd and non-square sizes, one smaller than the crop and one exactly its size.
HF_CASES = {
    "jpeg 640x480": lambda: _encode(_photo(640, 480), "JPEG", quality=90),
    "jpeg 480x640": lambda: _encode(_photo(480, 640, 1), "JPEG", quality=90),
    "jpeg 1001x777": lambda: _encode(_photo(1001, 777, 2), "JPEG", quality=90),
    "jpeg 333x517": lambda: _encode(_photo(333, 517, 3), "JPEG", quality=90),
    "jpeg 150x101": lambda: _encode(_photo(150, 101, 4), "JPEG", quality=90),
    "jpeg 224x224": lambda: _encode(_photo(224, 224, 5), "JPEG", quality=90),
    "jpeg 3000x2001": lambda: _encode(_photo(3000, 2001, 6), "JPEG", quality=85),
    "jpeg grey 900x701": lambda: _encode(_photo(900, 701, 7).convert("L"), "JPEG", quality=90),
    "jpeg cmyk 300x240": lambda: _encode(_photo(300, 240, 8).convert("CMYK"), "JPEG", quality=90),
    "png rgb 301x257": lambda: _encode(_photo(301, 257)),
    "png rgba partly transparent": _rgba_partly_transparent,
    "png palette with transparency": lambda: _encode(_photo(257, 311).quantize(64),
                                                     transparency=3),
    "png grey": lambda: _encode(_photo(250, 300).convert("L")),
    "png grey with tRNS": _grey_png_with_trns,
    "png rgb with tRNS": _rgb_png_with_trns,
    "png 16-bit grey": lambda: _encode(Image.fromarray(
        np.random.default_rng(10).integers(0, 400, (240, 260)).astype(np.uint16))),
    "png la": lambda: _encode(Image.merge("LA", (_photo(230, 250).convert("L"),
                                                 _photo(230, 250, 9).convert("L")))),
}


@functools.lru_cache(maxsize=None)
def _case_bytes(case):
  return HF_CASES[case]()


@pytest.mark.parametrize("size", [224, 97])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_eval_bytes_match_hugging_face(case, size):
  """The eval path on bytes == transformers' slow (PIL) CLIPImageProcessor on the same bytes
  opened by PIL, at the model's image size, and so do `preprocess_or_blank` and
  `decode_for_eval` + `preprocess`. (transformers 5's `CLIPImageProcessor` is the torchvision
  backend, another resize implementation: the reference is the PIL one.)"""
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  processor = CLIPImageProcessorPil(size={"shortest_edge": size},
                                    crop_size={"height": size, "width": size})
  data = _case_bytes(case)
  expected = processor(Image.open(io.BytesIO(data)),
                       return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  out = images.preprocess(data, size)
  assert out.shape == (size, size, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
  blank_or, valid = images.preprocess_or_blank(lambda: data, size, case)
  assert valid
  np.testing.assert_array_equal(blank_or, out)
  np.testing.assert_array_equal(images.preprocess(images.decode_for_eval(data), size), out)
  np.testing.assert_allclose(images.preprocess(Image.open(io.BytesIO(data)), size), expected,
                             rtol=0, atol=1e-5)


def test_eval_and_training_transparency_rules():
  """Where the training rule (`decode`) and transformers' (`decode_for_eval`) differ: a tRNS
  colour on an RGB or grey PNG (HF: white; training: ignored) and 16-bit greys (HF: clipped by
  PIL's convert; training: scaled). Alpha bands and palettes agree."""
  rgb = Image.new("RGB", (2, 1))
  rgb.putdata([(10, 20, 30), (200, 0, 0)])
  data = _encode(rgb, transparency=(10, 20, 30))
  assert images.decode_for_eval(data).getpixel((0, 0)) == (255, 255, 255)
  assert images.decode(data).getpixel((0, 0)) == (10, 20, 30)
  grey = _encode(Image.new("L", (2, 2), 40), transparency=40)
  assert images.decode_for_eval(grey).getpixel((0, 0)) == (255, 255, 255)
  assert images.decode(grey).getpixel((0, 0)) == (40, 40, 40)
  i16 = _encode(Image.fromarray(np.array([[0, 200, 32896]], np.uint16)))
  assert [images.decode_for_eval(i16).getpixel((x, 0))[0] for x in range(3)] == [0, 200, 255]
  assert [images.decode(i16).getpixel((x, 0))[0] for x in range(3)] == [0, 1, 128]
  for data in (_rgba_partly_transparent(), _encode(Image.new("LA", (4, 4), (50, 100)))):
    assert images.decode_for_eval(data).tobytes() == images.decode(data).tobytes()
  with pytest.raises(images.BadImageError, match="10x201.*max_aspect_ratio=20"):
    images.decode_for_eval(_thin_png(10, 201))
  with pytest.raises(images.BadImageError, match="max_pixels=99"):
    images.decode_for_eval(_encode(Image.new("RGB", (10, 10))), max_pixels=99)


def test_preprocess_values_and_centre_crop():
  s = 32
  wide = np.zeros((s, 3 * s, 3), np.uint8)
  wide[:] = (0, 0, 255)
  wide[:, s:2 * s] = (255, 0, 0)  # only the centre third is red
  out = images.preprocess(_encode(Image.fromarray(wide)), s)
  red = (np.array([1.0, 0.0, 0.0], np.float32) - images.CLIP_MEAN) / images.CLIP_STD
  np.testing.assert_allclose(out, np.broadcast_to(red, (s, s, 3)), atol=1e-6)
  tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
  np.testing.assert_allclose(images.preprocess(Image.fromarray(tall), s), out, atol=1e-6)


def test_random_resized_crop_is_deterministic():
  pixels = np.random.default_rng(2).integers(0, 256, (90, 120, 3), np.uint8)
  image = Image.fromarray(pixels)
  a = images.preprocess(image, 64, rng=7)
  assert a.shape == (64, 64, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, images.preprocess(image, 64, rng=np.random.default_rng(7)))
  assert not np.array_equal(a, images.preprocess(image, 64, rng=8))
  assert not np.array_equal(a, images.preprocess(image, 64))
  gen = np.random.default_rng(3)
  first, second = (images.random_resized_crop(image, 16, gen) for _ in range(2))
  assert first.size == (16, 16) and first.tobytes() != second.tobytes()


def test_random_resized_crop_geometry():
  image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (100, 400, 3), np.uint8))
  whole = images.random_resized_crop(image, 32, 0, scale=(1, 1), ratio=(4, 4))
  assert whole.tobytes() == image.resize((32, 32), Image.BICUBIC).tobytes()
  # 4:1 cannot be cropped at 3/4..4/3 with the whole area: the fallback is a 4:3 centre crop.
  fallback = images.random_resized_crop(image, 32, 0, scale=(1, 1))
  box = ((400 - 133) // 2, 0, (400 - 133) // 2 + 133, 100)
  assert fallback.tobytes() == image.resize((32, 32), Image.BICUBIC, box=box).tobytes()


def test_preprocess_batch():
  good = _encode(Image.new("RGB", (40, 30), (1, 2, 3)))
  batch = images.preprocess_batch([good, Image.new("L", (50, 50))], 16)
  assert batch.shape == (2, 16, 16, 3) and batch.dtype == np.float32
  batch_a = images.preprocess_batch([good, good], 16, rng=5)
  np.testing.assert_array_equal(batch_a, images.preprocess_batch([good, good], 16, rng=5))
  with pytest.raises(images.BadImageError, match="Image 1 of the batch: Empty image"):
    images.preprocess_batch([good, b""], 16)


def _thin_png(width, height):
  """A few hundred bytes of PNG: under the pixel limit, yet 224 x 4,480,000 once its shorter
  side is resized to 224 (the 1x20000 case took 14 s and 4.1 GB before the aspect limit)."""
  return _encode(Image.new("RGB", (width, height), (200, 10, 10)))


THIN = [(1, 20_000), (2, 60_000), (20_000, 1)]


@pytest.mark.parametrize("width, height", THIN)
def test_extreme_aspect_ratio_is_refused_quickly(width, height):
  data = _thin_png(width, height)
  assert len(data) < 1000 and width * height < images.MAX_PIXELS
  for call in (images.decode, lambda d: images.preprocess(d, 224),
               lambda d: images.preprocess(d, 224, rng=0)):
    start = time.perf_counter()
    with pytest.raises(images.BadImageError, match="^extreme aspect ratio") as info:
      call(data)
    assert time.perf_counter() - start < 1.0
    assert info.value.reason == "extreme aspect ratio"
  # A PIL image gets the same verdict as its bytes, before anything is resized.
  image = Image.new("RGB", (width, height))
  with pytest.raises(images.BadImageError, match="^extreme aspect ratio"):
    images.preprocess(image, 224)
  with pytest.raises(images.BadImageError, match="^extreme aspect ratio"):
    images.resize_center_crop(image, 224)


def test_aspect_ratio_limit_boundary():
  assert images.MAX_ASPECT_RATIO == 20
  at_limit = _thin_png(10, 200)  # 20:1 is allowed: a resized 224 x 4480 is 1M pixels
  assert images.decode(at_limit).size == (10, 200)
  assert images.preprocess(at_limit, 224).shape == (224, 224, 3)
  with pytest.raises(images.BadImageError, match="10x201.*max_aspect_ratio=20"):
    images.decode(_thin_png(10, 201))
  assert images.decode(_thin_png(10, 201), max_aspect_ratio=30).size == (10, 201)
  # Other bad images keep the generic reason (data.prepare counts by it).
  with pytest.raises(images.BadImageError) as info:
    images.decode(b"")
  assert info.value.reason == "bad image"
  with pytest.raises(images.BadImageError, match="Image 1 of the batch: extreme") as info:
    images.preprocess_batch([at_limit, _thin_png(1, 20_000)], 16)
  assert info.value.reason == "extreme aspect ratio"


_PEAK_MEMORY_CHILD = """
import io, json, resource, sys
from PIL import Image
from countclip_jax.data import images
datas = [bytes.fromhex(h) for h in json.loads(sys.argv[1])]
# Cap the address space at what is mapped now + 1 GiB, so that a regression fails fast with a
# MemoryError instead of taking 4 GB and 14 s of a shared machine.
with open("/proc/self/statm") as f:
  mapped = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + (1 << 30), resource.RLIM_INFINITY))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reasons = []
for data in datas:
  for image in (data, Image.open(io.BytesIO(data))):
    try:
      images.preprocess(image, 224)
      reasons.append(None)
    except images.BadImageError as e:
      reasons.append(e.reason)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"reasons": reasons, "grown_kib": grown}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, ru_maxrss in KiB")
def test_extreme_aspect_ratio_peak_memory_stays_small():
  datas = [_thin_png(w, h).hex() for w, h in THIN]
  result = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_CHILD, json.dumps(datas)],
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout)
  assert out["reasons"] == ["extreme aspect ratio"] * 6
  assert out["grown_kib"] < 50 << 10  # < 50 MiB over the interpreter's own (was 4.1 GB)


def test_normalize_table_is_the_arithmetic():
  """The uint8 look-up is bit-identical to (x / 255 - mean) / std in float32, any shape."""
  rng = np.random.default_rng(0)
  every_level = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)
  for pixels in (every_level, rng.integers(0, 256, (2, 5, 7, 3), np.uint8),
                 rng.integers(0, 256, (9, 4, 3), np.uint8)[:, ::2]):  # a strided view too
    want = ((pixels.astype(np.float32) / 255.0 - images.CLIP_MEAN) / images.CLIP_STD)
    got = images.normalize(pixels)
    assert got.dtype == np.float32 and got.shape == pixels.shape
    np.testing.assert_array_equal(got, want.astype(np.float32))
  floats = rng.uniform(0, 255, (4, 4, 3))  # not uint8: the arithmetic itself
  np.testing.assert_allclose(images.normalize(floats),
                             (floats / 255.0 - images.CLIP_MEAN) / images.CLIP_STD, atol=1e-5)


@pytest.mark.parametrize("width,height", [(384, 288), (288, 384), (640, 480), (230, 319)])
def test_resize_crop_box_is_the_centre_crop_resampled_from_its_box(width, height):
  """Training's crop-box resize: the square resize_center_crop makes, within rounding (PIL's
  two passes round differently from a box; most on noise, and _photo is noisy)."""
  image = _photo(width, height)
  box = np.asarray(images.resize_crop_box(image, 224), np.int16)
  full = np.asarray(images.resize_center_crop(image, 224), np.int16)
  assert box.shape == full.shape == (224, 224, 3)
  difference = np.abs(box - full)
  assert np.mean(difference) < 0.5 and np.percentile(difference, 99) <= 4, (
      difference.max(), (difference > 0).mean())
  assert not np.array_equal(box, full)  # really the box path, not resize_center_crop's


@pytest.mark.parametrize("width,height,size", [(224, 300, 224), (30, 50, 48)])
def test_resize_crop_box_of_a_small_image_is_resize_center_crop(width, height, size):
  """At the size (only a crop) or below it (an enlargement): resize_center_crop's pixels."""
  image = _photo(width, height)
  np.testing.assert_array_equal(np.asarray(images.resize_crop_box(image, size)),
                                np.asarray(images.resize_center_crop(image, size)))
  with pytest.raises(images.BadImageError, match="^extreme aspect ratio"):
    images.resize_crop_box(Image.new("RGB", (10, 300)), 224)
