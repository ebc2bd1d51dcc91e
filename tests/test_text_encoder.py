"""CLIP.text_states and export_text_encoder: the text tower as a diffusion model's text encoder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from conftest import TINY_HF_CONFIGS, make_torch_clip, sample_inputs
from countclip_jax import checkpoints, export, models
from countclip_jax.models import hf
from countclip_jax.text.tokenizer import build_tokenizer

PROMPT = "three red stars on a blue sofa"


def _eos_mask(ids, eos):
  """1 up to and including the first eos, 0 on the padding after it."""
  first = np.argmax(ids == eos, axis=1)
  return (np.arange(ids.shape[1])[None] <= first[:, None]).astype(np.int32)


def test_text_states_are_transformers_last_hidden_state(hf_checkpoint):
  torch_model, ckpt = hf_checkpoint
  model, params = models.load_pretrained(ckpt)
  reference = transformers.CLIPTextModel(torch_model.config.text_config).eval()
  # transformers 5's CLIPTextModel is the text transformer itself; 4's wraps it in .text_model.
  getattr(reference, "text_model", reference).load_state_dict(
      torch_model.text_model.state_dict())
  _, ids = sample_inputs(torch_model.config)
  mask = _eos_mask(ids, torch_model.config.text_config.eos_token_id)
  assert 0 < mask.sum() < mask.size  # the rows really are padded
  for attention_mask in (None, mask):
    ours = model.apply({"params": params}, ids, attention_mask, method="text_states")
    with torch.no_grad():
      theirs = reference(input_ids=torch.tensor(ids).long(), attention_mask=None if
                         attention_mask is None else torch.tensor(attention_mask))
    assert ours.shape == (ids.shape[0], ids.shape[1], model.config.text.width)
    np.testing.assert_allclose(ours, theirs.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    # encode_text is the eos row of the same states, projected.
    eos = np.argmax(ids == model.config.text.eos_token_id, axis=1)
    projected = np.asarray(ours)[np.arange(len(ids)), eos] @ params["text_projection"]["kernel"]
    np.testing.assert_allclose(
        model.apply({"params": params}, ids, attention_mask, method="encode_text"), projected,
        atol=1e-5, rtol=0)


def test_exported_text_encoder_loads_with_no_missing_or_unexpected_keys(tmp_path):
  torch_model = make_torch_clip("gelu")
  torch_model.save_pretrained(tmp_path / "ckpt")
  model, params = models.load_pretrained(str(tmp_path / "ckpt"))
  models.export_text_encoder(model, params, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path / "out")) == ["text_encoder"]  # no tokenizer given
  encoder, info = transformers.CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder",
                                                             output_loading_info=True)
  assert not any(info.values()), info
  # The keys of every SD 1.x text_encoder on the hub, which transformers 4 and 5 both load (5
  # strips the prefix when loading, and writes none).
  with safe_open(tmp_path / "out" / "text_encoder" / "model.safetensors", "np") as f:
    assert f.keys() and all(k.startswith("text_model.") for k in f.keys())
  assert json.loads((tmp_path / "out" / "text_encoder" / "config.json").read_text())[
      "architectures"] == ["CLIPTextModel"]
  _, ids = sample_inputs(torch_model.config)
  with torch.no_grad():
    theirs = encoder.eval()(input_ids=torch.tensor(ids).long()).last_hidden_state.numpy()
  np.testing.assert_allclose(model.apply({"params": params}, ids, method="text_states"), theirs,
                             atol=1e-5, rtol=0)


def test_a_text_tower_not_768_wide_is_refused_for_sd1_and_nothing_is_written(tmp_path):
  torch_model = make_torch_clip("quick_gelu")  # 32 wide
  torch_model.save_pretrained(tmp_path / "ckpt")
  model, params = models.load_pretrained(str(tmp_path / "ckpt"))
  with pytest.raises(models.WidthError, match="the text tower is 32 wide; the target "
                     "cross-attends at 768"):
    models.export_text_encoder(model, params, str(tmp_path / "lib"), require_width=768)
  assert not (tmp_path / "lib").exists()

  # A B/32 run into SD 1.x: the CLI refuses it from the run's config, before any checkpoint.
  workdir = tmp_path / "b32_run"
  workdir.mkdir()
  (workdir / checkpoints.MODEL_CONFIG).write_text(
      hf.config_to_hf(models.ARCHITECTURES["b32"]).to_json_string())
  result = subprocess.run([sys.executable, "-m", "countclip_jax.export", f"--workdir={workdir}",
                           f"--out={tmp_path / 'cli'}", "--text_encoder", "--for_sd1"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert ("error: the text tower is 512 wide; Stable Diffusion 1.x cross-attends at 768 "
          "(an L/14 text tower)") in result.stderr
  assert not (tmp_path / "cli").exists()


def _tiny_run(tmp_path):
  """A workdir as countclip_jax.main leaves it (model config, checkpoint, tokenizer), of a
  32-wide CLIP whose vocabulary is a tiny offline tokenizer's."""
  workdir = tmp_path / "run"
  tokenizer = build_tokenizer([PROMPT, "two green circles"], context_length=16,
                              out_dir=str(workdir / "tokenizer"))
  text = dict(TINY_HF_CONFIGS["quick_gelu"]["text_config"], vocab_size=tokenizer.vocab_size,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
  make_torch_clip("quick_gelu", text_config=text).save_pretrained(tmp_path / "ckpt")
  model, params = models.load_pretrained(str(tmp_path / "ckpt"))
  (workdir / checkpoints.MODEL_CONFIG).write_text(hf.config_to_hf(model.config).to_json_string())
  manager = checkpoints.create_manager(str(workdir), 1, 1, async_save=False)
  checkpoints.save(manager, 1, {"params": params}, force=True)
  manager.close()
  return str(workdir), model, params, tokenizer


def test_exported_text_encoder_conditions_a_stable_diffusion_pipeline(tmp_path):
  import diffusers  # pylint: disable=g-import-not-at-top  (a test extra, like torch)
  workdir, model, params, tokenizer = _tiny_run(tmp_path)
  out = tmp_path / "sd_text"
  export.export(workdir, str(out), text_encoder=True)  # no SD1 target: any width is written
  assert {"text_encoder", "tokenizer", "README.md"} <= set(os.listdir(out))

  # diffusers' own dummy components (tests/pipelines/stable_diffusion/test_stable_diffusion.py),
  # cross-attending at our 32-wide text tower.
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
      out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
      norm_num_groups=2)
  vae = diffusers.AutoencoderKL(
      block_out_channels=[4, 8], in_channels=3, out_channels=3,
      down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
      latent_channels=4, norm_num_groups=2)
  scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", clip_sample=False,
                                      set_alpha_to_one=False)
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, unet=unet, scheduler=scheduler,
      text_encoder=transformers.CLIPTextModel.from_pretrained(out / "text_encoder"),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(out / "tokenizer"),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  assert pipe.tokenizer.model_max_length == model.config.text.context_length  # what SD pads to

  with torch.no_grad():
    embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, do_classifier_free_guidance=False)
  ours = model.apply({"params": params}, tokenizer([PROMPT]), method="text_states")
  np.testing.assert_allclose(embeds.numpy(), ours, atol=1e-5, rtol=0)

  image = pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator("cpu").manual_seed(0)).images
  assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
