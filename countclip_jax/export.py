r"""A training run's checkpoint -> a Hugging Face CLIP directory (local or gs://).

  python -m countclip_jax.export --workdir=gs://BUCKET/run [--step=N] --out=gs://BUCKET/hf

Writes config.json, model.safetensors, the run's tokenizer and a model card (README.md) with
the run's config and eval numbers; `transformers.CLIPModel.from_pretrained` reads the result.
"""
from __future__ import annotations

import json

from absl import app, flags, logging

FLAGS = flags.FLAGS
from etils import epath

from countclip_jax import checkpoints
from countclip_jax.models import CLIP, export_hf, hf
from countclip_jax.text.tokenizer import Tokenizer

def load_run(workdir: str, step: int | None = None):
  """(model, params, tokenizer) of a training run, from its workdir alone."""
  root = epath.Path(workdir)
  if not (root / checkpoints.MODEL_CONFIG).exists():
    raise FileNotFoundError(f"{root / checkpoints.MODEL_CONFIG} is missing: is {workdir} the workdir of a "
                            "countclip_jax.main run?")
  model = CLIP(hf.config_from_hf(json.loads((root / checkpoints.MODEL_CONFIG).read_text())))
  params = checkpoints.restore_params(workdir, step)
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


def export(workdir: str, out: str, step: int | None = None) -> None:
  model, params, tokenizer = load_run(workdir, step)
  export_hf(model, params, out, tokenizer=tokenizer)
  (epath.Path(out) / "README.md").write_text(model_card(workdir, step))
  logging.info("Exported %s to %s", workdir, out)


def main(argv):
  del argv
  export(FLAGS.workdir, FLAGS.out, FLAGS.step)
  print(f"Exported {FLAGS.workdir} -> {FLAGS.out}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Workdir of a training run (local or gs://).")
  flags.DEFINE_string("out", None, "Output directory (local or gs://).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
