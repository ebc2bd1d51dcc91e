"""models/hf.py: parity with transformers' PyTorch CLIP, round trips, strict loading."""
import json
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from countclip_jax import models
from countclip_jax.models import hf
from conftest import make_torch_clip, sample_inputs


def torch_outputs(model, pixels, ids):
  px = torch.tensor(pixels).permute(0, 3, 1, 2)
  ids = torch.tensor(ids).long()
  with torch.no_grad():
    image = model.get_image_features(pixel_values=px)
    text = model.get_text_features(input_ids=ids)
    logits = model(pixel_values=px, input_ids=ids).logits_per_image
  # transformers 5 returns an output object whose pooler_output is the projected embedding.
  image, text = (getattr(x, "pooler_output", x) for x in (image, text))
  return image.numpy(), text.numpy(), logits.numpy()


def max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_outputs_match_transformers(hf_checkpoint, scan_layers):
  torch_model, path = hf_checkpoint
  model, params = models.load_pretrained(path, scan_layers=scan_layers)
  assert model.scan_layers == scan_layers
  assert ("0" in params["vision_model"]["encoder"]["layers"]) != scan_layers
  pixels, ids = sample_inputs(torch_model.config)
  image, text, logits = torch_outputs(torch_model, pixels, ids)
  out = model.apply({"params": params}, pixels, ids)
  assert max_abs(out.image_embeds, image) < 1e-5
  assert max_abs(out.text_embeds, text) < 1e-5
  assert max_abs(out.logits_per_image, logits) < 1e-5
  # The public methods give the same embeddings as __call__.
  assert max_abs(model.apply({"params": params}, pixels, method="encode_image"), image) < 1e-5
  assert max_abs(model.apply({"params": params}, ids, method="encode_text"), text) < 1e-5


def clip_loss_np_torch(logits):
  labels = torch.arange(logits.shape[0])
  return (torch.nn.functional.cross_entropy(logits, labels)
          + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("scan_layers", [False, True])
def test_gradients_match_torch_autograd(hf_checkpoint, scan_layers):
  torch_model, path = hf_checkpoint
  model, params = models.load_pretrained(path, scan_layers=scan_layers)
  pixels, ids = sample_inputs(torch_model.config, batch=4, seed=1)

  def loss_fn(p):
    logits = model.apply({"params": p}, pixels, ids).logits_per_image
    labels = jnp.arange(logits.shape[0])
    ce = lambda l: -jnp.mean(jax.nn.log_softmax(l)[labels, labels])
    return (ce(logits) + ce(logits.T)) / 2

  grads = hf.unstack_layers(jax.grad(loss_fn)(params))  # (stacked with scan_layers)
  torch_model.zero_grad()
  px = torch.tensor(pixels).permute(0, 3, 1, 2)
  logits = torch_model(pixel_values=px, input_ids=torch.tensor(ids).long()).logits_per_image
  clip_loss_np_torch(logits).backward()
  named = dict(torch_model.named_parameters())
  checks = {
      "logit_scale": (grads["logit_scale"], lambda g: g),
      "vision_model.encoder.layers.0.self_attn.q_proj.weight":
          (grads["vision_model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"],
           lambda g: g.T),
      "vision_model.embeddings.patch_embedding.weight":
          (grads["vision_model"]["embeddings"]["patch_embedding"]["kernel"],
           lambda g: np.transpose(g, (3, 2, 0, 1))),
      "text_model.encoder.layers.1.mlp.fc1.weight":
          (grads["text_model"]["encoder"]["layers"]["1"]["mlp"]["fc1"]["kernel"], lambda g: g.T),
      "text_model.final_layer_norm.weight":
          (grads["text_model"]["final_layer_norm"]["scale"], lambda g: g),
      "text_projection.weight": (grads["text_projection"]["kernel"], lambda g: g.T),
  }
  for name, (ours, to_torch) in checks.items():
    ref = named[name].grad.numpy()
    ours = to_torch(np.asarray(ours))
    assert np.linalg.norm(ref) > 0, name
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, (name, rel)


def test_attention_mask_and_legacy_eos_pooling(tmp_path):
  # eos_token_id == 2 is HF's legacy rule: pool at argmax(input_ids).
  torch_model = make_torch_clip("gelu", text_config={
      **__import__("conftest").TINY_HF_CONFIGS["gelu"]["text_config"], "eos_token_id": 2})
  torch_model.save_pretrained(tmp_path)
  model, params = models.load_pretrained(str(tmp_path))
  assert model.config.text.eos_token_id == 2
  ids = np.array([[88, 5, 9, 89, 0, 0, 0, 0], [88, 7, 89, 3, 3, 3, 3, 3]], np.int32)
  mask = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], np.int32)
  with torch.no_grad():
    ref = torch_model.get_text_features(input_ids=torch.tensor(ids).long(),
                                        attention_mask=torch.tensor(mask).long())
  ref = getattr(ref, "pooler_output", ref).numpy()
  ours = model.apply({"params": params}, ids, mask, method="encode_text")
  assert max_abs(ours, ref) < 1e-5


