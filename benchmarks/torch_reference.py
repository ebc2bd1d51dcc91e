r"""The same train step in PyTorch (transformers' CLIPModel), and JAX vs PyTorch in one run.

  python benchmarks/torch_reference.py --arch b32 --batch_size 8                # PyTorch alone
  python benchmarks/torch_reference.py --arch b32 --batch_size 8 --mode both    # ratio, one run
  python benchmarks/torch_reference.py --arch b32 --batch_size 8 --mode both --compile \
      --adamw default fused    # + torch.compile (inductor) of each, all interleaved

The PyTorch step does what trainer.make_train_step does, with transformers' `CLIPModel`
(random init from a `CLIPConfig` made by models.hf.config_to_hf from the same architecture: no
download), on the same synthetic batch (benchmarks/train_step.host_batch, pixels NCHW):
  - one text-encoder pass over the true captions and the K counterfactuals of the counting
    examples, images in one pass (the natural single-device form);
  - L = L_clip (symmetric InfoNCE with the learned scale) + λ L_count (K counterfactuals, raw
    cosine: count.scale = 1, λ = 1), written as losses.py writes them;
  - global-norm clipping at 1.0, AdamW (b1 0.9, b2 0.98, eps 1e-6, weight decay 0.2 on Linear
    and Conv weights only, as trainer.decays), the update skipped when the loss or the gradient
    norm is not finite, logit scale clamped to ln 100.
`--adamw` picks torch's AdamW implementation (default: the for-loop one torch uses on CPU;
foreach; fused). Torch runs with --threads intra-op threads (2 here: torch.set_num_threads).

`--mode both` builds the JAX step too (benchmarks/train_step.build, default variant or
--jax_variant) and times them interleaved: each round runs a JAX window, a PyTorch window and
a 2048² matmul in jnp and in torch; medians of the per-round times and of the per-round
ratios are reported, and each side's MFU against the jnp matmul peak of the same round (the
device's peak; torch's own 2048² matmul is printed too).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# OpenMP's default spin-waiting makes torch pathologically slow when the cores are shared (a
# tiny model's step went from 0.03 s to 3.6 s here under load): threads sleep instead. Must be
# set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import torch
import transformers

from benchmarks import train_step as jax_bench
from countclip_jax import models, trainer
from countclip_jax.models import hf
# pylint: enable=g-import-not-at-top,wrong-import-position

MAX_LOGIT_SCALE = math.log(100.0)


def _normalize(x):
  return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class TorchStep:
  """One training step of L_clip + λ L_count with transformers' CLIPModel and AdamW."""

  def __init__(self, arch: str, batch: dict, adamw: str = "default", lam: float = 1.0,
               count_scale: float | None = 1.0, lr: float = 1e-5, seed: int = 0,
               compile: bool = False):  # pylint: disable=redefined-builtin
    tokenizer = jax_bench.tokenizer_for(arch)
    config = models.ARCHITECTURES[arch]
    config = type(config)(text=type(config.text)(**{
        **config.text.__dict__, "vocab_size": tokenizer.vocab_size,
        "eos_token_id": tokenizer.eos_token_id, "context_length": tokenizer.context_length}),
        vision=config.vision, projection_dim=config.projection_dim,
        logit_scale_init=config.logit_scale_init)
    torch.manual_seed(seed)
    hf_config = hf.config_to_hf(config)
    hf_config.text_config.bos_token_id = tokenizer.bos_token_id
    self.model = transformers.CLIPModel._from_config(  # pylint: disable=protected-access
        hf_config, attn_implementation="sdpa").train()
    self.attn_implementation = self.model.config._attn_implementation  # pylint: disable=protected-access
    self.lam, self.count_scale = lam, count_scale
    decay, no_decay = [], []
    for module in self.model.modules():
      for name, p in module.named_parameters(recurse=False):
        is_kernel = isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name == "weight"
        (decay if is_kernel else no_decay).append(p)
    kw = {"foreach": True} if adamw == "foreach" else {"fused": True} if adamw == "fused" else {}
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6, **kw)
    self.params = decay + no_decay
    c, g = batch["count"], batch["general"]
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    self.images = torch.cat([nchw(c["image"]), nchw(g["image"])])
    self.num_count, self.k, length = c["cf_text"].shape
    self.texts = torch.from_numpy(np.concatenate(
        [c["text"], g["text"], c["cf_text"].reshape(-1, length)]).astype(np.int64))
    self.batch_size = self.images.shape[0]
    self.skipped = 0
    # torch.compile (inductor) as a PyTorch user would apply it to this loop: the loss (forward,
    # and through AOTAutograd its backward) and the optimizer update, each one compiled graph.
    self._loss, self._update = self.loss, self.update
    if compile:
      self._loss, self._update = torch.compile(self.loss), torch.compile(self.update)

  def loss(self):
    m = self.model
    all_texts = _normalize(m.text_projection(m.text_model(input_ids=self.texts).pooler_output))
    texts, cf = all_texts[:self.batch_size], all_texts[self.batch_size:]
    images = _normalize(m.visual_projection(m.vision_model(pixel_values=self.images)
                                            .pooler_output))
    scale = m.logit_scale.exp()
    logits = scale * images @ texts.T
    positives = scale * (images * texts).sum(-1)
    clip = ((torch.logsumexp(logits, 1) - positives).mean()
            + (torch.logsumexp(logits, 0) - positives).mean()) / 2
    n = self.num_count
    if not n:
      return clip
    s = scale if self.count_scale is None else self.count_scale
    pos = s * (images[:n] * texts[:n]).sum(-1)
    neg = s * torch.einsum("bd,bkd->bk", images[:n], cf.reshape(n, self.k, -1))
    count = (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()
    return clip + self.lam * count

  def update(self):
    self.optimizer.step()
    with torch.no_grad():
      self.model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)

  def step(self) -> float:
    self.optimizer.zero_grad(set_to_none=True)
    loss = self._loss()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
      self._update()
    else:
      self.skipped += 1
    return float(loss.detach())

  def run(self, steps: int):
    for _ in range(steps):
      self.step()


