r"""Fine-tune OpenAI CLIP ViT-B/16 to count: the B/32 recipe with 4x more image tokens.

  python -m countclip_jax.main --config=configs/b16.py --workdir=gs://BUCKET/countclip-b16
"""
from configs import b32

HUB_ID = "openai/clip-vit-base-patch16"


def get_config():
  c = b32.get_config()
  c.model.init = HUB_ID
  c.model.arch = "b16"
  return c
