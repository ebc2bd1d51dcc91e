"""evaluate.py: metrics on hand-made similarity matrices; skipped images; the eval run."""
import json

import jax
import numpy as np
import pytest

from countclip_jax import evaluate, models
from countclip_jax.data import countbench
from countclip_jax.text.tokenizer import build_tokenizer
from conftest import TFDS_COLOURS


def one_hot_scores(predicted, candidates=evaluate.NUMBERS):
  scores = np.zeros((len(predicted), len(candidates)))
  for row, p in enumerate(predicted):
    scores[row, list(candidates).index(p)] = 1.0
  return scores


def test_counting_metrics_known_confusion():
  true = [2, 2, 3, 3, 10, 10]
  predicted = [2, 3, 3, 3, 7, 10]
  m = evaluate.counting_metrics(one_hot_scores(predicted), true, skipped=4)
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["mae"] == pytest.approx((0 + 1 + 0 + 0 + 3 + 0) / 6)
  assert m["per_number"]["2"] == 0.5 and m["per_number"]["3"] == 1.0
  assert m["per_number"]["10"] == 0.5 and m["per_number"]["5"] is None
  confusion = np.asarray(m["confusion"])
  assert confusion.sum() == 6 and m["n"] == 6 and m["skipped"] == 4
  assert confusion[0, 0] == 1 and confusion[0, 1] == 1  # true 2: once 2, once 3
  assert confusion[8, 5] == 1 and confusion[8, 8] == 1  # true 10: once 7, once 10


def test_zero_shot_and_retrieval_on_hand_made_embeddings():
  eye = np.eye(4)
  assert evaluate.zero_shot_accuracy(eye, eye, [0, 1, 2, 3]) == 1.0
  assert evaluate.zero_shot_accuracy(eye, eye, [1, 1, 2, 3]) == 0.75
  texts = eye[[0, 1, 3, 2]]  # pairs 2 and 3 swapped
  r = evaluate.retrieval_recall(eye, texts, ks=(1, 2))
  assert r["image_to_text_r@1"] == 0.5 and r["image_to_text_r@2"] == 1.0
  assert r["text_to_image_r@1"] == 0.5


def test_count_retrieval_precision():
  # Images 0..3 show 2, 2, 3, 3 objects; the "two" prompt is closest to images 0 and 2.
  image = np.eye(4)
  prompts = np.zeros((2, 4))
  prompts[0, [0, 2]] = [1.0, 0.9]
  prompts[1, [2, 3]] = [1.0, 0.8]
  r = evaluate.count_retrieval(image, prompts, [2, 2, 3, 3], candidates=(2, 3), k=2)
  assert r["precision_at_k"] == {"2": 0.5, "3": 1.0}


def test_confusion_plot_is_written(tmp_path):
  m = evaluate.counting_metrics(one_hot_scores([2, 3, 4]), [2, 3, 5])
  evaluate.plot_confusion(m, str(tmp_path / "c.png"), "test")
  assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def embedder():
  from countclip_jax.data import synthetic
  tokenizer = build_tokenizer(synthetic.vocabulary() + [e.text for e in countbench.read_json()],
                              context_length=16)
  import dataclasses
  arch = models.ARCHITECTURES["tiny"]
  model = models.CLIP(dataclasses.replace(arch, text=dataclasses.replace(
      arch.text, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id)))
  params = models.init_params(model, jax.random.key(0))
  return evaluate.Embedder(model, params, tokenizer, batch_size=32)


def test_synthetic_eval_writes_results(embedder, tmp_path):
  results = evaluate.run(embedder, ["synthetic"], str(tmp_path), tag="_step7", synthetic_size=90)
  saved = json.loads((tmp_path / "eval" / "synthetic_step7.json").read_text())
  assert saved["counting"]["n"] == 90 and saved["counting"]["skipped"] == 0
  assert (tmp_path / "eval" / "synthetic_step7_confusion.png").exists()
  assert 0 <= saved["color_accuracy"] <= 1 and 0 <= saved["shape_accuracy"] <= 1
  flat = evaluate.scalars(results)
  assert set(flat) == {"synthetic/count_accuracy", "synthetic/count_mae",
                       "synthetic/color_accuracy", "synthetic/shape_accuracy"}


