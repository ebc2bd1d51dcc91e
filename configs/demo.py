r"""The demo's three runs on the synthetic counting world (what `make demo` chains).

  A  python -m countclip_jax.main --config=configs/demo.py:pretrain --workdir=runs/demo/A
  B  python -m countclip_jax.main --config=configs/demo.py:count --workdir=runs/demo/B \
         --config.model.init=runs/demo/A/hf
  C  python -m countclip_jax.main --config=configs/demo.py:control --workdir=runs/demo/C \
         --config.model.init=runs/demo/A/hf

A "pretrains" a tiny CLIP from scratch with the CLIP loss on captions *without* number words:
like web CLIP it learns colours and shapes but cannot count. B fine-tunes A with
L_clip + λ L_count on half counting, half general captions. C is B with λ = 0: the same data and
steps, so whatever B gains over C is the counting loss's doing.
"""
from configs import common

STAGES = ("pretrain", "count", "control")


def get_config(stage: str = "count"):
  if stage not in STAGES:
    raise ValueError(f"demo stage must be one of {STAGES}, got {stage!r}")
  c = common.base()
  c.model.arch = "demo"          # 64 px, patch 8, width 128, 4+4 layers: ~1.7M params
  c.model.dtype = "float32"      # CPUs have no fast bf16
  c.data.context_length = 10     # the world's longest caption is 8 tokens + bos + eos
  c.data.synthetic.size = 200_000
  c.train.batch_size = 128
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.log_every = 25
  c.checkpoint.every_steps = 200
  c.checkpoint.async_save = False
  c.eval.datasets = ("synthetic",)
  c.eval.size = 900              # 100 held-out images per number
  c.eval.batch_size = 300

  if stage == "pretrain":
    # Colour is learned in ~250 steps, shape far more slowly (22% at 250, 45% at 500, 64% at 750,
    # 71% at 1000; runs/demo/A with --config.eval.every_steps=250): the longer A learns shape,
    # the less B's and C's shape scores measure A's unfinished training instead of retention.
    c.train.steps = 1000
    c.train.lr = 1e-3
    c.train.warmup_steps = 100
    c.count.fraction = 0.0       # no caption states a number
    c.count.lam = 0.0
  else:
    c.train.steps = 500
    c.train.lr = 1e-3
    c.train.warmup_steps = 30
    c.count.fraction = 0.5
    c.count.num_counterfactuals = 8  # all wrong numbers: at this scale far faster than K=1
    c.count.scale = "learned"        # the model's own temperature, not the paper's raw cosine
    # λ = 2: with half the batch stating numbers, the CLIP loss alone already teaches some
    # counting (C reached 37% at λ = 0, B 48% at λ = 1 after 350 steps); the counting loss
    # needs more weight to pull clearly ahead.
    c.count.lam = 2.0 if stage == "count" else 0.0
  return c
