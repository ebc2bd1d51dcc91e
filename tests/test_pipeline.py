"""Input pipeline: the batch contract, counterfactuals, determinism, resumable state, process
shards, balanced sampling, global arrays and eval batches."""
import collections
import io

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from configs import common
from countclip_jax.data import images
from countclip_jax.data import pipeline
from countclip_jax.data import records
from countclip_jax.data import synthetic
from countclip_jax.text import numbers
from countclip_jax.text import tokenizer as tokenizer_lib
from countclip_jax.text.tokenizer import build_tokenizer

SIZE = 48  # the synthetic world cannot place ten objects at 32 px (it raises)
LENGTH = 16


@pytest.fixture(scope="module")
def tok():
  return build_tokenizer(synthetic.vocabulary() + ["cats", "dogs", "photo", "of", "id"], LENGTH)


def config(**overrides):
  c = common.base()
  c.train.batch_size, c.count.fraction, c.data.synthetic.size = 16, 0.25, 200
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  for x, y in zip(a, b):
    jax.tree.map(np.testing.assert_array_equal, x, y)


def pixels(image):
  """Pixel values as floats: training batches carry uint8; eval ones are CLIP-normalised."""
  if image.dtype == np.uint8:
    return image.astype(np.float64)
  return (image * images.CLIP_STD + images.CLIP_MEAN) * 255


def test_split_sizes():
  assert pipeline.split_sizes(128, 0.25) == (32, 96)
  assert pipeline.split_sizes(128, 0.25, process_count=4) == (8, 24)
  assert pipeline.split_sizes(8, 0.0, 2) == (0, 4) and pipeline.split_sizes(8, 1.0, 2) == (4, 0)
  with pytest.raises(ValueError, match=r"count.fraction must be in \[0, 1\]"):
    pipeline.split_sizes(8, 1.5)
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    pipeline.split_sizes(8, 0.5, 3)
  with pytest.raises(ValueError, match="= 3 counting and 9 general .* process count 2"):
    pipeline.split_sizes(12, 0.25, 2)


@pytest.mark.parametrize("k", [0, 9, -1])
def test_num_counterfactuals_validated(tok, k):
  with pytest.raises(ValueError, match="num_counterfactuals"):
    pipeline.train_dataset(config(count__num_counterfactuals=k), tok, SIZE,
                           process_index=0, process_count=1)


@pytest.mark.parametrize("k", [1, 8])
def test_batch_contract_and_counterfactuals(tok, k):
  c = config(count__num_counterfactuals=k)
  batches = take(pipeline.train_iterator(c, tok, SIZE, process_index=0, process_count=1), 3)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), batches[0])
  assert shapes == {
      "count": {"image": ((4, SIZE, SIZE, 3), np.uint8), "text": ((4, LENGTH), np.int32),
                "cf_text": ((4, k, LENGTH), np.int32), "number": ((4,), np.int32),
                "cf_number": ((4, k), np.int32)},
      "general": {"image": ((12, SIZE, SIZE, 3), np.uint8), "text": ((12, LENGTH), np.int32)}}
  for b in batches:
    count, general = b["count"], b["general"]
    assert (count["cf_number"] != count["number"][:, None]).all()
    assert np.isin(count["cf_number"], numbers.NUMBERS).all()
    for row in count["cf_number"]:
      assert len(set(row)) == k
    captions = tok.hf.batch_decode(count["text"], skip_special_tokens=True)
    for i, caption in enumerate(captions):
      assert numbers.parse_count(caption) == count["number"][i]
      swaps = [numbers.swap_count(caption, int(n)) for n in count["cf_number"][i]]
      np.testing.assert_array_equal(count["cf_text"][i], tok(swaps))
    for caption in tok.hf.batch_decode(general["text"], skip_special_tokens=True):
      assert caption and not numbers.find_numbers(caption)
    for image in (count["image"], general["image"]):  # renders, normalised on the devices
      assert image.std() > 0
      device = np.asarray(jax.jit(images.normalize_on_device)(image))
      np.testing.assert_allclose(device, images.normalize(image), atol=1e-6)
  if k == 8:
    np.testing.assert_array_equal(np.sort(batches[0]["count"]["cf_number"], 1),
                                  batches[0]["count"]["cf_number"])