def test_countbench_eval_counts_skipped_images(embedder, tmp_path):
  from PIL import Image
  import io
  entries = countbench.read_json()[:5]
  good = io.BytesIO()
  Image.new("RGB", (40, 30), (200, 10, 10)).save(good, format="JPEG")
  examples = [countbench.Example(e.index, e.url, e.text, e.number,
                                 image_bytes=good.getvalue() if i < 3 else b"\xff\xd8broken")
              for i, e in enumerate(entries)]
  import pyarrow as pa
  import pyarrow.parquet as pq
  table = pa.table({"image_url": [e.url for e in examples], "text": [e.text for e in examples],
                    "number": [e.number for e in examples],
                    "image": [{"bytes": e.image_bytes, "path": None} for e in examples]})
  pq.write_table(table, tmp_path / "countbench.parquet")
  results = evaluate.run(embedder, ["countbench"], str(tmp_path),
                         countbench_source=str(tmp_path / "countbench.parquet"))
  assert results["countbench"]["counting"]["n"] == 3
  assert results["countbench"]["counting"]["skipped"] == 2
  saved = json.loads((tmp_path / "eval" / "countbench.json").read_text())
  assert saved["count_retrieval"]["k"] == 3 and saved["count_retrieval"]["objects"] == 3
  assert saved["count_retrieval"]["precision_at_k"]["2"] is None  # no readable image shows two
  with pytest.raises(ValueError, match="needs a source"):
    evaluate.run(embedder, ["countbench"], str(tmp_path))


@pytest.mark.parametrize("caption, count, phrase", [
    ("Set of nine padlocks vector", 9, "padlocks"),
    ("two kittens sitting", 2, "kittens"),
    ("Ten multicolored butterflies on a white background", 10, "multicolored butterflies"),
    ("Photo of three young crazy girlfriends lying on the couch", 3, "young crazy girlfriends"),
    ("Nine cartoon owl outlines - Set of nine stylized...", 9, "cartoon owl outlines"),
    ("a two-tone car and five red apples, fresh", 5, "red apples"),
    ("Doctor gesture and pose of the six", 6, None),
    ("a bowl of apples", 3, None),
])
def test_object_phrase(caption, count, phrase):
  assert evaluate.object_phrase(caption, count) == phrase


class OneProcessEmbedder:
  """What eval streams need of an Embedder besides images() and texts(), on one process."""
  batch_size = 4

  def batches(self, dataset, where):
    from countclip_jax.data import pipeline
    return pipeline.eval_batches(dataset, self.batch_size, process_index=0, process_count=1)

  def process_images(self, pixels, example):
    return self.images(pixels), np.asarray(example)

  def gather_fields(self, batch):
    keep = np.asarray(batch["example"]) >= 0
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


class CountingEmbedder(OneProcessEmbedder):
  """An ideal counter: an image embeds as the count its red level encodes (20 per object), a
  text as the number it states; the real tokenizer and image size, for the eval's plumbing."""

  def __init__(self, real):
    self.model, self.tokenizer = real.model, real.tokenizer

  def images(self, pixels):
    from countclip_jax.data import images
    red = (np.asarray(pixels)[..., 0].mean(axis=(1, 2)) * images.CLIP_STD[0]
           + images.CLIP_MEAN[0]) * 255
    return np.eye(11)[np.rint(red / 20).astype(int)]

  def texts(self, texts):
    from countclip_jax.text import numbers
    return np.eye(11)[[numbers.parse_count(t) or 0 for t in texts]]


def test_countbench_count_retrieval_on_a_download_cache(embedder, tmp_path):
  from PIL import Image
  import io
  captions = [("two dogs on a sofa", 2), ("Two red apples.", 2), ("three dogs", 3),
              ("three cats in a box", 3), ("four cats", 4), ("four red apples, fresh", 4),
              ("five cats", 5)]
  entries = [{"image_url": f"http://images.test/{i}.png", "text": t, "number": n}
             for i, (t, n) in enumerate(captions)]
  (tmp_path / "images").mkdir()
  (tmp_path / "entries.json").write_text(json.dumps(entries))
  for i, (_, n) in enumerate(captions):
    png = io.BytesIO()
    Image.new("RGB", (20, 14), (20 * n, 0, 0)).save(png, format="PNG")
    data = png.getvalue() if n != 5 else b"\x89PNG broken"  # the five cats do not decode
    with open(countbench.cache_path(str(tmp_path), entries[i]["image_url"]), "wb") as f:
      f.write(data)
  result = evaluate.eval_countbench(CountingEmbedder(embedder), str(tmp_path), retrieval_k=2)
  assert result["counting"]["accuracy"] == 1.0 and result["counting"]["skipped"] == 1
  retrieval = result["count_retrieval"]
  # "red apples", "dogs", "cats" (only from images that decode: the five cats are not a query).
  assert retrieval["objects"] == 3 and retrieval["k"] == 2
  assert retrieval["precision_at_k"] == {"2": 1.0, "3": 1.0, "4": 1.0, **{
      str(n): None for n in range(5, 11)}}
  assert retrieval["mean_precision_at_k"] == 1.0
  assert retrieval["base_rate"]["2"] == pytest.approx(2 / 6) and retrieval["base_rate"]["5"] == 0


