"""Image-text pairs -> ArrayRecord shards for training: a counting set, a general set, stats.

  python -m countclip_jax.data.prepare --input '/data/laion/*.tar' --output_dir /data/prepared \
      --num_shards 64 --max_per_number 20000

Inputs are comma-separated globs; the kind comes from the extension:
  .tar      webdataset shards as img2dataset writes them: `KEY.jpg` (or .jpeg/.png/.webp) with
            `KEY.txt` and/or `KEY.json` ({"caption": ...}); members of one key are consecutive.
  .jsonl    one {"image": path, "caption": str} per line; paths relative to the jsonl's folder.
  .parquet  columns `image` (path, bytes, or {"bytes", "path"} as Hugging Face datasets store
            images) and `caption` (or `text`).
Each caption goes through `text.numbers.parse_count`: one stated count two..ten -> the counting
set (`number` = the count), no count -> the general set (`number` = 0), two different counts
("two cats and three dogs") -> skipped. Every image is decoded once (`images.decode`). Nothing
bad is fatal: a corrupt image, a missing caption, a bad json line or a tar member with an absolute
or `..` path (refused, never read) is skipped and counted by reason in `stats.json`, next to the
per-number counts. `--max_per_number` keeps the first N examples of each count (the inputs'
order) to balance the counting set. Output: records.py shards `counting-*`, `general-*`.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import itertools
import json
import os
import posixpath
import re
import sys
import tarfile
from typing import Iterable, Iterator, Sequence

import pyarrow.parquet as pq
import tqdm
from etils import epath

from countclip_jax.data import images
from countclip_jax.data import records
from countclip_jax.text import numbers

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
KINDS = {".tar": "webdataset", ".jsonl": "jsonl", ".parquet": "parquet"}
# Threads decode images in parallel (PIL releases the GIL); the inputs are read in chunks of
# this many pairs so that memory stays bounded and the output order is the input order.
CHUNK = 512
EXAMPLES_PER_REASON = 5  # keys kept in stats.json per skip reason, to find the culprits


@dataclasses.dataclass(frozen=True)
class Pair:
  """One input example. `image` is bytes or a path to read; `skip` a reason found while reading."""
  key: str
  image: bytes | str | None = None
  caption: object = None
  skip: str | None = None


# ---------------------------------------------------------------------------------------------
# Readers: each yields Pairs in the file's order and never raises for one bad example.

def _unsafe(name: str) -> bool:
  """Absolute or climbing out: refused even though we never extract (a later tool might)."""
  return name.startswith(("/", "\\")) or ".." in re.split(r"[\\/]", name)


def read_webdataset(path: str) -> Iterator[Pair]:
  """Pairs of a webdataset tar, grouped by key (the member path up to the first '.')."""
  with epath.Path(path).open("rb") as f:
    try:
      yield from _webdataset_members(path, f)
    except (tarfile.TarError, EOFError, OSError) as e:
      # A truncated or corrupt tar: keep what was read before, count the rest as one skip.
      yield Pair(path, skip=f"unreadable tar ({type(e).__name__})")


def _webdataset_members(path: str, f) -> Iterator[Pair]:
  with tarfile.open(fileobj=f, mode="r|*") as tar:
    key, files = None, {}
    for member in tar:
      if _unsafe(member.name):
        yield Pair(f"{path}:{member.name}", skip="unsafe path in tar (absolute or '..')")
        continue
      if member.isdir():
        continue
      if not member.isfile():
        yield Pair(f"{path}:{member.name}", skip="tar member is not a regular file")
        continue
      folder, base = posixpath.split(member.name)
      stem, _, ext = base.partition(".")
      if posixpath.join(folder, stem) != key:
        if key is not None:
          yield _webdataset_pair(f"{path}:{key}", files)
        key, files = posixpath.join(folder, stem), {}
      files[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
      yield _webdataset_pair(f"{path}:{key}", files)


def _webdataset_pair(key: str, files: dict[str, bytes]) -> Pair:
  image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
  try:
    if "txt" in files:
      caption = files["txt"].decode("utf-8")
    elif "json" in files:
      meta = json.loads(files["json"])
      caption = meta.get("caption") if isinstance(meta, dict) else None
    else:
      caption = None
  except (UnicodeDecodeError, json.JSONDecodeError):
    return Pair(key, skip="caption is not utf-8 text or json")
  return Pair(key, image, caption)


def read_jsonl(path: str) -> Iterator[Pair]:
  folder = os.path.dirname(path)
  with epath.Path(path).open("rb") as f:
    for line_number, line in enumerate(f, 1):
      key = f"{path}:{line_number}"
      line = line.decode("utf-8", errors="replace")
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        yield Pair(key, skip="bad json line")
        continue
      if not isinstance(row, dict):
        yield Pair(key, skip="bad json line")
        continue
      yield Pair(key, _image_field(row.get("image"), folder), row.get("caption", row.get("text")))


def read_parquet(path: str) -> Iterator[Pair]:
  folder = os.path.dirname(path)
  with epath.Path(path).open("rb") as f:
    table = pq.ParquetFile(f)
    names = table.schema_arrow.names
    caption_column = "caption" if "caption" in names else "text"
    if "image" not in names or caption_column not in names:
      raise ValueError(f"{path}: parquet needs columns 'image' and 'caption' (or 'text'); "
                       f"it has {names}.")
    row_number = 0
    for batch in table.iter_batches(columns=["image", caption_column], batch_size=256):
      for row in batch.to_pylist():
        yield Pair(f"{path}:{row_number}", _image_field(row["image"], folder), row[caption_column])
        row_number += 1


def _image_field(value, folder: str) -> bytes | str | None:
  """bytes, a path (relative to `folder`), or {"bytes", "path"} -> bytes or an absolute path."""
  if isinstance(value, dict):
    value = value.get("bytes") or value.get("path")
  if isinstance(value, str) and value:
    return value if os.path.isabs(value) or "://" in value else os.path.join(folder, value)
  return value if isinstance(value, bytes) and value else None


READERS = {"webdataset": read_webdataset, "jsonl": read_jsonl, "parquet": read_parquet}


def expand_inputs(patterns: str | Sequence[str]) -> list[str]:
  """Comma-separated globs -> sorted files, each with a known extension."""
  if isinstance(patterns, str):
    patterns = patterns.split(",")
  files = []
  for pattern in (p.strip() for p in patterns if p.strip()):
    path = epath.Path(pattern)
    matches = sorted(str(p) for p in path.parent.glob(path.name))
    if not matches:
      raise FileNotFoundError(f"No input files match {pattern!r}.")
    for m in matches:
      if os.path.splitext(m)[1] not in KINDS:
        raise ValueError(f"{m}: unknown input kind; expected one of {sorted(KINDS)}.")
    files += matches
  return files


def read_pairs(files: Iterable[str]) -> Iterator[Pair]:
  for path in files:
    yield from READERS[KINDS[os.path.splitext(path)[1]]](path)


# ---------------------------------------------------------------------------------------------
# Checking one pair (in a worker thread) and the run.

@dataclasses.dataclass(frozen=True)
class Checked:
  key: str
  image: bytes = b""
  caption: str = ""
  number: int = 0          # 2..10 for the counting set, 0 for the general set
  skip: str | None = None


def check(pair: Pair) -> Checked:
  """Caption -> its set (parse_count), image bytes validated by decoding; or the skip reason."""
  if pair.skip:
    return Checked(pair.key, skip=pair.skip)
  if not isinstance(pair.caption, str):
    return Checked(pair.key, skip="missing caption")
  caption = " ".join(pair.caption.split())
  if not caption:
    return Checked(pair.key, skip="empty caption")
  number = numbers.parse_count(caption)
  if number is None and any(m.reason is None for m in numbers.find_numbers(caption)):
    return Checked(pair.key, skip="several different counts in caption")
  image = pair.image
  if image is None:
    return Checked(pair.key, skip="missing image")
  if isinstance(image, str):
    try:
      image = epath.Path(image).read_bytes()
    except OSError:
      return Checked(pair.key, skip="missing image")
  try:
    images.decode(image)
  except images.BadImageError:
    return Checked(pair.key, skip="bad image")
  return Checked(pair.key, image, caption, number or 0)


def prepare(inputs: str | Sequence[str], output_dir: str, *, num_shards: int = 16,
            max_per_number: int = 0, general: bool = True, workers: int | None = None,
            overwrite: bool = False, progress: bool = True) -> dict:
  """Writes `counting-*` and (if `general`) `general-*` shards and stats.json; returns the stats.

  max_per_number: keep at most this many counting examples of each number (0: all).
  """
  files = expand_inputs(inputs)
  out = epath.Path(output_dir)
  if not overwrite and out.exists() and list(out.glob(f"*{records.SUFFIX}")):
    raise FileExistsError(f"{output_dir} already holds ArrayRecord shards; pass overwrite=True "
                          "(--overwrite) to replace them.")
  writers = {"counting": records.ShardWriter(output_dir, "counting", num_shards)}
  if general:
    writers["general"] = records.ShardWriter(output_dir, "general", num_shards)
  seen, kept = collections.Counter(), collections.Counter()
  skipped, skipped_keys = collections.Counter(), collections.defaultdict(list)

  def skip(key, reason):
    skipped[reason] += 1
    if len(skipped_keys[reason]) < EXAMPLES_PER_REASON:
      skipped_keys[reason].append(key)

  pairs = read_pairs(files)
  bar = tqdm.tqdm(unit=" pairs", desc="prepare", disable=not progress, file=sys.stderr)
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
    while chunk := list(itertools.islice(pairs, CHUNK)):
      for ex in pool.map(check, chunk):
        bar.update()
        if ex.skip:
          skip(ex.key, ex.skip)
        elif ex.number:
          seen[ex.number] += 1
          if max_per_number and kept[ex.number] >= max_per_number:
            skip(ex.key, "over the per-number cap")
            continue
          kept[ex.number] += 1
          writers["counting"].write(ex.image, ex.caption, ex.number, ex.key)
        elif general:
          writers["general"].write(ex.image, ex.caption, 0, ex.key)
        else:
          skip(ex.key, "no count in caption (general set off)")
      bar.set_postfix(counting=writers["counting"].count, skipped=sum(skipped.values()),
                      general=writers["general"].count if general else 0)
  bar.close()
  shards = {name: [os.path.basename(p) for p in w.close()] for name, w in writers.items()}
  stats = {
      "inputs": files,
      "examples": {name: w.count for name, w in writers.items()},
      "per_number": {str(n): kept[n] for n in numbers.NUMBERS},
      "per_number_before_cap": {str(n): seen[n] for n in numbers.NUMBERS},
      "max_per_number": max_per_number,
      "skipped": dict(sorted(skipped.items())),
      "skipped_examples": dict(sorted(skipped_keys.items())),
      "shards": shards,
  }
  (out / "stats.json").write_text(json.dumps(stats, indent=2))
  return stats


def summary(stats: dict) -> str:
  per_number = ", ".join(f"{numbers.NUMBER_WORDS[int(n)]} {c}"
                         for n, c in stats["per_number"].items())
  skipped = ", ".join(f"{r}: {c}" for r, c in stats["skipped"].items()) or "none"
  return (f"counting {stats['examples']['counting']} ({per_number}); "
          f"general {stats['examples'].get('general', 0)}; skipped {skipped}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True,
                      help="comma-separated globs of .tar, .jsonl or .parquet files")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--num_shards", type=int, default=16)
  parser.add_argument("--max_per_number", type=int, default=0,
                      help="keep at most N counting examples per number (0: all)")
  parser.add_argument("--no_general", action="store_true", help="write the counting set only")
  parser.add_argument("--workers", type=int, default=0, help="decoding threads (0: cpu count)")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  stats = prepare(args.input, args.output_dir, num_shards=args.num_shards,
                  max_per_number=args.max_per_number, general=not args.no_general,
                  workers=args.workers or None, overwrite=args.overwrite)
  print(summary(stats))
  print(f"Wrote {args.output_dir}/stats.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