@pytest.mark.parametrize("fraction,c,g", [(0.0, 0, 16), (1.0, 16, 0)])
def test_one_sided_batches_keep_their_shapes(tok, fraction, c, g):
  c_config = config(count__fraction=fraction, count__num_counterfactuals=8)
  b = next(pipeline.train_iterator(c_config, tok, SIZE, process_index=0, process_count=1))
  assert b["count"]["image"].shape == (c, SIZE, SIZE, 3) and b["count"]["text"].shape == (c, LENGTH)
  assert b["count"]["cf_text"].shape == (c, 8, LENGTH) and b["count"]["cf_number"].shape == (c, 8)
  assert b["general"]["image"].shape == (g, SIZE, SIZE, 3)
  assert b["general"]["text"].shape == (g, LENGTH) and b["general"]["text"].dtype == np.int32


@pytest.mark.parametrize("batch,fraction,processes",
                         [(2, 0.5, 1), (3, 0.5, 1), (4, 0.25, 1), (4, 0.5, 2), (1, 1.0, 1)])
def test_one_row_of_a_kind_per_process(tok, batch, fraction, processes):
  """A single counting or general row per process is a valid split (a length overflow in
  grain's endless mix once crashed it)."""
  c_config = config(train__batch_size=batch, count__fraction=fraction)
  c, g = pipeline.split_sizes(batch, fraction, processes)
  assert 1 in (c, g)
  rows = [next(pipeline.train_iterator(c_config, tok, SIZE, process_index=i,
                                       process_count=processes, num_threads=0))
          for i in range(processes)]
  for b in rows:
    assert b["count"]["image"].shape[0] == c and b["general"]["image"].shape[0] == g
  if processes == 2:  # two processes take different rows of the one global batch
    assert not np.array_equal(rows[0]["count"]["image"], rows[1]["count"]["image"])


def test_same_seed_same_batches_other_seed_other_batches(tok):
  def first(seed, threads):
    it = pipeline.train_iterator(config(train__seed=seed), tok, SIZE, process_index=0,
                                 process_count=1, num_threads=threads)
    return take(it, 3)
  a = first(0, 0)
  assert_same_batches(a, first(0, 4))  # thread timing does not matter
  other = first(1, 2)
  assert not np.array_equal(a[0]["general"]["image"], other[0]["general"]["image"])


def test_state_restores_the_identical_continuation(tok, tmp_path):
  # 40 general examples, 12 per batch: the continuation crosses into the (reshuffled) epoch 2.
  c = config(count__fraction=0.25, data__synthetic=dict(size=50, distractor_prob=0.3,
                                                          textured_prob=0.5))
  it = pipeline.train_iterator(c, tok, SIZE, process_index=0, process_count=1)
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)

  fresh = pipeline.train_iterator(c, tok, SIZE, process_index=0, process_count=1)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 4), expected)

  # The same through Orbax, as the trainer saves it next to the train state.
  it = pipeline.train_iterator(c, tok, SIZE, process_index=0, process_count=1)
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  take(it, 2)  # the saved iterator moves on; the checkpoint does not
  fresh = pipeline.train_iterator(c, tok, SIZE, process_index=0, process_count=1)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = manager.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_same_batches(take(restored["data"], 4), expected)


def png(value):
  buffer = io.BytesIO()
  Image.new("RGB", (40, 30), (value, 255 - value, 0)).save(buffer, "PNG")
  return buffer.getvalue()


def write_records(path, name, ids, number_of):
  with records.ShardWriter(str(path), name, num_shards=3) as writer:
    for i in ids:
      n = number_of(i)
      caption = f"a photo of {numbers.NUMBER_WORDS[n]} cats" if n else "a photo of dogs"
      writer.write(png(i), caption, n, key=str(i))
  return str(path / f"{name}-*.array_record")


