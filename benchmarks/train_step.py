r"""Train-step benchmark: compile time, step time, examples/s, FLOPs, MFU and memory.

  python benchmarks/train_step.py --arch b32 --batch_size 8              # this CPU: ~1 min
  python benchmarks/train_step.py --arch l14 --batch_size 8 --compile_only
  python benchmarks/train_step.py --arch b32 --batch_size 8 \
      --variants dtype=float32 remat=full dtype=bfloat16   # contenders, interleaved A,B,C,A,B,C..
  python benchmarks/train_step.py --arch b32 --batch_size 512 --dtype bfloat16 --fsdp  # TPU/GPU
  python benchmarks/train_step.py --roofline --batch_size 64 --roofline_fsdp 8  # no device used

The step is the project's own: `trainer.build_model` (random init, text tower sized to the CLIP
tokenizer: 49408 tokens, eos 49407, 77 positions), `trainer.make_optimizer`,
`trainer.init_state`, `trainer.make_train_step` over a mesh of all local devices (data
parallel), with the counting loss on (p = --fraction, K = --num_counterfactuals, λ = 1) and
synthetic random batches in the pipeline's layout
{"count": {image, text, cf_text, number, cf_number}, "general": {image, text}}.

What is reported, per variant:
  compile    seconds to trace+lower and to compile the step (no persistent cache); with
             --compile_only --compile_repeats N, medians of N fresh builds, interleaved.
  step       median seconds per step over --repeats timed windows after --warmup steps; each
             window dispatches its steps back to back and blocks once at the end (no host sync
             inside a window).
  ex/s       batch_size / step.
  FLOPs      model FLOPs per example counted from the architecture (`model_flops`: every
             matmul, forward 2 FLOPs/MAC, backward 4, patch embedding 2 - pixels get no
             gradient), and XLA's own count for the whole compiled step (cost_analysis(), one
             device's program times the devices) as a cross-check.
  MFU        model FLOPs/s over a matmul peak measured in the same run on the same device:
             a --peak_size² matmul in the step's dtype (best of 3) on one device, timed after
             every round, times the number of devices.
             "MFU" uses the best probe of the run (contention only ever lowers a probe);
             "MFU per round" is the median over rounds of step FLOP/s / that round's probe.
  memory     compiled memory_analysis() (arguments, outputs, aliased, temp); on TPU/GPU the
             device's peak_bytes_in_use, on CPU the process's peak RSS; minor page faults per
             step (on CPU XLA maps its temp buffer afresh every execution).
  --op_profile N  then traces N steps of the first variant (jax.profiler) and prints the
             milliseconds of XLA ops a step by kind (HLO name without its number, and fusion
             kind: ynn_fusion = YNNPACK matmuls on CPU, copy_* = layout copies), summed over
             the device's threads.

Variants (--variants, each a comma-separated list of key=value, run interleaved):
  dtype  float32 | bfloat16 (compute dtype; params stay float32)
  remat  none | full | dots | dots_all: model.remat False | True (each layer keeps its input
         only) | "dots_with_no_batch_dims_saveable" | "dots_saveable"
  scan   0 | 1: model.scan_layers (nn.scan over each tower's layers, params stacked)
  feed   device (one placed batch, reused) | host (a fresh host batch placed with
         pipeline.global_batch before every step, as trainer.train_and_evaluate does)
  text   tokens per caption fed to the text tower (data.context_length; default 77)
  xla    XLA compile options over the ones trainer.make_train_step sets, "name:value+...",
         e.g. xla=xla_cpu_copy_insertion_use_region_analysis:false (the trainer's CPU default
         before it set this option)
  lam    count.lam (default 1); lam=0 is the demo's control C, whose counterfactual captions
         get no backward pass (the model FLOPs and MFU columns still count that backward)
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
import types
from typing import Any, Callable

# Runs as a script from anywhere: the repo root holds configs/ and the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from countclip_jax import models, sharding, trainer
from countclip_jax.data import pipeline
from countclip_jax.tasks import contrastive
from countclip_jax.models import clip
from countclip_jax.models.clip import CLIPConfig
# pylint: enable=g-import-not-at-top,wrong-import-position

# The OpenAI CLIP tokenizer's sizes (what a run from a hub checkpoint uses).
CLIP_TOKENIZER = types.SimpleNamespace(vocab_size=49408, eos_token_id=49407, bos_token_id=49406,
                                       context_length=77)


def tokenizer_for(arch: str):
  """A stand-in tokenizer with the sizes build_model reads: CLIP's for the OpenAI
  architectures, the architecture's own small vocabulary for the test sizes."""
  text = models.ARCHITECTURES[arch].text
  if text.vocab_size == CLIP_TOKENIZER.vocab_size:
    return CLIP_TOKENIZER
  return types.SimpleNamespace(vocab_size=text.vocab_size, eos_token_id=text.eos_token_id,
                               bos_token_id=text.eos_token_id - 1,
                               context_length=text.context_length)


