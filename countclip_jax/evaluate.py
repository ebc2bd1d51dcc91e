r"""Evaluation: counting (the CountBench protocol), zero-shot retention, retrieval, plots.

  python -m countclip_jax.evaluate --workdir=DIR [--step=N] --data=synthetic,countbench
  python -m countclip_jax.evaluate --hf=DIR_or_hub_id --data=countbench --countbench=CACHE
  python -m countclip_jax.evaluate --hf=DIR --data=tfds:cifar10,tfds:imagenet2012:validation \
      --tfds_data_dir=gs://BUCKET/tfds --class_names=imagenet_classes.txt

Counting: each image's caption is rewritten with every number two..ten, fitted to the context
length around the number word, and the most similar candidate is the prediction. Reported: top-1
accuracy, accuracy per true number, mean absolute count error, the confusion matrix (JSON and a
PNG heat map, rows = true number) and how many images were skipped, never silently.
Retention: zero-shot classification with CLIP's prompt ensemble, on the synthetic world's colours
and shapes or on a prepared tfds classification set (`tfds:NAME[:SPLIT]`, data/classification.py);
image-text retrieval recall@k and count retrieval on the synthetic world; count retrieval
("three dogs": do the top-k images show three?) on CountBench.
Results go to OUT/eval/<data>[_step<N>].json (+ PNGs), and the command prints that directory.
OUT is --out, else the workdir, else (--hf) runs/eval/<the --hf name>, e.g.
runs/eval/openai_clip-vit-base-patch32: under the current directory, one per model. Training's
periodic evals call the same functions.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from etils import epath

from countclip_jax import cli
from countclip_jax import eval_mesh
from countclip_jax.data import classification
from countclip_jax.models.clip import CLIP, normalize
from countclip_jax.text import numbers
from countclip_jax.text.tokenizer import Tokenizer, fit_captions

FLAGS = flags.FLAGS
NUMBERS = numbers.NUMBERS  # two..ten
# CLIP's prompt ensemble for ImageNet (the 7 templates its prompt-engineering notebook selected
# from 80) plus the plain "a photo of a {}.".
PROMPT_TEMPLATES = ("a photo of a {}.", "itap of a {}.", "a bad photo of the {}.",
                    "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
                    "art of the {}.", "a photo of the small {}.")


# ----------------------------------------------------------------------------- metrics

def counting_metrics(scores: np.ndarray, true_numbers: Sequence[int],
                     candidates: Sequence[int] = NUMBERS, skipped: int = 0) -> dict:
  """Metrics from (N, len(candidates)) image-vs-candidate-caption scores.

  Returns accuracy, mae (mean |predicted - true|), per_number accuracy (None where a number has
  no image), confusion[true][predicted] counts, n (images scored) and skipped.
  """
  scores, true_numbers = np.asarray(scores), np.asarray(true_numbers)
  candidates = list(candidates)
  predicted = np.asarray(candidates)[np.argmax(scores, axis=1)]
  index = {n: i for i, n in enumerate(candidates)}
  confusion = np.zeros((len(candidates), len(candidates)), np.int64)
  for t, p in zip(true_numbers, predicted):
    confusion[index[int(t)], index[int(p)]] += 1
  per_number = {}
  for n in candidates:
    rows = true_numbers == n
    per_number[str(n)] = float(np.mean(predicted[rows] == n)) if rows.any() else None
  n = len(true_numbers)
  return {
      "accuracy": float(np.mean(predicted == true_numbers)) if n else 0.0,
      "mae": float(np.mean(np.abs(predicted - true_numbers))) if n else 0.0,
      "per_number": per_number, "confusion": confusion.tolist(), "numbers": candidates,
      "n": n, "skipped": int(skipped)}


def zero_shot_accuracy(image_emb, class_emb, labels) -> float:
  """Top-1 accuracy of nearest class embedding (both normalised)."""
  return float(np.mean(np.argmax(np.asarray(image_emb) @ np.asarray(class_emb).T, 1)
                       == np.asarray(labels)))


def label_ranks(scores, labels) -> np.ndarray:
  """Per row of (N, classes) scores: how many classes score above the row's label (0 = top-1;
  the label is in the top k where the rank is below k)."""
  scores = np.asarray(scores)
  return np.sum(scores > scores[np.arange(len(scores)), labels][:, None], axis=1)


def retrieval_recall(image_emb, text_emb, ks: Iterable[int] = (1, 5)) -> dict:
  """Recall@k for paired embeddings (row i of each is a pair), both directions."""
  sim = np.asarray(image_emb) @ np.asarray(text_emb).T
  target = np.arange(sim.shape[0])
  out = {}
  for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
    rank = label_ranks(s, target)
    for k in ks:
      out[f"{name}_r@{k}"] = float(np.mean(rank < k))
  return out


def count_retrieval(image_emb, prompt_emb, image_numbers, candidates=NUMBERS, k=10) -> dict:
  """For each number's prompt ("three {objects}"), the share of its top-k images that show
  exactly that many objects (the paper's retrieval figure, as a number)."""
  sim = np.asarray(prompt_emb) @ np.asarray(image_emb).T  # (numbers, images)
  top = np.argsort(-sim, axis=1)[:, :k]
  precision = {str(n): float(np.mean(np.asarray(image_numbers)[top[i]] == n))
               for i, n in enumerate(candidates)}
  return {"precision_at_k": precision, "k": k,
          "mean_precision_at_k": float(np.mean(list(precision.values())))}


# Where a caption's object phrase ends: prepositions, conjunctions, and the verbs and stock-photo
# tags that most often follow the objects in CountBench's captions ("two kittens sitting",
# "nine padlocks vector").
_PHRASE_END = frozenset("""in on at with of from for by and or to into onto over under near against
    that who which are is was were isolated sitting standing lying set vector illustration photo
    stock image clipart background as per each""".split())
_PHRASE_BREAK = re.compile(r"[.,;:!?()\[\]\"|/]|\s[-\u2013\u2014]|[-\u2013\u2014]\s")


def object_phrase(caption: str, count: int, max_words: int = 4) -> str | None:
  """What a counting caption counts, lowercased: the words after its count word up to the first
  punctuation mark or _PHRASE_END word, at most `max_words` ("Set of nine padlocks vector" ->
  "padlocks", "ten multicolored butterflies on a white background" -> "multicolored
  butterflies"). A rule, not a parser: "ten white and brown eggs" gives "white". None when the
  caption has no word for `count` or nothing follows it."""
  mentions = [m for m in numbers.find_numbers(caption) if m.value == count]
  mentions = [m for m in mentions if m.reason is None] or mentions
  if not mentions:
    return None
  words = []
  for word in _PHRASE_BREAK.split(caption[mentions[0].end:])[0].split()[:max_words]:
    if word.lower() in _PHRASE_END:
      break
    words.append(word.lower())
  return " ".join(words) or None


def plot_confusion(metrics: dict, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  confusion = np.asarray(metrics["confusion"], np.float64)
  rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(5, 4.4))
  im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
  labels = [str(n) for n in metrics["numbers"]]
  ax.set_xticks(range(len(labels)), labels)
  ax.set_yticks(range(len(labels)), labels)
  ax.set_xlabel("predicted number")
  ax.set_ylabel("true number")
  ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.1%}, MAE {metrics['mae']:.2f}")
  for i in range(len(labels)):
    for j in range(len(labels)):
      if rows[i, j] >= 0.005:
        ax.text(j, i, f"{rows[i, j]:.2f}"[1:] if rows[i, j] < 1 else "1", ha="center",
                va="center", fontsize=7, color="white" if rows[i, j] > 0.5 else "black")
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- embeddings

