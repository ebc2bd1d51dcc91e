r"""A training run's checkpoint -> a Hugging Face CLIP directory (local or gs://).

  python -m countclip_jax.export --workdir=gs://BUCKET/run [--step=N] --out=gs://BUCKET/hf

Writes config.json, model.safetensors, the run's tokenizer and a model card (README.md) with
the run's config and eval numbers; `transformers.CLIPModel.from_pretrained` reads the result.

  python -m countclip_jax.export --workdir=RUN --out=DIR --text_encoder [--for_sd1]

writes the text tower alone as a diffusion pipeline's DIR/text_encoder (`CLIPTextModel`) and
DIR/tokenizer, plus the card. `--for_sd1` targets Stable Diffusion 1.x, which cross-attends at
768 (OpenAI's L/14 text tower): any other width is refused (exit 2) before anything is written.

A non-empty --out is refused (exit 2, nothing written) unless `--overwrite` is given: files of an
earlier export that this one does not write would be left beside it. With `--overwrite`, files
of the same names are replaced and the others left as they are.
"""
from __future__ import annotations

import json

from absl import app, flags, logging
from etils import epath

from countclip_jax import checkpoints, cli
from countclip_jax.models import CLIP, WidthError, export_hf, export_text_encoder, hf
from countclip_jax.text.tokenizer import Tokenizer

# The width of the prompt states Stable Diffusion 1.x's UNet cross-attends to: it was trained
# on OpenAI's L/14 text tower.
SD1_CROSS_ATTENTION_DIM = 768
FLAGS = flags.FLAGS


def load_model(workdir: str) -> CLIP:
  """The run's model (architecture only: no checkpoint is read)."""
  root = epath.Path(workdir)
  if not (root / checkpoints.MODEL_CONFIG).exists():
    raise FileNotFoundError(f"{root / checkpoints.MODEL_CONFIG} is missing: is {workdir} the "
                            "workdir of a countclip_jax.main run?")
  return CLIP(hf.config_from_hf(json.loads((root / checkpoints.MODEL_CONFIG).read_text())))


def load_run(workdir: str, step: int | None = None):
  """(model, params, tokenizer) of a training run, from its workdir alone."""
  root = epath.Path(workdir)
  model = load_model(workdir)
  # A run with model.scan_layers holds its layers stacked; every command takes HF's layout.
  params = hf.unstack_layers(checkpoints.restore_params(workdir, step))
  tokenizer = Tokenizer.from_pretrained(str(root / "tokenizer"),
                                        model.config.text.context_length)
  return model, params, tokenizer


def model_card(workdir: str, step: int | None) -> str:
  root = epath.Path(workdir)
  lines = ["---", "library_name: transformers", "tags: [clip, counting, countclip-jax]", "---",
           "# CLIP fine-tuned to count (countclip-jax)", "",
           "Fine-tuned with the CLIP loss plus the counting loss of Paiss et al., \"Teaching CLIP "
           "to Count to Ten\" (ICCV 2023), by countclip-jax.", "",
           f"Exported from `{workdir}`" + (f" at step {step}." if step is not None else "."), ""]
  evals = sorted((root / "eval").glob("*.json")) if (root / "eval").exists() else []
  if evals:
    lines += ["## Evaluation", ""]
    for path in evals:
      lines += [f"### {path.stem}", "", "```json", path.read_text().strip(), "```", ""]
  if (root / "config.json").exists():
    lines += ["## Training config", "", "```json", (root / "config.json").read_text().strip(),
              "```", ""]
  return "\n".join(lines)


def check_out(out: str, overwrite: bool = False) -> None:
  """Refuses an `out` that is a file, or a directory with anything in it unless `overwrite`:
  an earlier export's files that this one does not write would be left beside it."""
  root = epath.Path(out)
  if root.is_file():
    raise cli.UserError(f"--out={out} is a file: give a directory. Nothing was written.")
  if not overwrite and root.is_dir() and next(iter(root.iterdir()), None) is not None:
    raise cli.UserError(f"--out={out} is not empty: give a new or empty directory, or pass "
                        "--overwrite to write into it. Nothing was written.")


def export(workdir: str, out: str, step: int | None = None, *, text_encoder: bool = False,
           for_sd1: bool = False, overwrite: bool = False) -> None:
  """The full CLIPModel, or (`text_encoder`) the text tower for a diffusion pipeline.

  Refused before anything is read or written: a non-empty `out` (unless `overwrite`), and with
  `for_sd1` a text tower of another width.
  """
  if for_sd1 and not text_encoder:
    raise ValueError("for_sd1 applies to the text encoder export (text_encoder=True)")
  check_out(out, overwrite)
  require_width = SD1_CROSS_ATTENTION_DIM if for_sd1 else None
  if require_width is not None:  # checked on the config, before the checkpoint is read
    width = load_model(workdir).config.text.width
    if width != require_width:
      raise WidthError(
          f"the text tower is {width} wide; Stable Diffusion 1.x cross-attends at "
          f"{require_width} (an L/14 text tower): export a fine-tune of "
          "openai/clip-vit-large-patch14 (configs/l14.py). Nothing was written.")
  model, params, tokenizer = load_run(workdir, step)
  if text_encoder:
    export_text_encoder(model, params, out, tokenizer, require_width=require_width)
  else:
    export_hf(model, params, out, tokenizer=tokenizer)
  (epath.Path(out) / "README.md").write_text(model_card(workdir, step))
  logging.info("Exported %s to %s", workdir, out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.for_sd1 and not FLAGS.text_encoder:
    raise app.UsageError("--for_sd1 applies to --text_encoder exports")
  export(FLAGS.workdir, FLAGS.out, FLAGS.step, text_encoder=FLAGS.text_encoder,
         for_sd1=FLAGS.for_sd1, overwrite=FLAGS.overwrite)
  what = " (text_encoder/, tokenizer/)" if FLAGS.text_encoder else ""
  print(f"Exported {FLAGS.workdir} -> {FLAGS.out}{what}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Workdir of a training run (local or gs://).")
  flags.DEFINE_string("out", None, "Output directory (local or gs://).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_bool("text_encoder", False, "Export the text tower alone, as a diffusion "
                    "pipeline's text_encoder/ and tokenizer/ subfolders.")
  flags.DEFINE_bool("for_sd1", False, "With --text_encoder: target Stable Diffusion 1.x, "
                    f"refusing a text tower not {SD1_CROSS_ATTENTION_DIM} wide.")
  flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out (files of the same names "
                    "are replaced, others left).")
  flags.mark_flags_as_required(["workdir", "out"])
  # A missing workdir or checkpoint, or a width SD 1.x cannot take, is the user's to fix.
  cli.run(main, user_error_kinds=(FileNotFoundError, WidthError))
