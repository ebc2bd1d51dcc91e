"""Readers for the density-counting datasets, in their published layouts, to one record type.

  FSC-147       read_fsc147(root, "train")           147 classes; points + 3 exemplar boxes
  CARPK         read_carpk(root, "test")             "cars"; a box per car, point = box centre
  ShanghaiTech  read_shanghaitech(root, "A", "test") "people"; points from GT_IMG_*.mat

Each returns a list of `CountingImage`, whose points are (x, y) in the pixels of the image file
as stored (see `density.py` for the convention), ready for `density.density_map`. Readers only
read annotations and check that every image file exists; images are decoded later, by workers.
Every missing file or malformed line raises with the path (and line) at fault.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import numpy as np
from absl import logging

from countclip_jax.data import density

FSC147_FILES = {"annotations": "annotation_FSC147_384.json",
                "splits": "Train_Test_Val_FSC_147.json",
                "classes": "ImageClasses_FSC147.txt",
                "images": "images_384_VarV2"}
SPLITS = {"fsc147": ("train", "val", "test"), "carpk": ("train", "test"),
          "shanghaitech": ("train", "test")}


@dataclasses.dataclass(frozen=True, eq=False)
class CountingImage:
  """One annotated image. `count` is len(points): the annotation is the ground truth."""
  name: str                        # file name, e.g. "2.jpg", "20161225_TPZ_00001.png", "IMG_1.jpg"
  image_path: str
  points: np.ndarray               # float32 (n, 2), (x, y) in the stored image's pixels
  class_name: str                  # what is counted: FSC-147's class, "cars", "people"
  split: str
  dataset: str                     # "fsc147", "carpk", "shanghaitech_a", "shanghaitech_b"
  boxes: np.ndarray | None = None  # float32 (m, 4) x1 y1 x2 y2: FSC exemplars / CARPK's boxes

  @property
  def count(self) -> int:
    return len(self.points)

  def read(self) -> bytes:
    """The image file's bytes (decode with `images.decode`)."""
    with open(self.image_path, "rb") as f:
      return f.read()


def _check_split(dataset: str, split: str):
  if split not in SPLITS[dataset]:
    raise ValueError(f"Unknown {dataset} split {split!r}; expected one of {SPLITS[dataset]}")


def _need(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} not found: {path}")
  return path


def _check_images(records: list[CountingImage], listing: str):
  """All listed image files exist, or one error naming how many are missing and which."""
  missing = [r.image_path for r in records if not os.path.isfile(r.image_path)]
  if missing:
    raise FileNotFoundError(f"{len(missing)} of {len(records)} images listed in {listing} are "
                            f"missing, e.g. {missing[0]}")


def _boxes(corners, where: str) -> np.ndarray:
  """FSC-147 boxes are 4 corners [[x1, y1], [x1, y2], [x2, y2], [x2, y1]]; the min/max of the
  corners does not depend on their order."""
  out = []
  for c in corners:
    c = np.asarray(c, np.float32).reshape(-1, 2)
    if len(c) < 2:
      raise ValueError(f"{where}: box {c.tolist()} needs at least 2 corners")
    out.append([*c.min(0), *c.max(0)])
  return np.asarray(out, np.float32).reshape(-1, 4)


def read_fsc147(root: str, split: str, image_dir: str | None = None) -> list[CountingImage]:
  """FSC-147 (Ranjan et al. 2021) from its published files in `root` (`FSC147_FILES`).

  Points and boxes are in the coordinates of images_384_VarV2 (height 384), as published; the
  json's H, W, ratio_h, ratio_w describe the original photos and are not needed. image_dir:
  the images if not in root/images_384_VarV2 (CounTR's layout keeps them one level up).
  """
  _check_split("fsc147", split)
  paths = {k: os.path.join(root, v) for k, v in FSC147_FILES.items()}
  if image_dir is not None:
    paths["images"] = image_dir
  for key in ("annotations", "splits", "classes"):
    _need(paths[key], f"FSC-147 {key} file")
  _need(paths["images"], "FSC-147 image directory")
  with open(paths["annotations"], encoding="utf-8") as f:
    annotations = json.load(f)
  with open(paths["splits"], encoding="utf-8") as f:
    names = json.load(f)
  if split not in names:
    raise ValueError(f"{paths['splits']} has no {split!r} list (keys: {sorted(names)})")
  classes = {}
  with open(paths["classes"], encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        # Tab-separated ("2.jpg\tsea shells"); a space after the name is accepted too.
        name, _, cls = line.strip().partition("\t" if "\t" in line else " ")
        if not cls.strip():
          raise ValueError(f"{paths['classes']}:{i}: expected '<image>\\t<class>', got {line!r}")
        classes[name.strip()] = cls.strip()
  records = []
  for name in names[split]:
    where = f"{paths['annotations']}[{name!r}]"
    if name not in annotations:
      raise ValueError(f"{name} is in the {split} split of {paths['splits']} but has no "
                       f"entry in {paths['annotations']}")
    if name not in classes:
      raise ValueError(f"{name} has no class in {paths['classes']}")
    entry = annotations[name]
    try:
      points = density.as_points(entry["points"])
    except (KeyError, ValueError) as e:
      raise ValueError(f"{where}: bad or missing 'points': {e}") from e
    records.append(CountingImage(
        name=name, image_path=os.path.join(paths["images"], name), points=points,
        class_name=classes[name], split=split, dataset="fsc147",
        boxes=_boxes(entry.get("box_examples_coordinates", []), where)))
  _check_images(records, f"{paths['splits']}[{split!r}]")
  return records


def read_carpk(root: str, split: str) -> list[CountingImage]:
  """CARPK (Hsieh et al. 2017): root holds Images/<name>.png, Annotations/<name>.txt (a line
  `x1 y1 x2 y2 class` per car) and ImageSets/{train,test}.txt (names without extension); in
  the CARPK_devkit download that root is CARPK_devkit/data. A car's point is its box centre."""
  _check_split("carpk", split)
  listing = _need(os.path.join(root, "ImageSets", f"{split}.txt"), "CARPK split list")
  with open(listing, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  records = []
  for name in names:
    path = _need(os.path.join(root, "Annotations", f"{name}.txt"), "CARPK annotation file")
    boxes = []
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if line.strip():
          fields = line.split()
          try:
            boxes.append([float(v) for v in fields[:4]])
          except ValueError:
            fields = []
          if len(fields) < 4:
            raise ValueError(f"{path}:{i}: expected 'x1 y1 x2 y2 class', got {line!r}")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    centres = np.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], 1) / 2
    records.append(CountingImage(
        name=f"{name}.png", image_path=os.path.join(root, "Images", f"{name}.png"),
        points=centres.astype(np.float32), class_name="cars", split=split, dataset="carpk",
        boxes=boxes))
  _check_images(records, listing)
  return records


