"""The README's "Using the model" snippet, run as written on a tiny export (context length 16,
not CLIP's 77): only the names of the model, the photo and the export target are replaced."""
import os
import re

import numpy as np
from PIL import Image

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
HUB_ID, PHOTO, TARGET = '"openai/clip-vit-base-patch32"', '"photo.jpg"', '"gs://bucket/my-clip"'


def using_the_model() -> str:
  text = open(README, encoding="utf-8").read()
  section = text[text.index("\n## Using the model\n"):]
  return re.search(r"^```python\n(.*?)^```", section, re.S | re.M).group(1)


def test_using_the_model_runs_on_a_short_context_export(tiny_export, tmp_path):
  code = using_the_model()
  for name in (HUB_ID, PHOTO, TARGET):  # the snippet still names what is replaced
    assert name in code, name
  Image.new("RGB", (90, 70), (200, 30, 30)).save(tmp_path / "photo.jpg")
  again = tmp_path / "again"
  code = (code.replace(HUB_ID, repr(tiny_export)).replace(PHOTO, repr(str(tmp_path / "photo.jpg")))
          .replace(TARGET, repr(str(again))))
  scope = {}
  exec(compile(code, "README.md: Using the model", "exec"), scope)  # pylint: disable=exec-used
  assert scope["tokenizer"].context_length == scope["model"].config.text.context_length == 16
  dim = scope["model"].config.projection_dim
  assert scope["image_emb"].shape == scope["text_emb"].shape == (1, dim)
  assert np.isfinite(scope["image_emb"]).all() and np.isfinite(scope["text_emb"]).all()
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(again))
