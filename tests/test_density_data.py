"""Density maps count exactly; crops keep points on their pixels; readers read the real layouts.

The dataset trees are written here in the published formats (json/txt files, PIL images, and
MATLAB v5 .mat files with ShanghaiTech's nesting), a few images each.
"""
import json
import os
import time

import numpy as np
import pytest
from PIL import Image
from scipy import io as sio

from countclip_jax.data import counting_datasets as cd
from countclip_jax.data import density

H, W = 48, 64
CORNERS = [[0, 0], [W, 0], [0, H], [W, H], [0.2, 0.3], [W - 0.1, H - 0.2]]
EDGES = [[0, 20.5], [W, 7.25], [31.5, 0], [12.0, H]]


def _random_points(n, h=H, w=W, seed=0):
  return np.random.default_rng(seed).uniform([0, 0], [w, h], (n, 2)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# density_map

@pytest.mark.parametrize("sigma", [0.05, 1.0, 4.0, 15.0, "adaptive"])
def test_map_sums_to_count_even_on_borders_and_corners(sigma):
  points = np.concatenate([_random_points(40), CORNERS, EDGES])
  d = density.density_map(points, H, W, sigma)
  assert d.shape == (H, W) and d.dtype == np.float32 and (d >= 0).all()
  np.testing.assert_allclose(d.sum(dtype=np.float64), len(points), rtol=1e-4)


@pytest.mark.parametrize("point", CORNERS + EDGES)
def test_each_border_point_has_mass_one(point):
  for sigma in (1.0, 6.0):
    np.testing.assert_allclose(density.density_map([point], H, W, sigma).sum(), 1.0, rtol=1e-5)


def test_single_point_is_centred_on_its_pixel():
  # Pixel (i, j) covers [j, j+1) x [i, i+1): (10.3, 20.7) is in row 20, column 10.
  d = density.density_map([[10.3, 20.7]], H, W, sigma=2.0)
  assert np.unravel_index(d.argmax(), d.shape) == (20, 10)
  # Away from the border the kernel's centroid is the point itself, in pixel-centre coordinates.
  rows, cols = np.mgrid[0:H, 0:W] + 0.5
  np.testing.assert_allclose([(d * cols).sum(), (d * rows).sum()], [10.3, 20.7], atol=1e-3)
  # Truncated at +-4 sigma (by pixel centre), per axis, as scipy.ndimage.gaussian_filter.
  support = np.abs(cols - 10.3) <= 8.0
  support &= np.abs(rows - 20.7) <= 8.0
  assert (d[~support] == 0).all() and (d[support] > 0).all()
  # A corner point's mass stays in the corner pixel's neighbourhood.
  d = density.density_map([[W, H]], H, W, sigma=1.0)
  assert np.unravel_index(d.argmax(), d.shape) == (H - 1, W - 1)


def test_tiny_sigma_gives_the_dot_map():
  # Each point's whole mass in its own pixel (no underflow to 0/0 however small sigma is).
  points = _distinct_pixel_points(50)
  dots = np.zeros((H, W), np.float32)
  cols, rows = np.floor(points).astype(int).T
  dots[rows, cols] = 1
  np.testing.assert_allclose(density.density_map(points, H, W, sigma=1e-3), dots, atol=1e-6)


def test_points_outside_are_dropped_and_counted():
  points = [[5.5, 5.5], [-0.1, 3], [W + 0.01, 3], [3, H + 1], [W, H]]  # two inside (closed box)
  d, dropped = density.density_map(points, H, W, 2.0, return_dropped=True)
  assert dropped == 3
  np.testing.assert_allclose(d.sum(), 2.0, rtol=1e-5)
  np.testing.assert_array_equal(density.inside(points, H, W), [True, False, False, False, True])
  clipped = density.clip_points(points, H, W)
  np.testing.assert_allclose(density.density_map(clipped, H, W).sum(), 5.0, rtol=1e-5)


def test_empty_and_scale():
  assert density.density_map(np.zeros((0, 2)), H, W).sum() == 0
  assert density.density_map([], H, W, "adaptive").shape == (H, W)
  np.testing.assert_allclose(density.density_map(_random_points(7), H, W, scale=60).sum(), 420,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="shape"):
    density.density_map(np.zeros((3, 3)), H, W)
  with pytest.raises(ValueError, match="sigma"):
    density.density_map([[1, 1]], H, W, sigma="wide")
  with pytest.raises(ValueError, match="sigma"):
    density.density_map([[1, 1]], H, W, sigma=0.0)


def test_adaptive_sigmas_follow_neighbour_distances():
  line = [[10, 10], [20, 10], [30, 10], [40, 10], [50, 10]]
  s = density.adaptive_sigmas(line, k=3, beta=0.3, sigma_min=0.1, sigma_max=100)
  # Points 20..40: neighbours at 10, 10, 20 -> 0.3 * 40/3 = 4. The ends: 10, 20, 30 -> 6.
  np.testing.assert_allclose(s, [6, 4, 4, 4, 6])
  np.testing.assert_allclose(density.adaptive_sigmas(line, k=1, beta=1.0), [10] * 5)
  np.testing.assert_allclose(density.adaptive_sigmas([[3, 3]], sigma_single=7.5), [7.5])
  # Two points: one neighbour each; duplicates are clamped up to sigma_min, far ones down.
  np.testing.assert_allclose(density.adaptive_sigmas([[0, 0], [0, 100]], beta=0.3,
                                                     sigma_max=1e3), [30, 30])
  np.testing.assert_allclose(density.adaptive_sigmas([[5, 5], [5, 5]], sigma_min=1.0), [1, 1])
  np.testing.assert_allclose(density.adaptive_sigmas([[0, 0], [0, 100]], sigma_max=16), [16, 16])
  # The map uses them: a crowd gives sharp peaks, isolated points wide ones.
  crowd = density.density_map([[20, 20], [21, 20], [20, 21]], H, W, "adaptive")
  sparse = density.density_map([[5, 5], [60, 5], [5, 44]], H, W, "adaptive")
  assert crowd.max() > 5 * sparse.max()


def test_per_point_sigmas():
  d = density.density_map([[10.5, 10.5], [40.5, 30.5]], H, W, sigma=np.array([1.0, 5.0]))
  np.testing.assert_allclose(d.sum(), 2, rtol=1e-5)
  assert d[10, 10] > 5 * d[30, 40]


def test_thousand_points_are_fast():
  points = _random_points(1000, 384, 576)
  density.adaptive_sigmas(points[:5])  # the scipy import is not the map's cost
  for sigma in (1.0, "adaptive"):
    start = time.perf_counter()
    d = density.density_map(points, 384, 576, sigma)
    assert time.perf_counter() - start < 1.0, sigma
    np.testing.assert_allclose(d.sum(dtype=np.float64), 1000, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# resize_density, resize_points, crops

@pytest.mark.parametrize("out", [(12, 16), (7, 9), (48, 64), (100, 150), (5, 200)])
def test_resize_density_preserves_the_sum(out):
  d = density.density_map(np.concatenate([_random_points(30), CORNERS]), H, W, "adaptive")
  r = density.resize_density(d, *out)
  assert r.shape == out and r.dtype == np.float32 and (r >= 0).all()
  np.testing.assert_allclose(r.sum(dtype=np.float64), d.sum(dtype=np.float64), rtol=1e-5)


def test_resize_density_keeps_mass_where_it_was():
  d = np.zeros((H, W), np.float32)
  d[5, 60] = 3.0  # top-right
  r = density.resize_density(d, 12, 16)  # 4x4 blocks
  assert r[1, 15] == pytest.approx(3.0)
  np.testing.assert_allclose(density.resize_density(np.stack([d, 2 * d]), 6, 8).sum((1, 2)),
                             [3, 6], rtol=1e-6)
  assert not density.resize_density(np.zeros((H, W)), 10, 10).any()


def test_resize_points_matches_resize_density():
  points = _random_points(20)
  big = density.resize_points(points, (H, W), (2 * H, 3 * W))
  np.testing.assert_allclose(big, points * [3, 2], rtol=1e-6)
  # The map of 2x-resized points, resized back, is (nearly) the map of the points: same grid.
  a = density.density_map(points, H, W, 2.0)
  big = density.resize_points(points, (H, W), (2 * H, 2 * W))
  b = density.resize_density(density.density_map(big, 2 * H, 2 * W, 4.0), H, W)
  assert np.abs(a - b).sum() < 0.03 * a.sum()


def _marked(points, h=H, w=W):
  """An image with a bright pixel under each point (distinct pixels), background dark."""
  image = np.full((h, w, 3), 20, np.uint8)
  cols, rows = np.floor(points).astype(int).T
  image[rows, cols] = 255
  return image


def _distinct_pixel_points(n, h=H, w=W, seed=0):
  rng = np.random.default_rng(seed)
  flat = rng.choice(h * w, n, replace=False)
  return (np.stack([flat % w, flat // w], 1) + rng.uniform(0.05, 0.95, (n, 2))).astype(np.float32)


def test_crop_moves_and_drops_points():
  points = np.array([[10.5, 10.5], [20.5, 5.5], [30.0, 5.5], [15.5, 12.0], [9.99, 5.5],
                     [29.99, 11.99], [10.0, 2.0]], np.float32)
  image, p = density.crop(_marked(points), points, top=2, left=10, height=10, width=20)
  assert image.shape == (10, 20, 3)
  # x == 30 and y == 12 are the window's right and bottom edges: half-open, so those points
  # belong to the next tile; its left and top edges (x == 10, y == 2) are in.
  np.testing.assert_allclose(p, [[0.5, 8.5], [10.5, 3.5], [19.99, 9.99], [0, 0]], atol=1e-5)
  with pytest.raises(ValueError, match="pad"):
    density.crop(image, p, 5, 5, 10, 10)


def test_random_crop_flip_keeps_points_on_their_pixels():
  points = _distinct_pixel_points(60)
  image = _marked(points)
  flips = 0
  for seed in range(20):
    out, p = density.random_crop_flip(image, points, (24, 32), rng=seed)
    assert out.shape == (24, 32, 3)
    cols, rows = np.floor(p).astype(int).T
    assert (out[rows, cols] == 255).all(), seed           # every kept point is on its pixel
    assert len(p) == (out[..., 0] == 255).sum(), seed     # and every marked pixel has its point
    flips += not np.array_equal(out, image[:24][:, :32])  # (not a proof of flipping; see below)
  assert flips > 0
  # Flipping alone: x -> width - x, and the pixel under the point follows.
  out, p = density.hflip(image, points)
  np.testing.assert_allclose(p[:, 0], W - points[:, 0])
  cols, rows = np.floor(p).astype(int).T
  assert (out[rows, cols] == 255).all()


def test_random_crop_flip_is_seeded_and_flips_at_the_given_rate():
  points = _distinct_pixel_points(30)
  image = _marked(points)
  a = density.random_crop_flip(image, points, 16, rng=3)
  b = density.random_crop_flip(image, points, 16, rng=3)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  never = density.random_crop_flip(image, points, (H, W), rng=0, flip_prob=0.0)
  always = density.random_crop_flip(image, points, (H, W), rng=0, flip_prob=1.0)
  np.testing.assert_array_equal(never[0], image)
  np.testing.assert_array_equal(always[0], image[:, ::-1])


def test_random_crop_pads_small_images():
  points = _distinct_pixel_points(10, 20, 30)
  image = _marked(points, 20, 30)
  out, p = density.random_crop_flip(image, points, 32, rng=0, flip_prob=0.0)
  assert out.shape == (32, 32, 3) and (out[20:] == 0).all() and (out[:, 30:] == 0).all()
  np.testing.assert_allclose(p, points)


# ---------------------------------------------------------------------------------------------
# Readers, on trees in the published layouts

def _save_image(path, size=(40, 30), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, (120, 60, 30)).save(path, format=fmt)


def _fsc147_tree(root):
  corners = lambda x1, y1, x2, y2: [[x1, y1], [x1, y2], [x2, y2], [x2, y1]]
  annotations = {
      "2.jpg": {"H": 768, "W": 1024, "ratio_h": 0.5, "ratio_w": 0.5,
                "points": [[10.5, 12.0], [30.25, 20.0]],
                "box_examples_coordinates": [corners(1, 2, 5, 7), corners(8, 9, 12, 15),
                                             corners(20, 1, 25, 4)]},
      "3.jpg": {"H": 384, "W": 512, "ratio_h": 1.0, "ratio_w": 1.0, "points": [[1, 1]],
                "box_examples_coordinates": [corners(0, 0, 3, 3)]},
      "7.jpg": {"H": 384, "W": 384, "ratio_h": 1.0, "ratio_w": 1.0,
                "points": [[5, 5], [6, 6], [7, 7]], "box_examples_coordinates": []},
  }
  with open(os.path.join(root, "annotation_FSC147_384.json"), "w") as f:
    json.dump(annotations, f)
  with open(os.path.join(root, "Train_Test_Val_FSC_147.json"), "w") as f:
    json.dump({"train": ["2.jpg", "3.jpg"], "val": ["7.jpg"], "test": []}, f)
  with open(os.path.join(root, "ImageClasses_FSC147.txt"), "w") as f:
    f.write("2.jpg\tsea shells\n3.jpg\tapples\n7.jpg\thot air balloons\n")
  for name in annotations:
    _save_image(os.path.join(root, "images_384_VarV2", name), fmt="JPEG")


def test_read_fsc147(tmp_path):
  _fsc147_tree(tmp_path)
  train = cd.read_fsc147(str(tmp_path), "train")
  assert [r.name for r in train] == ["2.jpg", "3.jpg"]
  first = train[0]
  assert first.class_name == "sea shells" and first.count == 2 and first.split == "train"
  assert first.dataset == "fsc147" and first.points.dtype == np.float32
  np.testing.assert_allclose(first.points, [[10.5, 12.0], [30.25, 20.0]])
  np.testing.assert_allclose(first.boxes, [[1, 2, 5, 7], [8, 9, 12, 15], [20, 1, 25, 4]])
  assert first.image_path == os.path.join(tmp_path, "images_384_VarV2", "2.jpg")
  assert Image.open(first.image_path).size == (40, 30) and first.read()[:2] == b"\xff\xd8"
  (val,) = cd.read_fsc147(str(tmp_path), "val")
  assert val.class_name == "hot air balloons" and val.count == 3 and val.boxes.shape == (0, 4)
  assert cd.read_fsc147(str(tmp_path), "test") == []
  with pytest.raises(ValueError, match="split"):
    cd.read_fsc147(str(tmp_path), "training")


def test_read_fsc147_errors_name_the_missing_file(tmp_path):
  _fsc147_tree(tmp_path)
  os.remove(tmp_path / "images_384_VarV2" / "3.jpg")
  with pytest.raises(FileNotFoundError, match=r"1 of 2 images.*Train_Test_Val.*3\.jpg"):
    cd.read_fsc147(str(tmp_path), "train")
  cd.read_fsc147(str(tmp_path), "val")  # the other split is intact
  os.remove(tmp_path / "annotation_FSC147_384.json")
  with pytest.raises(FileNotFoundError, match="annotation_FSC147_384.json"):
    cd.read_fsc147(str(tmp_path), "val")


def test_read_fsc147_image_without_annotation(tmp_path):
  _fsc147_tree(tmp_path)
  with open(tmp_path / "Train_Test_Val_FSC_147.json", "w") as f:
    json.dump({"train": ["2.jpg", "99.jpg"], "val": [], "test": []}, f)
  with pytest.raises(ValueError, match=r"99\.jpg.*no entry in .*annotation_FSC147_384"):
    cd.read_fsc147(str(tmp_path), "train")


def _carpk_tree(root):
  boxes = {"20161225_TPZ_00001": [(10, 20, 30, 30), (0, 0, 4, 6), (40, 10, 50, 25)],
           "20161225_TPZ_00002": [(1, 1, 3, 3)],
           "20160331_NTU_00001": []}  # a lot with no cars is a valid annotation
  for name, bs in boxes.items():
    _save_image(os.path.join(root, "Images", f"{name}.png"), (60, 40))
    os.makedirs(os.path.join(root, "Annotations"), exist_ok=True)
    with open(os.path.join(root, "Annotations", f"{name}.txt"), "w") as f:
      f.writelines(f"{x1} {y1} {x2} {y2} 1\n" for x1, y1, x2, y2 in bs)
  os.makedirs(os.path.join(root, "ImageSets"))
  with open(os.path.join(root, "ImageSets", "train.txt"), "w") as f:
    f.write("20161225_TPZ_00001\n20161225_TPZ_00002\n\n")
  with open(os.path.join(root, "ImageSets", "test.txt"), "w") as f:
    f.write("20160331_NTU_00001\n")


def test_read_carpk(tmp_path):
  _carpk_tree(tmp_path)
  train = cd.read_carpk(str(tmp_path), "train")
  assert [r.name for r in train] == ["20161225_TPZ_00001.png", "20161225_TPZ_00002.png"]
  first = train[0]
  assert first.class_name == "cars" and first.count == 3 and first.dataset == "carpk"
  np.testing.assert_allclose(first.points, [[20, 25], [2, 3], [45, 17.5]])
  np.testing.assert_allclose(first.boxes[0], [10, 20, 30, 30])
  (test,) = cd.read_carpk(str(tmp_path), "test")
  assert test.count == 0 and test.points.shape == (0, 2)
  assert density.density_map(first.points, 40, 60).sum() == pytest.approx(3, rel=1e-5)


def test_read_carpk_errors_name_the_missing_file(tmp_path):
  _carpk_tree(tmp_path)
  os.remove(tmp_path / "Images" / "20161225_TPZ_00002.png")
  with pytest.raises(FileNotFoundError, match=r"ImageSets.train\.txt.*20161225_TPZ_00002\.png"):
    cd.read_carpk(str(tmp_path), "train")
  os.remove(tmp_path / "Annotations" / "20160331_NTU_00001.txt")
  with pytest.raises(FileNotFoundError, match=r"annotation file.*20160331_NTU_00001\.txt"):
    cd.read_carpk(str(tmp_path), "test")
  with open(tmp_path / "Annotations" / "20161225_TPZ_00001.txt", "a") as f:
    f.write("12 13 oops\n")
  with pytest.raises(ValueError, match=r"20161225_TPZ_00001\.txt:4"):
    cd.read_carpk(str(tmp_path), "train")
  with pytest.raises(FileNotFoundError, match=r"ImageSets.test\.txt"):
    cd.read_carpk(str(tmp_path / "nowhere"), "test")


def _save_gt_mat(path, points):
  """A GT_IMG_*.mat as ShanghaiTech's MATLAB wrote it: image_info = {struct(location, number)},
  a 1x1 cell holding a 1x1 struct; location is n x 2 double (x, y), number 1x1 double."""
  struct = np.empty((1, 1), dtype=[("location", object), ("number", object)])
  struct[0, 0]["location"] = np.asarray(points, np.float64).reshape(-1, 2)
  struct[0, 0]["number"] = np.array([[len(points)]], np.float64)
  cell = np.empty((1, 1), dtype=object)
  cell[0, 0] = struct
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sio.savemat(path, {"image_info": cell})


SHANGHAI_POINTS = {"IMG_1": [[3.5, 4.5], [10, 20], [39.9, 29.9]], "IMG_2": [[7, 8]],
                   "IMG_10": []}


def _shanghai_tree(root, part="part_A", gt="ground-truth", split="train"):
  for name, pts in SHANGHAI_POINTS.items():
    _save_image(os.path.join(root, part, f"{split}_data", "images", f"{name}.jpg"), fmt="JPEG")
    _save_gt_mat(os.path.join(root, part, f"{split}_data", gt, f"GT_{name}.mat"), pts)


def test_gt_mat_fixture_has_the_real_files_nesting(tmp_path):
  # The index path every public ShanghaiTech loader uses on the real files must work on ours.
  _save_gt_mat(str(tmp_path / "GT_IMG_1.mat"), SHANGHAI_POINTS["IMG_1"])
  mat = sio.loadmat(str(tmp_path / "GT_IMG_1.mat"))
  assert mat["image_info"].shape == (1, 1) and mat["image_info"].dtype == object
  assert mat["image_info"][0, 0].dtype.names == ("location", "number")
  np.testing.assert_allclose(mat["image_info"][0][0][0][0][0], SHANGHAI_POINTS["IMG_1"])
  assert mat["image_info"][0][0][0][0][1].item() == 3


def test_read_shanghaitech(tmp_path):
  _shanghai_tree(tmp_path)
  records = cd.read_shanghaitech(str(tmp_path), "A", "train")
  assert [r.name for r in records] == ["IMG_1.jpg", "IMG_2.jpg", "IMG_10.jpg"]
  assert [r.count for r in records] == [3, 1, 0]
  assert {r.class_name for r in records} == {"people"}
  assert {r.dataset for r in records} == {"shanghaitech_a"}
  np.testing.assert_allclose(records[0].points, SHANGHAI_POINTS["IMG_1"])
  assert records[1].points.shape == (1, 2) and records[1].points.dtype == np.float32
  # The other spellings in circulation: part_B_final/ and ground_truth/.
  _shanghai_tree(tmp_path, "part_B_final", "ground_truth", "test")
  records = cd.read_shanghaitech(str(tmp_path), "B", "test")
  assert [r.count for r in records] == [3, 1, 0] and records[0].dataset == "shanghaitech_b"
  with pytest.raises(FileNotFoundError, match="part_B"):
    cd.read_shanghaitech(str(tmp_path), "B", "train")
  with pytest.raises(ValueError, match="part"):
    cd.read_shanghaitech(str(tmp_path), "C", "train")


def test_read_shanghaitech_errors_name_the_missing_file(tmp_path):
  _shanghai_tree(tmp_path)
  base = tmp_path / "part_A" / "train_data"
  os.remove(base / "images" / "IMG_2.jpg")  # its GT_IMG_2.mat is still there
  with pytest.raises(FileNotFoundError, match=r"1 of 3 images.*IMG_2\.jpg"):
    cd.read_shanghaitech(str(tmp_path), "A", "train")
  _save_image(str(base / "images" / "IMG_2.jpg"), fmt="JPEG")
  os.remove(base / "ground-truth" / "GT_IMG_10.mat")
  with pytest.raises(FileNotFoundError, match=r"annotation of IMG_10\.jpg.*GT_IMG_10\.mat"):
    cd.read_shanghaitech(str(tmp_path), "A", "train")
  sio.savemat(str(base / "ground-truth" / "GT_IMG_10.mat"), {"points": np.zeros((2, 2))})
  with pytest.raises(ValueError, match=r"GT_IMG_10\.mat.*image_info"):
    cd.read_shanghaitech(str(tmp_path), "A", "train")
