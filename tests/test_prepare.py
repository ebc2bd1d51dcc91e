"""data.prepare: webdataset tars, jsonl and parquet in; counting/general shards and stats out."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from countclip_jax.data import prepare
from countclip_jax.data import records


def jpeg(value: int, size=(20, 12)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, (value, 255 - value, 40)).save(buffer, "JPEG")
  return buffer.getvalue()


def png(value: int) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGBA", (9, 9), (value, 0, 0, 128)).save(buffer, "PNG")
  return buffer.getvalue()


CORRUPT = jpeg(7)[:60]  # a truncated JPEG: the header reads, the pixels do not


def write_tar(path, members):
  """members: (name, bytes) in order, as img2dataset writes them."""
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def read_all(output_dir, name):
  source, paths = records.data_source(f"{output_dir}/{name}-*.array_record")
  return [records.decode(source[i]) for i in range(len(source))], paths


@pytest.fixture
def webdataset_tar(tmp_path):
  path = tmp_path / "00000.tar"
  write_tar(path, [
      ("000000000.jpg", jpeg(10)), ("000000000.txt", b"Three red apples on a table"),
      ("000000000.json", json.dumps({"caption": "ignored: txt wins", "url": "u"}).encode()),
      ("000000001.jpg", jpeg(20)), ("000000001.json", json.dumps({"caption": "a dog"}).encode()),
      ("000000002.jpg", CORRUPT), ("000000002.txt", b"two cats"),
      ("000000003.jpg", jpeg(30)), ("000000003.txt", b"two cats and three dogs"),
      ("000000004.txt", b"five birds without their image"),
      ("../escape.txt", b"five birds"), ("/abs/000000005.jpg", jpeg(40)),
      ("sub/000000006.png", png(50)), ("sub/000000006.txt", b"  five   birds\non a wire "),
      ("000000007.jpg", jpeg(60)), ("000000007.txt", b"\xff\xfe not utf-8"),
      ("000000008.jpg", jpeg(70)), ("000000008.txt", b""),
      ("000000009.jpg", jpeg(80)), ("000000009.txt", b"a two-tone dress"),
  ])
  return path


def test_webdataset_tar_gives_the_right_shards_and_stats(tmp_path, webdataset_tar):
  out = tmp_path / "out"
  stats = prepare.prepare(str(webdataset_tar), str(out), num_shards=2, progress=False)
  counting, paths = read_all(out, "counting")
  assert [(r["caption"], r["number"]) for r in counting] == [
      ("Three red apples on a table", 3), ("five birds on a wire", 5)]  # whitespace normalised
  assert counting[0]["image"] == jpeg(10) and counting[1]["image"] == png(50)  # bytes kept as is
  assert counting[0]["key"].endswith("00000.tar:000000000")
  np.testing.assert_array_equal(records.numbers(paths), [3, 5])
  general, _ = read_all(out, "general")
  assert [(r["caption"], r["number"]) for r in general] == [("a dog", 0), ("a two-tone dress", 0)]

  assert stats["examples"] == {"counting": 2, "general": 2}
  assert stats["per_number"] == {**{str(n): 0 for n in range(2, 11)}, "3": 1, "5": 1}
  assert stats["skipped"] == {
      "bad image": 1, "several different counts in caption": 1, "missing image": 1,
      "unsafe path in tar (absolute or '..')": 2, "caption is not utf-8 text or json": 1,
      "empty caption": 1}
  assert stats["skipped_examples"]["bad image"] == [f"{webdataset_tar}:000000002"]
  assert json.loads((out / "stats.json").read_text()) == stats
  assert stats["shards"]["counting"] == ["counting-00000-of-00002.array_record",
                                         "counting-00001-of-00002.array_record"]


def test_jsonl_with_paths_bad_lines_and_a_cap(tmp_path):
  (tmp_path / "img").mkdir()
  for i in range(5):
    (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(10 * i))
  (tmp_path / "img" / "bad.jpg").write_bytes(b"not an image at all")
  lines = [
      {"image": "img/0.jpg", "caption": "two cups of tea"},
      {"image": "img/1.jpg", "caption": "Two cats asleep"},   # over the cap of one "two"
      {"image": "img/2.jpg", "text": "ten candles"},          # `text` works as the caption
      {"image": "img/3.jpg", "caption": "a quiet street"},
      {"image": "img/bad.jpg", "caption": "four chairs"},
      {"image": "img/missing.jpg", "caption": "six eggs"},
      {"image": "img/4.jpg"},
      "not an object",
  ]
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(json.dumps(l) for l in lines) + "\n{broken json\n\n")
  stats = prepare.prepare(str(path), str(tmp_path / "out"), num_shards=3, max_per_number=1,
                          progress=False)
  counting, _ = read_all(tmp_path / "out", "counting")
  assert sorted((r["caption"], r["number"]) for r in counting) == [
      ("ten candles", 10), ("two cups of tea", 2)]
  assert stats["per_number"]["2"] == 1 and stats["per_number_before_cap"]["2"] == 2
  assert stats["examples"] == {"counting": 2, "general": 1}
  assert stats["skipped"] == {"over the per-number cap": 1, "bad image": 1, "missing image": 1,
                              "missing caption": 1, "bad json line": 2}
  assert stats["skipped_examples"]["bad json line"] == [f"{path}:8", f"{path}:9"]


def test_parquet_bytes_and_hf_image_structs(tmp_path):
  path = tmp_path / "pairs.parquet"
  pq.write_table(pa.table({"image": [jpeg(1), CORRUPT, jpeg(3)],
                           "text": ["seven ducks", "eight ducks", "a pond"]}), path)
  (tmp_path / "x.jpg").write_bytes(jpeg(4))
  hf = tmp_path / "hf.parquet"
  pq.write_table(pa.table({"image": [{"bytes": jpeg(5), "path": None},
                                     {"bytes": None, "path": "x.jpg"}],
                           "caption": ["nine pins", "a lane"]}), hf)
  stats = prepare.prepare(f"{path},{hf}", str(tmp_path / "out"), num_shards=1, progress=False)
  counting, _ = read_all(tmp_path / "out", "counting")
  general, _ = read_all(tmp_path / "out", "general")
  assert [(r["caption"], r["image"]) for r in counting] == [("seven ducks", jpeg(1)),
                                                            ("nine pins", jpeg(5))]
  assert [(r["caption"], r["image"]) for r in general] == [("a pond", jpeg(3)), ("a lane", jpeg(4))]
  assert stats["skipped"] == {"bad image": 1}


def test_counting_only_and_truncated_tar(tmp_path, webdataset_tar):
  with tarfile.open(webdataset_tar) as tar:  # cut inside the data of key 3's image
    cut = next(m.offset_data for m in tar.getmembers() if m.name == "000000003.jpg") + 50
  truncated = tmp_path / "00001.tar"
  truncated.write_bytes(webdataset_tar.read_bytes()[:cut])
  stats = prepare.prepare(f"{webdataset_tar},{truncated}", str(tmp_path / "out"), num_shards=1,
                          general=False, progress=False)
  assert not list((tmp_path / "out").glob("general-*"))
  assert stats["skipped"]["unreadable tar (ReadError)"] == 1
  assert stats["skipped_examples"]["unreadable tar (ReadError)"] == [str(truncated)]
  # Keys 0..2 of the truncated tar still count: the apples twice, the birds once.
  assert stats["per_number"]["3"] == 2 and stats["per_number"]["5"] == 1
  assert stats["skipped"]["no count in caption (general set off)"] == 3
  assert stats["skipped"]["bad image"] == 2


def test_cli_and_refusing_to_overwrite(tmp_path, webdataset_tar, capsys):
  out = str(tmp_path / "out")
  argv = ["--input", str(webdataset_tar), "--output_dir", out, "--num_shards", "1"]
  assert prepare.main(argv) == 0
  printed = capsys.readouterr().out
  assert "counting 2 (two 0, three 1, four 0, five 1" in printed and "bad image: 1" in printed
  with pytest.raises(FileExistsError, match="overwrite"):
    prepare.prepare(str(webdataset_tar), out, progress=False)
  prepare.prepare(str(webdataset_tar), out, overwrite=True, progress=False)


def test_unknown_inputs_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="No input files match"):
    prepare.prepare(str(tmp_path / "*.tar"), str(tmp_path / "out"))
  (tmp_path / "pairs.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="pairs.csv: unknown input kind"):
    prepare.prepare(str(tmp_path / "pairs.csv"), str(tmp_path / "out"))