@functools.lru_cache(maxsize=8)
def _encoders(model: CLIP, out_sharding):
  """Jitted (params, images or texts) -> normalised embeddings, once per model and mesh:
  training's periodic evals build a new Embedder each time and would otherwise compile both
  again. The examples' indices pass through, replicated like the embeddings, so that every
  process knows which row is which."""
  encode = lambda method, p, x, example: (
      normalize(model.apply({"params": p}, x, method=method)), example)
  jit = functools.partial(jax.jit, out_shardings=out_sharding)
  return tuple(jit(functools.partial(encode, method)) for method in ("encode_image", "encode_text"))


class Embedder:
  """Normalised image and text embeddings in fixed-size jitted batches split over the devices
  of the params' mesh (eval_mesh.py); every process gets every embedding back.

  `images` / `texts` take the same rows on every process; `embedded_batches` streams a dataset
  of which each process reads only its share.
  """

  def __init__(self, model: CLIP, params, tokenizer: Tokenizer, batch_size: int = 64):
    self.mesh = eval_mesh.EvalMesh(params, batch_size)
    self.model, self.params, self.tokenizer = model, self.mesh.params, tokenizer
    self.batch_size = self.mesh.batch_size
    self._images, self._texts = _encoders(model, self.mesh.replicated)

  def _batched(self, fn, x: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(x), self.batch_size):
      chunk = x[i:i + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      example = np.arange(self.batch_size, dtype=np.int32)
      emb, _ = fn(self.params, self.mesh.place_everywhere(chunk),
                  self.mesh.place_everywhere(example))
      out.append(np.asarray(emb)[:self.batch_size - pad])
    dim = self.model.config.projection_dim
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

  def images(self, pixels: np.ndarray) -> np.ndarray:
    return self._batched(self._images, np.asarray(pixels, np.float32))

  def texts(self, texts: Sequence[str]) -> np.ndarray:
    return self._batched(self._texts, self.tokenizer(list(texts)))

  def batches(self, dataset, where: str):
    """This process's rows of each global eval batch of `dataset` (eval_mesh.EvalMesh)."""
    return self.mesh.batches(dataset, where)

  def process_images(self, pixels: np.ndarray, example: np.ndarray):
    """This process's rows of one global batch -> (embeddings, example indices) of the whole
    batch, on every process."""
    emb, example = self._images(self.params, self.mesh.place(np.asarray(pixels, np.float32)),
                                self.mesh.place(np.asarray(example, np.int32)))
    return np.asarray(emb), np.asarray(example)

  def gather_fields(self, batch: dict) -> dict:
    return self.mesh.gather_fields(batch)


def candidate_scores(embedder: Embedder, image_emb: np.ndarray, captions: Sequence[str],
                     counts: Sequence[int]) -> np.ndarray:
  """(N, 9) similarity of each image to its caption rewritten with each number two..ten."""
  fitted = fit_captions(embedder.tokenizer, captions, counts)
  texts = [c for caption, n in zip(fitted, counts)
           for c in numbers.count_captions(caption, n)]
  text_emb = embedder.texts(texts).reshape(len(captions), len(NUMBERS), -1)
  return np.einsum("nd,nkd->nk", image_emb, text_emb)


def class_embeddings(embedder: Embedder, prompts: Sequence[Sequence[str]]) -> np.ndarray:
  """(classes, dim): each class's prompts embedded, averaged and normalised (a prompt ensemble,
  as CLIP classifies ImageNet)."""
  mean = np.stack([np.mean(embedder.texts(list(p)), axis=0) for p in prompts])
  return np.asarray(normalize(jnp.asarray(mean)))


# ----------------------------------------------------------------------------- datasets

def eval_synthetic(embedder: Embedder, size: int = 900, world_config=None) -> dict:
  """Counting, colour/shape zero-shot, retrieval and count retrieval on held-out images.

  `world_config`: the training run's config (its data.synthetic settings); default settings
  otherwise.
  """
  from countclip_jax.data import pipeline, synthetic  # pylint: disable=g-import-not-at-top
  image_size = embedder.model.config.vision.image_size
  if world_config is None:
    world_config = ml_collections.ConfigDict({"data": {"synthetic": {
        "distractor_prob": synthetic.WorldConfig.distractor_prob,
        "textured_prob": synthetic.WorldConfig.textured_prob, "size": size}}})
  # The same world and preprocessing as training, on the held-out split.
  dataset = pipeline.synthetic_eval_dataset(world_config, image_size, "heldout", size)
  image_emb, rows, _ = embedded_dataset(embedder, dataset, "synthetic")
  examples = [dict(zip(rows, values)) for values in zip(*(v.tolist() for v in rows.values()))]
  counts = [int(e["number"]) for e in examples]
  scores = candidate_scores(embedder, image_emb, [e["caption"] for e in examples], counts)
  results = {"counting": counting_metrics(scores, counts)}

  # Retention: classify colour (and shape) by prompts without numbers, averaged over the other
  # attribute and the templates (a prompt ensemble, as CLIP does for ImageNet).
  world = synthetic.WorldConfig()
  for attribute, values, others in (("color", list(world.colors), list(world.shapes)),
                                    ("shape", list(world.shapes), list(world.colors))):
    prompts = []
    for value in values:
      pairs = [(value, other) if attribute == "color" else (other, value) for other in others]
      prompts.append([p for color, shape in pairs for p in synthetic.captions(2, color, shape)[1]])
    class_emb = class_embeddings(embedder, prompts)
    labels = [values.index(e[attribute]) for e in examples]
    results[f"{attribute}_accuracy"] = zero_shot_accuracy(image_emb, class_emb, labels)

  results["retrieval"] = retrieval_recall(
      image_emb, embedder.texts([e["general_caption"] for e in examples]))
  # Count retrieval: prompts name a kind ("a photo of three red stars"), so each kind's prompts
  # rank that kind's images (top-1); precision is averaged over the kinds.
  by_kind = {}
  for i, e in enumerate(examples):
    by_kind.setdefault((e["color"], e["shape"]), []).append(i)
  per_kind = []
  for (color, shape), rows in sorted(by_kind.items()):
    if len(rows) >= len(NUMBERS):
      prompts = [synthetic.captions(n, color, shape)[0][0] for n in NUMBERS]
      per_kind.append(count_retrieval(image_emb[rows], embedder.texts(prompts),
                                      [counts[i] for i in rows], k=1)["precision_at_k"])
  if per_kind:
    precision = {str(n): float(np.mean([p[str(n)] for p in per_kind])) for n in NUMBERS}
    results["count_retrieval"] = {"precision_at_1": precision, "kinds": len(per_kind),
                                  "mean_precision_at_1": float(np.mean(list(precision.values())))}
  return results


def embedded_batches(embedder: Embedder, dataset, where: str):
  """Streams a random-access eval dataset (an ImageNet never sits in memory at once), each
  process reading and embedding only its share: for each global eval batch, (image embeddings
  of its valid examples, those examples' other fields, how many of its examples are invalid:
  undecodable, counted as skipped), the same on every process, in dataset order."""
  batches = embedder.batches(dataset, where)
  for batch in tqdm.tqdm(batches, total=-(-len(dataset) // embedder.batch_size), unit="batch",
                         desc=where, disable=len(dataset) <= embedder.batch_size):
    emb, example = embedder.process_images(batch["image"], batch["example"])
    rows = embedder.gather_fields({k: v for k, v in batch.items() if k != "image"})
    valid = rows["valid"].astype(bool)
    rows = {k: v[valid] for k, v in rows.items()}
    yield (eval_mesh.in_example_order(emb, example, rows["example"]), rows,
           int(np.sum(~valid)))


def embedded_dataset(embedder: Embedder, dataset, where: str) -> tuple[np.ndarray, dict, int]:
  """embedded_batches, all at once: (embeddings, fields, skipped) of a small dataset."""
  parts = list(embedded_batches(embedder, dataset, where))
  dim = embedder.model.config.projection_dim
  emb = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, dim), np.float32)
  fields = {k: np.concatenate([p[1][k] for p in parts]) for k in (parts[0][1] if parts else {})}
  return emb, fields, sum(p[2] for p in parts)


