r"""Relevancy maps: which image patches and caption tokens a CLIP pair's logit rests on.

  python -m countclip_jax.explain --workdir=RUN --image=photo.jpg --text="three dogs" \
      [--out=explain.png] [--start_layer=-1]       # or --hf=DIR instead of --workdir
  python -m countclip_jax.explain --workdir=RUN --synthetic_shares=200     # JSON on stdout
  python -m countclip_jax.explain --compare=runs/demo/A,runs/demo/B --figure=compare.png

The rule of Chefer et al., "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers" (ICCV 2021), as in their CLIP notebook. For each pair b the
differentiated quantity is its own logit, exp(logit_scale) * cos(image b, text b); the pairs are
independent, so one gradient of the sum over b gives every pair its own. In each tower, for
layers start_layer..last, with A the post-softmax attention probabilities (B, heads, N, N) and
G = d logit / d A:

  cam = mean over heads of max(G * A, 0);   R <- R + cam @ R,   R starting as the identity.

Image relevancy is the class token's row of R over the patches, on the patch grid; text
relevancy is the end-of-text token's row over the caption tokens 1..eot-1, normalised to sum to
1. Both are raw (not min-maxed); R only ever adds non-negative terms, so both are >= 0.
"""
from __future__ import annotations

import functools
import json
import os
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from countclip_jax import cli

if TYPE_CHECKING:  # models imports transformers: the CLI reports a bad image before that
  from countclip_jax.models import CLIP

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- relevancy

def check_start_layer(start_layer: int, depth: int, tower: str) -> int:
  """`start_layer` as an index into a tower of `depth` layers (negative counts from the end)."""
  if not -depth <= start_layer < depth:
    raise cli.UserError(f"start_layer={start_layer} is out of range for the {tower} tower's "
                        f"{depth} layers: pass {-depth}..{depth - 1} (-1: the last layer only, "
                        "0: all).")
  return start_layer % depth


def eot_positions(input_ids, eos_token_id: int):
  """The model's pooling position (clip.eot_positions), imported late: models pulls in
  transformers, and the CLI checks its image before paying for that."""
  from countclip_jax.models.clip import eot_positions as rule  # pylint: disable=g-import-not-at-top
  return rule(input_ids, eos_token_id)


def rollout(probs: Sequence[jax.Array], grads: Sequence[jax.Array], start=0) -> jax.Array:
  """R (B, N, N) from each layer's attention probabilities and their gradients (B, H, N, N),
  rolled out over layers start.. (start may be traced: layers before it add exactly 0)."""
  n = probs[0].shape[-1]
  r = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (probs[0].shape[0], n, n))
  for layer, (a, g) in enumerate(zip(probs, grads)):
    cam = jnp.maximum(g.astype(jnp.float32) * a.astype(jnp.float32), 0).mean(axis=1)
    cam = jnp.where(layer >= start, cam, 0.0)
    r = r + jnp.einsum("bij,bjk->bik", cam, r, precision="highest")
  return r


def _tower_layers(tree, tower: str) -> list:
  layers = tree[tower]["encoder"]["layers"]
  return [layers[str(i)]["self_attn"]["attn_probs"] for i in range(len(layers))]


