r"""Fine-tune CLIP to count: `python -m countclip_jax.main --config=configs/l14.py --workdir=DIR`.

Any config field can be overridden: `--config.train.lr=1e-5 --config.count.fraction=0.5`.
The workdir may be local or gs://; a run started again with the same workdir resumes from its
newest checkpoint. Run the same command on every host of a TPU pod.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from countclip_jax import checkpoints, cli, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and evals go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (FloatingPointError, checkpoints.RestoreError) as e:  # a failed run, not a mistake
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  cli.run(main)
