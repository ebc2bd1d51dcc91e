r"""Count-specified image search: rank a folder's images for "five apples" with a counting CLIP.

  python -m countclip_jax.retrieve --workdir=RUN --images='photos/**/*.jpg' --query='five apples' \
      [--query='three dogs'] [--top_k=8] [--out=search.png] [--batch_size=64]
  python -m countclip_jax.retrieve --hf=DIR_or_hub_id --images=photos --query='two cats'

Prints one `rank  score  path` line per hit (cosine similarity, best first; a `# query` line
before each query's hits when there are several) and writes a contact sheet of the top_k
thumbnails, each labelled with its rank and score. Progress and notes go to stderr.

The image embeddings are cached in ROOT/.countclip_embeddings/KEY.npz + KEY.json, ROOT being the
glob's directory before its first wildcard ("photos" above), or under ~/.cache/countclip_jax
when ROOT is not writable:
- KEY hashes the model config, its compute dtype and the bytes of every parameter: any change of
  weights (another step, another fine-tune) starts a new cache, and no path or step name can
  make two models share one. Hashing costs a second or two for L/14.
- A file is embedded again only when its (path, size, mtime_ns) changed; entries of files gone
  from disk are dropped. Unreadable files are remembered with the reason, not decoded again.
- npz (read with allow_pickle=False) and json: loading a cache can never run code.
"""
from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from typing import NamedTuple, Sequence

import numpy as np
import tqdm
from absl import flags, logging
from PIL import Image, ImageDraw, ImageFont

from countclip_jax import cli
from countclip_jax.cli import UserError
from countclip_jax.data import images

FLAGS = flags.FLAGS
CACHE_DIR = ".countclip_embeddings"
FORMAT = 1  # of the cache files; part of KEY, so a new layout never misreads an old one
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ----------------------------------------------------------------------------- files

def glob_root(pattern: str) -> str:
  """The directory before the first wildcard: 'photos/**/*.jpg' -> 'photos', '*.jpg' -> '.'."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts:
    if glob.has_magic(part):
      break
    fixed.append(part)
  if len(fixed) == len(parts):  # no wildcard: a directory, or a file in one
    return pattern if os.path.isdir(pattern) else os.path.dirname(pattern) or "."
  return os.sep.join(fixed) or (os.sep if pattern.startswith(os.sep) else ".")


def list_images(pattern: str) -> tuple[str, list[str]]:
  """(root, sorted files) named by a glob (`**` recurses); a directory means its image files."""
  pattern = os.path.expanduser(pattern)
  if os.path.isdir(pattern):
    found = [p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
             if p.lower().endswith(IMAGE_EXTENSIONS)]
  else:
    found = glob.glob(pattern, recursive=True)
  files = sorted(p for p in found if os.path.isfile(p) and CACHE_DIR not in p.split(os.sep))
  return glob_root(pattern), files


def model_key(model, params) -> str:
  """What an image embedding depends on, hashed: config, compute dtype, every parameter's bytes."""
  import jax  # pylint: disable=g-import-not-at-top  # not needed by --help and user errors
  digest = hashlib.blake2b(digest_size=10)  # ~1 GB/s: one pass over the weights is cheap
  digest.update(f"{FORMAT} {model.config!r} {np.dtype(model.dtype).name}".encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}".encode())
    digest.update(leaf.reshape(-1).view(np.uint8))
  return digest.hexdigest()


def _writable(directory: str) -> bool:
  try:  # a probe file, not os.access: root may still meet a read-only mount
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      return True
  except OSError:
    return False


def cache_dir(root: str) -> tuple[str, str]:
  """(where ROOT's embeddings are cached, a note for the user when it is not beside them)."""
  local = os.path.join(root, CACHE_DIR)
  if _writable(local):
    return local, ""
  home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  name = hashlib.blake2b(os.path.abspath(root).encode(), digest_size=8).hexdigest()
  fallback = os.path.join(home, "countclip_jax", "embeddings", name)
  os.makedirs(fallback, exist_ok=True)
  return fallback, f"note: {root} is not writable; caching its embeddings in {fallback}"


# ----------------------------------------------------------------------------- the cache

