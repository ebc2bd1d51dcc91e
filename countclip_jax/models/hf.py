"""Hugging Face CLIP checkpoints in and out: hub ids, local directories and gs:// directories.

In: `model.safetensors` (PyTorch `CLIPModel` names, converted by rule; sharded index too) is
preferred, `flax_model.msgpack` (FlaxCLIPModel layout, our own tree) is accepted. Loading is
strict: every missing, unexpected or misshapen key is an error that names it. Pickle files
(`pytorch_model.bin`) are refused. Out: `config.json` + `model.safetensors` that
`transformers.CLIPModel.from_pretrained` reads. torch is never imported.

PyTorch -> Flax rules: Linear `weight` (out, in) -> `kernel` (in, out); Conv `weight` OIHW ->
`kernel` HWIO; LayerNorm `weight` -> `scale`; Embedding `weight` -> `embedding`; `position_ids`
buffers are ignored.

A model with `scan_layers` holds each encoder's layers stacked (`layers/<name>`, leading axis
depth); files always hold HF's `layers/{i}`. `stack_layers` / `unstack_layers` convert, here at
the boundary and nowhere else.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from etils import epath
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors

from countclip_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, param_shapes

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MSGPACK = "flax_model.msgpack"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5")
IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


class CheckpointError(ValueError):
  """A checkpoint that does not match the model: names the offending key(s)."""


# ----------------------------------------------------------------------------- configs

def config_from_hf(hf_config: dict) -> CLIPConfig:
  """transformers `CLIPConfig` dict (config.json) -> our `CLIPConfig`; HF fills the defaults."""
  hf = transformers.CLIPConfig.from_dict(hf_config)
  t, v = hf.text_config, hf.vision_config
  return CLIPConfig(
      text=TextConfig(vocab_size=t.vocab_size, context_length=t.max_position_embeddings,
                      width=t.hidden_size, depth=t.num_hidden_layers,
                      heads=t.num_attention_heads, mlp_dim=t.intermediate_size,
                      act=t.hidden_act, eos_token_id=t.eos_token_id,
                      layer_norm_eps=t.layer_norm_eps),
      vision=VisionConfig(image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                          depth=v.num_hidden_layers, heads=v.num_attention_heads,
                          mlp_dim=v.intermediate_size, act=v.hidden_act,
                          num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps),
      projection_dim=hf.projection_dim, logit_scale_init=hf.logit_scale_init_value)


def config_to_hf(config: CLIPConfig) -> transformers.CLIPConfig:
  t, v = config.text, config.vision
  text = dict(vocab_size=t.vocab_size, max_position_embeddings=t.context_length,
              hidden_size=t.width, num_hidden_layers=t.depth, num_attention_heads=t.heads,
              intermediate_size=t.mlp_dim, hidden_act=t.act, layer_norm_eps=t.layer_norm_eps,
              eos_token_id=t.eos_token_id, projection_dim=config.projection_dim,
              # bos is not used by the model; CLIP's vocabularies put it just before eos.
              bos_token_id=min(49406, t.vocab_size - 2))
  vision = dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
                num_hidden_layers=v.depth, num_attention_heads=v.heads,
                intermediate_size=v.mlp_dim, hidden_act=v.act, num_channels=v.num_channels,
                layer_norm_eps=v.layer_norm_eps, projection_dim=config.projection_dim)
  return transformers.CLIPConfig(text_config=text, vision_config=vision,
                                 projection_dim=config.projection_dim,
                                 logit_scale_init_value=config.logit_scale_init)


# ----------------------------------------------------------------------------- name rules

def _torch_name(path: tuple[str, ...], shape: tuple[int, ...]):
  """Flax param path -> (PyTorch state-dict key, flax->torch array transform)."""
  *prefix, leaf = path
  if leaf == "kernel" and len(shape) == 4:
    return ".".join(prefix + ["weight"]), lambda a: np.transpose(a, (3, 2, 0, 1))
  if leaf == "kernel":
    return ".".join(prefix + ["weight"]), lambda a: np.transpose(a)
  if leaf in ("scale", "embedding"):
    return ".".join(prefix + ["weight"]), lambda a: a
  return ".".join(path), lambda a: a


def _from_torch(array: np.ndarray, path) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if path[-1] == "kernel":
    return np.transpose(array)
  return array


def _check_keys(expected: set[str], found: set[str], source: str):
  missing, unexpected = sorted(expected - found), sorted(found - expected)
  if missing or unexpected:
    lines = [f"Checkpoint {source} does not match the model:"]
    lines += [f"  missing key: {k}" for k in missing[:20]]
    lines += [f"  unexpected key: {k}" for k in unexpected[:20]]
    if len(missing) + len(unexpected) > 40:
      lines.append(f"  ... ({len(missing)} missing, {len(unexpected)} unexpected in all)")
    raise CheckpointError("\n".join(lines))


def _cast(array, shape, dtype, key, source):
  if tuple(array.shape) != tuple(shape):
    raise CheckpointError(f"Checkpoint {source}: key {key} has shape {tuple(array.shape)}, "
                          f"the model expects {tuple(shape)}")
  return jnp.asarray(np.asarray(array).astype(dtype))


def params_from_torch_state(state: dict[str, np.ndarray], shapes, dtype=jnp.float32,
                            source: str = "state dict"):
  """PyTorch `CLIPModel` state dict -> Flax params, strictly against the `shapes` tree."""
  state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
  flat = flax.traverse_util.flatten_dict(shapes)
  names = {path: _torch_name(path, s.shape)[0] for path, s in flat.items()}
  _check_keys(set(names.values()), set(state), source)
  params = {}
  for path, s in flat.items():
    key = names[path]
    params[path] = _cast(_from_torch(state[key], path), s.shape, dtype, key, source)
  return flax.traverse_util.unflatten_dict(params)


def params_to_torch_state(params) -> dict[str, np.ndarray]:
  """Flax params -> PyTorch `CLIPModel` state dict (float32 numpy, contiguous)."""
  state = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    value = np.asarray(jax.device_get(value), dtype=np.float32)
    key, to_torch = _torch_name(path, value.shape)
    state[key] = np.array(to_torch(value), order="C")  # (ascontiguousarray makes 0-d 1-d)
  return state


def params_from_msgpack(data: bytes, shapes, dtype=jnp.float32, source: str = MSGPACK):
  """FlaxCLIPModel `flax_model.msgpack` bytes -> params, strictly against `shapes`."""
  restored = flax.serialization.msgpack_restore(data)
  restored = restored.get("params", restored)
  found = {"/".join(p): v for p, v in flax.traverse_util.flatten_dict(restored).items()}
  expected = {"/".join(p): s for p, s in flax.traverse_util.flatten_dict(shapes).items()}
  _check_keys(set(expected), set(found), source)
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split("/")): _cast(found[k], s.shape, dtype, k, source)
       for k, s in expected.items()})


# ----------------------------------------------------------------------------- layer layouts

# Arrays, or ShapeDtypeStructs for layouts without data.
def _stack(*xs):
  if isinstance(xs[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + xs[0].shape, xs[0].dtype)
  return jnp.stack(xs)


def _take(x, i: int):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return x[i]


def _is_per_layer(layers: dict) -> bool:
  return bool(layers) and all(str(k).isdigit() for k in layers)


def _stacked(layers: dict):
  return jax.tree_util.tree_map(_stack, *[layers[str(i)] for i in range(len(layers))])


def _unstacked(layers: dict):
  depth = jax.tree_util.tree_leaves(layers)[0].shape[0]
  return {str(i): jax.tree_util.tree_map(lambda a, i=i: _take(a, i), layers)
          for i in range(depth)}


def _convert_layers(params, to_stacked: bool):
  """`params` with every `layers` subtree that is not yet in the asked layout converted."""
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key == "layers" and isinstance(value, dict) and _is_per_layer(value) == to_stacked:
      out[key] = _stacked(value) if to_stacked else _unstacked(value)
    else:
      out[key] = _convert_layers(value, to_stacked)
  return out


def stack_layers(params):
  """HF's per-layer `.../layers/{i}/...` -> the scanned layout `.../layers/...` (leading axis
  i), under every `layers` key of the tree; a tree already stacked comes back unchanged."""
  return _convert_layers(params, to_stacked=True)


def unstack_layers(params):
  """The scanned layout -> HF's per-layer `layers/{i}`; a per-layer tree comes back unchanged."""
  return _convert_layers(params, to_stacked=False)


