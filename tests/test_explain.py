"""explain.py: relevancy maps against a PyTorch rollout on transformers' CLIP, shares, the CLI."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import TINY_HF_CONFIGS, make_torch_clip, sample_inputs
from countclip_jax import cli, explain, models
from countclip_jax.data import synthetic
from countclip_jax.models import clip
from countclip_jax.text.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_relevancy(model, pixels, ids, start_layer, mask=None):
  """Chefer et al.'s rule on transformers' eager attention: the independent reference."""
  out = model(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
              input_ids=torch.tensor(ids).long(), output_attentions=True,
              attention_mask=None if mask is None else torch.tensor(mask).long())
  vision, text = out.vision_model_output.attentions, out.text_model_output.attentions
  for a in vision + text:
    a.retain_grad()
  out.logits_per_image.diagonal().sum().backward()

  def roll(attentions):
    b, n = attentions[0].shape[0], attentions[0].shape[-1]
    r = torch.eye(n).expand(b, n, n)
    for a in attentions[start_layer:]:
      r = r + torch.bmm((a.grad * a).clamp(min=0).mean(dim=1), r)
    return r.detach().numpy()

  r_image, r_text = roll(vision), roll(text)
  grid = int(round(np.sqrt(r_image.shape[-1] - 1)))
  eos = model.config.text_config.eos_token_id
  eot = ids.argmax(-1) if eos == 2 else (ids == eos).argmax(-1)
  text_rel = np.zeros(ids.shape, np.float32)
  for b, e in enumerate(eot):
    text_rel[b, 1:e] = r_text[b, e, 1:e] / r_text[b, e, 1:e].sum()
  return r_image[:, 0, 1:].reshape(-1, grid, grid), text_rel


def modern_clip(out):
  """quick_gelu CLIP at 64 px with the synthetic world's tokenizer (first-eos pooling, padding
  is eos too), written with the tokenizer to `out`: the CLI and the shares load it too."""
  tokenizer = build_tokenizer(synthetic.vocabulary(), context_length=10, out_dir=str(out))
  specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
  config = TINY_HF_CONFIGS["quick_gelu"]
  return make_torch_clip(
      "quick_gelu", 1, attn_implementation="eager",
      text_config={**config["text_config"], **specials, "vocab_size": tokenizer.vocab_size,
                   "max_position_embeddings": 10},
      vision_config={**config["vision_config"], "image_size": 64, "patch_size": 16})


def legacy_clip():
  """gelu CLIP with eos_token_id 2: HF's legacy rule, pool at argmax(ids)."""
  return make_torch_clip("gelu", attn_implementation="eager", text_config={
      **TINY_HF_CONFIGS["gelu"]["text_config"], "eos_token_id": 2})


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  """name -> (torch model, our model, params, pixels, ids, directory), batch 3; built once."""
  out = {}
  for name in ("modern", "legacy"):
    path = tmp_path_factory.mktemp(name)
    torch_model = modern_clip(path) if name == "modern" else legacy_clip()
    torch_model.save_pretrained(path)
    config = torch_model.config
    if name == "legacy":  # ids with eos (89) the largest id, as the legacy rule assumes
      config = transformers.CLIPConfig(**TINY_HF_CONFIGS["gelu"])
    pixels, ids = sample_inputs(config, batch=3, seed=1)
    out[name] = (torch_model, *models.load_pretrained(str(path)), pixels, ids, str(path))
  return out


def padding_mask(model, ids):
  eot = np.asarray(explain.eot_positions(ids, model.config.text.eos_token_id))
  return (np.arange(ids.shape[1])[None] <= eot[:, None]).astype(np.int32)


@pytest.mark.parametrize("key, start_layer, with_mask", [
    ("modern", -1, False), ("modern", 0, True),
    ("legacy", -1, True), ("legacy", 0, False), ("legacy", 1, False), ("legacy", -2, False)])
def test_relevancy_matches_torch_rollout(clips, key, start_layer, with_mask):
  torch_model, model, params, pixels, ids, _ = clips[key]
  mask = padding_mask(model, ids) if with_mask else None
  ref_image, ref_text = torch_relevancy(torch_model, pixels, ids, start_layer, mask)
  image, text = explain.relevancy(model, params, pixels, ids, start_layer, mask)
  assert image.shape == ref_image.shape and text.shape == ids.shape
  # The maps are not trivial: relevancy beyond the identity's, spread unevenly.
  assert np.ptp(ref_image) > 1e-3 and (ref_text > 0).sum() > 3
  np.testing.assert_allclose(image, ref_image, atol=1e-4, rtol=0)
  np.testing.assert_allclose(text, ref_text, atol=1e-4, rtol=0)