# ----------------------------------------------------------------------------- FLOPs

def tower_macs(width, depth, mlp_dim, tokens) -> int:
  """Multiply-accumulates of one transformer tower's forward pass over one sequence read at
  one pooled token: q/k/v/out projections 4·T·D², MLP 2·T·D·M, scores and weighted sum
  2·T²·D (computed in full; the text tower's causal mask does not skip them) in every layer
  but the last, which computes the pooled token alone (models/clip.py, Encoder's pooled_at):
  keys and values 2·T·D², its query, output and MLP 2·D² + 2·D·M, its attention 2·T·D."""
  layer = lambda t: 4 * t * width ** 2 + 2 * t * width * mlp_dim + 2 * t * tokens * width
  return (depth - 1) * layer(tokens) + layer(1) + 2 * (tokens - 1) * width ** 2


def model_flops(config: CLIPConfig, context_length: int, batch_size: int, fraction: float,
                k: int) -> dict:
  """Model FLOPs of one train step (and per example) of L_clip + L_count, counted by matmul.

  Forward = 2 FLOPs per MAC; backward = 4 (input and weight gradients), except the patch
  embedding (2: pixels need no gradient). Images: B; texts: B true captions + K per counting
  example, all at the context length. The losses' B² similarities, the norms, softmaxes,
  activations and the optimizer (~20 FLOPs per param) are left out: < 1% at these sizes.
  """
  v, t = config.vision, config.text
  counting, _ = pipeline.split_sizes(batch_size, fraction)
  images, texts = batch_size, batch_size + counting * k
  patch = v.num_patches * v.patch_size ** 2 * v.num_channels * v.width
  image_macs = patch + tower_macs(v.width, v.depth, v.mlp_dim, v.num_patches + 1) \
      + v.width * config.projection_dim
  text_macs = tower_macs(t.width, t.depth, t.mlp_dim, context_length) \
      + t.width * config.projection_dim
  forward = 2 * (images * image_macs + texts * text_macs)
  train = 3 * forward - 2 * images * patch
  return {"forward_per_step": forward, "train_per_step": train,
          "train_per_example": train / batch_size,
          "image_forward": 2 * image_macs, "text_forward": 2 * text_macs,
          "texts_per_example": texts / batch_size}


# ----------------------------------------------------------------------------- roofline

# Published per-chip peaks: dense bf16 FLOP/s, HBM bytes/s (docs/PERFORMANCE.md cites them).
CHIPS = {
    "TPU v4": (275e12, 1200e9),    # cloud.google.com/tpu/docs/v4
    "TPU v5e": (197e12, 819e9),    # cloud.google.com/tpu/docs/v5e
    "TPU v5p": (459e12, 2765e9),   # cloud.google.com/tpu/docs/v5p
    "TPU v6e": (918e12, 1640e9),   # cloud.google.com/tpu/docs/v6e
    "H100 SXM": (989e12, 3350e9),  # nvidia.com/en-us/data-center/h100 (dense, no sparsity)
}