def test_export_round_trip_through_transformers(hf_checkpoint, tmp_path):
  torch_model, path = hf_checkpoint
  model, params = models.load_pretrained(path)
  out_dir = tmp_path / "export"
  models.export_hf(model, params, str(out_dir))
  pixels, ids = sample_inputs(torch_model.config, seed=2)
  reloaded = transformers.CLIPModel.from_pretrained(out_dir).eval()
  for ref, new in zip(torch_outputs(torch_model, pixels, ids), torch_outputs(reloaded, pixels, ids)):
    assert max_abs(ref, new) < 1e-6
  # The single-tower classes load from the same directory and agree.
  text_model = transformers.CLIPTextModelWithProjection.from_pretrained(out_dir).eval()
  vision_model = transformers.CLIPVisionModelWithProjection.from_pretrained(out_dir).eval()
  image, text, _ = torch_outputs(torch_model, pixels, ids)
  with torch.no_grad():
    text_only = text_model(input_ids=torch.tensor(ids).long()).text_embeds.numpy()
    image_only = vision_model(
        pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).image_embeds.numpy()
  assert max_abs(text_only, text) < 1e-5
  assert max_abs(image_only, image) < 1e-5
  # And our own loader reads our export back bit for bit.
  _, again = models.load_pretrained(str(out_dir))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)


def test_scanned_params_export_as_hf_per_layer_files(hf_checkpoint, tmp_path):
  """model.scan_layers in and out: the same files as the per-layer layout, bit for bit."""
  torch_model, path = hf_checkpoint
  model, params = models.load_pretrained(path, scan_layers=True)
  models.export_hf(model, params, str(tmp_path / "scanned"))
  plain_model, plain = models.load_pretrained(path)
  models.export_hf(plain_model, plain, str(tmp_path / "plain"))
  scanned_state = load_file(tmp_path / "scanned" / "model.safetensors")
  plain_state = load_file(tmp_path / "plain" / "model.safetensors")
  assert sorted(scanned_state) == sorted(plain_state)
  assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in scanned_state
  for key, value in plain_state.items():
    np.testing.assert_array_equal(scanned_state[key], value, err_msg=key)
  # The single-tower text export too (what diffusion pipelines load).
  models.export_text_encoder(model, params, str(tmp_path / "sd"))
  text_state = load_file(tmp_path / "sd" / "text_encoder" / "model.safetensors")
  np.testing.assert_array_equal(text_state["text_model.encoder.layers.1.mlp.fc1.weight"],
                                plain_state["text_model.encoder.layers.1.mlp.fc1.weight"])


def test_export_with_tokenizer(tmp_path):
  from countclip_jax.text.tokenizer import build_tokenizer
  model = models.CLIP(models.ARCHITECTURES["tiny"])
  params = models.init_params(model, jax.random.key(0))
  tokenizer = build_tokenizer(["three red stars", "a photo of two cats"], context_length=16)
  models.export_hf(model, params, str(tmp_path), tokenizer=tokenizer)
  hf_tok = transformers.CLIPTokenizerFast.from_pretrained(tmp_path)
  assert hf_tok("three red stars")["input_ids"] == list(tokenizer(["three red stars"])[0][:5])


def test_flax_msgpack_loads(hf_checkpoint, tmp_path):
  torch_model, path = hf_checkpoint
  model, params = models.load_pretrained(path)
  # FlaxCLIPModel.save_pretrained layout: the bare param tree (no "params" level), any dtype.
  fp16 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float16), params)
  shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
  (tmp_path / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(fp16))
  model2, params2 = models.load_pretrained(str(tmp_path))
  assert model2.config == model.config
  leaves = jax.tree_util.tree_leaves(params2)
  assert all(x.dtype == jnp.float32 for x in leaves)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3), params, params2)