def ids_of(image_batch):
  """Each record's image is one colour whose red channel is its id."""
  return np.round(pixels(image_batch)[:, SIZE // 2, SIZE // 2, 0]).astype(int).tolist()


@pytest.fixture
def records_config(tmp_path):
  c = config(data__source="records", train__batch_size=8, count__fraction=0.5,
             data__balance_numbers=False)
  c.data.records.counting = write_records(tmp_path, "counting", range(24), lambda i: 2 + i % 9)
  c.data.records.general = write_records(tmp_path, "general", range(100, 124), lambda i: 0)
  return c


def test_process_shards_are_disjoint_and_cover_the_data(tok, records_config):
  # 2 processes x 12 examples per set x 2 rows per batch: 6 batches are exactly one epoch.
  seen = {"count": [], "general": []}
  for process in range(2):
    batches = take(pipeline.train_iterator(records_config, tok, SIZE, process_index=process,
                                           process_count=2), 6)
    for part in seen:
      ids = sum((ids_of(b[part]["image"]) for b in batches), [])
      assert len(ids) == len(set(ids)) == 12  # one epoch: each local example once
      seen[part].append(set(ids))
  for part, want in (("count", set(range(24))), ("general", set(range(100, 124)))):
    assert not seen[part][0] & seen[part][1]
    assert seen[part][0] | seen[part][1] == want
  b = next(pipeline.train_iterator(records_config, tok, SIZE, process_index=0, process_count=1))
  for i, n in zip(ids_of(b["count"]["image"]), b["count"]["number"]):
    assert n == 2 + i % 9  # the record's number travels with its image


def test_records_augmentation_is_deterministic(tok, records_config):
  records_config.data.augment = True
  a = take(pipeline.train_iterator(records_config, tok, SIZE, process_index=0,
                                   process_count=1), 2)
  assert_same_batches(a, take(pipeline.train_iterator(records_config, tok, SIZE,
                                                      process_index=0, process_count=1), 2))


def test_balanced_sampling_over_numbers(tok, tmp_path):
  c = config(data__source="records", train__batch_size=36, count__fraction=1.0)
  # 60 "two", 3 or 4 of each other number: balanced, each number is served 1/9 of the time.
  c.data.records.counting = write_records(
      tmp_path, "counting", range(87), lambda i: 2 if i < 60 else 3 + (i - 60) % 8)
  for balance, check in ((True, lambda h: set(h.values()) == {16}),
                         (False, lambda h: h[2] > 80)):
    c.data.balance_numbers = balance
    it = pipeline.train_iterator(c, tok, SIZE, process_index=0, process_count=1)
    histogram = collections.Counter(sum((b["count"]["number"].tolist() for b in take(it, 4)), []))
    assert check(histogram), (balance, histogram)


def test_long_counting_captions_keep_their_number_word(tok):
  caption = "a photo of cats " * 6 + "and three dogs"
  text, cf_text = pipeline.tokenize_counting(tok, [caption, "two cats"], [3, 2],
                                             np.array([[5], [9]]))
  decoded = tok.hf.batch_decode(text, skip_special_tokens=True)
  assert "three dogs" in decoded[0] and decoded[1] == "two cats"
  assert "five dogs" in tok.hf.decode(cf_text[0, 0], skip_special_tokens=True)
  assert tok.hf.decode(cf_text[1, 0], skip_special_tokens=True) == "nine cats"


def test_only_counting_captions_that_truncation_cuts_are_fitted(tok, monkeypatch):
  # One caption fills the context exactly, one is a word longer: only the second is fitted
  # (the first tokenizes whole as it is; fitting rows one by one is the costly part).
  fitted, fit = [], tokenizer_lib.fit_caption
  monkeypatch.setattr(tokenizer_lib, "fit_caption",
                      lambda t, caption, n: fitted.append(caption) or fit(t, caption, n))
  exact = " ".join(["cats"] * (tok.context_length - 4) + ["three", "dogs"])
  longer = "cats " + exact
  text, cf_text = pipeline.tokenize_counting(tok, [exact, longer], [3, 3], np.array([[5], [5]]))
  assert fitted == [longer]
  assert tok.hf.decode(text[0], skip_special_tokens=True) == exact
  assert tok.hf.decode(cf_text[0, 0], skip_special_tokens=True) == exact.replace("three", "five")
  assert tok.hf.decode(text[1], skip_special_tokens=True) == exact  # fitted: a word less


def test_source_errors_name_the_config_field(tok):
  with pytest.raises(ValueError, match="config.data.records.counting is empty"):
    pipeline.train_dataset(config(data__source="records"), tok, SIZE, process_index=0,
                           process_count=1)
  with pytest.raises(ValueError, match="synthetic, records or tfds"):
    pipeline.train_dataset(config(data__source="laion"), tok, SIZE, process_index=0,
                           process_count=1)


def test_tfds_general_pairs_from_a_fake_data_source(tok, records_config, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  fake = [{"image": np.full((20, 24, 3), 10 * i, np.uint8),
           "captions": {"text": np.array([f"a photo of dogs {i}".encode(), b"second"])}}
          for i in range(1, 9)]
  calls = []
  monkeypatch.setattr(tfds, "data_source",
                      lambda name, split: calls.append((name, split)) or fake)
  records_config.data.source = "tfds"
  records_config.data.tfds.name, records_config.data.tfds.split = "fake_captions", "train[:8]"
  b = next(pipeline.train_iterator(records_config, tok, SIZE, process_index=0, process_count=1))
  assert calls == [("fake_captions", "train[:8]")]
  values = np.round(pixels(b["general"]["image"])[:, 5, 5, 0]).astype(int)
  assert set(values) <= set(range(10, 90, 10)) and len(set(values)) == 4
  for caption in tok.hf.batch_decode(b["general"]["text"], skip_special_tokens=True):
    assert caption.startswith("a photo of dogs")


def test_global_batch_places_the_local_batch(tok):
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  c = config(train__batch_size=64, count__fraction=0.125)  # 8 counting rows, 56 general
  local = next(pipeline.train_iterator(c, tok, SIZE, process_index=0, process_count=1))
  placed = pipeline.global_batch(local, sharding)
  jax.tree.map(np.testing.assert_array_equal, placed, local)
  assert placed["count"]["cf_text"].sharding == sharding
  assert len(placed["general"]["image"].addressable_shards) == 8
  # A prefix tree of shardings, and an empty side (p = 0).
  empty = next(pipeline.train_iterator(config(train__batch_size=64, count__fraction=0.0), tok,
                                       SIZE, process_index=0, process_count=1))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  placed = pipeline.global_batch(empty, {"count": replicated, "general": sharding})
  assert placed["count"]["image"].shape == (0, SIZE, SIZE, 3)
  assert placed["general"]["text"].sharding == sharding
  with pytest.raises(ValueError, match=r"\['general'\]\['text'\] of local shape \(5, 16\)"):
    pipeline.global_batch({"general": {"text": np.zeros((5, LENGTH), np.int32)}}, sharding)


def test_eval_batches_pad_and_keep_dataset_order():
  dataset = grain.MapDataset.source([{"number": np.int32(i), "name": f"ex{i}"} for i in range(10)])
  per_process = [list(pipeline.eval_batches(dataset, 4, process_index=p, process_count=2))
                 for p in range(2)]
  assert [len(batches) for batches in per_process] == [3, 3]
  examples, valid = [], []
  for b0, b1 in zip(*per_process):  # a global batch is process 0's rows, then process 1's
    for b in (b0, b1):
      assert b["number"].shape == (2,) and b["valid"].dtype == bool
      examples += b["example"].tolist()
      valid += b["valid"].tolist()
  assert examples == list(range(10)) + [-1, -1] and valid == [True] * 10 + [False] * 2
  assert per_process[1][-1]["name"].tolist() == ["", ""]
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    pipeline.eval_batches(dataset, 4, process_index=0, process_count=3)


def test_synthetic_eval_dataset():
  c = config()
  held = pipeline.synthetic_eval_dataset(c, SIZE, size=20)
  train = pipeline.synthetic_eval_dataset(c, SIZE, split="train", size=20)
  assert len(held) == 20
  ex = held[3]
  assert ex["image"].shape == (SIZE, SIZE, 3) and ex["image"].dtype == np.float32
  assert ex["number"] == 2 + 3 % 9 and ex["color"] in synthetic.COLORS
  assert ex["shape"] in synthetic.SHAPES and numbers.parse_count(ex["caption"]) == ex["number"]
  assert not np.array_equal(ex["image"], train[3]["image"])
  batches = list(pipeline.eval_batches(held, 8, process_index=0, process_count=1))
  assert [b["image"].shape[0] for b in batches] == [8, 8, 8]
  assert sum(b["valid"].sum() for b in batches) == 20


def test_countbench_eval_dataset_marks_bad_images(tmp_path):
  buffer = io.BytesIO()
  Image.new("RGB", (50, 40), "red").save(buffer, "JPEG")
  pq.write_table(pa.table({
      "image_url": ["u0", "u1", "u2"], "text": ["two cats", "three dogs", "four birds"],
      "number": [2, 3, 4],
      "image": [{"bytes": buffer.getvalue(), "path": None}, {"bytes": b"junk", "path": None},
                {"bytes": None, "path": None}]}), tmp_path / "countbench.parquet")
  dataset, missing = pipeline.countbench_eval_dataset(str(tmp_path / "countbench.parquet"), SIZE)
  assert missing == 1 and len(dataset) == 2
  good, bad = dataset[0], dataset[1]
  assert good["valid"] and good["number"] == 2 and good["image"].shape == (SIZE, SIZE, 3)
  assert not bad["valid"] and bad["number"] == 3 and not bad["image"].any()


# ---------------------------------------------------------------------------------------------
# Host input at speed: rows prepared by threads, batched on the iterator, placed ahead.

@pytest.mark.parametrize("source", ["synthetic", "records"])
def test_iterator_batches_are_the_datasets_whatever_the_threads(tok, records_config, source):
  """Batch i from the iterator (0, 1 or 2 threads preparing rows, any start) is the MapDataset's
  batch i: the rows are batched in order whatever the threads' timing."""
  c = records_config if source == "records" else config()
  c.data.augment = source == "records"  # random crops: per-row randomness must not move
  reference = pipeline.train_dataset(c, tok, SIZE, process_index=0, process_count=1)
  want = [reference[i] for i in range(2, 6)]
  for threads in (0, 1, 2):
    c.data.prefetch_buffer_size = 1 + threads  # a buffer of one batch, and of several
    it = pipeline.train_iterator(c, tok, SIZE, process_index=0, process_count=1,
                                 num_threads=threads, start=2)
    assert_same_batches(take(it, 4), want)
  assert not np.array_equal(want[0]["count"]["image"], want[1]["count"]["image"])


def test_rows_of_two_processes_are_the_rows_of_one(tok):
  one = pipeline.train_rows(config(), tok, SIZE, process_index=0, process_count=1)
  two = [pipeline.train_rows(config(), tok, SIZE, process_index=p, process_count=2)
         for p in range(2)]
  assert (one.batch_rows, two[0].batch_rows) == (16, 8)
  # Global batch 1: process 0's 2 counting + 6 general rows, then process 1's; one process has
  # its 4 counting rows, then 12 general.
  global_rows = [one.dataset[16 + j] for j in range(16)]
  local = [[two[p].dataset[8 + j] for j in range(8)] for p in range(2)]
  order = local[0][:2] + local[1][:2] + local[0][2:] + local[1][2:]
  for a, b in zip(global_rows, order):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_threads_take_runs_of_rows_that_divide_the_batch():
  """A thread's task: the most rows (<= 16) dividing the batch that still leave the prefetch
  buffer (ahead batches) two tasks a thread."""
  assert pipeline.rows_per_task(64, 1, 2) == 16
  assert pipeline.rows_per_task(64, 8, 2) == 8    # 128 buffered rows: 8 tasks of 16 < 16
  assert pipeline.rows_per_task(12, 0, 2) == 12   # the calling thread: a task a batch
  assert pipeline.rows_per_task(12, 2, 2) == 6
  assert pipeline.rows_per_task(7, 4, 2) == 1     # 7 rows: 2 tasks of 7 for 4 threads
  assert pipeline.rows_per_task(64, 100, 2) == 1


def test_host_threads_default_to_the_cores(monkeypatch):
  monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(12)),
                      raising=False)
  c = config()
  assert c.data.num_threads == -1 and pipeline.host_threads(c) == 12
  c.data.num_workers = 4
  assert pipeline.host_threads(c) == 3  # the cores shared out among the worker processes
  c.data.num_threads = 5
  assert pipeline.host_threads(c) == 5


class _Counting:
  """0, 1, 2, ... as host batches; raises `error` after `stop` batches; records close()."""

  def __init__(self, stop=None, error=StopIteration):
    self.i, self.stop, self.error, self.closed = 0, stop, error, False

  def __next__(self):
    if self.stop is not None and self.i >= self.stop:
      raise self.error()
    self.i += 1
    return {"x": np.full((8, 2), self.i - 1, np.float32)}

  def close(self):
    self.closed = True


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_device_prefetch_keeps_the_order_and_closes(depth):
  sharding = jax.sharding.NamedSharding(jax.make_mesh((8,), ("data",)),
                                        jax.sharding.PartitionSpec("data"))
  source = _Counting()
  feed = pipeline.DevicePrefetch(source, sharding, depth)
  for i in range(5):
    batch = next(feed)
    assert isinstance(batch["x"], jax.Array) and batch["x"].sharding == sharding
    np.testing.assert_array_equal(batch["x"], np.full((8, 2), i))
  feed.close()
  assert source.closed and (feed.thread is None or not feed.thread.is_alive())
  assert source.i <= 5 + depth + 1  # ahead by the queue and the one being made, no more


@pytest.mark.parametrize("depth", [0, 2])
def test_device_prefetch_passes_on_the_end_and_errors(depth):
  sharding = jax.sharding.NamedSharding(jax.make_mesh((8,), ("data",)),
                                        jax.sharding.PartitionSpec())
  feed = pipeline.DevicePrefetch(_Counting(stop=2), sharding, depth)
  assert [int(next(feed)["x"][0, 0]) for _ in range(2)] == [0, 1]
  for _ in range(2):  # the end stays the end (no hang on a second call)
    with pytest.raises(StopIteration):
      next(feed)
  feed.close()
  feed = pipeline.DevicePrefetch(_Counting(stop=1, error=OSError), sharding, depth)
  next(feed)
  with pytest.raises(OSError):
    next(feed)
  feed.close()
