"""CLIP in Flax with Hugging Face checkpoints: `load_pretrained`, `export_hf`."""
from countclip_jax.models.clip import ARCHITECTURES, CLIP, CLIPConfig, TextConfig, VisionConfig
from countclip_jax.models.clip import init_params, logical_axes, normalize, param_shapes
from countclip_jax.models.hf import CheckpointError, export_hf, load_pretrained
