"""Image-text pairs -> ArrayRecord shards for training: a counting set, a general set, stats.

  python -m countclip_jax.data.prepare --input '/data/laion/*.tar' --output_dir /data/prepared \
      --num_shards 64 --max_per_number 20000

Inputs are comma-separated globs; the kind comes from the extension:
  .tar      webdataset shards as img2dataset writes them: `KEY.jpg` (or .jpeg/.png/.webp) with
            `KEY.txt` and/or `KEY.json` ({"caption": ...}); members of one key are consecutive.
  .jsonl    one {"image": path, "caption": str} per line; paths relative to the jsonl's folder.
  .parquet  columns `image` (path, bytes, or {"bytes", "path"} as Hugging Face datasets store
            images) and `caption` (or `text`); paths relative to the parquet's folder.
Each caption goes through `text.numbers.parse_count`: one stated count two..ten -> the counting
set (`number` = the count), no count -> the general set (`number` = 0), two different counts
("two cats and three dogs") -> skipped. Every image is decoded once (`images.decode`, which
also refuses strips past `images.MAX_ASPECT_RATIO`). Nothing bad is fatal, and everything skipped
is counted by reason in `stats.json`, next to the per-number counts, with the first keys of each:
  - an example: a corrupt image, an extreme aspect ratio, a missing caption, a bad json line, text
    that is not UTF-8 (the same rule for every kind: never decoded with replacement characters),
    a tar member with an absolute or `..` path (refused, never read), or an image path of a jsonl
    or parquet that is absolute, a url or climbs out of the input's folder with `..` (refused
    unless `--allow_outside_paths`: a caption file must not ingest any file on the machine);
  - a whole input file that is unusable (unreadable, not a tar or parquet, a parquet without the
    columns): skipped and named in `stats.json` "skipped_inputs" before the run starts, or, with
    `--strict`, refused before anything is written (exit status 2, one line `error: ...`).
`--max_per_number` keeps the first N examples of each count (the inputs' order) to balance the
counting set. Output: records.py shards `counting-*`, `general-*`, shards with no record left out
(fewer records than `--num_shards`). Shards are written in `OUTPUT_DIR/.prepare-partial/` and
moved in at the end, stats.json last, so an interrupted run leaves no shard behind and can simply
be run again. An output dir that holds an earlier run's shards or stats.json is refused unless
`--overwrite`, which replaces all of them (also those of another `--num_shards` or of a set this
run does not write).
"""
from __future__ import annotations

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

import pyarrow as pa
import pyarrow.parquet as pq
import tqdm
from etils import epath

from countclip_jax import cli
from countclip_jax.data import images
from countclip_jax.data import records
from countclip_jax.text import numbers

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
KINDS = {".tar": "webdataset", ".jsonl": "jsonl", ".parquet": "parquet"}
# Threads decode images in parallel (PIL releases the GIL); the inputs are read in chunks of
# this many pairs so that memory stays bounded and the output order is the input order.
CHUNK = 512
EXAMPLES_PER_REASON = 5  # keys kept in stats.json per skip reason, to find the culprits
PARTIAL = ".prepare-partial"  # the shards of a run in progress, under the output dir
NOT_UTF8 = "text is not utf-8"
OUTSIDE = "image path outside the input's directory"
# What reading a damaged input can raise past the readers' own checks (ArrowInvalid and
# UnicodeDecodeError are ValueErrors): the file's remaining examples are counted as one skip.
READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, pa.ArrowException)


class InputError(ValueError):
  """The command line's inputs are refused before anything is written (exit status 2)."""


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
  if "txt" in files:
    return Pair(key, image, files["txt"])  # bytes: `check` decodes every kind's text alike
  if "json" not in files:
    return Pair(key, image, None)
  try:
    meta = json.loads(files["json"].decode("utf-8"))  # not json.loads(bytes): it guesses UTF-16
  except UnicodeDecodeError:
    return Pair(key, skip=NOT_UTF8)
  except json.JSONDecodeError:
    return Pair(key, skip="bad json")
  return Pair(key, image, meta.get("caption") if isinstance(meta, dict) else None)