def roofline_step(config: CLIPConfig, text_len: int, batch: int, fraction: float, k: int,
                  peak: float, bandwidth: float, fsdp: int = 1) -> dict:
  """A per-chip time model of one bf16 train step at `batch` examples per chip.

  Every matmul (forward, input gradient, weight gradient) takes max(FLOPs / peak, bytes /
  bandwidth) with bf16 operands read and results written once; attention's two matmuls per
  head likewise (no fused kernel). Elementwise work (layer norms, residual adds, softmax,
  activation), assumed ~30 D-vectors of bf16 traffic per token per layer forward+backward plus
  6 reads/writes of the H·T scores, is bandwidth-bound. AdamW moves 28 bytes per param (read
  p, g, m, v; write p, m, v in fp32), divided over `fsdp` chips. Ops run one after another
  (no overlap), collectives are assumed hidden: the model is an upper bound on MFU.
  """
  counting, _ = pipeline.split_sizes(batch, fraction)
  v, t = config.vision, config.text
  towers = [(v.width, v.depth, v.mlp_dim, v.heads, v.num_patches + 1, batch),
            (t.width, t.depth, t.mlp_dim, t.heads, text_len, batch + counting * k)]
  mm_time = ew_time = mm_flops = 0.0

  def matmul(m, kk, n, count=1):
    flops, bytes_ = 2 * m * kk * n, 2 * (m * kk + kk * n + m * n)
    return count * 3 * flops, count * 3 * max(flops / peak, bytes_ / bandwidth)

  for width, depth, mlp, heads, tokens, sequences in towers:
    rows, head_dim = sequences * tokens, width // heads
    layer = [matmul(rows, width, width, 4), matmul(rows, width, mlp), matmul(rows, mlp, width),
             matmul(tokens, head_dim, tokens, 2 * sequences * heads)]
    mm_flops += depth * sum(f for f, _ in layer)
    mm_time += depth * sum(s for _, s in layer)
    ew_bytes = 2 * rows * (30 * width + 6 * heads * tokens)
    ew_time += depth * ew_bytes / bandwidth
  params = sum(x.size for x in jax.tree_util.tree_leaves(models.param_shapes(clip.CLIP(config))))
  opt_time = 28 * params / fsdp / bandwidth
  total = mm_time + ew_time + opt_time
  return {"step_s": total, "matmul_s": mm_time, "elementwise_s": ew_time,
          "optimizer_s": opt_time, "mfu_bound": mm_flops / total / peak, "params": params}


def print_roofline(args) -> None:
  """The table of docs/PERFORMANCE.md's roofline section."""
  length = text_length(args)
  print(f"Per-chip roofline, bf16, {args.batch_size} examples per chip, p={args.fraction}, "
        f"K={args.num_counterfactuals}, {length} text tokens, optimizer sharded over "
        f"{args.roofline_fsdp} chip(s)")
  print("| model | GFLOP/example | params | chip | ridge FLOP/B | ex/s/chip at peak "
        "| MFU bound | step ms (matmul / elementwise / optimizer) |")
  print("|---|---|---|---|---|---|---|---|")
  for arch in ("b32", "b16", "l14", "l14_336"):
    config = models.ARCHITECTURES[arch]
    flops = model_flops(config, length, args.batch_size, args.fraction, args.num_counterfactuals)
    for chip, (peak, bandwidth) in CHIPS.items():
      r = roofline_step(config, length, args.batch_size, args.fraction,
                        args.num_counterfactuals, peak, bandwidth, args.roofline_fsdp)
      print(f"| {arch} | {flops['train_per_example'] / 1e9:.1f} | {r['params'] / 1e6:.0f}M "
            f"| {chip} | {peak / bandwidth:.0f} | {peak / flops['train_per_example']:,.0f} "
            f"| {r['mfu_bound']:.0%} | {1e3 * r['step_s']:.1f} ({1e3 * r['matmul_s']:.1f} / "
            f"{1e3 * r['elementwise_s']:.1f} / {1e3 * r['optimizer_s']:.1f}) |")


# ----------------------------------------------------------------------------- setup

