"""Input pipeline throughput: examples/s of data.pipeline against a plain PIL loop, same run.

  python benchmarks/input_pipeline.py --source records --seconds 3   # the issue-12 check
  python benchmarks/input_pipeline.py --threads 1 2 4 8             # more thread counts

"records": JPEG pairs written to ArrayRecord shards in a temp dir, then the training pipeline
at --image_size (decode, resize of the centre crop box, normalise, counterfactual captions,
tokenize), against a loop on one thread that only decodes and resizes the same JPEGs with PIL.
It prints the loop, the pipeline at each --threads count (data.num_threads; the batches are
stacked and tokenized in the calling thread), and two ratios: pipeline at the first count /
loop, and pipeline at the second / the first. "synthetic": the CPU demo's pipeline (procedural
world at 64 px, batch 128, p = 0.5, K = 8), which must keep up with ~2 steps/s (>= ~500
examples/s).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# Runs as a script from anywhere: the repo root holds configs/ and the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import common
from countclip_jax.data import pipeline
from countclip_jax.data import records
from countclip_jax.data import synthetic
from countclip_jax.text import tokenizer as tokenizer_lib
# pylint: enable=g-import-not-at-top,wrong-import-position


def make_jpegs(n: int, width: int, height: int) -> list[tuple[bytes, str, str]]:
  """(JPEG bytes, caption with number, caption without) of n world scenes, width x height."""
  world = synthetic.SyntheticCounting(synthetic.WorldConfig(image_size=max(width, height)),
                                      size=n)
  out = []
  for i in range(n):
    ex = world[i]
    buffer = io.BytesIO()
    Image.fromarray(ex["image"][:height, :width]).save(buffer, "JPEG", quality=90)
    out.append((buffer.getvalue(), ex["caption_with_number"], ex["caption_without_number"]))
  return out


def pil_loop(jpegs: list[bytes], size: int, seconds: float) -> float:
  """Examples/s of the plain baseline: decode, convert to RGB, bicubic resize to size x size."""
  done, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    for data in jpegs:
      image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
      np.asarray(image)
    done += len(jpegs)
  return done / (time.perf_counter() - start)


def pipeline_rate(config, tokenizer, size: int, threads: int, seconds: float) -> float:
  it = pipeline.train_iterator(config, tokenizer, size, process_index=0, process_count=1,
                               num_threads=threads)
  # Warm-up: thread pool, first reads, and the prefetch buffer the threads filled meanwhile
  # (consumed faster than they refill it), so the timing below is the steady rate.
  for _ in range(config.data.prefetch_buffer_size + 2):
    next(it)
  done, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(it)
    done += len(batch["count"]["text"]) + len(batch["general"]["text"])
  return done / (time.perf_counter() - start)


def bench_records(args) -> None:
  pairs = make_jpegs(args.num_images, args.source_width, args.source_height)
  with tempfile.TemporaryDirectory() as tmp:
    for name, caption in (("counting", 1), ("general", 2)):
      with records.ShardWriter(tmp, name, num_shards=4) as writer:
        # Each scene --copies times: grain's index shuffle costs ~320 us an example on 256
        # records but ~30 us on 4,096 (~14 us on 1M), and real sets are large.
        for i, pair in enumerate(pairs * args.copies):
          number = 2 + i % len(pairs) % 9  # the world counts 2 + index % 9
          writer.write(pair[0], pair[caption], number if caption == 1 else 0)
    config = common.base()
    config.data.source = "records"
    config.data.records.counting = os.path.join(tmp, "counting-*.array_record")
    config.data.records.general = os.path.join(tmp, "general-*.array_record")
    config.train.batch_size, config.count.fraction = args.batch_size, 0.25
    config.count.num_counterfactuals = args.num_counterfactuals
    tokenizer = tokenizer_lib.build_tokenizer(synthetic.vocabulary(), 77)
    base = pil_loop([p[0] for p in pairs], args.image_size, args.seconds)
    rates = [pipeline_rate(config, tokenizer, args.image_size, t, args.seconds)
             for t in args.threads]
  print(f"records  {args.image_size}px from {args.source_width}x{args.source_height} JPEGs, "
        f"batch {args.batch_size}, K={args.num_counterfactuals}, {os.cpu_count()} CPUs")
  print(f"  PIL decode+resize loop, 1 thread: {base:.0f} ex/s")
  for threads, rate in zip(args.threads, rates):
    print(f"  pipeline, data.num_threads={threads}: {rate:.0f} ex/s")
  print(f"  ratio pipeline({args.threads[0]}) / PIL loop: {rates[0] / base:.2f}")
  if len(rates) > 1:
    print(f"  ratio pipeline({args.threads[1]}) / pipeline({args.threads[0]}): "
          f"{rates[1] / rates[0]:.2f}")


def bench_synthetic(args) -> None:
  # The CPU demo's counting stage (configs/demo.py): 64 px, batch 128, p = 0.5, K = 8, L = 16.
  config = common.base()
  config.train.batch_size, config.count.fraction, config.count.num_counterfactuals = 128, 0.5, 8
  config.data.synthetic.size = 200_000
  tokenizer = tokenizer_lib.build_tokenizer(synthetic.vocabulary(), 16)
  for threads in args.threads:
    rate = pipeline_rate(config, tokenizer, 64, threads, args.seconds)
    print(f"synthetic 64px, batch 128, p=0.5, K=8, data.num_threads={threads}: "
          f"pipeline {rate:.0f} ex/s")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--source", choices=("records", "synthetic", "both"), default="both")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--source_width", type=int, default=384)
  parser.add_argument("--source_height", type=int, default=288)
  parser.add_argument("--num_images", type=int, default=256, help="distinct JPEG scenes")
  parser.add_argument("--copies", type=int, default=16, help="records per scene and set")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_counterfactuals", type=int, default=1)
  parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                      help="data.num_threads counts to measure (0: the calling thread only)")
  parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
  args = parser.parse_args(argv)
  if args.source in ("records", "both"):
    bench_records(args)
  if args.source in ("synthetic", "both"):
    bench_synthetic(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