@functools.lru_cache(maxsize=8)
def _relevancy_fn(model: CLIP):
  """Jitted (params, pixels, ids, mask, vision start, text start) -> (image (B, g, g), text
  (B, L)), once per model: the start layers are arguments, so changing them compiles nothing."""
  explainer = model.clone(explain=True, remat=False)  # explicit, perturbable probabilities
  c = model.config
  grid = c.vision.image_size // c.vision.patch_size

  def fn(params, pixels, input_ids, attention_mask, vision_start, text_start):
    def apply(variables, mutable):
      return explainer.apply(variables, pixels, input_ids, attention_mask, mutable=mutable)

    # The perturbations are zeros shaped as the probabilities; eval_shape allocates nothing.
    shapes = jax.eval_shape(lambda: apply({"params": params}, "perturbations")[1])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])

    def logit(perturbations):
      out, state = apply({"params": params, "perturbations": perturbations}, "intermediates")
      return jnp.trace(out.logits_per_image), state["intermediates"]

    grads, sown = jax.grad(logit, has_aux=True)(zeros)
    r_image = rollout([a for (a,) in _tower_layers(sown, "vision_model")],
                      _tower_layers(grads, "vision_model"), vision_start)
    r_text = rollout([a for (a,) in _tower_layers(sown, "text_model")],
                     _tower_layers(grads, "text_model"), text_start)
    image = r_image[:, 0, 1:].reshape(-1, grid, grid)
    eot = eot_positions(input_ids, c.text.eos_token_id)
    row = jnp.take_along_axis(r_text, eot[:, None, None], axis=1)[:, 0]
    positions = jnp.arange(input_ids.shape[-1])[None]
    text = jnp.where((positions >= 1) & (positions < eot[:, None]), row, 0.0)
    # An empty caption (eot at 1) has nothing to share: its row stays all 0.
    text = text / jnp.maximum(text.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return image, text

  return jax.jit(fn)


def relevancy(model: CLIP, params, pixels, input_ids, start_layer: int = -1,
              attention_mask=None) -> tuple[jax.Array, jax.Array]:
  """Relevancy of pairs (pixels[b], input_ids[b]): (image (B, grid, grid), text (B, L)).

  pixels: NHWC, CLIP-normalised (data/images.py `preprocess`); input_ids (B, L) as the tokenizer
  gives them. start_layer: the first layer rolled out in each tower, Python-style (-1: only the
  last, the notebook's default; 0: all). Text relevancy is 0 at position 0, eot and after.
  """
  pixels, input_ids = jnp.asarray(pixels), jnp.asarray(input_ids)
  if pixels.shape[0] != input_ids.shape[0]:
    raise ValueError(f"relevancy explains pairs: {pixels.shape[0]} images but "
                     f"{input_ids.shape[0]} captions")
  c = model.config
  starts = (check_start_layer(start_layer, c.vision.depth, "vision"),
            check_start_layer(start_layer, c.text.depth, "text"))
  if attention_mask is None:  # all ones is the same computation, and one trace for both
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  return _relevancy_fn(model)(params, pixels, input_ids, attention_mask, *starts)


# ----------------------------------------------------------------------------- measurement

def object_share(image_relevance: np.ndarray, mask: np.ndarray) -> float:
  """Share of a (grid, grid) relevancy map's mass on the True pixels of `mask` (S, S).

  Each patch's relevancy is spread evenly over its (S/grid)^2 pixels (the map upsampled by
  nearest neighbour, divided by the patch area), so the share is
  sum_p r_p * f_p / sum_p r_p, with f_p the fraction of patch p's pixels inside the mask.
  """
  grid, size = image_relevance.shape[0], mask.shape[0]
  patch = size // grid
  fraction = mask.reshape(grid, patch, grid, patch).mean(axis=(1, 3))
  return float((image_relevance * fraction).sum() / max(image_relevance.sum(), 1e-30))


def number_positions(tokenizer, caption: str) -> list[int]:
  """Positions in `tokenizer([caption])[0]` of the tokens spelling the caption's count word(s)
  (text/numbers.py's counts; bos is position 0)."""
  from countclip_jax.text import numbers  # pylint: disable=g-import-not-at-top
  spans = [(m.start, m.end) for m in numbers.find_numbers(caption) if m.reason is None]
  offsets = tokenizer.hf(caption, add_special_tokens=False, return_offsets_mapping=True,
                         verbose=False)["offset_mapping"]
  return [i + 1 for i, (start, end) in enumerate(offsets)
          if i + 1 < tokenizer.context_length - 1  # truncation keeps context - 2 tokens
          and any(start < e and s < end for s, e in spans)]


def synthetic_shares(model: CLIP, params, tokenizer, world, indices: Sequence[int],
                     start_layer: int = -1, batch_size: int = 50) -> dict:
  """Where the relevancy of the synthetic world's counting pairs goes, averaged over `indices`.

  Each example pairs `world[i]["image"]` with its caption stating the count.
  image_object_share: the share of image relevancy on the counted objects' pixels (the union of
    `synthetic.object_mask` of objects [0, count); distractors count as background), by
    `object_share`. image_object_area: the mean fraction of pixels those objects cover, what a
    uniform map would score.
  text_number_share: the share of text relevancy on the number word's token(s).
    text_number_baseline: the mean of (number tokens / caption tokens), a uniform share's score.
  """
  from countclip_jax.data import images, synthetic  # pylint: disable=g-import-not-at-top
  size = model.config.vision.image_size
  if world.config.image_size != size:
    raise ValueError(f"The world renders {world.config.image_size} px images; the model takes "
                     f"{size} px")
  indices = list(indices)
  masks, pixels, ids, number_pos = [], [], [], []
  for i in indices:
    scene, example = world.scene(i), world[i]
    mask = np.zeros((size, size), bool)
    for j in range(scene.count):
      rows, cols, m = synthetic.object_mask(scene.shapes[j], scene.centers[j],
                                            float(scene.half_sizes[j]), size)
      mask[rows, cols] |= m
    masks.append(mask)
    pixels.append(images.normalize(example["image"]))
    ids.append(tokenizer([example["caption_with_number"]])[0])
    number_pos.append(number_positions(tokenizer, example["caption_with_number"]))
  image_rel, text_rel = _batched_relevancy(model, params, np.stack(pixels), np.stack(ids),
                                           start_layer, batch_size)
  eot = np.asarray(eot_positions(np.stack(ids), model.config.text.eos_token_id))
  return {
      "examples": len(indices),
      "start_layer": start_layer,
      "image_object_share": float(np.mean([object_share(r, m)
                                           for r, m in zip(image_rel, masks)])),
      "image_object_area": float(np.mean([m.mean() for m in masks])),
      "text_number_share": float(np.mean([t[p].sum() for t, p in zip(text_rel, number_pos)])),
      "text_number_baseline": float(np.mean([len(p) / max(e - 1, 1)
                                             for p, e in zip(number_pos, eot)])),
  }


def _batched_relevancy(model, params, pixels, ids, start_layer, batch_size):
  """`relevancy` in fixed-size batches (the last one padded with copies: one compile)."""
  outs = []
  for start in range(0, len(pixels), batch_size):
    px, tx = pixels[start:start + batch_size], ids[start:start + batch_size]
    n = len(px)
    pad = (0, batch_size - n) if len(pixels) > batch_size else (0, 0)
    px = np.pad(px, (pad,) + ((0, 0),) * 3, mode="edge")
    tx = np.pad(tx, (pad, (0, 0)), mode="edge")
    image, text = relevancy(model, params, px, tx, start_layer)
    outs.append((np.asarray(image)[:n], np.asarray(text)[:n]))
  return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


# ----------------------------------------------------------------------------- figures

def _upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(grid, grid) -> (H, W), bilinear, min-maxed to [0, 1] for display only."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  up = np.asarray(Image.fromarray(heat.astype(np.float32))  # mode F
                  .resize((size[1], size[0]), Image.BILINEAR))
  return (up - up.min()) / max(up.max() - up.min(), 1e-12)


