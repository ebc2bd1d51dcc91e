"""Input pipeline throughput: examples/s of data.pipeline against a plain PIL loop, same run.

  python benchmarks/input_pipeline.py --source records --seconds 3 --rounds 3  # issue 12's check
  python benchmarks/input_pipeline.py --threads 1 2 4 8                         # more threads
  python benchmarks/input_pipeline.py --source records --profile 20  # where a row's time goes
  python benchmarks/input_pipeline.py --source synthetic --profile 20  # the demo's rows

"records": JPEG pairs written to ArrayRecord shards in a temp dir, then the training pipeline
at --image_size (decode, resize of the centre crop box, counterfactual captions, stack uint8
pixels, tokenize; normalising is the step's, on the devices), against a loop on one thread
that only decodes and resizes the same JPEGs with PIL. It prints the loop, the pipeline at
each --threads count (data.num_threads; the batches are stacked and tokenized in the calling
thread), each as examples/s of wall time and per CPU-second of the process (the per-core rate,
which other jobs on a shared machine move less), and two ratios: pipeline at the first count /
loop, and pipeline at the second / the first. --rounds interleaves repeats and reports medians.
--profile N: instead, N batches of the pipeline in the calling thread (data.num_threads=0)
under cProfile, the functions that take the most time of their own.
"synthetic": the CPU demo's pipeline (procedural world at 64 px, batch 128, p = 0.5, K = 8,
10 text tokens), which must keep up with ~2 steps/s (>= ~500 examples/s).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# Runs as a script from anywhere: the repo root holds configs/ and the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import common
from configs import demo as demo_config
from countclip_jax import models
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


def _timed(step, seconds: float) -> tuple[float, float]:
  """(examples/s of wall time, examples per CPU-second of this process, all its threads) of
  calling step() -> examples done, for `seconds`. The CPU rate is the per-core rate, which
  other jobs on the machine barely change; the wall rate is what threads buy."""
  done, start, cpu = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    done += step()
  return done / (time.perf_counter() - start), done / (time.process_time() - cpu)


def pil_loop(jpegs: list[bytes], size: int, seconds: float) -> tuple[float, float]:
  """The plain baseline, one thread: decode, convert to RGB, bicubic resize to size x size."""
  def step():
    for data in jpegs:
      image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
      np.asarray(image)
    return len(jpegs)
  return _timed(step, seconds)


def pipeline_rate(config, tokenizer, size: int, threads: int, seconds: float
                  ) -> tuple[float, float]:
  it = pipeline.train_iterator(config, tokenizer, size, process_index=0, process_count=1,
                               num_threads=threads)
  # Warm-up: thread pool, first reads, and the prefetch buffer the threads filled meanwhile
  # (consumed faster than they refill it), so the timing below is the steady rate.
  for _ in range(config.data.get("prefetch_buffer_size", 2) + 2):  # (.get: older configs)
    next(it)

  def step():
    batch = next(it)
    return len(batch["count"]["text"]) + len(batch["general"]["text"])
  return _timed(step, seconds)


def profile(config, tokenizer, size: int, batches: int) -> None:
  it = pipeline.train_iterator(config, tokenizer, size, process_index=0, process_count=1,
                               num_threads=0)
  next(it)  # first reads and the tokenizer's warm-up
  profiler = cProfile.Profile()
  start = time.perf_counter()
  profiler.enable()
  for _ in range(batches):
    next(it)
  profiler.disable()
  examples = batches * config.train.batch_size
  print(f"profile: {batches} batches ({examples} examples) in the calling thread, "
        f"{(time.perf_counter() - start) / examples * 1e3:.2f} ms an example under cProfile")
  pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


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
    if args.profile:
      profile(config, tokenizer, args.image_size, args.profile)
      return
    # Rounds interleave the contenders, so that a shared machine's load hits them alike.
    loop, rates = [], {t: [] for t in args.threads}
    for _ in range(args.rounds):
      loop.append(pil_loop([p[0] for p in pairs], args.image_size, args.seconds))
      for threads in args.threads:
        rates[threads].append(pipeline_rate(config, tokenizer, args.image_size, threads,
                                            args.seconds))
  median = lambda pairs, i: float(np.median([p[i] for p in pairs]))
  show = lambda pairs: (f"{median(pairs, 0):.0f} ex/s, {median(pairs, 1):.0f} ex/CPU-s" + (
      f" (medians of {', '.join(f'{p[0]:.0f}' for p in pairs)} ex/s)" if len(pairs) > 1 else ""))
  print(f"records  {args.image_size}px from {args.source_width}x{args.source_height} JPEGs, "
        f"batch {args.batch_size}, K={args.num_counterfactuals}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"  PIL decode+resize loop, 1 thread: {show(loop)}")
  for threads in args.threads:
    print(f"  pipeline, data.num_threads={threads}: {show(rates[threads])}")
  first, *more = [median(rates[t], 0) for t in args.threads]
  print(f"  ratio pipeline({args.threads[0]}) / PIL loop: {first / median(loop, 0):.2f} "
        f"(per CPU-second: {median(rates[args.threads[0]], 1) / median(loop, 1):.2f})")
  if more:
    print(f"  ratio pipeline({args.threads[1]}) / pipeline({args.threads[0]}): "
          f"{more[0] / first:.2f}")


def bench_synthetic(args) -> None:
  # The CPU demo's counting stage, configs/demo.py:count as it is (64 px, batch 128, p = 0.5,
  # K = 8, a context of 10 tokens: its longest captions fill it).
  config = demo_config.get_config("count")
  size = models.ARCHITECTURES[config.model.arch].vision.image_size
  length = config.data.context_length
  tokenizer = tokenizer_lib.build_tokenizer(synthetic.vocabulary(), length)
  if args.profile:
    profile(config, tokenizer, size, args.profile)
    return
  for threads in args.threads:
    rate, per_cpu = pipeline_rate(config, tokenizer, size, threads, args.seconds)
    print(f"synthetic {size}px, batch {config.train.batch_size}, p={config.count.fraction}, "
          f"K={config.count.num_counterfactuals}, {length} tokens, data.num_threads={threads}: "
          f"pipeline {rate:.0f} ex/s, {per_cpu:.0f} ex/CPU-s")


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
  parser.add_argument("--rounds", type=int, default=1, help="interleaved repeats (median)")
  parser.add_argument("--profile", type=int, default=0,
                      help="profile this many batches (calling thread) instead of timing")
  args = parser.parse_args(argv)
  if args.source in ("records", "both"):
    bench_records(args)
  if args.source in ("synthetic", "both"):
    bench_synthetic(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