@dataclasses.dataclass
class Variant:
  name: str
  dtype: str = "float32"
  remat: str = "none"  # none | full | dots | dots_all
  scan: bool = False
  feed: str = "device"  # device | host
  text: int | None = None  # tokens per caption (None: --text_length or the context length)
  xla: str = ""  # compile options over the trainer's: "name:value+name:value"
  lam: float = 1.0  # count.lam; 0 = the demo's control C (counterfactuals measured, no backward)


def parse_variant(spec: str, defaults: Variant) -> Variant:
  fields = {}
  for item in filter(None, spec.split(",")):
    key, _, value = item.partition("=")
    if key not in ("dtype", "remat", "scan", "feed", "text", "xla", "lam"):
      raise ValueError(f"variant key {key!r} is not one of dtype, remat, scan, feed, text, xla, "
                       "lam")
    if key == "remat" and value not in REMAT:
      raise ValueError(f"remat={value!r} is not one of {', '.join(REMAT)}")
    fields[key] = (value in ("1", "true", "True") if key == "scan" else
                   int(value) if key == "text" else float(value) if key == "lam" else value)
  return dataclasses.replace(defaults, name=spec, **fields)


def make_config(args, variant: Variant):
  c = common.base()
  c.model.arch, c.model.dtype = args.arch, variant.dtype
  c.model.remat = REMAT[variant.remat]
  c.model.scan_layers = variant.scan
  c.train.batch_size = args.batch_size
  c.train.steps, c.train.warmup_steps = 10_000, 100
  c.count.fraction, c.count.num_counterfactuals = args.fraction, args.num_counterfactuals
  c.count.lam, c.count.scale = variant.lam, 1.0
  c.mesh.data, c.mesh.fsdp, c.mesh.model = -1, 1, 1
  if getattr(args, "fsdp", False):
    c.mesh.data, c.mesh.fsdp = 1, -1
  return c


# The variant's remat -> model.remat (models/clip.py REMAT_POLICIES).
REMAT = {
    "none": False,
    "full": True,  # save nothing but each layer's input
    "dots": "dots_with_no_batch_dims_saveable",
    "dots_all": "dots_saveable",
}


def _model(config, tokenizer, variant: Variant):
  model, _ = contrastive.TASK.build_model(config, tokenizer)
  return model


def host_batch(config, tokenizer, image_size: int, seed: int = 0,
               length: int | None = None) -> dict:
  """Random pixels and token ids (bos, words, eos, eos padding) in the pipeline's layout, this
  process's share; `length` tokens per caption (default: the tokenizer's context length)."""
  rng = np.random.RandomState(seed)
  # This process's share of the global batch (pipeline.global_batch assembles the rest).
  counting, general = (n // jax.process_count() for n in pipeline.split_sizes(
      config.train.batch_size, config.count.fraction))
  k, length = config.count.num_counterfactuals, length or tokenizer.context_length

  def ids(n):
    x = np.full((n, length), tokenizer.eos_token_id, np.int32)
    x[:, 0] = tokenizer.bos_token_id
    for row in x:
      words = rng.randint(3, min(length - 1, 20))
      row[1:words] = rng.randint(0, tokenizer.bos_token_id - 1, size=words - 1)
    return x

  image = lambda n: rng.randn(n, image_size, image_size, 3).astype(np.float32)
  numbers = rng.randint(2, 11, size=counting).astype(np.int32)
  return {"count": {"image": image(counting), "text": ids(counting),
                    "cf_text": ids(counting * k).reshape(counting, k, length),
                    "number": numbers, "cf_number": (numbers[:, None] % 9 + 2 + np.zeros(
                        (counting, k), np.int32)).astype(np.int32)},
          "general": {"image": image(general), "text": ids(general)}}