def read_jsonl(path: str, allow_outside_paths: bool = False) -> Iterator[Pair]:
  folder = os.path.dirname(path)
  with epath.Path(path).open("rb") as f:
    for line_number, line in enumerate(f, 1):
      key = f"{path}:{line_number}"
      try:
        # Strict, as for tars and parquet: a replacement character would reach the captions.
        line = line.decode("utf-8-sig" if line_number == 1 else "utf-8")
      except UnicodeDecodeError:
        yield Pair(key, skip=NOT_UTF8)
        continue
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
      yield _pair(key, row.get("image"), row.get("caption", row.get("text")), folder,
                  allow_outside_paths)


def read_parquet(path: str, allow_outside_paths: bool = False) -> Iterator[Pair]:
  folder = os.path.dirname(path)
  with epath.Path(path).open("rb") as f:
    table = pq.ParquetFile(f)
    caption_column = _parquet_caption_column(table.schema_arrow.names)
    if caption_column is None:  # inspect_input has skipped such a file already
      raise ValueError(f"{path}: {NO_COLUMNS}; it has {table.schema_arrow.names}.")
    row_number = 0
    for batch in table.iter_batches(columns=["image", caption_column], batch_size=256):
      captions = batch.column(1)
      if pa.types.is_string(captions.type) or pa.types.is_large_string(captions.type):
        # As bytes, never validated by Arrow: one bad caption must not end the file (to_pylist
        # raises for the whole batch), and `check` decodes them like the other kinds' text.
        captions = captions.view(pa.large_binary() if pa.types.is_large_string(captions.type)
                                 else pa.binary())
      for image, caption in zip(batch.column(0).to_pylist(), captions.to_pylist()):
        yield _pair(f"{path}:{row_number}", image, caption, folder, allow_outside_paths)
        row_number += 1


def _parquet_caption_column(names: Sequence[str]) -> str | None:
  caption_column = "caption" if "caption" in names else "text"
  return caption_column if "image" in names and caption_column in names else None


def _outside(value: str) -> bool:
  """Absolute, a url, or climbing out with `..` (after normalising: `a/../b` stays inside)."""
  if "://" in value or os.path.isabs(value) or value.startswith(("/", "\\")):
    return True
  normal = posixpath.normpath(value.replace("\\", "/"))
  return normal == ".." or normal.startswith("../")


def _pair(key: str, value, caption, folder: str, allow_outside_paths: bool) -> Pair:
  """bytes, a path (relative to `folder`), or {"bytes", "path"} -> a Pair with bytes or a path.

  A path is refused (OUTSIDE) if it leaves `folder`, unless `allow_outside_paths`. Symlinks
  inside the folder are followed: they are the dataset owner's, not the caption file's, choice.
  """
  if isinstance(value, dict):
    value = value.get("bytes") or value.get("path")
  if isinstance(value, str) and value:
    if _outside(value):
      if not allow_outside_paths:
        return Pair(key, skip=OUTSIDE)
      return Pair(key, value if os.path.isabs(value) or "://" in value
                  else os.path.join(folder, value), caption)
    return Pair(key, os.path.join(folder, value), caption)
  return Pair(key, value if isinstance(value, bytes) and value else None, caption)


READERS = {"webdataset": read_webdataset, "jsonl": read_jsonl, "parquet": read_parquet}
NO_COLUMNS = "input parquet has no 'image' and 'caption' (or 'text') columns"


def inspect_input(path: str) -> str | None:
  """Why an input file is unusable as a whole (a skip reason), or None. Reads only its start
  (a tar's first header, a parquet's footer), so that one bad file is found before the run."""
  kind = KINDS[os.path.splitext(path)[1]]
  try:
    with epath.Path(path).open("rb") as f:
      if kind == "parquet":
        try:
          names = pq.ParquetFile(f).schema_arrow.names
        except (pa.ArrowException, ValueError, OSError):
          return "input file is not a parquet file"
        return None if _parquet_caption_column(names) else NO_COLUMNS
      if kind == "webdataset":
        try:
          with tarfile.open(fileobj=f, mode="r|*") as tar:
            tar.next()
        except (tarfile.TarError, EOFError):
          return "input file is not a tar file"
        return None
      f.read(1)
      return None
  except OSError as e:
    return f"unreadable input file ({type(e).__name__})"


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
        raise InputError(f"{m}: unknown input kind; expected one of {sorted(KINDS)}.")
    files += matches
  return files


