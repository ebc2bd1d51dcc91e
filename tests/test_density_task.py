"""The density task through the one loop: a run from the command line, its resume, its eval
protocol and the count command."""
import io
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from countclip_jax import checkpoints, density_eval
from countclip_jax.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "density.py")
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                  "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}


def run(*command):
  return subprocess.run([sys.executable, "-m", *command], env=ENV, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope="module")
def density_run(tmp_path_factory):
  """A finished 6-step run of configs/density.py:tiny (checkpoints at 3 and 6)."""
  workdir = tmp_path_factory.mktemp("density") / "run"
  result = run("countclip_jax.main", f"--config={CONFIG}:tiny", f"--workdir={workdir}",
               "--verbosity=-1")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_a_density_run_trains_and_evaluates(density_run):
  rows = read_metrics(str(density_run))
  train = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train] == [2, 4, 6]
  assert {"train/density_mse", "train/prompt_contrast_loss", "train/count_mae"} <= set(train[0])
  final = [r for r in rows if "eval/density/mae" in r]
  assert len(final) == 1 and np.isfinite(final[0]["eval/density/absent_mean"])
  assert (density_run / "eval" / "density_step6.png").exists()
  params = checkpoints.restore_params(str(density_run))
  assert set(params) >= {"backbone", "interaction", "decoder"}


def test_the_frozen_backbone_stays_and_the_head_trains(density_run):
  first = checkpoints.restore_params(str(density_run), 3)
  last = checkpoints.restore_params(str(density_run), 6)
  jax.tree_util.tree_map(np.testing.assert_array_equal, first["backbone"], last["backbone"])
  assert not np.allclose(first["decoder"]["head"]["kernel"], last["decoder"]["head"]["kernel"])


def test_a_resumed_density_run_ends_bit_identical(density_run, tmp_path):
  resumed = tmp_path / "resumed"
  shutil.copytree(density_run, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")  # as if it had stopped after step 3's save
  result = run("countclip_jax.main", f"--config={CONFIG}:tiny", f"--workdir={resumed}",
               "--verbosity=-1")
  assert result.returncode == 0, result.stderr[-3000:]
  jax.tree_util.tree_map(np.testing.assert_array_equal, checkpoints.restore_params(str(resumed)),
                         checkpoints.restore_params(str(density_run)))


def test_sliding_window_equals_a_direct_evaluation():
  """With a per-pixel model, the windows (any stride, the last one over the padding) must
  reassemble exactly what the model gives on the whole image at once."""
  rng = np.random.default_rng(0)
  image = rng.normal(size=(32, 150, 3)).astype(np.float32)  # wider than the window
  per_pixel = lambda x: np.tanh(x).sum(-1)
  for stride in (8, 13, 32):
    np.testing.assert_allclose(density_eval.sliding_window(per_pixel, image, 32, stride),
                               per_pixel(image), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="stride"):
    density_eval.sliding_window(per_pixel, image, 32, 0)


def test_count_command_counts_and_skips_a_corrupt_file(density_run, tmp_path):
  good = tmp_path / "wide.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 170, 3), np.uint8)).save(good)
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  out = tmp_path / "out"
  result = run("countclip_jax.count", f"--workdir={density_run}", "--prompt=red circles",
               f"--out={out}", str(good), str(bad))
  assert result.returncode == 1, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1 and lines[0].endswith(str(good))
  assert float(lines[0].split("\t")[0]) >= 0
  assert f"skipped {bad}" in result.stderr
  with Image.open(out / "wide_density.png") as overlay:
    assert overlay.size[0] > overlay.size[1]  # the whole wide image, not a square crop


def test_the_fsc147_preset_is_clip_counts_recipe():
  from configs import density
  c = density.get_config("fsc147")
  assert (c.model.init, c.density.model, c.density.crop_size) == (
      "openai/clip-vit-base-patch16", "clip_count", 384)
  assert (c.density.sigma, c.density.scale, c.density.count_weight) == (1.0, 60.0, 0.0)
  assert (c.train.batch_size, c.train.lr, c.train.b1, c.train.b2, c.train.weight_decay) == (
      32, 1e-4, 0.9, 0.95, 0.05)
  assert (c.density.pooling, c.density.cross_attention) == ("eot", "tokens")  # minus its bugs


def test_real_set_eval_batches_windows_of_several_images_like_one_image_at_a_time(tmp_path):
  """eval_real puts windows of different images (and prompts) in one call; each image's count
  must be what the sliding window over that image alone gives."""
  # pylint: disable=import-outside-toplevel
  from configs import common
  from countclip_jax import eval_mesh
  from countclip_jax.data import density_pipeline
  from countclip_jax.models import density as density_model
  from test_density_model import ids_for, make, random_params
  from test_multihost import write_fsc147
  write_fsc147(tmp_path, (96, 200, 150, 300, 130))  # 1-7 windows an image at stride 32
  config = common.base()
  config.density.source, config.density.data_dir = "fsc147", str(tmp_path)
  config.density.crop_size, config.density.eval_window_stride = 96, 32
  model = make()
  params = random_params(density_model.param_shapes(model))


  class PromptIds:
    """Each distinct prompt its own one-token name, in the tiny CLIP's bos/eos (its pooling
    finds eos by id, so a tokenizer of other ids would leave the maps blind to the prompt)."""
    context_length, seen = 12, {}

    def __call__(self, texts):
      return np.concatenate([ids_for([10 + self.seen.setdefault(t, len(self.seen))])
                             for t in texts])

  tok = PromptIds()
  mesh = eval_mesh.EvalMesh(params, 8)
  results, _ = density_eval.eval_real(config, model, mesh, tok)
  dataset = density_pipeline.eval_dataset(config, 64)
  want = []
  for i in range(len(dataset)):
    image, _ = density_pipeline.eval_image(dataset[i], config)
    windows = density_eval.window_predictor(model, mesh, tok([dataset[i]["prompt"]])[None])
    want.append(float(density_eval.sliding_window(windows, image, 96, 32).sum()) / 60)
  true = [len(dataset[i]["points"]) for i in range(len(dataset))]
  assert len(set(want)) == 5  # prompts and pixels differ, so a mixed-up row would show
  expected = density_eval._errors(want, true)  # pylint: disable=protected-access
  assert results["n"] == 5 and results["skipped"] == 0
  assert results["mae"] == pytest.approx(expected["mae"], rel=1e-5)
  assert results["rmse"] == pytest.approx(expected["rmse"], rel=1e-5)
  # A corrupt image is skipped and counted, and the others still count as they did.
  (tmp_path / "images_384_VarV2" / "v2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  results, _ = density_eval.eval_real(config, model, mesh, tok)
  kept = [0, 1, 3, 4]
  expected = density_eval._errors(  # pylint: disable=protected-access
      [want[i] for i in kept], [true[i] for i in kept])
  assert results["skipped"] == 1 and results["n"] == 4
  assert results["mae"] == pytest.approx(expected["mae"], rel=1e-5)
