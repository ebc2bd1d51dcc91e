r"""CLIP-Count's density counting on the dense synthetic world (task = "density").

  demo   python -m countclip_jax.main --config=configs/density.py --workdir=runs/density \
             --config.model.init=runs/demo/B/hf   # the demo's count-aware backbone, frozen
  tiny   python -m countclip_jax.main --config=configs/density.py:tiny --workdir=/tmp/density
             (a random tiny backbone: seconds on a CPU, for tests)

The head (visual prompts, patch-text interaction, decoder) trains; the backbone is frozen
(train.freeze). Prompts name a kind ("red circles"); scenes hold up to 50 of it among other
kinds, and the loss also asks each image for another kind and for an absent one.
"""
from configs import common


def get_config(arg: str = "demo"):
  if arg not in ("demo", "tiny"):
    raise ValueError(f"configs/density.py takes 'demo' or 'tiny', got {arg!r}")
  c = common.base()
  c.task = "density"
  c.model.arch = "demo"
  c.model.dtype = "float32"        # CPUs have no fast bf16
  c.data.context_length = 8        # "red circles" + bos/eos, room for 2 learned context tokens
  c.density.model = "demo"
  c.density.synthetic.size = 100_000
  c.train.freeze = "^backbone/"
  # CLIP-Count's AdamW (betas 0.9, 0.95; weight decay 0.05), at a from-scratch head's rate.
  c.train.lr = 1e-3
  c.train.b2 = 0.95
  c.train.weight_decay = 0.05
  c.train.warmup_steps = 50
  c.train.batch_size = 32
  c.train.steps = 1500
  c.train.log_every = 50
  c.checkpoint.every_steps = 500
  c.checkpoint.async_save = False
  c.eval.datasets = ("density",)
  c.density.eval_size = 300
  if arg == "tiny":
    c.model.arch = "tiny"
    c.density.model = "tiny"
    c.density.synthetic.size = 1000
    c.density.synthetic.max_count = 20
    c.train.steps = 6
    c.train.batch_size = 8
    c.train.warmup_steps = 1
    c.train.log_every = 2
    c.checkpoint.every_steps = 3
    c.density.eval_size = 16
  return c
