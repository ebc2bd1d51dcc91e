"""Shared test fixtures: tiny random CLIP checkpoints written in Hugging Face format."""
import os
import shutil
import tempfile

import numpy as np
import pytest

# Tests run on the CPU; 8 host devices let sharding tests build real meshes.
# -O0: the suite is dominated by compiling tiny models (x0.77 on test_trainer's sharded step).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, both xdist workers and every `python -m
# countclip_jax.main` a test starts (they inherit os.environ): most of those runs compile the
# same tiny step, and a cache hit loads it ~3x faster than XLA:CPU compiles it. Cache keys hold
# the program, jaxlib and the XLA flags that matter, so a hit is the executable a compile makes.
# The controller makes it before it starts the workers, which inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE = tempfile.mkdtemp(prefix="countclip-xla-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



# The heaviest modules, heaviest first (seconds of test time in `make test --durations=0` on a
# 2-core Xeon, 4 Dec 2026: main 209, trainer 173, multihost 145, demo 98, misuse 72, gcs 68,
# hf 64, benchmarks 61, density_task 49, density_model 47). `make test` hands whole modules
# to its two workers in this order (xdist's loadfile, module fixtures set up once), so each
# worker takes the next one when free and both end together (longest first); in file order one
# long module could start last and run alone for a minute and a half. Only the order changes.
HEAVIEST_FIRST = ("test_main.py", "test_trainer.py", "test_multihost.py", "test_demo.py",
                  "test_misuse.py", "test_gcs.py", "test_hf.py", "test_benchmarks.py",
                  "test_density_task.py", "test_density_model.py", "test_clip.py",
                  "test_evaluate.py")


def pytest_collection_modifyitems(items):
  rank = lambda item: (HEAVIEST_FIRST.index(item.path.name) if item.path.name in HEAVIEST_FIRST
                       else len(HEAVIEST_FIRST))
  items.sort(key=rank)  # stable: a module's tests keep their order


def pytest_sessionfinish(session):
  if "_OWN_CACHE" in globals() and not hasattr(session.config, "workerinput"):
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)  # the controller, after every worker ended


# Two tiny architectures for parity: one quick_gelu, one gelu; text and vision widths differ;
# eos_token_id is not 2 (the modern pooling rule: the first eos position).
TINY_HF_CONFIGS = {
    "quick_gelu": dict(
        text_config=dict(vocab_size=120, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         hidden_act="quick_gelu", bos_token_id=118, eos_token_id=119,
                         pad_token_id=119),
        vision_config=dict(image_size=24, patch_size=8, hidden_size=48, intermediate_size=80,
                           num_hidden_layers=2, num_attention_heads=3, hidden_act="quick_gelu"),
        projection_dim=24),
    "gelu": dict(
        text_config=dict(vocab_size=90, hidden_size=40, intermediate_size=56,
                         num_hidden_layers=3, num_attention_heads=5, max_position_embeddings=12,
                         hidden_act="gelu", bos_token_id=88, eos_token_id=89, pad_token_id=0),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=24, intermediate_size=48,
                           num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu"),
        projection_dim=16),
}


def make_torch_clip(name, seed=0, **overrides):
  """A transformers CLIPModel with every weight random (not HF's ones/zeros init)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  kwargs = {**TINY_HF_CONFIGS[name], **overrides}
  torch.manual_seed(seed)
  model = transformers.CLIPModel(transformers.CLIPConfig(**kwargs)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
    model.logit_scale.fill_(np.log(1 / 0.07))
  return model


def sample_inputs(config, batch=3, seed=0):
  """NHWC pixels and eos-terminated ids with padding after the eos."""
  rng = np.random.RandomState(seed)
  t, v = config.text_config, config.vision_config
  pixels = rng.randn(batch, v.image_size, v.image_size, 3).astype(np.float32)
  length = t.max_position_embeddings
  ids = np.full((batch, length), t.pad_token_id, np.int32)
  for i in range(batch):
    n = rng.randint(1, length - 1)
    ids[i, 0] = t.bos_token_id
    ids[i, 1:n] = rng.randint(1, t.vocab_size - 3, size=n - 1)
    ids[i, n] = t.eos_token_id
  return pixels, ids


@pytest.fixture(params=sorted(TINY_HF_CONFIGS))
def hf_checkpoint(request, tmp_path):
  """(torch model, directory written by save_pretrained)."""
  model = make_torch_clip(request.param)
  model.save_pretrained(tmp_path / "ckpt")
  return model, str(tmp_path / "ckpt")


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A finished 4-step run of configs/tiny.py, made by the command line as a user would, with
  model.scan_layers: its checkpoints hold stacked layers, which every command reads as HF's
  per-layer tree (the default layout is what test_main's runs write)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path_factory.mktemp("tiny_run")
  subprocess.run([sys.executable, "-m", "countclip_jax.main",
                  f"--config={os.path.join(root, 'configs', 'tiny.py')}", f"--workdir={workdir}",
                  "--config.train.steps=4", "--config.model.scan_layers=True", "--verbosity=-1"],
                 check=True, cwd=root, timeout=300, capture_output=True,
                 env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  return str(workdir)


# The colours of the tfds test set below: image i is a solid COLOURS[i % 3], labelled so; then
# one red image labelled "blue" and one whose bytes are not an image.
TFDS_COLOURS = ("red", "green", "blue")
TFDS_RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


@pytest.fixture(scope="session")
def tfds_colours_dir(tmp_path_factory):
  """A tfds classification set 'tiny_colours' (test split, 11 examples) prepared in array_record
  format, as `tfds build --file_format=array_record` leaves it: (data_dir, its 11 labels)."""
  import io  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def png(colour):
    out = io.BytesIO()
    Image.new("RGB", (16, 12), TFDS_RGB[colour]).save(out, format="PNG")
    return out.getvalue()

  examples = [(png(TFDS_COLOURS[i % 3]), i % 3) for i in range(9)]
  examples += [(png("red"), 2), (b"\x89PNG\r\n\x1a\n truncated", 0)]

  class TinyColours(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=list(TFDS_COLOURS))}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, (image, label) in enumerate(examples):
        yield i, {"image": image, "label": label}

  data_dir = tmp_path_factory.mktemp("tfds")
  TinyColours(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir), [label for _, label in examples]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
  """A random tiny CLIP (context length 16) exported as a Hugging Face directory with the
  synthetic world's tokenizer, as models.export_hf writes it: what --hf and the README take."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from countclip_jax import models  # pylint: disable=g-import-not-at-top
  from countclip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from countclip_jax.text.tokenizer import build_tokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = build_tokenizer(synthetic.vocabulary() + ["dogs"], context_length=16)
  arch = models.ARCHITECTURES["tiny"]
  model = models.CLIP(dataclasses.replace(arch, text=dataclasses.replace(
      arch.text, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id)))
  # Random weights from the shapes alone: model.init runs op by op, ~10x slower.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype),
                                  models.param_shapes(model))
  out = str(tmp_path_factory.mktemp("tiny_export"))
  models.export_hf(model, params, out, tokenizer=tokenizer)
  return out
