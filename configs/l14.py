r"""Fine-tune OpenAI CLIP ViT-L/14 to count (the paper's large model).

  python -m countclip_jax.main --config=configs/l14.py --workdir=gs://BUCKET/countclip-l14 \
      --config.data.records.counting=... --config.data.records.general=... \
      --config.eval.countbench_dir=countbench   # as in configs/b32.py

428M params: params and Adam state are sharded over all devices (FSDP) and each layer is
rematerialised, so the run fits v4/v5e HBM at batch 256.
"""
from configs import b32

HUB_ID = "openai/clip-vit-large-patch14"


def get_config():
  c = b32.get_config()
  c.model.init = HUB_ID
  c.model.arch = "l14"
  c.model.remat = True
  c.train.lr = 5e-6             # larger models drift further from their zero-shot skill
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
