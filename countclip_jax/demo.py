r"""`make demo`: the method working before your eyes, on a CPU, with nothing downloaded.

  python -m countclip_jax.demo [--workdir=runs/demo] [--fresh]

Three ordinary runs of `countclip_jax.main` on the synthetic counting world (configs/demo.py),
chained through a Hugging Face export, as a user would chain them:

  A  pretrain a tiny CLIP from scratch on captions without number words (it learns colours and
     shapes, not counting); export it as a Hugging Face directory, A/hf.
  B  fine-tune A with L_clip + λ L_count on half counting, half general captions.
  C  the control: B with λ = 0 (same data, same steps).

Then it tabulates held-out counting accuracy, mean absolute count error and colour/shape
zero-shot accuracy of A, B and C, writes WORKDIR/report.md (table, confusion matrices, training
curves) and WORKDIR/report.json, and exports B to WORKDIR/B/hf.

A is cached: a finished WORKDIR/A whose config matches is reused (pass --fresh to retrain it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import flags, logging

from configs import demo as demo_config
from countclip_jax import cli, export
from countclip_jax.metric_writer import read_metrics

FLAGS = flags.FLAGS
CONFIG_FILE = demo_config.__file__
STAGES = {"A": "pretrain", "B": "count", "C": "control"}
DESCRIPTIONS = {"A": "pretrained, no number words", "B": "fine-tuned with the counting loss",
                "C": "control: same fine-tune, λ = 0"}
# --smoke: a few steps of everything, for the tests (the numbers mean nothing).
SMOKE = ("--config.train.steps=3", "--config.train.batch_size=16", "--config.eval.size=45",
         "--config.eval.batch_size=45", "--config.checkpoint.every_steps=2",
         "--config.train.log_every=1", "--config.train.warmup_steps=1")


def run_stage(name: str, workdir: str, extra: list[str]) -> float:
  """Runs one stage as its own `python -m countclip_jax.main` process; returns seconds."""
  command = [sys.executable, "-m", "countclip_jax.main",
             f"--config={CONFIG_FILE}:{STAGES[name]}", f"--workdir={workdir}", *extra,
             "--verbosity=-1"]  # warnings and the progress bar only
  print(f"\n[{name}] {DESCRIPTIONS[name]}\n$ {' '.join(command[1:])}", flush=True)
  # glibc then backs XLA:CPU's per-step temp buffer with huge pages instead of ~230k page faults
  # a step: x1.1-1.3 on the demo's step (docs/PERFORMANCE.md). Read at process start, hence here;
  # a glibc without the tunable ignores it. transformers would advise that PyTorch is missing:
  # only its tokenizer is used.
  env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
         **os.environ}
  start = time.perf_counter()
  subprocess.run(command, check=True, env=env)
  return time.perf_counter() - start


def final_eval(workdir: str) -> dict:
  """The stage's held-out synthetic eval at its last step."""
  steps = [r["step"] for r in read_metrics(workdir)]
  with open(os.path.join(workdir, "eval", f"synthetic_step{max(steps)}.json")) as f:
    return json.load(f)


def summary(result: dict) -> dict:
  return {"count_accuracy": result["counting"]["accuracy"],
          "count_mae": result["counting"]["mae"],
          "color_accuracy": result["color_accuracy"],
          "shape_accuracy": result["shape_accuracy"]}