def torch_matmul_probe(size: int):
  a, b = torch.randn(size, size), torch.randn(size, size)
  a @ b

  def probe(repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      a @ b
      times.append(time.perf_counter() - start)
    return 2 * size ** 3 / min(times)
  return probe


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--arch", default="b32", choices=sorted(models.ARCHITECTURES))
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--fraction", type=float, default=0.5, help="p: counting share")
  parser.add_argument("--num_counterfactuals", type=int, default=1, help="K")
  parser.add_argument("--text_length", type=int, default=None,
                      help="tokens per caption (default: the tokenizer's context length)")
  parser.add_argument("--mode", choices=("torch", "both"), default="torch")
  parser.add_argument("--adamw", nargs="+", default=["default"],
                      choices=("default", "foreach", "fused"),
                      help="torch AdamW implementation(s); several are interleaved")
  parser.add_argument("--compile", action="store_true",
                      help="also torch.compile (inductor) each AdamW contender, interleaved")
  parser.add_argument("--jax_variant", default="", help="train_step.py variant spec for JAX")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
  parser.add_argument("--peak_size", type=int, default=2048)
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  transformers.logging.set_verbosity_error()

  print(f"# CPU: {jax_bench.cpu_model()}", flush=True)
  print(f"# {jax_bench.describe(args)}; torch {torch.__version__} ({args.threads} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), transformers {transformers.__version__}; {jax_bench.load_note()}", flush=True)
  config = jax_bench.make_config(args, jax_bench.parse_variant("", jax_bench.Variant("")))
  tokenizer = jax_bench.tokenizer_for(args.arch)
  size = models.ARCHITECTURES[args.arch].vision.image_size
  batch = jax_bench.host_batch(config, tokenizer, size, length=args.text_length)
  contenders, steps = {}, {}
  for impl in args.adamw:
    for compiled in (False, True) if args.compile else (False,):
      ref = TorchStep(args.arch, batch, adamw=impl, compile=compiled)
      name = f"torch{'.compile' if compiled else ''}/{impl}"
      start = time.perf_counter()
      ref.run(1)  # torch.compile compiles here
      first = time.perf_counter() - start
      ref.run(max(args.warmup - 1, 0))
      print(f"# {name} (attention {ref.attn_implementation}): first step {first:.1f} s",
            flush=True)
      contenders[name] = jax_bench.timed(lambda ref=ref: ref.run(1), 1)
  probes = {"torch_peak": torch_matmul_probe(args.peak_size)}
  flops = jax_bench.model_flops(models.ARCHITECTURES[args.arch], jax_bench.text_length(args),
                                args.batch_size, args.fraction, args.num_counterfactuals)
  jax_name = None
  if args.mode == "both":
    variant = jax_bench.parse_variant(args.jax_variant, jax_bench.Variant(""))
    bench = jax_bench.build(args, variant)
    jax_name = f"jax/{args.jax_variant or 'default'}"
    print(f"# jax step: lower {bench.lower_seconds:.1f} s, compile {bench.compile_seconds:.1f} s",
          flush=True)
    bench.run(args.warmup)
    window = jax_bench.steps_per_window(bench, 0.5)
    contenders = {jax_name: jax_bench.timed(lambda: bench.run(window), window), **contenders}
    probes["jax_peak"] = jax_bench.matmul_probe(args.peak_size, np.float32)

  def probe():
    return {name: p() for name, p in probes.items()}
  results = jax_bench.interleave(contenders, args.repeats, probe)
  rounds = results.pop("peak")
  peaks = {name: [r[name] for r in rounds] for name in probes}

  print(f"\n{jax_bench.describe(args)}; {jax_bench.load_note()}")
  print(f"model FLOPs per step: {flops['train_per_step'] / 1e9:.4g} G")
  # MFU against the device's matmul peak: the best jnp 2048² product of the run (in --mode
  # torch, torch's); per round: that round's probe.
  peak_name = "jax_peak" if "jax_peak" in peaks else "torch_peak"
  print("matmul peak (best / median of rounds): " + ", ".join(
      f"{name[:-5]} {max(p) / 1e9:.0f} / {statistics.median(p) / 1e9:.0f} GFLOP/s"
      for name, p in peaks.items()))
  print(f"| step | s/step (median) | ex/s | GFLOP/s | MFU (vs best {peak_name[:-5]} matmul) "
        f"| MFU per round | per round s |")
  print("|---|---|---|---|---|---|---|")
  for name, times in results.items():
    t = statistics.median(times)
    mfu = flops["train_per_step"] / t / max(peaks[peak_name])
    mfu_rounds = statistics.median(flops["train_per_step"] / s / p
                                   for s, p in zip(times, peaks[peak_name]))
    print(f"| {name} | {t:.3f} | {args.batch_size / t:.2f} | "
          f"{flops['train_per_step'] / t / 1e9:.0f} | {mfu:.1%} | {mfu_rounds:.1%} | "
          f"{', '.join(f'{x:.2f}' for x in times)} |")
  if jax_name:
    for name in results:
      if name == jax_name:
        continue
      ratios = [a / b for a, b in zip(results[name], results[jax_name])]
      print(f"speed-up of {jax_name} over {name}: median {statistics.median(ratios):.3f} "
            f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
