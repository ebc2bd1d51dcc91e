r"""`make demo`: the method working before your eyes, on a CPU, with nothing downloaded.

  python -m countclip_jax.demo [--workdir=runs/demo] [--fresh]

Four ordinary runs of `countclip_jax.main` on the synthetic worlds (configs/demo.py,
configs/density.py), chained through Hugging Face exports, as a user would chain them:

  A  pretrain a tiny CLIP from scratch on captions without number words (it learns colours and
     shapes, not counting); export it as a Hugging Face directory, A/hf.
  B  fine-tune A with L_clip + λ L_count on half counting, half general captions; export, B/hf.
  C  the control: B with λ = 0 (same data, same steps).
  D  density counting (CLIP-Count's head) on B's frozen backbone, on dense scenes of up to 50
     objects of the prompted kind among other kinds.

Then it tabulates held-out counting accuracy, mean absolute count error and colour/shape
zero-shot accuracy of A, B and C, and D's count errors (all, prompted kind the majority or the
minority of its image, a prompt naming an absent kind), writes WORKDIR/report.md (tables,
confusion matrices, density maps, training curves) and WORKDIR/report.json.

--ablations then trains D again six ways, each changing one thing (backbone A instead of B;
CLIP-Count's end-of-text pooling; its one-key cross-attention; no prompt-contrast loss;
one-word prompts, and those with CLIP-Count's pooling), and adds their table to the report.

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
from configs import density as density_config
from countclip_jax import cli, export
from countclip_jax.metric_writer import read_metrics

FLAGS = flags.FLAGS
# Each stage: (config file, its argument).
STAGES = {"A": (demo_config.__file__, "pretrain"), "B": (demo_config.__file__, "count"),
          "C": (demo_config.__file__, "control"), "D": (density_config.__file__, "demo")}
DESCRIPTIONS = {"A": "pretrained, no number words", "B": "fine-tuned with the counting loss",
                "C": "control: same fine-tune, λ = 0",
                "D": "density counting on B's frozen backbone"}
# --ablations: D with one thing changed; (description, the backbone's stage, overrides).
ABLATIONS = {
    "D_backbone_A": ("backbone A (no counting loss) instead of B", "A", []),
    "D_clip_count_pooling": ("CLIP-Count's pooling (argmax of the ids: two tokens early)", "B",
                             ["--config.density.pooling=clip_count"]),
    "D_pooled_cross_attention": ("CLIP-Count's cross-attention (one key, the pooled prompt)",
                                 "B", ["--config.density.cross_attention=pooled"]),
    "D_no_prompt_contrast": ("no prompt-contrast loss", "B",
                             ["--config.density.prompt_contrast_weight=0"]),
    # One-word prompts ("red"; a scene's kinds then differ in colour), where CLIP-Count's rule
    # pools a learned context token: the same text for every kind. A pair, the second changing
    # one field of the first.
    "D_color_names": ("one-word prompts, the colour (`density.synthetic.names=color`)", "B",
                      ["--config.density.synthetic.names=color"]),
    "D_color_names_clip_count_pooling": (
        "one-word prompts with CLIP-Count's pooling", "B",
        ["--config.density.synthetic.names=color", "--config.density.pooling=clip_count"]),
}
# --smoke: a few steps of everything, for the tests (the numbers mean nothing).
SMOKE = ("--config.train.steps=3", "--config.train.batch_size=16", "--config.eval.size=45",
         "--config.eval.batch_size=45", "--config.checkpoint.every_steps=2",
         "--config.train.log_every=1", "--config.train.warmup_steps=1",
         "--config.density.eval_size=16")
D_REPORT = {"mae": ("mae",), "rmse": ("rmse",), "mean_count": ("mean_count",),
            "majority_mae": ("majority", "mae"), "minority_mae": ("minority", "mae"),
            "absent_mean": ("absent_mean",),
            "absent_mean_color_present": ("absent_mean_color_present",),
            "absent_mean_color_absent": ("absent_mean_color_absent",)}


def run_stage(name: str, workdir: str, extra: list[str]) -> float:
  """Runs one stage as its own `python -m countclip_jax.main` process; returns seconds."""
  config_file, arg = STAGES[name[0]]
  command = [sys.executable, "-m", "countclip_jax.main", f"--config={config_file}:{arg}",
             f"--workdir={workdir}", *extra, "--verbosity=-1"]  # warnings and the progress bar
  print(f"\n[{name}] {DESCRIPTIONS.get(name) or ABLATIONS[name][0]}\n"
        f"$ {' '.join(command[1:])}", flush=True)
  # glibc then backs XLA:CPU's per-step temp buffer with huge pages instead of ~230k page faults
  # a step: x1.1-1.3 on the demo's step (docs/PERFORMANCE.md). Read at process start, hence here;
  # a glibc without the tunable ignores it. transformers would advise that PyTorch is missing:
  # only its tokenizer is used.
  env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
         **os.environ}
  start = time.perf_counter()
  subprocess.run(command, check=True, env=env)
  return time.perf_counter() - start


def final_eval(workdir: str, dataset: str = "synthetic") -> dict:
  """The stage's held-out eval at its last step (`dataset`: synthetic, or density for D)."""
  with open(os.path.join(workdir, "eval", f"{dataset}_step{last_step(workdir)}.json")) as f:
    return json.load(f)


