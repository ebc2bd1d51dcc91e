r"""The accelerator sweep that benchmarks/accelerator.sh runs: train steps of B/32 and L/14
(bf16 compute, fp32 params, counting loss on) and of the CLIP-Count density model, each at
per-device batch sizes that double until one does not fit or the time budget is spent.

  bash benchmarks/accelerator.sh            # a GPU/TPU host: ~8 min, writes benchmarks/results/
  bash benchmarks/accelerator.sh --smoke    # this CPU: tiny sizes, proves the script end to end

Per case: compile time, step time (median of timed windows), examples/s, MFU against the
device's datasheet bf16 peak and against a matmul probe measured in the same run, the compiled
step's memory (memory_analysis) and the device's peak bytes in use so far. FLOPs: counted from
the architecture for CLIP (train_step.model_flops), XLA's cost analysis for the density model
(its convolutions and frozen backbone have no hand count here). One JSON and one markdown
table go to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from etils import epath

import train_step as ts
from countclip_jax import tasks, trainer
# pylint: enable=g-import-not-at-top,wrong-import-position

# Dense bf16 FLOP/s from the datasheets (no sparsity), by jax's device_kind.
DATASHEET_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
}
NEMO_B32_PER_H100 = 2630  # examples/s, NeMo's CLIP B/32 (docs/PERFORMANCE.md)

# (case, per-device batch sizes tried in order). The density case is CLIP-Count's step.
FULL = [("b32", [64, 128, 256, 512, 1024]), ("l14", [16, 32, 64, 128, 256]),
        ("density", [8, 16, 32, 64])]
SMOKE = [("tiny", [4, 8]), ("density_tiny", [4])]


def build_clip(arch: str, batch: int, smoke: bool):
  dtype = "float32" if smoke else "bfloat16"  # CPUs have no fast bf16
  remat = "full" if arch == "l14" else "none"  # configs/l14.py rematerialises each layer
  args = argparse.Namespace(arch=arch, batch_size=batch, fraction=0.5, num_counterfactuals=1,
                            text_length=None, fsdp=False)  # the paper's p and K
  bench = ts.build(args, ts.Variant(name=arch, dtype=dtype, remat=remat))
  flops = ts.model_flops(bench.model.config, ts.text_length(args), batch, args.fraction,
                         args.num_counterfactuals)["train_per_step"]
  return bench, flops, "counted"


def build_density(batch: int, smoke: bool):
  """configs/density.py's fsc147 recipe (ViT-B/16 frozen, 384 px, CLIP-Count's head) on the
  synthetic world rendered at 384 px, one prompt per image as on FSC-147; a random backbone (no
  download; the same shapes)."""
  from configs import density  # pylint: disable=g-import-not-at-top
  c = density.get_config("tiny" if smoke else "fsc147")
  c.model.init = ""
  c.density.source = "synthetic"
  c.density.other_prompts = 0 if not smoke else -1
  if not smoke:
    c.density.synthetic.image_size = c.density.crop_size
  c.train.batch_size = batch
  c.mesh.data, c.mesh.fsdp, c.mesh.model = -1, 1, 1
  trainer.validate(c)
  task = tasks.get("density")
  tokenizer, _ = trainer.load_tokenizer(c, epath.Path(tempfile.mkdtemp()))  # the world's
  model, _ = task.build_model(c, tokenizer)
  example = next(task.train_iterator(c, tokenizer, model, start=0))
  bench = ts.build_step(task, model, c, example, ts.Variant(name="density", dtype=c.model.dtype))
  return bench, bench.xla_flops, "XLA"


def run_case(name: str, per_device: int, smoke: bool, repeats: int, window: float) -> dict:
  batch = per_device * jax.device_count()
  start = time.perf_counter()
  if name.startswith("density"):
    bench, flops, flops_source = build_density(batch, smoke)
  else:
    bench, flops, flops_source = build_clip(name, batch, smoke)
  bench.run(2)  # warm-up: the first steps allocate
  steps = ts.steps_per_window(bench, window)
  times = [ts.timed(lambda: bench.run(steps), steps)() for _ in range(repeats)]
  step_s = statistics.median(times)
  mem = bench.memory
  row = {"case": name, "per_device_batch": per_device, "batch": batch,
         "dtype": bench.config.model.dtype, "remat": bench.variant.remat,
         "lower_s": bench.lower_seconds, "compile_s": bench.compile_seconds,
         "step_s": step_s, "step_times": times, "examples_per_s": batch / step_s,
         "examples_per_s_per_device": batch / step_s / jax.device_count(),
         "flops_per_step": flops, "flops_source": flops_source,
         "xla_flops_per_step": bench.xla_flops,
         "compiled_bytes": mem.get("argument", 0) + mem.get("output", 0) - mem.get("alias", 0)
         + mem.get("temp", 0), "memory": mem, "peak_bytes_in_use": ts.device_peak_memory(),
         "case_seconds": time.perf_counter() - start}
  del bench
  return row


def is_out_of_memory(error: BaseException) -> bool:
  text = f"{type(error).__name__} {error}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def sweep(cases, smoke: bool, budget: float, repeats: int, window: float) -> list[dict]:
  rows, deadline = [], time.perf_counter() + budget
  for name, sizes in cases:
    last = 0.0
    for per_device in sizes:
      left = deadline - time.perf_counter()
      if left < 2 * last:  # the next size takes longer than this one did
        rows.append({"case": name, "per_device_batch": per_device, "status": "skipped: time"})
        print(f"# {name} @ {per_device}/device: skipped ({left:.0f} s left)", flush=True)
        continue
      try:
        row = run_case(name, per_device, smoke, repeats, window)
      except Exception as e:  # pylint: disable=broad-except
        status = "out of memory" if is_out_of_memory(e) else f"error: {type(e).__name__}: {e}"
        rows.append({"case": name, "per_device_batch": per_device, "status": status[:500]})
        print(f"# {name} @ {per_device}/device: {status[:200]}", flush=True)
        if not is_out_of_memory(e):
          traceback.print_exc()
        break  # a larger batch will not fit either
      finally:
        jax.clear_caches()
        gc.collect()
      row["status"] = "ok"
      last = row["case_seconds"]
      rows.append(row)
      print(f"# {name} @ {per_device}/device: {row['step_s'] * 1e3:.1f} ms/step, "
            f"{row['examples_per_s']:,.1f} ex/s, compile {row['compile_s']:.1f} s", flush=True)
  return rows


def environment(probe_flops: float) -> dict:
  device = jax.devices()[0]
  return {"device_kind": device.device_kind, "platform": device.platform,
          "devices": jax.device_count(), "jax": jax.__version__,
          "python": platform.python_version(), "host": platform.node(),
          "cpu": ts.cpu_model(), "cpus": os.cpu_count(),
          "datasheet_bf16_peak": DATASHEET_PEAKS.get(device.device_kind),
          "probe_peak": probe_flops, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def markdown(env: dict, rows: list[dict]) -> str:
  sheet, probe, n = env["datasheet_bf16_peak"], env["probe_peak"], env["devices"]
  peaks = (f"datasheet {sheet / 1e12:.0f} TFLOP/s" if sheet else "datasheet unknown")
  lines = [f"{n} x {env['device_kind']} ({env['platform']}), jax {env['jax']}, {env['utc']}; "
           f"bf16 peak per device: {peaks}, matmul probe {probe / 1e12:.1f} TFLOP/s; host CPU "
           f"{env['cpu']}.", "",
           "| case | batch/device | step ms | ex/s/device | MFU (datasheet) | MFU (probe) "
           "| FLOPs | compile s | compiled GiB | peak GiB | vs NeMo B/32 per H100 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["status"] != "ok":
      lines.append(f"| {r['case']} | {r['per_device_batch']} | {r['status']} |" + " |" * 8)
      continue
    rate = r["flops_per_step"] / r["step_s"] / n if r["flops_per_step"] else None
    pct = lambda peak: f"{rate / peak:.1%}" if rate and peak else "-"
    nemo = (f"{r['examples_per_s_per_device'] / NEMO_B32_PER_H100:.2f}x"
            if r["case"] == "b32" else "")
    peak_mem = r["peak_bytes_in_use"]
    lines.append(
        f"| {r['case']} | {r['per_device_batch']} | {r['step_s'] * 1e3:.1f} "
        f"| {r['examples_per_s_per_device']:,.1f} | {pct(sheet)} | {pct(probe)} "
        f"| {r['flops_source']} | {r['compile_s']:.1f} | {r['compiled_bytes'] / 2 ** 30:.2f} "
        f"| {'-' if peak_mem is None else f'{peak_mem / 2 ** 30:.2f}'} | {nemo} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (this CPU)")
  parser.add_argument("--out", required=True, help="directory for results.json and results.md")
  parser.add_argument("--budget_s", type=float, default=400,
                      help="seconds for the sweep (the shell script's hard limit is above it)")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows per case")
  parser.add_argument("--window_s", type=float, default=1.0, help="minimum window length")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  smoke = args.smoke
  size, dtype = (256, jnp.float32) if smoke else (8192, jnp.bfloat16)
  probe = ts.matmul_probe(size, dtype)
  probe_flops = max(probe() for _ in range(3))
  env = environment(probe_flops)
  print(f"# {env['devices']} x {env['device_kind']}; probe {probe_flops / 1e12:.2f} TFLOP/s",
        flush=True)
  rows = sweep(SMOKE if smoke else FULL, smoke, args.budget_s, args.repeats, args.window_s)
  env["probe_peak_after"] = max(probe() for _ in range(3))
  env["probe_peak"] = max(env["probe_peak"], env["probe_peak_after"])
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"environment": env, "cases": rows}, f, indent=1)
  table = markdown(env, rows)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table)
  print(table)
  return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
