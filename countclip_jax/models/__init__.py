"""CLIP in Flax with Hugging Face checkpoints: `load_pretrained`, `export_hf`,
`export_text_encoder` (the text tower for diffusion pipelines)."""
from countclip_jax.models.clip import ARCHITECTURES, CLIP, CLIPConfig, TextConfig, VisionConfig
from countclip_jax.models.clip import init_params, logical_axes, normalize, param_shapes
from countclip_jax.models.hf import CheckpointError, WidthError, export_hf, export_text_encoder
from countclip_jax.models.hf import load_pretrained, stack_layers, unstack_layers