def summary(result: dict) -> dict:
  return {"count_accuracy": result["counting"]["accuracy"],
          "count_mae": result["counting"]["mae"],
          "color_accuracy": result["color_accuracy"],
          "shape_accuracy": result["shape_accuracy"]}


def density_summary(result: dict) -> dict:
  """D's numbers in report.json: counts in objects over the held-out dense scenes."""
  out = {}
  for key, path in D_REPORT.items():
    value = result
    for part in path:
      value = value[part]
    out[key] = value
  return out


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


def density_table(results: dict, seconds: dict, label) -> list[str]:
  table = ["| run | MAE | RMSE | mean true count | MAE, prompted kind the majority | "
           "MAE, prompted kind the minority | mean count for an absent kind (its colour in the "
           "image / not) | time |",
           "|---|---|---|---|---|---|---|---|"]
  fmt = lambda v: "-" if v is None else f"{v:.2f}"
  for name, r in results.items():
    table.append(f"| {label(name)} | {fmt(r['mae'])} | {fmt(r['rmse'])} | "
                 f"{fmt(r['mean_count'])} | {fmt(r['majority_mae'])} | "
                 f"{fmt(r['minority_mae'])} | {fmt(r['absent_mean'])} "
                 f"({fmt(r.get('absent_mean_color_present'))} / "
                 f"{fmt(r.get('absent_mean_color_absent'))}) | {seconds.get(name, 0):.0f} s |")
  return table


def last_step(workdir: str) -> int:
  return max(r["step"] for r in read_metrics(workdir))


def write_report(root: str, workdirs: dict, results: dict, seconds: dict, ablations: dict,
                 scenes: int) -> str:
  """WORKDIR/report.md; returns the tables for the terminal."""
  table = ["| stage | counting accuracy | count MAE | colour zero-shot | shape zero-shot | time |",
           "|---|---|---|---|---|---|"]
  for name in "ABC":
    r = results[name]
    table.append(f"| {name}: {DESCRIPTIONS[name]} | {r['count_accuracy']:.1%} | "
                 f"{r['count_mae']:.2f} | {r['color_accuracy']:.1%} | "
                 f"{r['shape_accuracy']:.1%} | {seconds.get(name, 0):.0f} s |")
  d_table = density_table({"D": results["D"]}, seconds, lambda n: f"D: {DESCRIPTIONS[n]}")
  relative = lambda path: os.path.relpath(path, root)
  lines = ["# countclip-jax demo", "",
           "Held-out synthetic images (100 per number two..ten; chance is 11.1%). Counting: the "
           "image's caption rewritten with each number, argmax of similarity (the CountBench "
           "protocol). Made by `make demo` (`python -m countclip_jax.demo`).", "",
           *table, "",
           "A that was reused from the cache shows no time." if "A" not in seconds else "", "",
           "## D: density counting", "",
           f"{scenes} held-out dense scenes (1-50 objects of the prompted kind, up to "
           "three kinds); count = the map's sum / 60, errors in objects. The minority column "
           "asks for a kind outnumbered by another in its image; the last one asks each image "
           "for a kind it does not hold (0 is right), split by whether a kind of its colour is "
           "in the image (then only the shape of 4-8 px objects tells them apart).", "",
           *d_table, ""]
  if ablations:
    lines += ["### Ablations: D with one thing changed", "",
              *density_table({"D": results["D"], **ablations}, seconds,
                             lambda n: DESCRIPTIONS["D"] if n == "D" else ABLATIONS[n][0]), ""]
  lines += ["Image, target and predicted map (titles: prompt: true / predicted count):", "",
            f"![D]({relative(workdirs['D'])}/eval/density_step{last_step(workdirs['D'])}.png)",
            "", "## Confusion matrices (rows: true number)", ""]
  for name in "ABC":
    lines.append(f"![{name}]({relative(workdirs[name])}/eval/"
                 f"synthetic_step{last_step(workdirs[name])}_confusion.png)")
  lines += ["", "## Training curves", "", "![curves](curves.png)", ""]
  with open(os.path.join(root, "report.md"), "w") as f:
    f.write("\n".join(lines))
  return "\n".join(table + [""] + d_table)