class EmbeddingCache:
  """One folder's image embeddings under one model: DIRECTORY/KEY.npz (embeddings, paths) and
  DIRECTORY/KEY.json, which maps each path (relative to the folder) to its size, mtime_ns and
  either its row in the npz or the reason it does not decode. In memory, `entries[path]` holds
  the embedding itself ("vector") instead of the row."""

  def __init__(self, directory: str, key: str):
    self.directory, self.key = directory, key
    self.npz, self.json = (os.path.join(directory, f"{key}.{ext}") for ext in ("npz", "json"))
    self.entries: dict[str, dict] = {}
    if os.path.exists(self.json) and os.path.exists(self.npz):
      try:
        self.entries = self._read()
      except Exception as e:  # pylint: disable=broad-except  # a cache is disposable
        print(f"note: rebuilding the unreadable embedding cache {self.json}: {e}", file=sys.stderr)

  def _read(self) -> dict[str, dict]:
    with open(self.json, encoding="utf-8") as f:
      index = json.load(f)
    if index.get("format") != FORMAT or index.get("model_key") != self.key:
      raise ValueError("another format or model")
    with np.load(self.npz, allow_pickle=False) as data:
      embeddings, paths = data["embeddings"], data["paths"]
    entries = {}
    for path, entry in index["files"].items():
      if "row" in entry:
        row = entry.pop("row")
        if not 0 <= row < len(paths) or paths[row] != path:  # npz and json of different saves
          raise ValueError(f"row {row} of {self.npz} is not {path}")
        entry["vector"] = embeddings[row]
      entries[path] = entry
    return entries

  def save(self) -> None:
    """Both files atomically (a killed save leaves the old ones), the npz first."""
    embedded = sorted(p for p, e in self.entries.items() if "vector" in e)
    rows = {p: i for i, p in enumerate(embedded)}
    vectors = [self.entries[p]["vector"] for p in embedded]
    files = {p: {k: v for k, v in e.items() if k != "vector"} | (
        {"row": rows[p]} if p in rows else {}) for p, e in sorted(self.entries.items())}
    os.makedirs(self.directory, exist_ok=True)
    _write_atomic(self.npz, lambda f: np.savez(
        f, embeddings=np.stack(vectors) if vectors else np.zeros((0, 0), np.float32),
        paths=np.array(embedded, dtype=str)))
    index = {"format": FORMAT, "model_key": self.key, "files": files}
    _write_atomic(self.json, lambda f: f.write(json.dumps(index, indent=0).encode()))


def _write_atomic(path: str, write) -> None:
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".tmp", delete=False) as f:
    try:
      write(f)
    except BaseException:
      os.remove(f.name)
      raise
  os.replace(f.name, path)


class Gallery(NamedTuple):
  """The searchable images: `paths[i]` (as listed) embeds as row i of `embeddings`."""
  paths: list[str]
  embeddings: np.ndarray
  skipped: dict[str, str]  # unreadable file -> why
  read: int  # files new or changed, read now (the others came from the cache)


def _pixels(path: str, size: int):
  """(CLIP's eval pixels, None) or (None, why the file is no usable image)."""
  try:
    with open(path, "rb") as f:
      return images.preprocess(f.read(), size), None
  except (images.BadImageError, OSError, ValueError) as e:  # as images.preprocess_or_blank
    return None, str(e) or type(e).__name__


