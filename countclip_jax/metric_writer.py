"""Training metrics to WORKDIR/metrics.jsonl and TensorBoard event files (primary host only)."""
from __future__ import annotations

import json
import math
import time

import jax
from etils import epath


class MetricWriter:

  def __init__(self, workdir: str, tensorboard: bool = True, upload_every_secs: float = 10.0):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    # gs:// objects cannot be appended to (gcsfs would silently overwrite a resumed run's rows)
    # and appear only when closed: there the whole file is kept here and rewritten, at once for
    # the first row, then at most every upload_every_secs, and at close.
    self._remote = "://" in str(workdir)
    if self._remote:
      self._text = self.path.read_text() if self.path.exists() else ""
      self._uploaded, self._pending = -math.inf, False
      self.upload_every_secs = upload_every_secs
    else:
      self._file = self.path.open("a")
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    scalars = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
    line = json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n"
    if self._remote:
      self._text, self._pending = self._text + line, True
      if time.monotonic() - self._uploaded >= self.upload_every_secs:
        self._upload()
    else:
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, int(step))

  def _upload(self) -> None:
    self.path.write_text(self._text)
    self._uploaded, self._pending = time.monotonic(), False

  def close(self) -> None:
    if self.enabled:
      if not self._remote:
        self._file.close()
      elif self._pending:
        self._upload()
      if self._tb is not None:
        self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (for reports and tests)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