@dataclasses.dataclass
class Bench:
  variant: Variant
  model: Any
  config: Any
  compiled: Any
  state: Any
  batches: list  # host batches (feed=host) or one placed batch (feed=device)
  batch_sharding: Any
  lower_seconds: float
  compile_seconds: float
  xla_flops: float | None
  memory: dict
  steps_done: int = 0

  def run(self, steps: int):
    """Dispatches `steps` steps back to back and blocks once at the end."""
    metrics = None
    for _ in range(steps):
      if self.variant.feed == "host":
        batch = pipeline.global_batch(self.batches[self.steps_done % len(self.batches)],
                                      self.batch_sharding)
      else:
        batch = self.batches[0]
      self.state, metrics = self.compiled(self.state, batch)
      self.steps_done += 1
    jax.block_until_ready((self.state, metrics))
    return metrics


def build(args, variant: Variant, compile_only: bool = False) -> Bench:
  config = make_config(args, variant)
  tokenizer = tokenizer_for(args.arch)
  trainer.validate(config)
  model = _model(config, tokenizer, variant)
  length = variant.text or getattr(args, "text_length", None)
  image_size = model.config.vision.image_size
  host_batches = lambda: [host_batch(config, tokenizer, image_size, seed, length)
                          for seed in range(4)]
  return build_step(contrastive.TASK, model, config, host_batch(
      config, tokenizer, image_size, length=length), variant, compile_only, host_batches)


def build_step(task, model, config, example: dict, variant: Variant, compile_only: bool = False,
               host_batches: Callable[[], list] | None = None) -> Bench:
  """Any task's train step, as the trainer builds it over a mesh of all devices, lowered and
  compiled for `example` (this process's share of a batch), with a fresh random state."""
  mesh = sharding.make_mesh(config.mesh)
  shapes = trainer.param_shapes(task, model)
  tx, schedule = trainer.make_optimizer(config, shapes)
  state_shapes, shardings = trainer.state_layout(task, model, tx, mesh)
  step = trainer.make_train_step(task, model, tx, schedule, config, mesh, shardings)
  batch_sharding = task.batch_shardings(mesh)
  abstract = lambda tree, sh: jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

  start = time.perf_counter()
  lowered = step.lower(abstract(state_shapes, shardings), abstract(example, batch_sharding))
  lower_seconds = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile(compiler_options=_xla_options(variant.xla) or None)
  compile_seconds = time.perf_counter() - start
  xla_flops = _xla_flops(compiled)
  if xla_flops is not None:  # cost_analysis() counts one device's SPMD program
    xla_flops *= mesh.size
  memory = _compiled_memory(compiled)

  state, batches = None, []
  if not compile_only:
    state = trainer.init_state(task, model, tx, None, jax.random.key(0), mesh, shardings)
    if variant.feed == "host":
      batches = host_batches() if host_batches else [example]
    else:
      batches = [pipeline.global_batch(example, batch_sharding)]
  return Bench(variant, model, config, compiled, state, batches, batch_sharding, lower_seconds,
               compile_seconds, xla_flops, memory)


def _xla_options(spec: str) -> dict:
  options = {}
  for item in filter(None, spec.split("+")):
    name, _, value = item.partition(":")
    lowered = value.lower()
    options[name] = (lowered == "true" if lowered in ("true", "false") else
                     int(value) if value.lstrip("-").isdigit() else value)
  return options