# ----------------------------------------------------------------------------- sources

class _Directory:
  """The files of a checkpoint: a local or gs:// directory, or a hub repo (downloaded lazily)."""

  def __init__(self, name_or_path: str, revision: str | None = None):
    self.name = str(name_or_path)
    self.revision = revision
    if self.name.startswith("gs://") or os.path.isdir(self.name):
      self.root = epath.Path(self.name)
      self.is_hub = False
    elif os.path.exists(self.name):
      raise FileNotFoundError(f"{self.name} is a file; pass the checkpoint directory.")
    elif self.name.startswith((".", "/", "~")) or self.name.count("/") != 1:
      raise FileNotFoundError(f"No such checkpoint directory: {self.name} (neither a local "
                              "directory, a gs:// path nor a hub id like org/name)")
    else:
      self.is_hub = True

  def has(self, filename: str) -> bool:
    """Whether the checkpoint holds `filename`, without downloading it (a hub repo's pickle
    weights are only named in the refusal, never fetched)."""
    if self.is_hub:
      import huggingface_hub  # pylint: disable=g-import-not-at-top
      return huggingface_hub.file_exists(self.name, filename, revision=self.revision)
    return (self.root / filename).exists()

  def local_file(self, filename: str) -> str | None:
    """A local path to `filename` (downloaded or copied if needed), or None if absent."""
    if self.is_hub:
      import huggingface_hub  # pylint: disable=g-import-not-at-top
      try:
        return huggingface_hub.hf_hub_download(self.name, filename, revision=self.revision)
      except huggingface_hub.errors.EntryNotFoundError:
        return None
    path = self.root / filename
    if not path.exists():
      return None
    if not self.name.startswith("gs://"):
      return os.fspath(path)
    local = os.path.join(tempfile.mkdtemp(prefix="countclip_ckpt_"), filename)
    path.copy(epath.Path(local))
    return local


