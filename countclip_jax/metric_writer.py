"""Training metrics to WORKDIR/metrics.jsonl and TensorBoard event files (primary host only)."""
from __future__ import annotations

import json
import time

import jax
from etils import epath


class MetricWriter:

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = self.path.open("a")
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    scalars = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (for reports and tests)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