def _xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _compiled_memory(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  return {name: int(getattr(m, f"{name}_size_in_bytes", 0))
          for name in ("argument", "output", "alias", "temp", "generated_code")}


# ----------------------------------------------------------------------------- timing

def matmul_probe(size: int, dtype) -> Callable[[], float]:
  """Returns a function that times one size x size @ size x size product (FLOP/s)."""
  a = jax.random.normal(jax.random.key(1), (size, size), dtype)
  b = jax.random.normal(jax.random.key(2), (size, size), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()

  def probe(repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - start)
    return 2 * size ** 3 / min(times)  # best of a few: the peak, not the mean
  return probe


def device_peak_memory() -> int | None:
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s]
  return max(peaks) if peaks and all(p is not None for p in peaks) else None


def rss_peak_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def steps_per_window(bench: Bench, seconds: float) -> int:
  """Enough steps for a window of >= `seconds` (1 on a slow CPU, more on an accelerator)."""
  start = time.perf_counter()
  bench.run(1)
  one = time.perf_counter() - start
  return max(1, int(np.ceil(seconds / max(one, 1e-6))))


def interleave(contenders: dict[str, Callable[[], float]], rounds: int,
               probe: Callable[[], float] | None = None) -> dict[str, list[float]]:
  """Round robin: each round times every contender once (A, B, ..., peak probe) and returns the
  per-round seconds (and peak FLOP/s under "peak")."""
  out = {name: [] for name in contenders}
  if probe is not None:
    out["peak"] = []
  for r in range(rounds):
    order = list(contenders)
    if r % 2:  # alternate the order too: A B, B A, ... so neither always runs first
      order.reverse()
    for name in order:
      out[name].append(contenders[name]())
    if probe is not None:
      out["peak"].append(probe())
  return out


def xla_op_events(run: Callable[[], Any]) -> list[dict]:
  """The XLA op events ("name": HLO instruction, "dur": us) of a jax.profiler trace of `run()`,
  without the runtime's own (dispatch, thread waits, Python)."""
  with tempfile.TemporaryDirectory() as out:
    jax.profiler.start_trace(out)
    run()
    jax.profiler.stop_trace()
    (trace,) = glob.glob(os.path.join(out, "plugins", "profile", "*", "*.trace.json.gz"))
    with gzip.open(trace) as f:
      events = json.load(f)["traceEvents"]
  return [e for e in events if e.get("ph") == "X" and "dur" in e and "::" not in e["name"]
          and not e["name"].startswith(("$", "Pjit"))]


def op_profile(bench: Bench, steps: int) -> list[tuple[str, float, int]]:
  """(kind, ms a step, ops) of `steps` traced steps, the costliest first: XLA ops by HLO name
  without its number plus the fusion kind (`[kCustom]`: library calls such as YNNPACK's)."""
  kinds = {m.group(1): m.group(2) for m in re.finditer(
      r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? fusion\(.*?kind=(\w+)", bench.compiled.as_text(), re.M)}
  bench.run(1)
  ms, ops = collections.Counter(), collections.Counter()
  for e in xla_op_events(lambda: bench.run(steps)):
    kind = re.sub(r"[.]\d+$", "", e["name"]) + (f" [{kinds[e['name']]}]" if e["name"] in kinds
                                                 else "")
    ms[kind] += e["dur"] / 1e3 / steps
    ops[kind] += 1 / steps
  return [(kind, t, round(ops[kind])) for kind, t in ms.most_common()]


def timed(fn: Callable[[], Any], steps: int, faults: list | None = None) -> Callable[[], float]:
  """Seconds per step of one window; appends the window's minor page faults per step to
  `faults` (the process's: on CPU, XLA's buffers are the process's memory)."""
  def run():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn()
    seconds = (time.perf_counter() - start) / steps
    if faults is not None:
      faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps)
    return seconds
  return run


def cpu_model() -> str:
  """/proc/cpuinfo's model name, family and model (CPUs of one name differ: Zen 3 vs Zen 4)."""
  fields = {}
  with open("/proc/cpuinfo") as f:
    for line in f:
      key, _, value = line.partition(":")
      fields.setdefault(key.strip(), value.strip())
  return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model "
          f"{fields.get('model', '?')}, {os.cpu_count()} CPUs)")


def load_note() -> str:
  load = os.getloadavg()
  return (f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"at the start")


# ----------------------------------------------------------------------------- main

def fmt_bytes(n) -> str:
  return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def text_length(args) -> int:
  return getattr(args, "text_length", None) or tokenizer_for(args.arch).context_length


def describe(args) -> str:
  image = models.ARCHITECTURES[args.arch].vision.image_size
  return (f"{args.arch}, {image} px, batch {args.batch_size}, p={args.fraction}, "
          f"K={args.num_counterfactuals}, {text_length(args)} text tokens, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--arch", default="b32", choices=sorted(models.ARCHITECTURES))
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--fraction", type=float, default=0.5, help="p: counting share")
  parser.add_argument("--num_counterfactuals", type=int, default=1, help="K")
  parser.add_argument("--text_length", type=int, default=None,
                      help="tokens per caption fed to the text tower (default: the "
                           "tokenizer's context length, 77 for CLIP; the model keeps 77 positions)")
  parser.add_argument("--variants", nargs="+", default=[""],
                      help="contenders, each 'key=value,...' over dtype, remat, scan, feed")
  parser.add_argument("--dtype", default="float32", help="default compute dtype")
  parser.add_argument("--fsdp", action="store_true", help="shard params over all devices")
  parser.add_argument("--warmup", type=int, default=2, help="steps before timing")
  parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant")
  parser.add_argument("--window_seconds", type=float, default=0.5,
                      help="minimum length of a timed window")
  parser.add_argument("--peak_size", type=int, default=2048)
  parser.add_argument("--compile_only", action="store_true")
  parser.add_argument("--op_profile", type=int, default=0,
                      help="then trace this many steps of the first variant: ms of ops by kind")
  parser.add_argument("--compile_repeats", type=int, default=1,
                      help="with --compile_only: builds per variant, interleaved; medians")
  parser.add_argument("--roofline", action="store_true",
                      help="print the TPU/GPU roofline table (batch_size = per chip) and exit")
  parser.add_argument("--roofline_fsdp", type=int, default=1,
                      help="chips the optimizer state is sharded over, for --roofline")
  parser.add_argument("--json", default="", help="append one JSON line per variant here")
  args = parser.parse_args(argv)
  if args.roofline:
    print_roofline(args)
    return 0
  sharding.initialize_distributed()  # a TPU pod slice: every host runs this script

  print(f"# {describe(args)}; jax {jax.__version__}; {load_note()}", flush=True)
  defaults = Variant(name="", dtype=args.dtype)
  variants = [parse_variant(s, defaults) for s in args.variants]
  arch = models.ARCHITECTURES[args.arch]
  benches = []
  for v in variants:
    bench = build(args, v, compile_only=args.compile_only)
    print(f"# built {v.name or 'default'}: lower {bench.lower_seconds:.1f} s, compile "
          f"{bench.compile_seconds:.1f} s", flush=True)
    benches.append(bench)
  if args.compile_only and args.compile_repeats > 1:
    # Rebuild (a new jitted step: no trace or executable cache) and recompile, interleaved;
    # medians over all builds.
    times = {b.variant.name: ([b.lower_seconds], [b.compile_seconds]) for b in benches}
    for r in range(1, args.compile_repeats):
      for v in (variants if r % 2 == 0 else variants[::-1]):
        again = build(args, v, compile_only=True)
        times[v.name][0].append(again.lower_seconds)
        times[v.name][1].append(again.compile_seconds)
        print(f"# rebuilt {v.name or 'default'}: lower {again.lower_seconds:.1f} s, compile "
              f"{again.compile_seconds:.1f} s", flush=True)
    for b in benches:
      b.lower_seconds = statistics.median(times[b.variant.name][0])
      b.compile_seconds = statistics.median(times[b.variant.name][1])
  flops_of = {b.variant.name: model_flops(
      b.model.config, b.variant.text or text_length(args), args.batch_size, args.fraction,
      args.num_counterfactuals) for b in benches}
  flops = flops_of[benches[0].variant.name]
  results = {}
  if not args.compile_only:
    windows = {}
    for bench in benches:
      bench.run(args.warmup)
      windows[bench.variant.name] = steps_per_window(bench, args.window_seconds)
    dtype = jnp.bfloat16 if all(v.dtype == "bfloat16" for v in variants) else jnp.float32
    probe = matmul_probe(args.peak_size, dtype)
    faults = {b.variant.name: [] for b in benches}
    contenders = {b.variant.name: timed(functools.partial(b.run, windows[b.variant.name]),
                                        windows[b.variant.name], faults[b.variant.name])
                  for b in benches}
    results = interleave(contenders, args.repeats, probe)

  print(f"\n{describe(args)}; {load_note()}")
  print(f"model FLOPs per example (train step): {flops['train_per_example'] / 1e9:.4g} G "
        f"(image fwd {flops['image_forward'] / 1e9:.4g} G, text fwd "
        f"{flops['text_forward'] / 1e9:.4g} G x {flops['texts_per_example']:.3g} texts)")
  header = ("| variant | lower s | compile s | step s | ex/s | model GFLOP/step | XLA GFLOP/step "
            "| matmul peak GFLOP/s | MFU | MFU per round | args GiB | temp GiB | peak memory "
            "| page faults/step |")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  for bench in benches:
    name = bench.variant.name or "default"
    flops = flops_of[bench.variant.name]
    row = {"arch": args.arch, "batch_size": args.batch_size, "variant": name,
           "lower_s": bench.lower_seconds, "compile_s": bench.compile_seconds,
           "model_flops_per_step": flops["train_per_step"], "xla_flops_per_step": bench.xla_flops,
           "memory": bench.memory, "device": jax.devices()[0].device_kind,
           "devices": jax.device_count(), "load_end": os.getloadavg()}
    step_s = ex_s = mfu = mfu_rounds = peak = None
    if results:
      times = results[bench.variant.name]
      step_s = statistics.median(times)
      ex_s = args.batch_size / step_s
      peak = max(results["peak"])  # the device's best; contention only lowers a probe
      devices = jax.device_count()  # the probe runs on one device; the step on all of them
      mfu = flops["train_per_step"] / step_s / (peak * devices)
      mfu_rounds = statistics.median(flops["train_per_step"] / t / (p * devices)
                                     for t, p in zip(times, results["peak"]))
      row.update(step_s=step_s, step_times=times, examples_per_s=ex_s, peak_flops=peak,
                 peak_samples=results["peak"], mfu=mfu, mfu_per_round=mfu_rounds,
                 page_faults_per_step=statistics.median(faults[bench.variant.name]))
    mem = bench.memory
    peak_mem = device_peak_memory()
    peak_note = fmt_bytes(peak_mem) if peak_mem else f"RSS {fmt_bytes(rss_peak_bytes())}"
    row["peak_memory"] = peak_mem or rss_peak_bytes()
    f = lambda x, spec: "-" if x is None else format(x, spec)
    xla = f(bench.xla_flops and bench.xla_flops / 1e9, ".4g")
    if bench.variant.scan and bench.xla_flops:
      xla += " (scan body once)"
    print(f"| {name} | {bench.lower_seconds:.1f} | {bench.compile_seconds:.1f} "
          f"| {f(step_s, '.3f')} | {f(ex_s, '.2f' if ex_s and ex_s < 100 else ',.0f')} | {flops['train_per_step'] / 1e9:.4g} "
          f"| {xla} | {f(peak and peak / 1e9, '.0f')} | {f(mfu, '.1%')} | {f(mfu_rounds, '.1%')} "
          f"| {mem.get('argument', 0) / 2 ** 30:.2f} | {mem.get('temp', 0) / 2 ** 30:.2f} "
          f"| {peak_note} | {f(row.get('page_faults_per_step'), ',.0f')} |")
    if args.json:
      with open(args.json, "a") as out:
        out.write(json.dumps(row) + "\n")
  if len(benches) > 1 and results:
    base = results[benches[0].variant.name]
    for bench in benches[1:]:
      ratios = [a / b for a, b in zip(base, results[bench.variant.name])]
      print(f"speed-up of {bench.variant.name} over {benches[0].variant.name or 'default'}: "
            f"median {statistics.median(ratios):.3f} (per round: "
            f"{', '.join(f'{r:.2f}' for r in ratios)})")
  if args.op_profile and not args.compile_only:
    rows = op_profile(benches[0], args.op_profile)
    total = sum(t for _, t, _ in rows)
    print(f"\nXLA ops of {benches[0].variant.name or 'default'}, {total:.1f} ms a step over the "
          f"device's threads ({args.op_profile} traced steps):")
    for kind, t, n in rows[:15]:
      print(f"  {t:8.1f} ms {t / total:6.1%} {n:5d} ops  {kind}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