def countbench_count_retrieval(embedder: Embedder, image_emb, captions: Sequence[str],
                               counts: Sequence[int], k: int = 10) -> dict | None:
  """Text-to-image count retrieval over CountBench's images: for each object phrase its captions
  name ("dogs") and each number, the query "three dogs" ranks all the images; precision@k is the
  share of the top k that show three objects (the label is the count, of whatever objects),
  averaged over the objects. None for a number no image shows; `base_rate`: the share of the
  images that show each number (a model blind to numbers scores about that)."""
  objects = sorted({p for p in map(object_phrase, captions, counts) if p})
  if not objects:
    return None
  queries = [f"{numbers.number_word(n)} {o}" for o in objects for n in NUMBERS]
  text_emb = embedder.texts(queries).reshape(len(objects), len(NUMBERS), -1)
  k = min(k, len(counts))
  per_object = [count_retrieval(image_emb, t, counts, k=k)["precision_at_k"] for t in text_emb]
  base = {str(n): float(np.mean(np.asarray(counts) == n)) for n in NUMBERS}
  precision = {n: float(np.mean([p[n] for p in per_object])) if base[n] else None for n in base}
  shown = [v for v in precision.values() if v is not None]
  return {"precision_at_k": precision, "mean_precision_at_k": float(np.mean(shown)), "k": k,
          "objects": len(objects), "base_rate": base}


