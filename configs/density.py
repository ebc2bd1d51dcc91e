r"""CLIP-Count's density counting on the dense synthetic world (task = "density").

  demo   python -m countclip_jax.main --config=configs/density.py --workdir=runs/density \
             --config.model.init=runs/demo/B/hf   # the demo's count-aware backbone, frozen
  tiny   python -m countclip_jax.main --config=configs/density.py:tiny --workdir=/tmp/density
             (a random tiny backbone: seconds on a CPU, for tests)
  fsc147 python -m countclip_jax.main --config=configs/density.py:fsc147 --workdir=gs://B/run \
             --config.density.data_dir=FSC147   # CLIP-Count's recipe on ViT-B/16 (an accelerator)

The head (visual prompts, patch-text interaction, decoder) trains; the backbone is frozen
(train.freeze). Prompts name a kind ("red circles"); scenes hold up to 50 of it among other
kinds, and the loss also asks each image for another kind and for an absent one.
"""
from configs import common


def get_config(arg: str = "demo"):
  if arg not in ("demo", "tiny", "fsc147"):
    raise ValueError(f"configs/density.py takes 'demo', 'tiny' or 'fsc147', got {arg!r}")
  c = common.base()
  c.task = "density"
  c.model.arch = "demo"
  c.model.dtype = "float32"        # CPUs have no fast bf16
  c.data.context_length = 8        # "red circles" + bos/eos, room for 2 learned context tokens
  c.density.model = "demo"
  c.density.synthetic.size = 100_000
  # 2 px dots on 64 px scenes of 4-8 px objects: with σ=1 (CLIP-Count's, at 384 px) the pixel
  # MSE was still near an empty map's after 500 steps (README, "Stage D: how it was tuned").
  c.density.sigma = 2.0
  c.train.freeze = "^backbone/"
  # CLIP-Count's AdamW (betas 0.9, 0.95; weight decay 0.05), at a from-scratch head's rate.
  c.train.lr = 1e-3
  c.train.b2 = 0.95
  c.train.weight_decay = 0.05
  c.train.warmup_steps = 50
  # Half CLIP-Count's batch, more steps: after the same 6,400 examples, batch 16 was at MAE
  # 5.9 and batch 32 at 7.7 (same README section).
  c.train.batch_size = 16
  c.train.steps = 2000
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
  if arg == "fsc147":
    # CLIP-Count: ViT-B/16, 384 px crops, AdamW 1e-4 (0.9, 0.95) wd 0.05, batch 32, 20 epochs
    # of the patch-text contrast alone, then 200 of the maps (3,659 training images: 115 steps
    # an epoch). Our default count-aware backbone would be a B/16 run of configs/b16.py.
    c.model.init = "openai/clip-vit-base-patch16"
    c.model.dtype = "bfloat16"
    c.data.context_length = 77
    c.density.model = "clip_count"
    c.density.source = "fsc147"
    c.density.crop_size = 384
    c.density.sigma = 1.0
    c.train.batch_size = 32
    c.density.contrastive_weight = 1.0
    c.density.contrastive_only_steps = 20 * 115
    c.train.lr = 1e-4
    c.train.warmup_steps = 500
    c.train.steps = 220 * 115
    c.train.log_every = 100
    c.checkpoint.every_steps = 1000
    c.checkpoint.async_save = True
    c.eval.every_steps = 5 * 115
  return c