def sync(embedder, cache: EmbeddingCache, root: str, files: Sequence[str], *,
         save_every_s: float = 60.0) -> Gallery:
  """Brings `cache` up to date with `files` (under `root`), embedding only new or changed ones,
  and returns their gallery. Entries of files that still exist but that `files` does not name
  stay: another glob over the same folder shares the cache."""
  size = embedder.model.config.vision.image_size
  names = {p: os.path.relpath(p, root) for p in files}
  stamps = {}
  for p in files:
    stat = os.stat(p)
    stamps[p] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
  listed = set(names.values())
  gone = [n for n in cache.entries if n not in listed and not os.path.exists(os.path.join(root, n))]
  for name in gone:
    del cache.entries[name]
  stale = [p for p in files
           if any(cache.entries.get(names[p], {}).get(k) != v for k, v in stamps[p].items())]
  last_save = time.monotonic()
  workers = min(8, os.cpu_count() or 1)  # PIL decodes and resizes with the GIL released
  with concurrent.futures.ThreadPoolExecutor(workers) as pool, tqdm.tqdm(
      total=len(stale), unit="img", desc="embedding", disable=not stale) as progress:
    for start in range(0, len(stale), embedder.batch_size):
      chunk = stale[start:start + embedder.batch_size]
      decoded = list(pool.map(lambda p: _pixels(p, size), chunk))
      good = [i for i, (pixels, _) in enumerate(decoded) if pixels is not None]
      vectors = embedder.images(np.stack([decoded[i][0] for i in good])) if good else []
      for i, vector in zip(good, vectors):
        cache.entries[names[chunk[i]]] = {**stamps[chunk[i]], "vector": vector}
      for p, (pixels, error) in zip(chunk, decoded):
        if pixels is None:
          cache.entries[names[p]] = {**stamps[p], "error": error}
      progress.update(len(chunk))
      if time.monotonic() - last_save > save_every_s:  # a long first pass survives a kill
        cache.save()
        last_save = time.monotonic()
  if stale or gone:
    cache.save()
  readable = [p for p in files if "vector" in cache.entries[names[p]]]
  vectors = [cache.entries[names[p]]["vector"] for p in readable]
  return Gallery(readable, np.stack(vectors) if vectors else np.zeros((0, 0), np.float32),
                 {p: cache.entries[names[p]]["error"] for p in files
                  if "error" in cache.entries[names[p]]}, len(stale))


# ----------------------------------------------------------------------------- search

def search(embedder, gallery: Gallery, queries: Sequence[str], top_k: int
           ) -> list[list[tuple[float, str]]]:
  """For each query, its top_k (cosine similarity, path), best first; ties in gallery order."""
  if not gallery.paths:
    return [[] for _ in queries]
  similarity = np.asarray(embedder.texts(list(queries))) @ gallery.embeddings.T
  order = np.argsort(-similarity, axis=1, kind="stable")[:, :top_k]
  return [[(float(similarity[q, i]), gallery.paths[i]) for i in row]
          for q, row in enumerate(order)]


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font
    return ImageFont.load_default()


def _thumbnail(path: str, size: int) -> Image.Image:
  tile = Image.new("RGB", (size, size), (235, 235, 235))
  try:
    with open(path, "rb") as f:
      image = images.decode(f.read(), min_size=size)
  except (images.BadImageError, OSError, ValueError):  # changed since it was embedded: blank
    return tile
  image.thumbnail((size, size), Image.BICUBIC)  # whole image, letterboxed: counts stay visible
  tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
  return tile


