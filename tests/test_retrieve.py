"""retrieve.py: the embedding cache (what is embedded when), ranking, contact sheet, the CLI."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from countclip_jax import retrieve

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ColourEmbedder:
  """Stands in for evaluate.Embedder: an image embeds as its dominant channel, a text as the
  colour it names; records how many images it embeds."""
  batch_size = 2  # several batches per folder
  model = types.SimpleNamespace(config=types.SimpleNamespace(
      vision=types.SimpleNamespace(image_size=8)))

  def __init__(self):
    self.embedded = 0

  def images(self, pixels):
    self.embedded += len(pixels)
    return np.eye(3, dtype=np.float32)[np.asarray(pixels).mean(axis=(1, 2)).argmax(-1)]

  def texts(self, texts):
    return np.eye(3)[[next(i for i, c in enumerate(COLOURS) if c in t) for t in texts]]


def _image(path, colour, size=(20, 14)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, COLOURS[colour]).save(path)


@pytest.fixture()
def photos(tmp_path):
  root = tmp_path / "photos"
  _image(root / "red.png", "red")
  _image(root / "sub" / "green.png", "green")
  _image(root / "blue.jpg", "blue")
  (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  return root


def _sync(root, embedder):
  found_root, files = retrieve.list_images(str(root / "**" / "*.*g"))
  assert found_root == str(root)
  cache = retrieve.EmbeddingCache(str(root / retrieve.CACHE_DIR), "key")
  return retrieve.sync(embedder, cache, found_root, files), cache


def test_second_run_embeds_nothing_and_changes_embed_alone(photos, monkeypatch):
  first = ColourEmbedder()
  gallery, cache = _sync(photos, first)
  assert first.embedded == 3 and gallery.read == 4  # 3 images + the broken file
  assert gallery.paths == [str(photos / p) for p in ("blue.jpg", "red.png", "sub/green.png")]
  assert list(gallery.skipped) == [str(photos / "broken.jpg")]
  assert "Not a readable image" in gallery.skipped[str(photos / "broken.jpg")]
  saved = os.stat(cache.json).st_mtime_ns

  # Same files, same model: nothing is decoded (the broken file neither) nor embedded.
  def no_decoding(path, size):
    raise AssertionError(f"{path} decoded again")
  monkeypatch.setattr(retrieve, "_pixels", no_decoding)
  second = ColourEmbedder()
  again, _ = _sync(photos, second)
  assert second.embedded == 0 and again.read == 0
  assert again.paths == gallery.paths and again.skipped == gallery.skipped
  np.testing.assert_array_equal(again.embeddings, gallery.embeddings)
  assert os.stat(cache.json).st_mtime_ns == saved  # not even rewritten
  monkeypatch.undo()

  # red.png rewritten (now blue, same size: only its mtime tells), new.png added, green removed.
  _image(photos / "red.png", "blue")
  stat = os.stat(photos / "red.png")
  os.utime(photos / "red.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  _image(photos / "new.png", "green")
  os.remove(photos / "sub" / "green.png")
  decoded = []
  monkeypatch.setattr(retrieve, "_pixels", lambda path, size: decoded.append(path) or (
      retrieve.images.preprocess(open(path, "rb").read(), size), None))
  third = ColourEmbedder()
  updated, _ = _sync(photos, third)
  assert sorted(decoded) == [str(photos / "new.png"), str(photos / "red.png")]
  assert third.embedded == 2 and updated.read == 2
  reloaded = retrieve.EmbeddingCache(str(photos / retrieve.CACHE_DIR), "key")
  assert sorted(reloaded.entries) == ["blue.jpg", "broken.jpg", "new.png", "red.png"]
  np.testing.assert_array_equal(reloaded.entries["red.png"]["vector"], [0, 0, 1])  # re-embedded
  with np.load(reloaded.npz, allow_pickle=False) as data:  # no pickle needed to read it back
    assert sorted(data["paths"]) == ["blue.jpg", "new.png", "red.png"]

  hits = retrieve.search(third, updated, ["something blue", "green"], top_k=2)
  assert hits[0] == [(1.0, str(photos / "blue.jpg")), (1.0, str(photos / "red.png"))]
  assert hits[1][0] == (1.0, str(photos / "new.png")) and hits[1][1][0] == 0.0


def test_another_glob_keeps_the_entries_it_does_not_name(photos):
  _sync(photos, ColourEmbedder())
  cache = retrieve.EmbeddingCache(str(photos / retrieve.CACHE_DIR), "key")
  retrieve.sync(ColourEmbedder(), cache, str(photos), [str(photos / "red.png")])
  assert "blue.jpg" in retrieve.EmbeddingCache(cache.directory, "key").entries


def test_a_damaged_or_foreign_cache_is_rebuilt(photos, capsys):
  _, cache = _sync(photos, ColourEmbedder())
  assert retrieve.EmbeddingCache(cache.directory, "another model").entries == {}
  index = json.loads(open(cache.json).read())
  index["files"]["red.png"]["row"] = 0  # rows of another save
  open(cache.json, "w").write(json.dumps(index))
  assert retrieve.EmbeddingCache(cache.directory, "key").entries == {}
  assert "rebuilding the unreadable embedding cache" in capsys.readouterr().err


def test_model_key_follows_the_weights():
  model = types.SimpleNamespace(config="config A", dtype=np.float32)
  params = {"vision": {"kernel": np.zeros((2, 3), np.float32)}, "logit_scale": np.float32(2.6)}
  key = retrieve.model_key(model, params)
  same = {"vision": {"kernel": np.zeros((2, 3), np.float32)}, "logit_scale": np.float32(2.6)}
  assert retrieve.model_key(model, same) == key
  same["vision"]["kernel"][1, 2] = 1e-7
  assert retrieve.model_key(model, same) != key
  assert retrieve.model_key(types.SimpleNamespace(config="config B", dtype=np.float32),
                            params) != key


def test_cache_falls_back_to_the_home_cache_when_the_folder_is_read_only(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
  assert retrieve.cache_dir(str(tmp_path)) == (str(tmp_path / retrieve.CACHE_DIR), "")
  monkeypatch.setattr(retrieve, "_writable", lambda directory: False)
  directory, note = retrieve.cache_dir(str(tmp_path))
  assert directory.startswith(str(tmp_path / "home" / "countclip_jax")) and os.path.isdir(directory)
  assert "not writable" in note


def test_glob_root():
  assert retrieve.glob_root("photos/**/*.jpg") == "photos"
  assert retrieve.glob_root("/data/a*/x.jpg") == "/data"
  assert retrieve.glob_root("*.jpg") == "."


def test_contact_sheet(photos, tmp_path):
  hits = [[(0.9, str(photos / "red.png")), (0.5, str(photos / "broken.jpg"))],
          [(0.3, str(photos / "blue.jpg"))]]
  retrieve.contact_sheet(["red", "blue"], hits, str(tmp_path / "sheet.png"), thumb=40)
  sheet = Image.open(tmp_path / "sheet.png")
  assert sheet.format == "PNG" and sheet.size == (8 + 2 * 48, 8 + 2 * (26 + 40 + 34 + 8))
  assert sheet.getpixel((8 + 20, 8 + 26 + 20))[0] > 200  # the red thumbnail, first


def _cli(*args, cwd):
  return subprocess.run([sys.executable, "-m", "countclip_jax.retrieve", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": ROOT})


@pytest.fixture(scope="module")
def hf_dir(tiny_export):
  """A random tiny CLIP exported in Hugging Face format, as `--hf` takes it (conftest.py)."""
  return tiny_export


def test_command_line(hf_dir, tmp_path, monkeypatch, capsys):
  for i, colour in enumerate(("red", "green", "blue", "red")):
    _image(tmp_path / "photos" / f"{i}.png", colour, size=(70, 50))
  (tmp_path / "photos" / "bad.png").write_bytes(b"nothing")
  done = _cli(f"--hf={hf_dir}", "--images", "photos/**/*.png", "--query=three red stars",
              "--query", "two blue circles", "--top_k=3", "--batch_size=4", "--out=sheet.png",
              cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  assert lines[0] == "# three red stars" and lines[4] == "# two blue circles" and len(lines) == 8
  rank, score, path = lines[1].split("\t")
  assert rank == "1" and -1 <= float(score) <= 1 and path.startswith("photos/")
  assert "skipped 1 unreadable image:\n  photos/bad.png (" in done.stderr
  assert "5 files: 5 new or changed" in done.stderr
  assert Image.open(tmp_path / "sheet.png").format == "PNG"
  # Another process loads the same weights, derives the same key: everything from the cache.
  monkeypatch.chdir(tmp_path)
  retrieve.retrieve(workdir=None, step=None, hf=hf_dir, pattern="photos/**/*.png",
                    queries=["three red stars", "two blue circles"], top_k=3, out="",
                    batch_size=4)
  again = capsys.readouterr()
  assert "5 files: 0 new or changed" in again.err and again.out == done.stdout


@pytest.mark.parametrize("args, message", [
    (["--workdir=run", "--images=nothing/*.jpg", "--query=two cats"], "no file matches"),
    (["--workdir=missing", "--images=*.png", "--query=two cats"], "no workdir missing"),
    (["--workdir=run", "--images=*.png", "--query= "], "empty query"),
    (["--workdir=run", "--images=*.png"], "empty query"),
    (["--images=*.png", "--query=two cats"], "pass exactly one of --workdir or --hf"),
    (["--workdir=run", "--images=*.png", "--query=two cats", "--out=no/sheet.png"],
     "no directory for --out=no/sheet.png"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, args, message):
  _image(tmp_path / "a.png", "red")
  done = _cli(*args, cwd=tmp_path)
  assert done.returncode == 2 and done.stderr.startswith(f"error: {message}"), done.stderr
  assert "Traceback" not in done.stderr


def test_help_exits_0(tmp_path):
  done = _cli("--help", cwd=tmp_path)
  assert done.returncode == 0 and "--query" in done.stdout + done.stderr
