"""CountBench: the benchmark's entries (image_url, text, number) and a local image cache.

The 540 entries ship as package data. Their images live on the open web and many links are dead,
so `download` fetches what it can into a cache directory, once: an image in the cache is never
fetched again, and links that are gone -- an HTTP 404 or 410, content that is no image (or over
MAX_BYTES), a url that is not http(s) -- are remembered in `manifest.json` and reported, not
refetched, unless `retry_failed`. A network failure (connection refused, DNS failure, timeout,
5xx; also 429 and the other 4xx, answers that may change) says nothing about the link: it is
never remembered, and the next run fetches it again. Every run writes `report.json` and prints a
summary, with the network failures counted apart.
`load_examples` reads the cache, or a pre-downloaded parquet copy (the `nielsr/countbench`
layout), for the evaluation: the examples that have an image, and how many were skipped.

  python -m countclip_jax.data.countbench --out ~/countbench [--workers 32] [--retry-failed]
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import http.client
import importlib.resources
import json
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request

import tqdm

from countclip_jax import cli
from countclip_jax.data import images

USER_AGENT = "Mozilla/5.0 (compatible; countclip-jax CountBench downloader)"
MAX_BYTES = 50 << 20
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# The failures that are facts about the link, not about this run's network: remembered.
_GONE_KINDS = frozenset({"http 404", "http 410", "undecodable", "too large", "bad url"})
_PARQUET_COLUMNS = ("image_url", "text", "number", "image")


@dataclasses.dataclass(frozen=True)
class Example:
  """One CountBench entry; `image_bytes` or `path` holds its image once there is one."""
  index: int
  url: str
  text: str
  number: int
  image_bytes: bytes | None = dataclasses.field(default=None, repr=False)
  path: str | None = None

  def read(self) -> bytes:
    """The image bytes (from memory or the cache file)."""
    if self.image_bytes is not None:
      return self.image_bytes
    if self.path is None:
      raise ValueError(f"CountBench example {self.index} has no image ({self.url}).")
    with open(self.path, "rb") as f:
      return f.read()


def read_json(path: str | None = None) -> list[Example]:
  """CountBench entries from a json list of {image_url, text, number}; default: package data."""
  if path is None:
    source = "package data CountBench.json"
    text = (importlib.resources.files("countclip_jax") / "package_data/CountBench.json"
            ).read_text(encoding="utf-8")
  else:
    source = path
    with open(path, encoding="utf-8") as f:
      text = f.read()
  try:
    entries = json.loads(text)
  except json.JSONDecodeError as e:  # its message names no file
    raise ValueError(f"{source} is not json: {e}") from e
  if not isinstance(entries, list):
    raise ValueError(f"{source}: expected a json list of entries, got {type(entries).__name__}.")
  return [_example(i, e, source) for i, e in enumerate(entries)]


def _example(index, entry, source, **image) -> Example:
  where = f"CountBench entry {index} in {source}"
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: expected an object, got {entry!r}.")
  missing = [k for k in ("image_url", "text", "number") if entry.get(k) is None]
  if missing:
    raise ValueError(f"{where}: missing {', '.join(missing)}.")
  number = entry["number"]
  if isinstance(number, bool) or not isinstance(number, int) or not 2 <= number <= 10:
    raise ValueError(f"{where}: number must be an integer in 2..10, got {number!r}.")
  return Example(index, str(entry["image_url"]), str(entry["text"]), number, **image)


def cache_key(url: str) -> str:
  """Cache file stem of an image url (two entries of CountBench share a url: one file)."""
  return hashlib.sha1(url.encode("utf-8")).hexdigest()[:20]


def cache_path(cache_dir: str, url: str) -> str:
  return os.path.join(cache_dir, "images", cache_key(url) + ".img")


# ---------------------------------------------------------------------------------------------
# Download.


class _FetchError(Exception):
  def __init__(self, kind: str, detail: str):
    super().__init__(f"{kind}: {detail}")
    self.kind, self.detail = kind, detail


def _fetch_once(url: str, timeout: float, max_bytes: int) -> bytes:
  """GET `url`'s body; any failure is a _FetchError whose kind the report counts."""
  if not url.startswith(("http://", "https://")):
    raise _FetchError("bad url", f"not an http(s) url: {url!r}")
  request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      length = response.headers.get("Content-Length")
      if length and length.isdigit() and int(length) > max_bytes:
        raise _FetchError("too large", f"{length} bytes > max_bytes={max_bytes}")
      data = response.read(max_bytes + 1)
      if len(data) > max_bytes:
        raise _FetchError("too large", f"more than max_bytes={max_bytes}")
      return data
  except urllib.error.HTTPError as e:
    e.close()
    raise _FetchError(f"http {e.code}", str(e.reason)) from e
  except urllib.error.URLError as e:
    if isinstance(e.reason, TimeoutError):
      raise _FetchError("timeout", f"no answer within {timeout} s") from e
    if isinstance(e.reason, socket.gaierror):
      raise _FetchError("dns error", str(e.reason)) from e
    raise _FetchError("connection error", str(e.reason)) from e
  except TimeoutError as e:
    raise _FetchError("timeout", f"no answer within {timeout} s") from e
  except (http.client.HTTPException, OSError) as e:
    raise _FetchError("connection error", f"{type(e).__name__}: {e}") from e
  except ValueError as e:  # urllib's verdict on malformed urls
    raise _FetchError("bad url", str(e)) from e


