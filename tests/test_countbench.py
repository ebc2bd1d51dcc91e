"""CountBench: entries, the downloader against a local HTTP server, cache and parquet loaders."""
import collections
import http.server
import io
import json
import os
import socket
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from countclip_jax.data import countbench
from countclip_jax.data import images


def _jpeg(color):
  buf = io.BytesIO()
  Image.new("RGB", (40, 30), color).save(buf, "JPEG")
  return buf.getvalue()


def _png_rgba():
  buf = io.BytesIO()
  Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(buf, "PNG")
  return buf.getvalue()


class _Server:
  """127.0.0.1 server: good images, a 404, a 410, a corrupt file, a hang, a 503 once, a 503
  while `down` is set; counts requests."""

  def __init__(self):
    self.files = {"/red.jpg": _jpeg((255, 0, 0)), "/blue.jpg": _jpeg((0, 0, 255)),
                  "/alpha.png": _png_rgba(), "/corrupt.jpg": b"\xff\xd8\xff\xe0 not really"}
    self.requests = collections.Counter()
    self.release = threading.Event()
    self.lock = threading.Lock()
    self.down = True
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # pylint: disable=invalid-name
        with server.lock:
          server.requests[self.path] += 1
          count = server.requests[self.path]
        if self.path == "/hang.jpg":
          server.release.wait(10)  # never answers within the client's timeout
          return
        if self.path == "/flaky.jpg" and count == 1 or self.path == "/down.jpg" and server.down:
          self.send_error(503)
          return
        if self.path == "/gone.jpg":
          self.send_error(410)
          return
        body = server.files.get("/red.jpg" if self.path in ("/flaky.jpg", "/down.jpg")
                                else self.path)
        if body is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.release.set()
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture()
def server():
  s = _Server()
  yield s
  s.close()


def _examples(server, names):
  return [countbench.Example(i, f"{server.url}/{name}", f"{_word(i)} things", 2 + i % 9)
          for i, name in enumerate(names)]


def _word(i):
  return ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")[i % 9]


NAMES = ["red.jpg", "missing.jpg", "blue.jpg", "corrupt.jpg", "hang.jpg", "alpha.png",
         "flaky.jpg", "red.jpg"]  # the last is the same url as the first, like CountBench's


def _download(out, examples, **kwargs):
  kwargs = {"workers": 4, "timeout": 0.5, "retries": 1, "backoff": 0, "progress": False,
            **kwargs}
  return countbench.download(str(out), examples, **kwargs)


def test_download_cache_and_report(server, tmp_path):
  examples = _examples(server, NAMES)
  report = _download(tmp_path, examples)

  assert report["entries"] == 8 and report["available"] == 5 and report["unavailable"] == 3
  assert report["downloaded"] == 5 and report["cached_before"] == 0
  failed = {f["index"]: (f["status"], f["kind"]) for f in report["failed"]}
  assert failed == {1: ("dead", "http 404"), 3: ("undecodable", "undecodable"),
                    4: ("unreachable", "timeout")}
  assert report["by_kind"] == {"http 404": 1, "undecodable": 1, "timeout": 1}
  assert json.loads((tmp_path / "report.json").read_text()) == report
  # 404 is final, timeouts and 503 are retried once, a url shared by two entries is fetched once.
  assert server.requests == {"/red.jpg": 1, "/missing.jpg": 1, "/blue.jpg": 1,
                             "/corrupt.jpg": 1, "/hang.jpg": 2, "/alpha.png": 1,
                             "/flaky.jpg": 2}
  # Only good images are cached, byte for byte; the corrupt file is not.
  cached = sorted(os.listdir(tmp_path / "images"))
  assert len(cached) == 4 and not any(n.startswith(".tmp") for n in cached)
  with open(countbench.cache_path(str(tmp_path), examples[2].url), "rb") as f:
    assert f.read() == server.files["/blue.jpg"]

  # A second run fetches no image again, nor the 404 or the corrupt file (remembered); the
  # timeout is a network failure, not a dead link: fetched again (twice: one retry).
  before = server.requests.copy()
  again = _download(tmp_path, examples)
  assert server.requests - before == {"/hang.jpg": 2}
  assert again["available"] == 5 and again["downloaded"] == 0 and again["cached_before"] == 5
  assert again["remembered"] == 2 and again["network_failures"] == 1
  assert {f["index"]: f["remembered"] for f in again["failed"]} == {1: True, 3: True, 4: False}
  before = server.requests.copy()

  # --retry-failed refetches the failures only.
  _download(tmp_path, examples, retry_failed=True, retries=0)
  new = server.requests - before
  assert new == {"/missing.jpg": 1, "/corrupt.jpg": 1, "/hang.jpg": 1}

  found, skipped = countbench.load_examples(str(tmp_path))
  assert skipped == 3 and [e.index for e in found] == [0, 2, 5, 6, 7]
  assert found[1].read() == server.files["/blue.jpg"]
  assert found[0].text == "two things" and found[0].number == 2
  assert images.decode(found[2].read()).getpixel((0, 0)) == (255, 255, 255)  # alpha on white