def stage_a_key(extra: list[str]) -> dict:
  """What A's result depends on: its preset's fields (not the file's name, so an edited preset
  retrains A; the density task's fields are D's business) and the command-line overrides."""
  config = json.loads(demo_config.get_config(STAGES["A"][1]).to_json_best_effort(sort_keys=True))
  del config["density"]
  return {"config": config, "args": extra}


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
  hf_dir = lambda name: os.path.join(workdirs[name], "hf")
  seconds = {}
  start = time.perf_counter()

  # ---- A: pretrain (cached), then export as a Hugging Face directory for B and C to start from.
  if not FLAGS.fresh and cached(workdirs["A"], extra):
    print(f"[A] reusing {workdirs['A']} (cached; pass --fresh to retrain)")
  else:
    shutil.rmtree(workdirs["A"], ignore_errors=True)
    seconds["A"] = run_stage("A", workdirs["A"], extra)
    export.export(workdirs["A"], hf_dir("A"))
    with open(os.path.join(workdirs["A"], "demo_stage.json"), "w") as f:
      json.dump(stage_a_key(extra), f)

  # ---- B and C: two fine-tunes from the same start, with and without the counting loss.
  for name in ("B", "C"):
    shutil.rmtree(workdirs[name], ignore_errors=True)
    seconds[name] = run_stage(name, workdirs[name], [*extra, f"--config.model.init={hf_dir('A')}"])
  export.export(workdirs["B"], hf_dir("B"))

  # ---- D: the density head on B's export, frozen; then the ablations, each changing one thing.
  shutil.rmtree(workdirs["D"], ignore_errors=True)
  seconds["D"] = run_stage("D", workdirs["D"], [*extra, f"--config.model.init={hf_dir('B')}"])
  ablations = {}
  for name, (_, backbone, overrides) in (ABLATIONS.items() if FLAGS.ablations else ()):
    workdirs[name] = os.path.join(root, "ablations", name)
    shutil.rmtree(workdirs[name], ignore_errors=True)
    seconds[name] = run_stage(name, workdirs[name], [
        *extra, f"--config.model.init={hf_dir(backbone)}", *overrides])
    ablations[name] = density_summary(final_eval(workdirs[name], "density"))

  # ---- Report.
  results = {name: summary(final_eval(workdirs[name])) for name in "ABC"}
  density = final_eval(workdirs["D"], "density")
  results["D"] = density_summary(density)
  with open(os.path.join(root, "report.json"), "w") as f:
    json.dump({**results, **({"ablations": ablations} if ablations else {})}, f, indent=1)
  plot_curves({name: workdirs[name] for name in "ABC"}, os.path.join(root, "curves.png"))
  tables = write_report(root, workdirs, results, seconds, ablations, density["n"])
  print("\n" + tables)
  abc = sum(seconds.get(name, 0) for name in "ABC")
  print(f"\nStages A+B+C took {abc / 60:.1f} min{'' if 'A' in seconds else ' (A cached)'}, "
        f"D {seconds['D'] / 60:.1f} min ({time.perf_counter() - start:.0f} s in all, with the "
        f"report{' and the ablations' if ablations else ''}). Report: {root}/report.md; B as a "
        f"Hugging Face model: {hf_dir('B')}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", "runs/demo", "Where the runs and the report go.")
  flags.DEFINE_bool("fresh", False, "Retrain stage A even if a finished one is cached.")
  flags.DEFINE_bool("ablations", False, "Also train D six more ways, one change each "
                    "(ABLATIONS), and tabulate them.")
  flags.DEFINE_bool("smoke", False, "A few steps of each stage (for tests; numbers mean nothing).")
  cli.run(main)