def _retryable(kind: str) -> bool:
  if kind.startswith("http "):
    return int(kind[5:]) in _RETRY_STATUS
  return kind in ("timeout", "connection error")


def _gone(record: dict) -> bool:
  """Whether a failure record is remembered (the link is dead), not retried on the next run."""
  return record.get("kind") in _GONE_KINDS


def _failure(kind: str, error: str, attempts: int) -> dict:
  # "unreachable": a network failure, or an answer that may change; the next run tries again.
  status = "dead" if kind in _GONE_KINDS else "unreachable"
  return {"status": status, "kind": kind, "error": error, "attempts": attempts}


def _fetch_and_store(url, path, timeout, retries, backoff, max_bytes) -> dict:
  """Downloads, validates and caches one url; returns its record (never raises)."""
  attempt = 0
  while True:
    try:
      data = _fetch_once(url, timeout, max_bytes)
      break
    except _FetchError as e:
      if attempt >= retries or not _retryable(e.kind):
        return _failure(e.kind, e.detail, attempt + 1)
      time.sleep(backoff * 2 ** attempt)
      attempt += 1
    except Exception as e:  # pylint: disable=broad-except  # one bad link must not stop the run
      return _failure("error", f"{type(e).__name__}: {e}", attempt + 1)
  try:
    images.decode(data)
  except images.BadImageError as e:
    return {"status": "undecodable", "kind": "undecodable", "error": str(e),
            "attempts": attempt + 1}
  _write_atomic(path, data)
  return {"status": "ok", "bytes": len(data), "attempts": attempt + 1}