def test_a_fixed_link_is_cached_on_retry(server, tmp_path):
  examples = _examples(server, ["missing.jpg"])
  assert _download(tmp_path, examples)["available"] == 0
  server.files["/missing.jpg"] = _jpeg((0, 255, 0))
  assert _download(tmp_path, examples)["available"] == 0  # remembered, not refetched
  report = _download(tmp_path, examples, retry_failed=True)
  assert report["available"] == 1 and report["failed"] == []
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert manifest == {"failed": {}}


def test_bad_urls_are_reported_not_raised(tmp_path):
  examples = [countbench.Example(0, "ftp://example.com/a.jpg", "two cats", 2),
              countbench.Example(1, "http://127.0.0.1:1/a.jpg", "two cats", 2)]
  report = _download(tmp_path, examples)
  assert [f["kind"] for f in report["failed"]] == ["bad url", "connection error"]


def test_cli(server, tmp_path, capsys):
  entries = [{"image_url": f"{server.url}/red.jpg", "text": "two red cards", "number": 2},
             {"image_url": f"{server.url}/missing.jpg", "text": "three cats", "number": 3}]
  path = tmp_path / "bench.json"
  path.write_text(json.dumps(entries))
  out = tmp_path / "cache"
  code = countbench.main(["--out", str(out), "--json", str(path), "--workers", "2",
                          "--timeout", "0.5", "--retries", "0", "--no-progress"])
  assert code == 0
  printed = capsys.readouterr().out
  assert "1 of 2 images available" in printed and "http 404: 1" in printed
  assert str(out / "report.json") in printed
  found, skipped = countbench.load_examples(str(out))
  assert skipped == 1 and found[0].text == "two red cards"
  capsys.readouterr()
  countbench.main(["--out", str(out), "--json", str(path), "--no-progress"])
  assert "were not refetched" in capsys.readouterr().out
  assert server.requests == {"/red.jpg": 1, "/missing.jpg": 1}


def test_package_json():
  examples = countbench.read_json()
  assert len(examples) == 540
  assert examples[0].index == 0 and examples[0].text.startswith("We review the ten best")
  assert {e.number for e in examples} == set(range(2, 11))


@pytest.mark.parametrize("entries, match", [
    ({"a": 1}, "expected a json list"),
    ([{"image_url": "u", "text": "t"}], "entry 0 .*missing number"),
    ([{"image_url": "u", "text": "t", "number": 11}], "entry 0 .*2..10, got 11"),
    ([{"image_url": "u", "text": "t", "number": "3"}], "integer in 2..10"),
])
def test_json_errors(tmp_path, entries, match):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(entries))
  with pytest.raises(ValueError, match=match):
    countbench.read_json(str(path))