def contact_sheet(queries: Sequence[str], results: Sequence[Sequence[tuple[float, str]]],
                  out: str, thumb: int = 160, columns: int = 8) -> None:
  """A PNG: per query, its name and its hits in a grid, each labelled "#rank  score" + file."""
  pad, label, header = 8, 34, 26
  columns = max(1, min(columns, max(len(r) for r in results)))
  rows = [max(1, math.ceil(len(r) / columns)) for r in results]
  sheet = Image.new("RGB", (pad + columns * (thumb + pad),
                            pad + sum(header + n * (thumb + label + pad) for n in rows)), "white")
  draw, big, small = ImageDraw.Draw(sheet), _font(15), _font(11)
  y = pad
  for query, hits, n in zip(queries, results, rows):
    draw.text((pad, y), query, fill="black", font=big)
    y += header
    for i, (score, path) in enumerate(hits):
      x = pad + (i % columns) * (thumb + pad)
      top = y + (i // columns) * (thumb + label + pad)
      sheet.paste(_thumbnail(path, thumb), (x, top))
      draw.text((x, top + thumb + 3), f"#{i + 1}  {score:.3f}", fill="black", font=small)
      name = os.path.basename(path)
      while len(name) > 4 and draw.textlength(name, font=small) > thumb:
        name = name[:-4] + "..."  # keep the start; drop 4 characters, add 3 dots
      draw.text((x, top + thumb + 18), name, fill=(90, 90, 90), font=small)
    y += n * (thumb + label + pad)
  sheet.save(out, format="PNG")


# ----------------------------------------------------------------------------- CLI

def _load_model(workdir: str, step: int | None, hf: str):
  try:
    if workdir:
      if "://" not in workdir and not os.path.isdir(workdir):
        raise UserError(f"no workdir {workdir}")
      from countclip_jax.export import load_run  # pylint: disable=g-import-not-at-top
      return load_run(workdir, step)
    from countclip_jax.models import load_pretrained  # pylint: disable=g-import-not-at-top
    from countclip_jax.text.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    model, params = load_pretrained(hf)
    return model, params, Tokenizer.from_pretrained(hf, model.config.text.context_length)
  except FileNotFoundError as e:
    raise UserError(str(e)) from e


def retrieve(*, workdir: str, step: int | None, hf: str, pattern: str, queries: Sequence[str],
             top_k: int, out: str, batch_size: int) -> list[list[tuple[float, str]]]:
  """The command: checks the arguments before loading anything, then syncs, searches, prints."""
  queries = [q.strip() for q in queries]
  if not queries or not all(queries):
    raise UserError("empty query: pass --query='five apples' (once per query)")
  if bool(workdir) == bool(hf):
    raise UserError("pass exactly one of --workdir or --hf")
  if top_k < 1 or batch_size < 1:
    raise UserError(f"--top_k ({top_k}) and --batch_size ({batch_size}) must be positive")
  if not pattern:
    raise UserError("pass --images='DIR/**/*.jpg' (a glob, quoted) or a directory")
  if out and not os.path.isdir(os.path.dirname(out) or "."):
    raise UserError(f"no directory for --out={out}")
  root, files = list_images(pattern)
  if not files:
    raise UserError(f"no file matches --images={pattern!r}")
  model, params, tokenizer = _load_model(workdir, step, hf)
  from countclip_jax.evaluate import Embedder  # pylint: disable=g-import-not-at-top
  embedder = Embedder(model, params, tokenizer, batch_size)
  directory, note = cache_dir(root)
  if note:
    print(note, file=sys.stderr)
  cache = EmbeddingCache(directory, model_key(model, params))
  gallery = sync(embedder, cache, root, files)
  if gallery.skipped:
    n = len(gallery.skipped)
    print(f"skipped {n} unreadable image{'s' if n > 1 else ''}:"
          + "".join(f"\n  {p} ({why})" for p, why in gallery.skipped.items()), file=sys.stderr)
  print(f"{len(files)} files: {gallery.read} new or changed, "
        f"{len(files) - gallery.read} from the cache {cache.json}", file=sys.stderr)
  if not gallery.paths:
    raise UserError(f"none of the {len(files)} files matching {pattern!r} is a readable image")
  results = search(embedder, gallery, queries, top_k)
  for query, hits in zip(queries, results):
    if len(queries) > 1:
      print(f"# {query}")
    for rank, (score, path) in enumerate(hits, 1):
      print(f"{rank}\t{score:.4f}\t{path}")
  if out:
    contact_sheet(queries, results, out)
    print(f"contact sheet: {out}", file=sys.stderr)
  return results


def main(argv):
  if not FLAGS["verbosity"].present:  # stderr is for progress and notes, not jax's INFO lines
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]} (quote a query of several words)")
  retrieve(workdir=FLAGS.workdir, step=FLAGS.step, hf=FLAGS.hf, pattern=FLAGS.images,
           queries=FLAGS.query or [], top_k=FLAGS.top_k, out=FLAGS.out,
           batch_size=FLAGS.batch_size)
  return 0


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A training run's workdir (its checkpoint).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
  flags.DEFINE_string("hf", None, "Or a Hugging Face CLIP: hub id, local or gs:// dir.")
  flags.DEFINE_string("images", None, "Images to search: a quoted glob ('DIR/**/*.jpg', ** "
                      "recurses) or a directory (its image files, recursively).")
  flags.DEFINE_multi_string("query", None, "Text to search for ('five apples'); repeatable.")
  flags.DEFINE_integer("top_k", 8, "Hits per query.")
  flags.DEFINE_string("out", "search.png", "Contact sheet PNG ('' for none).")
  flags.DEFINE_integer("batch_size", 64, "Images per embedding batch.")
  cli.run(main)  # retrieve() raises UserError for every mistake it checks
