r"""Fine-tune OpenAI CLIP ViT-L/14 at 336 px: the L/14 recipe with 2.25x more image tokens.

  python -m countclip_jax.main --config=configs/l14_336.py --workdir=gs://BUCKET/countclip-l14-336
"""
from configs import l14

HUB_ID = "openai/clip-vit-large-patch14-336"


def get_config():
  c = l14.get_config()
  c.model.init = HUB_ID
  c.model.arch = "l14_336"
  return c