def test_explicit_attention_is_the_fused_one():
  """The explain path computes what dot_product_attention does (scale, padding and causal
  masks), and its sown probabilities are 0 on future and padded keys."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 12))
  mask = (np.arange(7)[None] < np.array([[7], [4]]))[:, None, None, :]
  layer = lambda explain: clip.Attention(12, 3, 2, jnp.float32, jnp.float32, explain=explain)

  @jax.jit
  def both(rng):
    params = layer(False).init(rng, x, mask, True)
    explicit, state = layer(True).apply(params, x, mask, True, mutable="intermediates")
    return layer(False).apply(params, x, mask, True), explicit, state["intermediates"]

  fused, explicit, sown = both(jax.random.key(1))
  np.testing.assert_allclose(explicit, fused, atol=1e-6)
  (probs,) = sown["attn_probs"]
  probs = np.asarray(probs)
  assert probs.shape == (2, 3, 7, 7)
  assert (probs[..., np.triu(np.ones((7, 7), bool), 1)] == 0).all()
  assert (probs[1, :, :, 4:] == 0).all()  # padded keys, from the padding rows too
  np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-6)


def test_explain_exposes_every_layer_and_training_nothing(clips):
  _, model, params, pixels, ids, _ = clips["legacy"]
  sow = lambda m: jax.eval_shape(lambda p: m.apply({"params": p}, pixels, ids,
                                                   mutable="intermediates")[1], params)
  sown = sow(model.clone(explain=True))["intermediates"]
  c = model.config
  for tower, cfg, n in (("vision_model", c.vision, c.vision.num_patches + 1),
                        ("text_model", c.text, ids.shape[1])):
    layers = sown[tower]["encoder"]["layers"]
    assert sorted(layers) == [str(i) for i in range(cfg.depth)]
    for layer in layers.values():
      (probs,) = layer["self_attn"]["attn_probs"]
      assert probs.shape == (3, cfg.heads, n, n)
  # The default path never computes the probabilities: the fused attention runs.
  assert not sow(model).get("intermediates")


@pytest.mark.parametrize("key", ["modern", "legacy"])
def test_text_relevancy_sums_to_one_inside_the_caption(clips, key):
  _, model, params, pixels, ids, _ = clips[key]
  _, text = explain.relevancy(model, params, pixels, ids, start_layer=0)
  text = np.asarray(text)
  eot = np.asarray(explain.eot_positions(ids, model.config.text.eos_token_id))
  assert (eot > 1).sum() >= 2
  for b, e in enumerate(eot):
    # An empty caption (eot at 1) has no tokens to share relevancy among: all 0.
    assert abs(text[b].sum() - (e > 1)) < 1e-5
    assert text[b, 0] == 0 and (text[b, e:] == 0).all()
  assert (text >= 0).all()


def test_bad_start_layer_is_refused(clips):
  _, model, params, pixels, ids, _ = clips["legacy"]
  depth = model.config.vision.depth
  for bad in (depth, -depth - 1):
    with pytest.raises(ValueError, match=rf"start_layer={bad} is out of range .* layers"):
      explain.relevancy(model, params, pixels, ids, start_layer=bad)
  with pytest.raises(ValueError, match="pairs"):
    explain.relevancy(model, params, pixels, ids[:1])


def test_object_share_spreads_patches_evenly():
  mask = np.zeros((8, 8), bool)
  mask[:4, :4] = True  # patch (0, 0) of a 2x2 grid, wholly
  mask[4:6, 4:8] = True  # half of patch (1, 1)
  relevance = np.array([[1.0, 2.0], [3.0, 4.0]])
  assert explain.object_share(relevance, mask) == pytest.approx((1 + 4 * 0.5) / 10)


@pytest.fixture(scope="module")
def tiny_dir(clips):
  return clips["modern"][-1]


def test_synthetic_shares(tiny_dir):
  model, params, tokenizer = explain.load(tiny_dir)
  caption = "a photo of seven red stars"
  (pos,) = explain.number_positions(tokenizer, caption)
  assert explain.token_labels(tokenizer, tokenizer([caption])[0][pos:pos + 1]) == ["seven"]
  world = explain.heldout_world(tiny_dir, 64, 6)
  shares = explain.synthetic_shares(model, params, tokenizer, world, range(6), batch_size=3)
  assert shares["examples"] == 6
  for key in ("image_object_share", "image_object_area", "text_number_share",
              "text_number_baseline"):
    assert 0 < shares[key] < 1, (key, shares)


def run_main(monkeypatch, **values):
  """explain.main in this process, its flags set as absl would (the defaults of its flags)."""
  defaults = dict(workdir=None, step=None, hf=None, image=None, text=None, out="explain.png",
                  start_layer=-1, synthetic_shares=0, compare=[], figure=None, figure_examples=4)
  monkeypatch.setattr(explain, "FLAGS", types.SimpleNamespace(**{**defaults, **values}))
  explain.main([])


def test_cli_modes(tiny_dir, tmp_path, monkeypatch, capsys):
  photo = tmp_path / "photo.png"
  Image.fromarray(synthetic.render(synthetic.SyntheticCounting().scene(0))).resize(
      (50, 40)).save(photo)
  out = tmp_path / "explain.png"
  run_main(monkeypatch, hf=tiny_dir, image=str(photo), text="three red stars", out=str(out))
  with Image.open(out) as png:
    png.verify()
  capsys.readouterr()
  run_main(monkeypatch, hf=tiny_dir, synthetic_shares=3)
  shares = json.loads(capsys.readouterr().out)
  assert shares["examples"] == 3 and 0 < shares["text_number_share"] < 1
  # Two runs side by side (the same model twice here) on synthetic scenes.
  figure = tmp_path / "compare.png"
  run_main(monkeypatch, compare=[tiny_dir, tiny_dir], figure=str(figure), figure_examples=3)
  with Image.open(figure) as png:
    png.verify()
    assert png.size[0] > 400
  # The user's mistake (cli.run prints it as one line, exit status 2).
  with pytest.raises(cli.UserError, match="start_layer=5 is out of range"):
    run_main(monkeypatch, hf=tiny_dir, image=str(photo), text="two", start_layer=5)


def test_cli_bad_image_is_one_line_error(tiny_dir, tmp_path):
  """The command line itself (absl flags, exit status): a bad image fails before the model
  loads, in one line."""
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
  result = subprocess.run([sys.executable, "-m", "countclip_jax.explain", f"--hf={tiny_dir}",
                           f"--image={bad}", "--text=two dogs"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