def plot_curves(workdirs: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for name, workdir in workdirs.items():
    rows = [r for r in read_metrics(workdir) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["train/clip_loss"] for r in rows], label=f"{name}")
    if name != "A":
      axes[1].plot(steps, [r["train/count_loss"] for r in rows], label=name)
      axes[2].plot(steps, [r["train/count_accuracy"] for r in rows], label=name)
  for ax, title in zip(axes, ["CLIP loss", "counting loss (measured in C)",
                              "in-batch count accuracy (true caption beats all 8)"]):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(root: str, workdirs: dict, results: dict, seconds: dict) -> str:
  table = ["| stage | counting accuracy | count MAE | colour zero-shot | shape zero-shot | time |",
           "|---|---|---|---|---|---|"]
  for name, r in results.items():
    table.append(f"| {name}: {DESCRIPTIONS[name]} | {r['count_accuracy']:.1%} | "
                 f"{r['count_mae']:.2f} | {r['color_accuracy']:.1%} | "
                 f"{r['shape_accuracy']:.1%} | {seconds.get(name, 0):.0f} s |")
  lines = ["# countclip-jax demo", "",
           "Held-out synthetic images (100 per number two..ten; chance is 11.1%). Counting: the "
           "image's caption rewritten with each number, argmax of similarity (the CountBench "
           "protocol). Made by `make demo` (`python -m countclip_jax.demo`).", "",
           *table, "",
           "A that was reused from the cache shows no time." if "A" not in seconds else "", "",
           "## Confusion matrices (rows: true number)", ""]
  for name, workdir in workdirs.items():
    steps = max(r["step"] for r in read_metrics(workdir))
    lines.append(f"![{name}]({os.path.relpath(workdir, root)}/eval/"
                 f"synthetic_step{steps}_confusion.png)")
  lines += ["", "## Training curves", "", "![curves](curves.png)", ""]
  with open(os.path.join(root, "report.md"), "w") as f:
    f.write("\n".join(lines))
  return "\n".join(table)


def stage_a_key(extra: list[str]) -> dict:
  """What A's result depends on: its preset's fields (not the file's name, so an edited preset
  retrains A) and the command-line overrides."""
  config = demo_config.get_config(STAGES["A"])
  return {"config": json.loads(config.to_json_best_effort(sort_keys=True)), "args": extra}


def cached(workdir: str, extra: list[str]) -> bool:
  """Whether A finished before with the same config (and was exported)."""
  marker = os.path.join(workdir, "demo_stage.json")
  if not os.path.exists(marker) or not os.path.exists(
      os.path.join(workdir, "hf", "model.safetensors")):
    return False
  with open(marker) as f:
    return json.load(f) == stage_a_key(extra)


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # the exports' checkpoint restores would log at INFO
    logging.set_verbosity(logging.WARNING)
  root = FLAGS.workdir
  os.makedirs(root, exist_ok=True)
  extra = list(SMOKE) if FLAGS.smoke else []
  workdirs = {name: os.path.join(root, name) for name in STAGES}
  seconds = {}
  start = time.perf_counter()

  # ---- A: pretrain (cached), then export as a Hugging Face directory for B and C to start from.
  if not FLAGS.fresh and cached(workdirs["A"], extra):
    print(f"[A] reusing {workdirs['A']} (cached; pass --fresh to retrain)")
  else:
    shutil.rmtree(workdirs["A"], ignore_errors=True)
    seconds["A"] = run_stage("A", workdirs["A"], extra)
    export.export(workdirs["A"], os.path.join(workdirs["A"], "hf"))
    with open(os.path.join(workdirs["A"], "demo_stage.json"), "w") as f:
      json.dump(stage_a_key(extra), f)

  # ---- B and C: two fine-tunes from the same start, with and without the counting loss.
  for name in ("B", "C"):
    shutil.rmtree(workdirs[name], ignore_errors=True)
    seconds[name] = run_stage(
        name, workdirs[name], [*extra, f"--config.model.init={workdirs['A']}/hf"])

  # ---- Report.
  results = {name: summary(final_eval(workdir)) for name, workdir in workdirs.items()}
  with open(os.path.join(root, "report.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot_curves(workdirs, os.path.join(root, "curves.png"))
  table = write_report(root, workdirs, results, seconds)
  export.export(workdirs["B"], os.path.join(workdirs["B"], "hf"))
  print("\n" + table)
  print(f"\nStages took {sum(seconds.values()) / 60:.1f} min ({time.perf_counter() - start:.0f} s "
        f"with the report). Report: {root}/report.md; B as a Hugging Face model: "
        f"{workdirs['B']}/hf")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", "runs/demo", "Where the three runs and the report go.")
  flags.DEFINE_bool("fresh", False, "Retrain stage A even if a finished one is cached.")
  flags.DEFINE_bool("smoke", False, "A few steps of each stage (for tests; numbers mean nothing).")
  cli.run(main)