def _read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
  state = {}
  for file in files:
    with safe_open(file, framework="numpy") as f:
      for key in f.keys():
        state[key] = f.get_tensor(key)
  return state


def load_pretrained(name_or_path: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    remat: bool | str = False, scan_layers: bool = False,
                    revision: str | None = None):
  """(model, params) from a hub id, a local directory or a gs:// directory.

  `dtype` is the compute dtype (e.g. jnp.bfloat16), `param_dtype` the dtype params are cast to
  whatever the file holds (fp16/bf16 files become fp32 by default). `scan_layers`: the model
  scans its layers and the params come stacked (see stack_layers).
  """
  model, params = _load_per_layer(name_or_path, dtype, param_dtype, remat, revision)
  if scan_layers:
    return model.clone(scan_layers=True), stack_layers(params)
  return model, params


def _load_per_layer(name_or_path, dtype, param_dtype, remat, revision):
  directory = _Directory(name_or_path, revision)
  config_file = directory.local_file("config.json")
  if config_file is None:
    raise FileNotFoundError(f"{name_or_path} has no config.json")
  with open(config_file) as f:
    config = config_from_hf(json.load(f))
  model = CLIP(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
  shapes = param_shapes(model)

  if (file := directory.local_file(SAFETENSORS)) is not None:
    state = _read_safetensors([file])
  elif (index := directory.local_file(SAFETENSORS_INDEX)) is not None:
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    state = _read_safetensors([directory.local_file(s) for s in shards])
  elif (file := directory.local_file(MSGPACK)) is not None:
    with open(file, "rb") as f:
      return model, params_from_msgpack(f.read(), shapes, param_dtype,
                                        f"{name_or_path}/{MSGPACK}")
  else:
    pickled = [p for p in PICKLES if directory.has(p)]
    if pickled:
      raise CheckpointError(
          f"{name_or_path} only has {', '.join(pickled)}: pickle files are refused (they can run "
          f"code). Convert it once with transformers: CLIPModel.from_pretrained(dir)"
          f".save_pretrained(dir, safe_serialization=True), which writes {SAFETENSORS}.")
    raise FileNotFoundError(f"{name_or_path} has no {SAFETENSORS} or {MSGPACK}")
  return model, params_from_torch_state(state, shapes, param_dtype, f"{name_or_path}")


def _write_model(out: epath.Path, hf_config, architecture: str, params: Any) -> None:
  """config.json + model.safetensors, as `save_pretrained` of `architecture` writes them."""
  out.mkdir(parents=True, exist_ok=True)
  hf_config.architectures = [architecture]
  (out / "config.json").write_text(hf_config.to_json_string())
  state = params_to_torch_state(unstack_layers(params))
  (out / SAFETENSORS).write_bytes(save_safetensors(state, metadata={"format": "pt"}))


def export_hf(model: CLIP, params: Any, out_dir: str, tokenizer=None) -> None:
  """Writes `config.json` + `model.safetensors` (transformers CLIPModel) to a local/gs:// dir.

  `tokenizer` (a text.tokenizer.Tokenizer) adds its files, so that `CLIPProcessor` and
  `CLIPTokenizerFast.from_pretrained(out_dir)` work too, with `model_max_length` set to the
  model's context length (Tokenizer.from_pretrained(out_dir) pads to it).
  """
  out = epath.Path(out_dir)
  _write_model(out, config_to_hf(model.config), "CLIPModel", params)
  if tokenizer is not None:
    _save_tokenizer(tokenizer, os.fspath(out), model.config.text.context_length)


def _save_tokenizer(tokenizer, out_dir: str, context_length: int) -> None:
  """The tokenizer's files with `model_max_length` set to the model's context length: what
  pipelines pad prompts to, and Tokenizer.from_pretrained's default (else CLIP's 77, past the
  positions of a short-context model)."""
  hf_tokenizer, saved = tokenizer.hf, tokenizer.hf.model_max_length
  hf_tokenizer.model_max_length = context_length
  try:
    tokenizer.save(out_dir)
  finally:  # the caller's tokenizer is left as it was
    hf_tokenizer.model_max_length = saved


class WidthError(ValueError):
  """A text tower whose width is not the one the export's target cross-attends at."""


def export_text_encoder(model: CLIP, params: Any, out_dir: str, tokenizer=None, *,
                        require_width: int | None = None) -> None:
  """The text tower as a diffusion pipeline's `text_encoder/` and `tokenizer/` subfolders.

  `out_dir/text_encoder` is a `transformers.CLIPTextModel` (its last_hidden_state is
  `CLIP.text_states`) with the `text_model.*` keys of the SD 1.x text encoders on the hub, which
  transformers 4 writes and 5 also reads (5 writes unprefixed keys). `out_dir/tokenizer` holds
  the tokenizer's files with `model_max_length` set to the model's context length: pipelines pad
  prompts to it.
  `require_width` (768 for Stable Diffusion 1.x) refuses any other text width with a WidthError
  before anything is written.
  """
  width = model.config.text.width
  if require_width is not None and width != require_width:
    raise WidthError(f"the text tower is {width} wide; the target cross-attends at "
                     f"{require_width}. Nothing was written.")
  out = epath.Path(out_dir)
  # Only the text tower: its params keep their `text_model/...` paths, hence the key prefix.
  _write_model(out / "text_encoder", config_to_hf(model.config).text_config, "CLIPTextModel",
               {"text_model": params["text_model"]})
  if tokenizer is not None:
    _save_tokenizer(tokenizer, os.fspath(out / "tokenizer"), model.config.text.context_length)
