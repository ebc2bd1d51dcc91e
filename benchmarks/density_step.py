r"""Where the density task's train step spends its time: a profile by model part, and variants.

  python benchmarks/density_step.py [--init runs/demo/B/hf] [--variants "" "heads=4+decoder_widths=[32,32,16,16]"]

Builds configs/density.py:demo's step pieces (the task's loss on one batch of the dense
synthetic world, gradients of the head with the backbone frozen as train.freeze does), times
the gradient computation (median of --rounds runs, variants interleaved round by round), and
for the first variant traces --trace_steps runs with jax.profiler and sums the time of XLA's
ops by the model part named in each op's metadata (`interaction/block_1/self_attn`, forward or
backward). Ops without a model path (weight gradients of convolutions, layout copies) are
listed under their own names. A variant is "field=value+..." over the DEMO head preset
(models/density.py DensityConfig); "" is the preset itself.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from benchmarks.train_step import cpu_model, xla_op_events
from configs import density as density_configs
from countclip_jax import tasks, trainer
from countclip_jax.data import synthetic
from countclip_jax.models import density as density_model
from countclip_jax.tasks import density as density_task
from countclip_jax.text.tokenizer import Tokenizer, build_tokenizer


def parse_variant(text: str) -> dict:
  fields = {}
  for item in filter(None, text.split("+")):
    key, value = item.split("=")
    value = json.loads(value) if not value.isalpha() else value
    fields[key] = tuple(value) if isinstance(value, list) else value
  return fields


def build(args, variant: str, tokenizer):
  """(jitted gradient function, params, batch) for one variant of the DEMO head."""
  config = density_configs.get_config("demo")
  config.model.init = args.init
  config.data.num_threads = 1
  config.train.batch_size = args.batch_size
  density_model.PRESETS["demo"] = ("demo", dataclasses.replace(density_model.DEMO,
                                                               **parse_variant(variant)))
  task = tasks.get("density")
  model, params = task.build_model(config, tokenizer)
  if params is None:
    params = task.init_params(model, jax.random.key(0))
  iterator = task.train_iterator(config, tokenizer, model, start=0)
  batch = {k: jnp.asarray(v) for k, v in next(iterator).items()}
  iterator.close()
  frozen = lambda p: trainer.stop_frozen_gradients(config.train.freeze, p)
  loss = lambda p, b: density_task.loss_fn(frozen(p), b, jnp.asarray(1000), model,
                                           config.density)[0]
  return jax.jit(jax.grad(loss)), params, batch


def op_parts(hlo_text: str) -> dict:
  """XLA op name -> 'fwd PART' / 'bwd PART' from its op_name metadata, PART cut to --depth."""
  parts = {}
  for m in re.finditer(r"^\s*%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", hlo_text, re.M):
    path = m.group(2)
    direction = "bwd" if "transpose(jvp(" in path else "fwd"
    path = re.sub(r"transpose\(jvp\((\w+)\)\)|jvp\((\w+)\)",
                  lambda g: g.group(1) or g.group(2), path)
    parts[m.group(1)] = (direction, path.split("/")[1:])  # drop jit(...)
  return parts


def profile(grad, params, batch, steps: int, depth: int) -> list[tuple[str, float]]:
  parts = op_parts(grad.lower(params, batch).compile().as_text())
  def run():
    for _ in range(steps):
      jax.block_until_ready(grad(params, batch))
  totals = collections.Counter()
  for e in xla_op_events(run):
    if e["name"] in parts:
      direction, path = parts[e["name"]]
      key = f"{direction} {'/'.join(p for p in path[:depth] if p != 'DensityCounter')}"
    else:
      key = "(no model path) " + re.sub(r"[.]\d+$", "", e["name"])
    totals[key] += e["dur"] / 1e3 / steps
  return totals.most_common()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--init", default="", help="a backbone (HF dir, run); '' = random demo CLIP")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--variants", nargs="*", default=[""])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--trace_steps", type=int, default=3)
  parser.add_argument("--depth", type=int, default=4, help="model-path parts per profile row")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()

  config = density_configs.get_config("demo")
  if args.init:
    tokenizer = Tokenizer.from_pretrained(args.init, config.data.context_length)
  else:
    tokenizer = build_tokenizer(synthetic.vocabulary(), config.data.context_length)
  print(f"density step (configs/density.py:demo head, batch {args.batch_size}, backbone "
        f"{args.init or 'random demo CLIP'}), {cpu_model()}, load average "
        f"{os.getloadavg()[0]:.1f}")
  built = {}
  for v in args.variants:
    start = time.perf_counter()
    built[v] = build(args, v, tokenizer)
    grad, params, batch = built[v]
    jax.block_until_ready(grad(params, batch))
    print(f"  variant {v or 'DEMO preset'!r}: built and compiled in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
  times = {v: [] for v in args.variants}
  for _ in range(args.rounds):
    for v, (grad, params, batch) in built.items():
      start = time.perf_counter()
      jax.block_until_ready(grad(params, batch))
      times[v].append(time.perf_counter() - start)
  print("\n| variant | gradient ms (median) | vs first |\n|---|---|---|")
  first = np.median(times[args.variants[0]])
  for v in args.variants:
    print(f"| {v or 'DEMO preset'} | {1e3 * np.median(times[v]):.0f} | "
          f"{np.median(times[v]) / first:.2f} |")
  rows = profile(*built[args.variants[0]], args.trace_steps, args.depth)
  total = sum(ms for _, ms in rows)
  print(f"\nProfile of {args.variants[0] or 'the DEMO preset'!r} ({args.trace_steps} traced "
        f"runs; XLA op time {total:.0f} ms a run):\n\n| part | ms | share |\n|---|---|---|")
  for key, ms in rows[:args.top]:
    print(f"| {key} | {ms:.1f} | {ms / total:.1%} |")
  rest = sum(ms for _, ms in rows[args.top:])
  print(f"| (the other {len(rows) - args.top} rows) | {rest:.1f} | {rest / total:.1%} |")
  print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