def read_pairs(files: Iterable[str], allow_outside_paths: bool = False) -> Iterator[Pair]:
  """Every file's Pairs in order; damage found in the middle of a file (past inspect_input)
  ends that file with one skip naming it, and the next file is read."""
  for path in files:
    kind = KINDS[os.path.splitext(path)[1]]
    reader = READERS[kind]
    try:
      if kind == "webdataset":
        yield from reader(path)
      else:
        yield from reader(path, allow_outside_paths)
    except READ_ERRORS as e:
      yield Pair(path, skip=f"unreadable input file ({type(e).__name__})")


# ---------------------------------------------------------------------------------------------
# Checking one pair (in a worker thread) and the run.

@dataclasses.dataclass(frozen=True)
class Checked:
  key: str
  image: bytes = b""
  caption: str = ""
  number: int = 0          # 2..10 for the counting set, 0 for the general set
  skip: str | None = None


def _text(value) -> str | None:
  """A caption as str, the same for every input kind: bytes decode as strict UTF-8 and a str
  must encode as UTF-8 (json's "\\ud800" escapes make lone surrogates, which the records'
  msgpack refuses); raises UnicodeError otherwise. None if it is neither."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, str):
    value.encode("utf-8")
    return value
  return None


def _safe_key(key: str) -> str:
  # Tar member names that are not UTF-8 come as surrogate escapes; the key is provenance only,
  # so it is kept, escaped, rather than failing the record's encoding.
  return key.encode("utf-8", "backslashreplace").decode("utf-8")


def check(pair: Pair) -> Checked:
  """Caption -> its set (parse_count), image bytes validated by decoding; or the skip reason."""
  key = _safe_key(pair.key)
  if pair.skip:
    return Checked(key, skip=pair.skip)
  try:
    caption = _text(pair.caption)
  except UnicodeError:
    return Checked(key, skip=NOT_UTF8)
  if caption is None:
    return Checked(key, skip="missing caption")
  caption = " ".join(caption.split())
  if not caption:
    return Checked(key, skip="empty caption")
  number = numbers.parse_count(caption)
  if number is None and any(m.reason is None for m in numbers.find_numbers(caption)):
    return Checked(key, skip="several different counts in caption")
  image = pair.image
  if image is None:
    return Checked(key, skip="missing image")
  if isinstance(image, str):
    try:
      image = epath.Path(image).read_bytes()
    except (OSError, ValueError):  # ValueError: a path epath cannot even form
      return Checked(key, skip="missing image")
  try:
    images.decode(image)
  except images.BadImageError as e:
    return Checked(key, skip=e.reason)  # "bad image", or "extreme aspect ratio"
  return Checked(key, image, caption, number or 0)


def _earlier_outputs(out: epath.Path) -> list[epath.Path]:
  """What a prepare run wrote in `out`: shards of both sets, their sidecars, stats.json."""
  if not out.exists():
    return []
  found = [p for name in ("counting", "general") for p in out.glob(f"{name}-*")
           if p.name.endswith((records.SUFFIX, records.SUFFIX + records.NUMBERS_SUFFIX))]
  return sorted(found + ([out / "stats.json"] if (out / "stats.json").exists() else []))


def prepare(inputs: str | Sequence[str], output_dir: str, *, num_shards: int = 16,
            max_per_number: int = 0, general: bool = True, workers: int | None = None,
            overwrite: bool = False, strict: bool = False, allow_outside_paths: bool = False,
            progress: bool = True) -> dict:
  """Writes `counting-*` and (if `general`) `general-*` shards and stats.json; returns the stats.

  max_per_number: keep at most this many counting examples of each number (0: all).
  strict: an unusable input file raises InputError before anything is written, instead of being
    skipped and named in stats["skipped_inputs"].
  overwrite: replace an earlier run's shards and stats.json in `output_dir` (else FileExistsError).
  allow_outside_paths: let jsonl/parquet image paths be absolute, urls, or climb out with `..`.
  """
  if num_shards < 1:
    raise InputError(f"num_shards must be >= 1, got {num_shards}.")
  files = expand_inputs(inputs)
  unusable = {path: reason for path in files if (reason := inspect_input(path))}
  if strict and unusable:
    raise InputError(f"{len(unusable)} unusable input file(s), nothing written (--strict): "
                     + "; ".join(f"{p}: {r}" for p, r in unusable.items()))
  out = epath.Path(output_dir)
  earlier = _earlier_outputs(out)
  if earlier and not overwrite:
    raise FileExistsError(f"{output_dir} already holds the shards or stats.json of a prepare run; "
                          "pass overwrite=True (--overwrite) to replace them.")
  staging = out / PARTIAL
  if staging.exists():  # what a killed run left: never published, safe to drop
    staging.rmtree()
  try:
    stats = _run(files, unusable, out, staging, num_shards=num_shards,
                 max_per_number=max_per_number, general=general, workers=workers,
                 allow_outside_paths=allow_outside_paths, progress=progress, earlier=earlier)
  finally:
    if staging.exists():
      staging.rmtree()
  return stats


def _run(files, unusable, out, staging, *, num_shards, max_per_number, general, workers,
         allow_outside_paths, progress, earlier) -> dict:
  writers = {"counting": records.ShardWriter(str(staging), "counting", num_shards)}
  if general:
    writers["general"] = records.ShardWriter(str(staging), "general", num_shards)
  seen, kept = collections.Counter(), collections.Counter()
  skipped, skipped_keys = collections.Counter(), collections.defaultdict(list)

  def skip(key, reason):
    skipped[reason] += 1
    if len(skipped_keys[reason]) < EXAMPLES_PER_REASON:
      skipped_keys[reason].append(key)

  for path, reason in unusable.items():
    skip(path, reason)
  pairs = read_pairs([p for p in files if p not in unusable], allow_outside_paths)
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
  written = {name: w.close() for name, w in writers.items()}
  # Publish: the earlier run's files go (overwrite), the shards that got records move in, the
  # empty ones are dropped (a reader would have to skip them), stats.json last marks it done.
  for path in earlier:
    path.unlink()
  shards = {}
  for name, paths in written.items():
    shards[name] = []
    for path in map(epath.Path, paths):
      sidecar = epath.Path(str(path) + records.NUMBERS_SUFFIX)
      if len(records.numbers([str(path)])):
        path.rename(out / path.name)
        sidecar.rename(out / sidecar.name)
        shards[name].append(path.name)
  stats = {
      "inputs": files,
      "examples": {name: w.count for name, w in writers.items()},
      "per_number": {str(n): kept[n] for n in numbers.NUMBERS},
      "per_number_before_cap": {str(n): seen[n] for n in numbers.NUMBERS},
      "max_per_number": max_per_number,
      "skipped": dict(sorted(skipped.items())),
      "skipped_examples": dict(sorted(skipped_keys.items())),
      "skipped_inputs": unusable,
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
  parser = cli.ArgumentParser(prog="python -m countclip_jax.data.prepare",
                              description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True,
                      help="comma-separated globs of .tar, .jsonl or .parquet files")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--num_shards", type=int, default=16)
  parser.add_argument("--max_per_number", type=int, default=0,
                      help="keep at most N counting examples per number (0: all)")
  parser.add_argument("--no_general", action="store_true", help="write the counting set only")
  parser.add_argument("--workers", type=int, default=0, help="decoding threads (0: cpu count)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an earlier run's shards and stats.json in --output_dir")
  parser.add_argument("--strict", action="store_true",
                      help="refuse (exit 2, nothing written) if an input file is unusable, "
                      "instead of skipping it")
  parser.add_argument("--allow_outside_paths", action="store_true",
                      help="let jsonl/parquet image paths be absolute or leave their folder")
  args = parser.parse_args(argv)
  try:
    stats = prepare(args.input, args.output_dir, num_shards=args.num_shards,
                    max_per_number=args.max_per_number, general=not args.no_general,
                    workers=args.workers or None, overwrite=args.overwrite, strict=args.strict,
                    allow_outside_paths=args.allow_outside_paths)
  except (InputError, FileNotFoundError, FileExistsError) as e:  # refused before writing
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return cli.USER_ERROR
  print(summary(stats))
  print(f"Wrote {args.output_dir}/stats.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
