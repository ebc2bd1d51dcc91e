"""export.py: a training run -> a Hugging Face directory that transformers loads."""
import os
import subprocess
import sys

import numpy as np
import torch
import transformers

from countclip_jax import export


def test_exported_run_loads_in_transformers_with_the_same_outputs(tiny_workdir, tmp_path):
  out = tmp_path / "hf"
  subprocess.run([sys.executable, "-m", "countclip_jax.export", f"--workdir={tiny_workdir}",
                  f"--out={out}"], check=True, capture_output=True, timeout=300)
  assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(
      os.listdir(out))
  card = (out / "README.md").read_text()
  assert "Teaching CLIP to Count" in card and '"count"' in card  # the run's config is in it

  model, params, tokenizer = export.load_run(tiny_workdir)
  reference = transformers.CLIPModel.from_pretrained(out).eval()
  hf_tokenizer = transformers.CLIPTokenizerFast.from_pretrained(out)
  captions = ["a photo of three red stars", "some blue circles"]
  ids = tokenizer(captions)
  np.testing.assert_array_equal(
      ids, hf_tokenizer(captions, padding="max_length", max_length=ids.shape[1])["input_ids"])
  pixels = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  ours = model.apply({"params": params}, pixels, ids)
  with torch.no_grad():
    theirs = reference(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                       input_ids=torch.tensor(ids).long())
  np.testing.assert_allclose(ours.logits_per_image, theirs.logits_per_image.numpy(), atol=1e-4)


def test_export_of_a_missing_run_says_what_is_missing(tmp_path):
  import pytest
  with pytest.raises(FileNotFoundError, match="model_config.json is missing"):
    export.load_run(str(tmp_path))