def eval_countbench(embedder: Embedder, source: str, retrieval_k: int = 10) -> dict:
  """The paper's protocol on CountBench (a download cache or a parquet copy), and count
  retrieval precision@retrieval_k ("three dogs" -> images of three things)."""
  from countclip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  dataset, skipped = pipeline.countbench_eval_dataset(
      source, embedder.model.config.vision.image_size)
  image_emb, rows, invalid = embedded_dataset(embedder, dataset, "CountBench")
  captions, counts = [str(c) for c in rows.get("caption", [])], [int(n) for n in
                                                                  rows.get("number", [])]
  skipped += invalid
  if not counts:
    raise ValueError(f"No CountBench image could be read from {source} ({skipped} skipped)")
  scores = candidate_scores(embedder, image_emb, captions, counts)
  result = {"counting": counting_metrics(scores, counts, skipped=skipped)}
  retrieval = countbench_count_retrieval(embedder, image_emb, captions, counts, retrieval_k)
  if retrieval is not None:
    result["count_retrieval"] = retrieval
  return result


def eval_zero_shot(embedder: Embedder, dataset, class_names: Sequence[str],
                   templates: Sequence[str] = PROMPT_TEMPLATES, where: str = "") -> dict:
  """Zero-shot classification of a random-access dataset of {"image", "label", "valid"}: the
  nearest class by the prompt ensemble; top-1 and top-5 accuracy, invalid images skipped."""
  class_emb = class_embeddings(embedder, [[t.format(c) for t in templates] for c in class_names])
  k = min(5, len(class_names))
  top1 = top_k = skipped = n = 0
  for emb, rows, invalid in embedded_batches(embedder, dataset, f"zero-shot {where}"):
    ranks = label_ranks(emb @ class_emb.T, rows["label"])
    top1, top_k, n = top1 + int(np.sum(ranks < 1)), top_k + int(np.sum(ranks < k)), n + len(ranks)
    skipped += invalid
  if not n:
    raise ValueError(f"No image of {where or 'the zero-shot set'} could be read "
                     f"({skipped} skipped)")
  return {"zero_shot": {"top1": top1 / n, f"top{k}": top_k / n, "n": n, "skipped": skipped,
                        "classes": len(class_names), "templates": len(templates)}}