def _write_atomic(path: str, data: bytes) -> None:
  """Write-then-rename: an interrupted run never leaves a half image that looks cached."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _write_json(path: str, obj) -> None:
  _write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8"))


def download(out_dir: str, examples: list[Example] | None = None, *, workers: int = 16,
             timeout: float = 10.0, retries: int = 2, retry_failed: bool = False,
             backoff: float = 1.0, max_bytes: int = MAX_BYTES, progress: bool = True) -> dict:
  """Fetches the images of `examples` (default: the package's CountBench) into `out_dir`.

  Cached images are not fetched again; dead links remembered in `out_dir/manifest.json` (404,
  410, undecodable, too large, bad url) are not either, unless `retry_failed`. Downloads run on
  `workers` threads; each url gets `timeout` seconds per connect/read and `retries` more attempts
  after a timeout, connection error or 408/425/429/5xx (waiting `backoff * 2**attempt` s); other
  answers end this run's attempts. Network failures and answers that may change (status
  "unreachable": connection refused, DNS, timeout, 5xx, 429, 403...) are not remembered: the next
  run fetches them again, and the report counts them as "network_failures". Downloaded bytes
  must pass `images.decode`, otherwise the link is reported undecodable and nothing is cached.
  Writes `out_dir/entries.json` (what `load_examples` reads) and `out_dir/report.json`, prints
  a summary when `progress`, and returns the report.
  """
  examples = read_json() if examples is None else examples
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  _write_json(os.path.join(out_dir, "entries.json"), [
      {"image_url": e.url, "text": e.text, "number": e.number} for e in examples])
  manifest_path = os.path.join(out_dir, "manifest.json")
  failed: dict[str, dict] = {}
  if os.path.exists(manifest_path):
    with open(manifest_path, encoding="utf-8") as f:
      failed = json.load(f).get("failed", {})
    # Earlier versions remembered network failures too (a run without network marked every link
    # dead): those are forgotten here, so that this run fetches them.
    failed = {k: r for k, r in failed.items() if isinstance(r, dict) and _gone(r)}

  by_url = collections.defaultdict(list)
  for e in examples:
    by_url[e.url].append(e)
  cached_before = {u for u in by_url if os.path.exists(cache_path(out_dir, u))}
  known = {u for u in by_url if u not in cached_before and cache_key(u) in failed
           and not retry_failed}
  todo = [u for u in by_url if u not in cached_before and u not in known]

  records = {}
  bar = tqdm.tqdm(total=len(todo), desc="CountBench images", unit="img", disable=not progress)
  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      futures = {pool.submit(_fetch_and_store, u, cache_path(out_dir, u), timeout, retries,
                             backoff, max_bytes): u for u in todo}
      for future in concurrent.futures.as_completed(futures):
        url = futures[future]
        records[url] = record = future.result()
        if record["status"] != "ok" and _gone(record):
          failed[cache_key(url)] = {"url": url, **record}
        else:  # cached now, or unreachable this time: nothing to remember
          failed.pop(cache_key(url), None)
        bar.update()
  finally:  # keep what was learned, even on Ctrl-C
    bar.close()
    _write_json(manifest_path, {"failed": failed})

  failures = []
  for url, group in by_url.items():
    if url in cached_before or records.get(url, {}).get("status") == "ok":
      continue
    record = records[url] if url in records else failed[cache_key(url)]
    for e in group:
      failures.append({"index": e.index, "url": url, "status": record["status"],
                       "kind": record["kind"], "error": record["error"],
                       "remembered": url in known})
  failures.sort(key=lambda r: r["index"])
  report = {
      "cache_dir": os.path.abspath(out_dir),
      "entries": len(examples),
      "available": len(examples) - len(failures),
      "downloaded": sum(len(by_url[u]) for u, r in records.items() if r["status"] == "ok"),
      "cached_before": sum(len(by_url[u]) for u in cached_before),
      "unavailable": len(failures),
      "remembered": sum(f["remembered"] for f in failures),
      "network_failures": sum(f["status"] == "unreachable" for f in failures),
      "by_kind": dict(collections.Counter(f["kind"] for f in failures).most_common()),
      "failed": failures,
  }
  _write_json(os.path.join(out_dir, "report.json"), report)
  if progress:
    print(summary(report))
  return report


def summary(report: dict) -> str:
  """One paragraph for stdout: what is available, what is not and why."""
  lines = [f"CountBench: {report['available']} of {report['entries']} images available in "
           f"{report['cache_dir']} ({report['downloaded']} downloaded now, "
           f"{report['cached_before']} cached before)."]
  if report["unavailable"]:
    kinds = ", ".join(f"{k}: {n}" for k, n in report["by_kind"].items())
    lines.append(f"{report['unavailable']} unavailable ({kinds}); the evaluation skips them.")
  if report.get("network_failures"):
    lines.append(f"{report['network_failures']} network failures, retried on the next run.")
  if report["remembered"]:
    lines.append(f"{report['remembered']} of those failed in an earlier run and were not "
                 "refetched (--retry-failed to try again).")
  lines.append(f"Details: {os.path.join(report['cache_dir'], 'report.json')}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Load for evaluation.


def load_examples(source: str) -> tuple[list[Example], int]:
  """(examples with an image, number skipped) from a `download` cache directory, or from a
  parquet file or directory of them in the `nielsr/countbench` layout."""
  if os.path.isfile(source):
    return _load_parquet([source])
  if not os.path.isdir(source):
    raise FileNotFoundError(f"CountBench source {source} is neither a cache directory nor a "
                            "parquet file.")
  if os.path.isdir(os.path.join(source, "images")):
    entries = os.path.join(source, "entries.json")
    examples = read_json(entries if os.path.exists(entries) else None)
    found = [dataclasses.replace(e, path=cache_path(source, e.url)) for e in examples
             if os.path.exists(cache_path(source, e.url))]
    return found, len(examples) - len(found)
  files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
  if not files:
    raise FileNotFoundError(f"{source} has no images/ (run `python -m "
                            "countclip_jax.data.countbench --out DIR`) and no parquet files.")
  return _load_parquet(files)


def _load_parquet(files: list[str]) -> tuple[list[Example], int]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  # only for this layout
  found, skipped, index = [], 0, 0
  for path in files:
    table = pq.read_table(path)
    missing = [c for c in _PARQUET_COLUMNS if c not in table.column_names]
    if missing:
      raise ValueError(f"{path} lacks columns {missing}; expected the nielsr/countbench layout: "
                       "image_url, text, number, image (struct of bytes, path).")
    for row in table.select(list(_PARQUET_COLUMNS)).to_pylist():
      image = row.pop("image") or {}
      data, image_path = image.get("bytes"), image.get("path")
      if image_path and not os.path.isabs(image_path):
        image_path = os.path.join(os.path.dirname(path), image_path)
      if data:
        found.append(_example(index, row, path, image_bytes=data))
      elif image_path and os.path.exists(image_path):
        found.append(_example(index, row, path, path=image_path))
      else:
        skipped += 1
      index += 1
  return found, skipped


def main(argv: list[str] | None = None) -> int:
  parser = cli.ArgumentParser(prog="python -m countclip_jax.data.countbench",
                              description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="cache directory (created if missing)")
  parser.add_argument("--json", default=None, help="CountBench json (default: package data)")
  parser.add_argument("--workers", type=int, default=16, help="parallel downloads")
  parser.add_argument("--timeout", type=float, default=10.0, help="seconds per connect/read")
  parser.add_argument("--retries", type=int, default=2, help="retries after timeouts and 5xx")
  parser.add_argument("--retry-failed", action="store_true",
                      help="refetch dead links remembered by an earlier run (network failures "
                      "are always retried)")
  parser.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bar (the summary is still printed)")
  args = parser.parse_args(argv)
  try:  # a --json that is missing or not CountBench's format, an --out that is a file
    entries = read_json(args.json)
    os.makedirs(args.out, exist_ok=True)
  except (OSError, ValueError) as e:
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return cli.USER_ERROR
  report = download(args.out, entries, workers=args.workers, timeout=args.timeout,
                    retries=args.retries, retry_failed=args.retry_failed, progress=args.progress)
  if not args.progress:
    print(summary(report))
  return 0 if report["available"] else 1


if __name__ == "__main__":
  sys.exit(main())