def test_safetensors_preferred_over_msgpack(hf_checkpoint):
  _, path = hf_checkpoint
  with open(os.path.join(path, "flax_model.msgpack"), "wb") as f:
    f.write(b"not a msgpack file")
  models.load_pretrained(path)  # reads model.safetensors, never the broken msgpack


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_are_cast(tmp_path, dtype):
  torch_model = make_torch_clip("quick_gelu")
  torch_model.to(dtype).save_pretrained(tmp_path)
  _, params = models.load_pretrained(str(tmp_path))
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  _, bf16 = models.load_pretrained(str(tmp_path), param_dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree_util.tree_leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
  ref = torch_model.to(torch.float32).state_dict()["text_projection.weight"].numpy()
  np.testing.assert_array_equal(np.asarray(params["text_projection"]["kernel"]), ref.T)


def test_bf16_compute_close_to_fp32(hf_checkpoint):
  torch_model, path = hf_checkpoint
  model, params = models.load_pretrained(path)
  bf16_model, _ = models.load_pretrained(path, dtype=jnp.bfloat16)
  pixels, ids = sample_inputs(torch_model.config)
  ref = model.apply({"params": params}, pixels, ids)
  out = bf16_model.apply({"params": params}, pixels, ids)
  assert out.image_embeds.dtype == jnp.float32  # embeddings leave the model in fp32
  cos = lambda a, b: np.sum(models.normalize(a) * models.normalize(b), -1)
  assert np.min(cos(out.image_embeds, ref.image_embeds)) > 0.99
  assert np.min(cos(out.text_embeds, ref.text_embeds)) > 0.99


def rewrite_safetensors(path, edit):
  file = os.path.join(path, "model.safetensors")
  state = load_file(file)
  edit(state)
  save_file(state, file, metadata={"format": "pt"})


def test_missing_key_is_named(hf_checkpoint):
  _, path = hf_checkpoint
  rewrite_safetensors(path, lambda s: s.pop("vision_model.encoder.layers.1.mlp.fc2.bias"))
  with pytest.raises(models.CheckpointError,
                     match=r"missing key: vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
    models.load_pretrained(path)


def test_unexpected_key_is_named(hf_checkpoint):
  _, path = hf_checkpoint
  rewrite_safetensors(path, lambda s: s.update(extra_head=np.zeros(3, np.float32)))
  with pytest.raises(models.CheckpointError, match="unexpected key: extra_head"):
    models.load_pretrained(path)


def test_position_ids_buffers_are_ignored(hf_checkpoint):
  _, path = hf_checkpoint
  rewrite_safetensors(path, lambda s: s.update({
      "text_model.embeddings.position_ids": np.arange(12)[None]}))
  models.load_pretrained(path)


def test_wrong_shape_is_named(hf_checkpoint):
  _, path = hf_checkpoint
  config_file = os.path.join(path, "config.json")
  with open(config_file) as f:
    config = json.load(f)
  config["projection_dim"] += 1
  config["text_config"]["projection_dim"] = config["vision_config"]["projection_dim"] = \
      config["projection_dim"]
  with open(config_file, "w") as f:
    json.dump(config, f)
  with pytest.raises(models.CheckpointError, match=r"key (text|visual)_projection\.weight has "
                     r"shape \(\d+, \d+\), the model expects"):
    models.load_pretrained(path)


def test_pickle_only_directory_is_refused(hf_checkpoint):
  _, path = hf_checkpoint
  os.remove(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
    f.write(b"\x80\x04pickle that must never be opened")
  with pytest.raises(models.CheckpointError, match=r"only has pytorch_model\.bin.*refused"):
    models.load_pretrained(path)


def test_no_such_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="No such checkpoint directory"):
    models.load_pretrained(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    models.load_pretrained(str(tmp_path))
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="is a file"):
    models.load_pretrained(str(tmp_path / "config.json"))
  with pytest.raises(FileNotFoundError, match="has no model.safetensors or flax_model.msgpack"):
    models.load_pretrained(str(tmp_path))


def test_hub_ids_go_through_huggingface_hub(hf_checkpoint, monkeypatch):
  import huggingface_hub
  _, path = hf_checkpoint
  requested = []

  def fake_download(repo_id, filename, revision=None):
    requested.append((repo_id, filename, revision))
    local = os.path.join(path, filename)
    if not os.path.exists(local):
      raise huggingface_hub.errors.EntryNotFoundError(filename)
    return local

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
  model, _ = models.load_pretrained("someone/tiny-clip", revision="main")
  assert requested == [("someone/tiny-clip", "config.json", "main"),
                       ("someone/tiny-clip", "model.safetensors", "main")]
  assert model.config.projection_dim in (16, 24)


def test_a_pickle_only_hub_repo_is_refused_without_downloading_the_pickle(tmp_path, monkeypatch):
  import huggingface_hub
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
  files = {"config.json", "pytorch_model.bin"}
  downloaded = []

  def fake_download(repo_id, filename, revision=None):
    downloaded.append(filename)
    if filename != "config.json":  # the weights it has are pickles
      raise huggingface_hub.errors.EntryNotFoundError(filename)
    return str(tmp_path / filename)

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
  monkeypatch.setattr(huggingface_hub, "file_exists",
                      lambda repo_id, filename, revision=None: filename in files)
  with pytest.raises(hf.CheckpointError, match="only has pytorch_model.bin: pickle files are"):
    models.load_pretrained("someone/pickled-clip")
  assert "pytorch_model.bin" not in downloaded