def test_parquet(tmp_path):
  red = _jpeg((255, 0, 0))
  (tmp_path / "local.jpg").write_bytes(_jpeg((0, 0, 255)))
  image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  table = pa.table({
      "image_url": ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"],
      "text": ["two cats", "three dogs", "four birds"],
      "number": [2, 3, 4],
      "image": pa.array([{"bytes": red, "path": None}, None,
                         {"bytes": None, "path": "local.jpg"}], type=image_type),
  })
  pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
  found, skipped = countbench.load_examples(str(tmp_path / "train-00000-of-00001.parquet"))
  assert skipped == 1
  assert [(e.index, e.text, e.number) for e in found] == [(0, "two cats", 2), (2, "four birds", 4)]
  assert found[0].read() == red
  assert images.decode(found[1].read()).getpixel((0, 0))[2] > 240
  assert countbench.load_examples(str(tmp_path))[1] == 1  # a directory of parquet files

  pq.write_table(table.drop(["image"]), tmp_path / "bad.parquet")
  with pytest.raises(ValueError, match="lacks columns \\['image'\\]"):
    countbench.load_examples(str(tmp_path / "bad.parquet"))


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a cache directory nor a parquet"):
    countbench.load_examples(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no images/"):
    countbench.load_examples(str(tmp_path))
  with pytest.raises(ValueError, match="has no image"):
    countbench.Example(3, "u", "t", 2).read()


@pytest.fixture()
def no_dns(monkeypatch):
  """Name resolution fails for dns-fails.test, as it does for every name without a network."""
  real = socket.getaddrinfo

  def getaddrinfo(host, *args, **kwargs):
    if host == "dns-fails.test":
      raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return real(host, *args, **kwargs)

  monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_network_failures_are_retried_on_the_next_run(server, tmp_path, no_dns):
  names = ["red.jpg", "missing.jpg", "gone.jpg", "corrupt.jpg", "down.jpg", "hang.jpg"]
  examples = _examples(server, names) + [
      countbench.Example(6, "http://127.0.0.1:1/refused.jpg", "two cats", 2),  # nothing listens
      countbench.Example(7, "http://dns-fails.test/a.jpg", "three cats", 3)]
  report = _download(tmp_path, examples, retries=0)
  failed = {f["index"]: (f["status"], f["kind"], f["remembered"]) for f in report["failed"]}
  assert failed == {1: ("dead", "http 404", False), 2: ("dead", "http 410", False),
                    3: ("undecodable", "undecodable", False),
                    4: ("unreachable", "http 503", False), 5: ("unreachable", "timeout", False),
                    6: ("unreachable", "connection error", False),
                    7: ("unreachable", "dns error", False)}
  assert report["available"] == 1 and report["unavailable"] == 7
  assert report["network_failures"] == 4
  text = countbench.summary(report)
  assert "4 network failures, retried on the next run" in text
  # Only the answers that mean "gone" are remembered.
  manifest = json.loads((tmp_path / "manifest.json").read_text())["failed"]
  assert sorted(r["kind"] for r in manifest.values()) == ["http 404", "http 410", "undecodable"]

  # The next run (no --retry-failed) tries the network failures again, and only them.
  server.down = False
  before = server.requests.copy()
  again = _download(tmp_path, examples, retries=0)
  assert server.requests - before == {"/down.jpg": 1, "/hang.jpg": 1}
  assert again["downloaded"] == 1 and again["available"] == 2
  assert again["network_failures"] == 3 and again["remembered"] == 3
  assert {f["index"] for f in again["failed"] if f["remembered"]} == {1, 2, 3}
  assert "were not refetched" in countbench.summary(again)


def test_network_failures_remembered_by_an_earlier_version_are_retried(server, tmp_path):
  examples = _examples(server, ["red.jpg", "missing.jpg"])
  # A manifest as the downloader wrote it when a run without network marked every link dead.
  (tmp_path / "manifest.json").write_text(json.dumps({"failed": {
      countbench.cache_key(e.url): {"url": e.url, "status": "dead", "kind": kind, "error": "x",
                                    "attempts": 1}
      for e, kind in zip(examples, ["connection error", "http 404"])}}))
  report = _download(tmp_path, examples)
  assert server.requests == {"/red.jpg": 1}
  assert report["available"] == 1 and report["remembered"] == 1
