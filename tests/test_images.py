"""Image decoding and CLIP preprocessing: odd modes, bad bytes, bombs, crops, parity with HF."""
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
    assert images.decode(data).size == (20, 20)


def test_jpeg_draft_decodes_smaller():
  y, x = np.mgrid[0:1200, 0:1600]
  pixels = np.stack([x % 256, y % 256, (x + y) // 16 % 256], -1).astype(np.uint8)
  data = _encode(Image.fromarray(pixels), "JPEG", quality=95)
  assert images.decode(data).size == (1600, 1200)
  assert images.decode(data, min_size=224).size == (400, 300)  # 1/4 scale; 1/8 would be < 224
  fast = images.preprocess(data, 224)
  full = images.preprocess(images.decode(data), 224)
  assert np.abs(fast - full).mean() < 0.05


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