def file_name(dataset: str) -> str:
  """'tfds:imagenet2012:validation[:5000]' -> 'tfds_imagenet2012_validation_5000'."""
  return re.sub(r"[^\w.-]+", "_", dataset).strip("_")


def check_datasets(datasets: Sequence[str], countbench_source: str = "") -> None:
  """Fails on an eval set that `run` would not know, before anything is computed."""
  for name in datasets:
    if name.startswith(classification.PREFIX):
      classification.parse_spec(name)
    elif name == "countbench" and not countbench_source:
      raise cli.UserError("The countbench eval needs a source: eval.countbench_dir / "
                          "--countbench (python -m countclip_jax.data.countbench --out DIR)")
    elif name not in ("synthetic", "countbench"):
      raise cli.UserError(f"Unknown eval dataset {name!r}: synthetic | countbench | "
                          "tfds:NAME[:SPLIT]")


def run(embedder: Embedder, datasets: Sequence[str], out_dir: str, *, tag: str = "",
        synthetic_size: int = 900, countbench_source: str = "", world_config=None,
        tfds_data_dir: str = "", class_names: str = "") -> dict:
  """Evaluates each dataset, writes OUT/eval/<name><tag>.json and confusion PNGs.

  Results are keyed by file_name(dataset): 'synthetic', 'countbench', 'tfds_cifar10_test'.
  """
  check_datasets(datasets, countbench_source)
  out = epath.Path(out_dir) / "eval"
  out.mkdir(parents=True, exist_ok=True)
  results = {}
  for dataset in datasets:
    name = file_name(dataset)
    if dataset == "synthetic":
      result = eval_synthetic(embedder, synthetic_size, world_config)
    elif dataset == "countbench":
      result = eval_countbench(embedder, countbench_source)
    else:
      examples, names = classification.load(dataset, embedder.model.config.vision.image_size,
                                            data_dir=tfds_data_dir, names_file=class_names)
      result = eval_zero_shot(embedder, examples, names, where=dataset)
    results[name] = result
    if jax.process_index() == 0:
      (out / f"{name}{tag}.json").write_text(json.dumps(result, indent=1))
      if "counting" in result:
        plot_confusion(result["counting"], str(out / f"{name}{tag}_confusion.png"),
                       f"{name}{tag.replace('_', ' ')}")
    logging.info("eval %s%s: %s", name, tag,
                 ", ".join(f"{k} {v:.3f}" for k, v in scalars({name: result}).items()))
  return results


