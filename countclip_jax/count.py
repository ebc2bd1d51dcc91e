r"""Count what a prompt names in image files, with a density run of ours (task = "density").

  python -m countclip_jax.count --workdir=RUN --prompt="apples" photo1.jpg photo2.png \
      [--out=counts/] [--step=N]

Prints one line per image (count, path) and writes OUT/<name>_density.png: the image with the
predicted density over it. Images of any size: each is resized to the run's training height
and covered by CLIP-Count's sliding window (density_eval.sliding_window). An image that does
not decode is reported and skipped; the exit code is 1 if any was.
"""
from __future__ import annotations

import json
import os
import sys

import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath

from countclip_jax import cli

FLAGS = flags.FLAGS


def load_density_run(workdir: str, step: int | None = None):
  """(model, params, tokenizer, config) of a density run, from its workdir alone."""
  from countclip_jax import checkpoints, tasks  # pylint: disable=g-import-not-at-top
  from countclip_jax.tasks import density  # pylint: disable=g-import-not-at-top
  from countclip_jax.text.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  root = epath.Path(workdir)
  if not (root / density.DENSITY_CONFIG).exists():
    raise FileNotFoundError(f"{root / density.DENSITY_CONFIG} is missing: is {workdir} the "
                            "workdir of a density run (--config=configs/density.py)?")
  config = ml_collections.ConfigDict(json.loads((root / "config.json").read_text()))
  model = tasks.get("density").model_from_workdir(config, workdir)
  params = checkpoints.restore_params(workdir, step)
  tokenizer = Tokenizer.from_pretrained(os.fspath(root / "tokenizer"),
                                        config.data.context_length)
  return model, params, tokenizer, config


def count_image(model, mesh, tokenizer, config, data: bytes, prompt: str):
  """(count, density map (H, W) over the resized image, the resized uint8 image); `mesh`: an
  eval_mesh.EvalMesh of the run's params."""
  from countclip_jax import density_eval  # pylint: disable=g-import-not-at-top
  from countclip_jax.data import density_pipeline, images  # pylint: disable=g-import-not-at-top
  size = model.config.input_size
  image, _ = density_pipeline.load_image(data, np.zeros((0, 2), np.float32), size)
  ids = tokenizer([config.density.prompt_template.format(prompt)])[None]
  windows = density_eval.window_predictor(model, mesh, ids)
  full = density_eval.sliding_window(windows, images.normalize(image), size,
                                     min(config.density.eval_window_stride, size))
  return float(full.sum()) / config.density.scale, full, image


def overlay(image: np.ndarray, density: np.ndarray, title: str, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5 * image.shape[1] / image.shape[0] + 0.5, 5))
  ax.imshow(image)
  ax.imshow(density, cmap="magma", alpha=0.55)
  ax.set_title(title, fontsize=10)
  ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more image files after the flags")
  if not FLAGS.prompt.strip():
    raise app.UsageError("--prompt is empty: name what to count, e.g. --prompt=apples")
  model, params, tokenizer, config = load_density_run(FLAGS.workdir, FLAGS.step)
  from countclip_jax import density_eval, eval_mesh  # pylint: disable=g-import-not-at-top
  from countclip_jax.data import images  # pylint: disable=g-import-not-at-top
  mesh = eval_mesh.EvalMesh(params, density_eval.WINDOW_BATCH)
  os.makedirs(FLAGS.out, exist_ok=True)
  skipped = 0
  for path in paths:
    try:
      with open(path, "rb") as f:
        number, density, image = count_image(model, mesh, tokenizer, config, f.read(),
                                             FLAGS.prompt)
    except (OSError, images.BadImageError) as e:
      print(f"skipped {path}: {e}", file=sys.stderr)
      skipped += 1
      continue
    print(f"{number:.1f}\t{path}")
    name = os.path.splitext(os.path.basename(path))[0]
    overlay(image, density, f"{FLAGS.prompt}: {number:.1f}",
            os.path.join(FLAGS.out, f"{name}_density.png"))
  if skipped:
    print(f"{skipped} of {len(paths)} images skipped", file=sys.stderr)
  return 1 if skipped else 0


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Workdir of a density run (local or gs://).")
  flags.DEFINE_string("prompt", None, "What to count, e.g. 'apples' or 'red circles'.")
  flags.DEFINE_string("out", "counts", "Where the heat-map overlays go.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.mark_flags_as_required(["workdir", "prompt"])
  logging.set_verbosity(logging.WARNING)
  # A missing workdir or checkpoint is the user's to fix; an unreadable image is skipped (above).
  cli.run(main, user_error_kinds=(FileNotFoundError,))