class ColourEmbedder(OneProcessEmbedder):
  """Stands in for Embedder: an image embeds as its dominant channel, a text as the colour word
  it names, so every zero-shot score is known in advance."""

  def images(self, pixels):
    return np.eye(3)[np.asarray(pixels).mean(axis=(1, 2)).argmax(-1)]

  def texts(self, texts):
    return np.eye(3)[[next(i for i, c in enumerate(TFDS_COLOURS) if c in t) for t in texts]]


def test_zero_shot_on_a_tfds_set_counts_hits_and_skipped_images(tfds_colours_dir):
  from countclip_jax.data import classification
  data_dir, labels = tfds_colours_dir
  dataset, names = classification.load("tfds:tiny_colours", 8, data_dir=data_dir)
  result = evaluate.eval_zero_shot(ColourEmbedder(), dataset, names)["zero_shot"]
  # 10 readable images (4-image batches, the last one padded), one of them mislabelled; the
  # 11th does not decode.
  assert result["n"] == 10 and result["skipped"] == 1 and result["classes"] == 3
  assert result["top1"] == pytest.approx(9 / 10) and result["top3"] == 1.0
  assert result["templates"] == len(evaluate.PROMPT_TEMPLATES)


def test_label_ranks_give_top_k_hits():
  scores = np.array([[0.1, 0.9, 0.5], [0.8, 0.1, 0.3], [0.2, 0.3, 0.1]])
  ranks = evaluate.label_ranks(scores, [1, 2, 0])
  np.testing.assert_array_equal(ranks < 1, [True, False, False])
  np.testing.assert_array_equal(ranks < 2, [True, True, True])


def test_tfds_eval_run_writes_results(embedder, tfds_colours_dir, tmp_path):
  results = evaluate.run(embedder, ["tfds:tiny_colours:test"], str(tmp_path), tag="_step3",
                         tfds_data_dir=tfds_colours_dir[0])
  saved = json.loads((tmp_path / "eval" / "tfds_tiny_colours_test_step3.json").read_text())
  assert saved == results["tfds_tiny_colours_test"]
  assert saved["zero_shot"]["n"] == 10 and saved["zero_shot"]["skipped"] == 1
  assert set(evaluate.scalars(results)) == {"tfds_tiny_colours_test/zero_shot_top1",
                                            "tfds_tiny_colours_test/zero_shot_top3"}
  with pytest.raises(ValueError, match="Unknown eval dataset 'cifar10'"):
    evaluate.run(embedder, ["cifar10"], str(tmp_path))


def test_command_line_on_a_run(tiny_workdir, tfds_colours_dir, tmp_path):
  import subprocess
  import sys
  command = [sys.executable, "-m", "countclip_jax.evaluate", f"--workdir={tiny_workdir}",
             "--data=synthetic,tfds:tiny_colours", f"--tfds_data_dir={tfds_colours_dir[0]}",
             "--synthetic_size=45", "--batch_size=16", f"--out={tmp_path}"]
  # The subprocess has no TinyColours class: tfds reads the prepared set from its files alone,
  # as it would a cifar10 prepared on another machine.
  done = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  printed = json.loads(done.stdout[done.stdout.index("{"):])
  assert {"synthetic/count_accuracy", "tfds_tiny_colours/zero_shot_top1"} <= set(printed)
  saved = json.loads((tmp_path / "eval" / "synthetic.json").read_text())
  assert saved["counting"]["n"] == 45 and printed["synthetic/count_accuracy"] == saved[
      "counting"]["accuracy"]
  assert json.loads((tmp_path / "eval" / "tfds_tiny_colours.json").read_text())[
      "zero_shot"]["skipped"] == 1
  refused = subprocess.run(command[:4] + ["--hf=somewhere"], capture_output=True, text=True,
                           timeout=300)
  assert refused.returncode != 0 and "exactly one of --workdir or --hf" in refused.stderr


def test_an_hf_eval_without_out_goes_under_runs_eval_named_after_the_model(tiny_export,
                                                                          tmp_path):
  import os
  import shutil
  import subprocess
  import sys
  shutil.copytree(tiny_export, tmp_path / "my-export")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-m", "countclip_jax.evaluate", "--hf=./my-export",
                         "--synthetic_size=9", "--batch_size=9"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": root})
  assert done.returncode == 0, done.stderr[-3000:]
  where = tmp_path / "runs" / "eval" / "my-export" / "eval"
  assert json.loads((where / "synthetic.json").read_text())["counting"]["n"] == 9
  assert f"Wrote {where}/\n" in done.stderr
  assert "synthetic/count_accuracy" in json.loads(done.stdout)  # stdout: the JSON alone