def _first_dir(*candidates: str) -> str:
  for c in candidates:
    if os.path.isdir(c):
      return c
  raise FileNotFoundError(f"ShanghaiTech directory not found: {' or '.join(candidates)}")


def _mat_points(path: str) -> np.ndarray:
  """GT_IMG_*.mat -> (n, 2). MATLAB saved `image_info` as a 1x1 cell holding a 1x1 struct with
  fields location (n x 2 double, x y) and number, i.e. mat["image_info"][0, 0][0, 0]["location"]
  (= mat["image_info"][0][0][0][0][0] in the usual indexing). scipy's MATLAB v5 reader; no
  pickle. simplify_cells is avoided: it squeezes a 1-point location to shape (2,)."""
  from scipy import io  # pylint: disable=g-import-not-at-top  # only ShanghaiTech needs it
  try:
    info = io.loadmat(path)["image_info"][0, 0][0, 0]
    points = np.asarray(info["location"], np.float32).reshape(-1, 2)
  except Exception as e:  # noqa: BLE001  # any layout surprise: one message naming the file
    raise ValueError(f"{path}: expected image_info{{1}}.location (a 1x1 cell holding a struct "
                     f"with an n x 2 'location'): {type(e).__name__}: {e}") from e
  if "number" in (info.dtype.names or ()) and np.size(info["number"]) == 1:
    number = int(np.asarray(info["number"]).item())
    if number != len(points):
      logging.warning("%s: image_info.number is %d but location has %d points; using the points",
                      path, number, len(points))
  return points


def read_shanghaitech(root: str, part: str = "A", split: str = "train") -> list[CountingImage]:
  """ShanghaiTech part A or B (Zhang et al. 2016): root/part_A/train_data/images/IMG_1.jpg with
  root/part_A/train_data/ground-truth/GT_IMG_1.mat. Also accepted: part_A_final/ and
  ground_truth/, the spellings of other copies in circulation. Points are kept as stored. They
  were annotated in MATLAB, so probably 1-based (half a pixel right/down of our convention;
  nothing for a count), and some may lie just past the border: `density.clip_points` keeps
  those in the count."""
  _check_split("shanghaitech", split)
  if part not in ("A", "B"):
    raise ValueError(f"ShanghaiTech part must be 'A' or 'B', got {part!r}")
  base = _first_dir(*(os.path.join(root, p, f"{split}_data")
                      for p in (f"part_{part}", f"part_{part}_final")))
  image_dir = _first_dir(os.path.join(base, "images"))
  gt_dir = _first_dir(os.path.join(base, "ground-truth"), os.path.join(base, "ground_truth"))
  image_names = {os.path.basename(p) for p in glob.glob(os.path.join(image_dir, "*.jpg"))}
  gt_images = {os.path.basename(p)[3:-4] + ".jpg"
               for p in glob.glob(os.path.join(gt_dir, "GT_*.mat"))}
  if not image_names and not gt_images:
    raise FileNotFoundError(f"No IMG_*.jpg in {image_dir} and no GT_*.mat in {gt_dir}")
  # IMG_2 before IMG_10: natural order, as the dataset numbers its images.
  order = lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)]
  records = []
  for name in sorted(image_names | gt_images, key=order):
    gt = _need(os.path.join(gt_dir, f"GT_{name[:-4]}.mat"), f"ShanghaiTech annotation of {name}")
    records.append(CountingImage(
        name=name, image_path=os.path.join(image_dir, name), points=_mat_points(gt),
        class_name="people", split=split, dataset=f"shanghaitech_{part.lower()}"))
  _check_images(records, gt_dir)
  return records