def token_labels(tokenizer, ids: np.ndarray) -> list[str]:
  """Each id decoded on its own (BPE pieces keep their spelling)."""
  return [tokenizer.hf.decode([int(t)]).strip() for t in ids]


def draw(image_ax, text_ax, image: np.ndarray, image_rel: np.ndarray, labels: Sequence[str],
         text_rel: np.ndarray) -> None:
  """The image (uint8 HWC) under its heat map, and the caption's tokens 1..eot-1 shaded."""
  image_ax.imshow(image)
  image_ax.imshow(_upsample(image_rel, image.shape[:2]), cmap="jet", alpha=0.5, vmin=0, vmax=1)
  image_ax.set_axis_off()
  shown = text_rel[1:1 + len(labels)]
  top = max(float(shown.max()), 1e-12)
  text_ax.imshow(shown[None], cmap="Reds", vmin=0, vmax=top, aspect="auto")
  # Labels sized to fit their cells (~0.55 em per character), white on the darkest cells.
  cell = text_ax.get_position().width * text_ax.figure.get_figwidth() * 72 / max(len(labels), 1)
  size = min(8.0, 0.9 * cell / (0.55 * max([len(l) for l in labels] + [1])))
  for j, label in enumerate(labels):
    text_ax.text(j, 0, label, ha="center", va="center", fontsize=size,
                 color="white" if shown[j] > 0.6 * top else "black")
  text_ax.set_axis_off()


