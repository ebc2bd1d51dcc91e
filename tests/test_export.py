"""export.py: a training run -> a Hugging Face directory that transformers loads."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from countclip_jax import checkpoints, cli, export
from countclip_jax.text.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files(directory) -> dict:
  """Every entry under `directory`: relative path -> its bytes (None for a directory)."""
  out = {}
  for parent, dirs, names in os.walk(directory):
    for name in dirs + names:
      path = os.path.join(parent, name)
      out[os.path.relpath(path, directory)] = None if name in dirs else open(path, "rb").read()
  return out


def test_exported_run_loads_in_transformers_with_the_same_outputs(tiny_workdir, tmp_path):
  out = tmp_path / "hf"
  subprocess.run([sys.executable, "-m", "countclip_jax.export", f"--workdir={tiny_workdir}",
                  f"--out={out}"], check=True, capture_output=True, timeout=300)
  assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(
      os.listdir(out))
  card = (out / "README.md").read_text()
  assert "Teaching CLIP to Count" in card and '"count"' in card  # the run's config is in it

  # The run scanned its layers: the checkpoint is stacked, every command gets HF's layout.
  layers = checkpoints.restore_params(tiny_workdir)["text_model"]["encoder"]["layers"]
  assert layers["mlp"]["fc1"]["kernel"].shape[0] == 2
  model, params, tokenizer = export.load_run(tiny_workdir)
  assert sorted(params["text_model"]["encoder"]["layers"]) == ["0", "1"]
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
  # The tokenizer pads to the run's context length, not CLIP's 77, when none is asked for.
  assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 16
  assert Tokenizer.from_pretrained(str(out)).context_length == ids.shape[1] == 16

  # Exporting again into the now non-empty directory needs overwrite (--overwrite).
  before = files(out)
  with pytest.raises(cli.UserError, match="is not empty"):
    export.export(tiny_workdir, str(out))
  assert files(out) == before
  export.export(tiny_workdir, str(out), overwrite=True)
  assert set(files(out)) == set(before)


def test_export_of_a_missing_run_says_what_is_missing(tmp_path):
  import pytest
  with pytest.raises(FileNotFoundError, match="model_config.json is missing"):
    export.load_run(str(tmp_path))


def test_export_into_a_non_empty_directory_is_refused_before_the_run_is_read(tmp_path):
  out = tmp_path / "hf"
  (out / "text_encoder").mkdir(parents=True)
  (out / "text_encoder" / "config.json").write_text("{}")
  (out / "notes.txt").write_text("an earlier export")
  before = files(out)
  done = subprocess.run([sys.executable, "-m", "countclip_jax.export",
                         f"--workdir={tmp_path / 'no-run'}", f"--out={out}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
  (line,) = done.stderr.splitlines()
  assert line == (f"error: --out={out} is not empty: give a new or empty directory, or pass "
                  "--overwrite to write into it. Nothing was written.")
  assert files(out) == before  # and the missing run was never looked at
