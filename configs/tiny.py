r"""A tiny CLIP from scratch on the synthetic counting world: trains in seconds on a CPU.

For tests and smoke runs:
  python -m countclip_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""
from configs import common


def get_config():
  c = common.base()
  c.model.arch = "tiny"            # 64 px, patch 16, 2+2 layers
  c.model.dtype = "float32"        # CPUs have no fast bf16
  c.data.context_length = 16       # synthetic captions are at most 8 words
  c.data.synthetic.size = 10_000
  c.train.steps = 20
  c.train.batch_size = 16
  c.train.lr = 1e-3                # from scratch, not a fine-tune
  c.train.warmup_steps = 5
  c.train.weight_decay = 0.0
  c.train.log_every = 5
  c.count.fraction = 0.5
  c.count.num_counterfactuals = 8
  c.count.scale = "learned"
  c.checkpoint.every_steps = 10
  c.checkpoint.async_save = False
  c.eval.datasets = ()
  c.eval.size = 64
  return c