def _caption_tokens(tokenizer, ids: np.ndarray, eos_token_id: int) -> list[str]:
  eot = int(eot_positions(ids[None], eos_token_id)[0])
  return token_labels(tokenizer, ids[1:eot])


def save_explanation(model: CLIP, params, tokenizer, image_bytes: bytes, text: str, out: str,
                     start_layer: int = -1) -> None:
  """One image and caption -> PNG of the heat map on the image and the shaded tokens."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from countclip_jax.data import images  # pylint: disable=g-import-not-at-top

  size = model.config.vision.image_size
  decoded = images.decode_for_eval(image_bytes)  # transformers' pixels, as evaluate's
  pixels = images.preprocess(decoded, size)
  # What the model saw (the centre crop), at a size worth looking at.
  shown = np.asarray(images.resize_center_crop(decoded, max(size, min(min(decoded.size), 448))))
  ids = tokenizer([text])
  image_rel, text_rel = (np.asarray(x)[0] for x in relevancy(model, params, pixels[None], ids,
                                                            start_layer))
  fig, (image_ax, text_ax) = plt.subplots(2, 1, figsize=(5, 5.8),
                                          gridspec_kw={"height_ratios": [10, 1]})
  draw(image_ax, text_ax, shown, image_rel,
       _caption_tokens(tokenizer, ids[0], model.config.text.eos_token_id), text_rel)
  image_ax.set_title(text, fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def compare_figure(runs: Sequence[tuple[str, CLIP, object, object]], world,
                   indices: Sequence[int], out: str, start_layer: int = -1) -> None:
  """Grid PNG: a row per synthetic scene, a column per run (name, model, params, tokenizer)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from countclip_jax.data import images  # pylint: disable=g-import-not-at-top

  examples = [world[i] for i in indices]
  fig = plt.figure(figsize=(3.2 * len(runs), 3.4 * len(examples)))
  cells = fig.add_gridspec(2 * len(examples), len(runs), height_ratios=[8, 1] * len(examples))
  for col, (name, model, params, tokenizer) in enumerate(runs):
    ids = tokenizer([e["caption_with_number"] for e in examples])
    pixels = np.stack([images.normalize(e["image"]) for e in examples])
    image_rel, text_rel = (np.asarray(x) for x in relevancy(model, params, pixels, ids,
                                                           start_layer))
    for row, example in enumerate(examples):
      image_ax = fig.add_subplot(cells[2 * row, col])
      text_ax = fig.add_subplot(cells[2 * row + 1, col])
      draw(image_ax, text_ax, example["image"], image_rel[row],
           _caption_tokens(tokenizer, ids[row], model.config.text.eos_token_id), text_rel[row])
      image_ax.set_title(f"{name}: {example['caption_with_number']}" if row == 0
                         else example["caption_with_number"], fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def load(path: str, step: int | None = None, hf: bool = False):
  """(model, params, tokenizer) of a run's workdir, or of a Hugging Face directory."""
  if hf or not os.path.exists(os.path.join(path, "model_config.json")):
    from countclip_jax.models import load_pretrained  # pylint: disable=g-import-not-at-top
    from countclip_jax.text.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    model, params = load_pretrained(path)
    return model, params, Tokenizer.from_pretrained(path, model.config.text.context_length)
  from countclip_jax.export import load_run  # pylint: disable=g-import-not-at-top
  return load_run(path, step)


def heldout_world(path: str, image_size: int, size: int):
  """The held-out synthetic world as a run at `path` saw it (its config.json, else defaults)."""
  from countclip_jax.data import pipeline, synthetic  # pylint: disable=g-import-not-at-top
  settings = {}
  config_path = os.path.join(path, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      settings = json.load(f).get("data", {}).get("synthetic", {})
  config = synthetic.WorldConfig(
      image_size=image_size,
      distractor_prob=settings.get("distractor_prob", synthetic.WorldConfig.distractor_prob),
      textured_prob=settings.get("textured_prob", synthetic.WorldConfig.textured_prob))
  return synthetic.SyntheticCounting(config, split="heldout", seed=pipeline.WORLD_SEED, size=size)


def main(argv):
  del argv
  if FLAGS.compare:
    if not FLAGS.figure:
      raise app.UsageError("--compare needs --figure=OUT.png")
    runs = [(os.path.basename(os.path.normpath(p)), *load(p)) for p in FLAGS.compare]
    world = heldout_world(FLAGS.compare[0], runs[0][1].config.vision.image_size,
                          FLAGS.figure_examples)
    compare_figure(runs, world, range(FLAGS.figure_examples), FLAGS.figure, FLAGS.start_layer)
    print(f"Wrote {FLAGS.figure}")
    return
  if bool(FLAGS.workdir) == bool(FLAGS.hf):
    raise app.UsageError("Pass exactly one of --workdir or --hf (or --compare)")
  path = FLAGS.workdir or FLAGS.hf
  if FLAGS.synthetic_shares:
    model, params, tokenizer = load(path, FLAGS.step, hf=bool(FLAGS.hf))
    world = heldout_world(path, model.config.vision.image_size, FLAGS.synthetic_shares)
    print(json.dumps(synthetic_shares(model, params, tokenizer, world,
                                      range(FLAGS.synthetic_shares), FLAGS.start_layer),
                     indent=1))
    return
  if not FLAGS.image or FLAGS.text is None:
    raise app.UsageError("Pass --image and --text (or --synthetic_shares, or --compare)")
  from countclip_jax.data import images  # pylint: disable=g-import-not-at-top
  with cli.user_errors(OSError, images.BadImageError):  # a bad image fails before the model loads
    with open(FLAGS.image, "rb") as f:
      image_bytes = f.read()
    images.decode_for_eval(image_bytes)
  model, params, tokenizer = load(path, FLAGS.step, hf=bool(FLAGS.hf))
  save_explanation(model, params, tokenizer, image_bytes, FLAGS.text, FLAGS.out,
                   FLAGS.start_layer)
  print(f"Wrote {FLAGS.out}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A training run's workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
  flags.DEFINE_string("hf", None, "Or a Hugging Face CLIP directory (with its tokenizer).")
  flags.DEFINE_string("image", None, "Image file to explain.")
  flags.DEFINE_string("text", None, "Caption to explain.")
  flags.DEFINE_string("out", "explain.png", "Where the PNG goes.")
  flags.DEFINE_integer("start_layer", -1, "First layer rolled out (-1: last only, 0: all).")
  flags.DEFINE_integer("synthetic_shares", 0, "Print the relevancy shares on this many held-out "
                       "synthetic scenes as JSON.")
  flags.DEFINE_list("compare", [], "Runs (workdirs or HF dirs) side by side in --figure.")
  flags.DEFINE_string("figure", None, "PNG of --figure_examples synthetic scenes' maps.")
  flags.DEFINE_integer("figure_examples", 4, "Scenes in the --compare figure.")
  # A missing workdir, checkpoint or HF directory is the user's to fix (start layers and images
  # are checked where they are read, as cli.UserError).
  cli.run(main, user_error_kinds=(FileNotFoundError,))
