"""ArrayRecord shards of image-text pairs: the record format, a sharded writer, and the reader.

A record is a msgpack map `{"image": bytes, "caption": str, "number": int, "key": str}`: the
encoded image exactly as it came (validated by `data.prepare`), the caption, the count it states
(2..10; 0 for a general pair) and where it came from. msgpack, not pickle: reading a shard never
runs code. Shards are named `{name}-00000-of-00016.array_record`; next to each one,
`{shard}.numbers.npy` holds the `number` of every record, so balanced sampling over counts does
not have to read the images.

  with ShardWriter("/data/out", "counting", num_shards=16) as w:
    w.write(jpeg_bytes, "three dogs on a sofa", 3, key="00001/000000042")
  source, paths = data_source("/data/out/counting-*.array_record")
  record = decode(source[0])
"""
from __future__ import annotations

import io
import os
from typing import Sequence

import grain
import msgpack
import numpy as np
from array_record.python import array_record_module
from etils import epath

SUFFIX = ".array_record"
NUMBERS_SUFFIX = ".numbers.npy"
FIELDS = {"image": bytes, "caption": str, "number": int, "key": str}
# group_size:1 makes every record its own chunk: random access (grain's shuffle) reads one record.
WRITER_OPTIONS = "group_size:1"


def encode(image: bytes, caption: str, number: int = 0, key: str = "") -> bytes:
  """One record's bytes. `number` is the stated count 2..10, or 0 for a general pair."""
  record = {"image": bytes(image), "caption": caption, "number": int(number), "key": key}
  for name, kind in FIELDS.items():
    if not isinstance(record[name], kind):
      raise TypeError(f"Record field {name!r} must be {kind.__name__}, got "
                      f"{type(record[name]).__name__} (key {key!r}).")
  return msgpack.packb(record, use_bin_type=True)


def decode(data: bytes) -> dict:
  """Record bytes -> {"image": bytes, "caption": str, "number": int, "key": str}."""
  try:
    record = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several types for bad bytes.
    raise ValueError(f"Not a countclip record ({len(data)} bytes): {type(e).__name__}: {e}") from e
  if not isinstance(record, dict) or any(not isinstance(record.get(k), t)
                                         for k, t in FIELDS.items()):
    got = ({k: type(v).__name__ for k, v in record.items()} if isinstance(record, dict)
           else type(record).__name__)
    want = {k: t.__name__ for k, t in FIELDS.items()}
    raise ValueError(f"Not a countclip record: got {got}, expected {want}.")
  return record


def shard_paths(output_dir: str, name: str, num_shards: int) -> list[str]:
  return [os.path.join(output_dir, f"{name}-{i:05d}-of-{num_shards:05d}{SUFFIX}")
          for i in range(num_shards)]


class ShardWriter:
  """Writes records round-robin over `num_shards` files, then each shard's numbers sidecar.

  Round-robin keeps the shards the same size (+-1) without knowing the total in advance.
  """

  def __init__(self, output_dir: str, name: str, num_shards: int):
    if num_shards < 1:
      raise ValueError(f"num_shards must be >= 1, got {num_shards} (writing {name!r}).")
    epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
    self.paths = shard_paths(output_dir, name, num_shards)
    self._writers = [array_record_module.ArrayRecordWriter(p, WRITER_OPTIONS) for p in self.paths]
    self._numbers: list[list[int]] = [[] for _ in self.paths]
    self.count = 0

  def write(self, image: bytes, caption: str, number: int = 0, key: str = "") -> None:
    shard = self.count % len(self._writers)
    self._writers[shard].write(encode(image, caption, number, key))
    self._numbers[shard].append(number)
    self.count += 1

  def close(self) -> list[str]:
    """Finishes every shard and writes its sidecar; returns the shard paths."""
    for writer, path, numbers in zip(self._writers, self.paths, self._numbers):
      writer.close()
      buffer = io.BytesIO()
      np.save(buffer, np.asarray(numbers, np.int32))
      epath.Path(path + NUMBERS_SUFFIX).write_bytes(buffer.getvalue())
    self._writers = []
    return self.paths

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, *exc) -> None:
    if self._writers:
      self.close()


def expand(patterns: str | Sequence[str]) -> list[str]:
  """Sorted `.array_record` files matching comma-separated globs (local or gs://).

  Only names ending in `.array_record` count, so `counting-*` does not pick up the sidecars.
  """
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p.strip()]
  paths = []
  for pattern in patterns:
    pattern = pattern.strip()
    path = epath.Path(pattern)
    matches = sorted(str(p) for p in path.parent.glob(path.name) if str(p).endswith(SUFFIX))
    if not matches:
      raise FileNotFoundError(f"No ArrayRecord shards ({SUFFIX}) match {pattern!r}.")
    paths += matches
  return paths


def numbers(paths: Sequence[str]) -> np.ndarray:
  """int32 (num_records,): the `number` of every record of `paths`, in data_source order."""
  out = []
  for path in paths:
    sidecar = epath.Path(path + NUMBERS_SUFFIX)
    if not sidecar.exists():
      raise FileNotFoundError(f"{sidecar} is missing: balanced sampling needs the numbers that "
                              f"data.prepare writes next to each shard.")
    out.append(np.load(io.BytesIO(sidecar.read_bytes())))
  return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)


def data_source(patterns: str | Sequence[str]
                ) -> tuple[grain.sources.ArrayRecordDataSource, list[str]]:
  """(random-access source of record bytes over all matching shards, the shard paths)."""
  paths = expand(patterns)
  return grain.sources.ArrayRecordDataSource(paths), paths