def scalars(results: dict) -> dict:
  """The headline numbers, flat, for metric writers."""
  flat = {}
  for name, result in results.items():
    if "counting" in result:
      flat[f"{name}/count_accuracy"] = result["counting"]["accuracy"]
      flat[f"{name}/count_mae"] = result["counting"]["mae"]
    for key in ("color_accuracy", "shape_accuracy"):
      if key in result:
        flat[f"{name}/{key}"] = result[key]
    for key, value in result.get("zero_shot", {}).items():
      if key.startswith("top"):
        flat[f"{name}/zero_shot_{key}"] = value
  return flat


def evaluate_during_training(config, model, params, tokenizer, workdir, step) -> dict:
  embedder = Embedder(model, params, tokenizer, config.eval.batch_size)
  results = run(embedder, config.eval.datasets, workdir, tag=f"_step{step}",
                synthetic_size=config.eval.size, countbench_source=config.eval.countbench_dir,
                world_config=config, tfds_data_dir=config.eval.tfds_data_dir,
                class_names=config.eval.class_names)
  return scalars(results)


# ----------------------------------------------------------------------------- CLI

def default_out(hf: str) -> str:
  """Where an --hf eval goes without --out: one directory per model under ./runs/eval, so that
  evaluating another model never overwrites the first one's results."""
  return f"runs/eval/{file_name(hf).strip('._') or 'model'}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if bool(FLAGS.workdir) == bool(FLAGS.hf):
    raise app.UsageError("Pass exactly one of --workdir or --hf")
  with cli.user_errors(ValueError):  # a bad --data spec fails before any model loads
    check_datasets(FLAGS.data, FLAGS.countbench)
  if FLAGS.workdir:
    from countclip_jax.export import load_run  # pylint: disable=g-import-not-at-top
    model, params, tokenizer = load_run(FLAGS.workdir, FLAGS.step)
  else:
    from countclip_jax.models import load_pretrained  # pylint: disable=g-import-not-at-top
    model, params = load_pretrained(FLAGS.hf)
    tokenizer = Tokenizer.from_pretrained(FLAGS.hf, model.config.text.context_length)
  out = FLAGS.out or FLAGS.workdir or default_out(FLAGS.hf)
  results = run(Embedder(model, params, tokenizer, FLAGS.batch_size), FLAGS.data, out,
                tag=f"_step{FLAGS.step}" if FLAGS.step is not None else "",
                synthetic_size=FLAGS.synthetic_size, countbench_source=FLAGS.countbench,
                tfds_data_dir=FLAGS.tfds_data_dir, class_names=FLAGS.class_names)
  print(json.dumps(scalars(results), indent=1))
  where = out if "://" in out else os.path.abspath(out)
  print(f"Wrote {where}/eval/", file=sys.stderr)  # stderr: stdout stays the JSON alone


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A training run's workdir (its checkpoint).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
  flags.DEFINE_string("hf", None, "Or a Hugging Face CLIP: hub id, local or gs:// dir.")
  flags.DEFINE_list("data", ["synthetic"], "Eval sets: synthetic, countbench, tfds:NAME[:SPLIT] "
                    "(a prepared tfds classification set, zero-shot).")
  flags.DEFINE_string("countbench", "", "CountBench cache dir or parquet.")
  flags.DEFINE_string("tfds_data_dir", "", "tfds data dir of the tfds: sets (default: tfds's).")
  flags.DEFINE_string("class_names", "", "File of class names, one per line, for tfds sets "
                      "whose labels are ids (imagenet2012).")
  flags.DEFINE_string("out", None, "Where eval/ goes (default: the workdir, or for --hf "
                      "./runs/eval/<the --hf name, / as _>).")
  flags.DEFINE_integer("synthetic_size", 900, "Held-out synthetic images.")
  flags.DEFINE_integer("batch_size", 64, "Eval batch size.")
  # A missing workdir, checkpoint, --hf directory or --countbench source is the user's to fix.
  cli.run(main, user_error_kinds=(FileNotFoundError,))
