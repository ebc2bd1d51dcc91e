"""data.prepare: webdataset tars, jsonl and parquet in; counting/general shards and stats out."""
import io
import json
import tarfile
import time

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
      "unsafe path in tar (absolute or '..')": 2, "text is not utf-8": 1,
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


def thin_png(width, height) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, "PNG")
  return buffer.getvalue()


def test_extreme_aspect_ratios_are_skipped_quickly(tmp_path):
  path = tmp_path / "thin.tar"
  write_tar(path, [("a.png", thin_png(1, 20_000)), ("a.txt", b"two poles"),
                   ("b.png", thin_png(2, 60_000)), ("b.txt", b"a fence"),
                   ("c.jpg", jpeg(5)), ("c.txt", b"three cones")])
  start = time.perf_counter()
  stats = prepare.prepare(str(path), str(tmp_path / "out"), num_shards=1, workers=1,
                          progress=False)
  assert time.perf_counter() - start < 5.0  # generous for a loaded machine: refusing is instant
  assert stats["skipped"] == {"extreme aspect ratio": 2}
  assert stats["skipped_examples"]["extreme aspect ratio"] == [f"{path}:a", f"{path}:b"]
  assert stats["examples"] == {"counting": 1, "general": 0}


def shard_files(out):
  return sorted(p.name for p in out.iterdir() if p.name.endswith(records.SUFFIX))


def test_an_unusable_input_is_skipped_and_named(tmp_path, webdataset_tar):
  no_columns = tmp_path / "a-no-columns.parquet"
  pq.write_table(pa.table({"img": [jpeg(1)], "label": ["four owls"]}), no_columns)
  not_parquet = tmp_path / "b-not.parquet"
  not_parquet.write_bytes(b"PAR1 but not really" * 10)
  not_tar = tmp_path / "c-not.tar"
  not_tar.write_bytes(b"not a tar" * 200)
  a_folder = tmp_path / "d-folder.jsonl"
  a_folder.mkdir()
  good = tmp_path / "e-good.parquet"
  pq.write_table(pa.table({"image": [jpeg(2)], "caption": ["six geese"]}), good)
  inputs = [no_columns, not_parquet, not_tar, a_folder, webdataset_tar, good]
  out = tmp_path / "out"
  stats = prepare.prepare(",".join(map(str, inputs)), str(out), num_shards=8, progress=False)
  # The valid inputs are all kept, in order.
  assert stats["examples"] == {"counting": 3, "general": 2}
  assert stats["per_number"]["6"] == 1 and stats["per_number"]["3"] == 1
  assert stats["skipped_inputs"] == {
      str(no_columns): "input parquet has no 'image' and 'caption' (or 'text') columns",
      str(not_parquet): "input file is not a parquet file",
      str(not_tar): "input file is not a tar file",
      str(a_folder): "unreadable input file (IsADirectoryError)"}
  for path, reason in stats["skipped_inputs"].items():
    assert stats["skipped"][reason] == 1 and stats["skipped_examples"][reason] == [path]
  assert stats["inputs"] == [str(p) for p in inputs]
  # No empty shards: 8 asked for, 3 and 2 records.
  assert shard_files(out) == [f"counting-0000{i}-of-00008.array_record" for i in range(3)] + [
      f"general-0000{i}-of-00008.array_record" for i in range(2)]
  assert stats["shards"]["counting"] == shard_files(out)[:3]
  assert not list(out.glob("*-00003-of-00008*"))  # nor their sidecars
  counting, paths = read_all(out, "counting")
  assert [r["caption"] for r in counting] == ["Three red apples on a table", "five birds on a wire",
                                              "six geese"]
  np.testing.assert_array_equal(records.numbers(paths), [3, 5, 6])


def test_strict_refuses_an_unusable_input_before_writing(tmp_path, webdataset_tar, capsys):
  bad = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"img": [jpeg(1)]}), bad)
  out = tmp_path / "out"
  argv = ["--input", f"{webdataset_tar},{bad}", "--output_dir", str(out), "--strict"]
  assert prepare.main(argv) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
  assert "'image' and 'caption'" in lines[0]
  assert not out.exists()
  with pytest.raises(prepare.InputError, match="bad.parquet"):
    prepare.prepare(f"{webdataset_tar},{bad}", str(out), strict=True, progress=False)
  assert not out.exists()
  assert prepare.main(argv[:-1] + ["--num_shards", "1"]) == 0  # without --strict: skipped
  assert "input parquet has no" in capsys.readouterr().out


def test_other_command_line_errors_are_one_line(tmp_path, webdataset_tar, capsys):
  out = str(tmp_path / "out")
  assert prepare.main(["--input", str(tmp_path / "nothing-*.tar"), "--output_dir", out]) == 2
  assert capsys.readouterr().err.startswith("error: No input files match")
  (tmp_path / "pairs.csv").write_text("a,b\n")
  assert prepare.main(["--input", str(tmp_path / "pairs.csv"), "--output_dir", out]) == 2
  assert "pairs.csv: unknown input kind" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
  assert prepare.main(["--input", str(webdataset_tar), "--output_dir", out]) == 0
  capsys.readouterr()
  assert prepare.main(["--input", str(webdataset_tar), "--output_dir", out]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1


def test_an_interrupted_run_leaves_nothing_and_a_rerun_works(tmp_path, webdataset_tar,
                                                             monkeypatch):
  out = tmp_path / "out"
  calls = []
  real_check = prepare.check

  def check_then_fail(pair):
    calls.append(pair.key)
    if len(calls) == 4:
      raise KeyboardInterrupt  # what Ctrl-C (or any crash) does in the middle of a run
    return real_check(pair)

  monkeypatch.setattr(prepare, "check", check_then_fail)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(str(webdataset_tar), str(out), num_shards=2, workers=1, progress=False)
  assert len(calls) >= 4
  assert sorted(p.name for p in out.iterdir()) == []  # no shards (0-byte or not), no stats
  monkeypatch.setattr(prepare, "check", real_check)
  stats = prepare.prepare(str(webdataset_tar), str(out), num_shards=2, progress=False)
  assert stats["examples"] == {"counting": 2, "general": 2}
  assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".npy")) == [
      "counting-00000-of-00002.array_record", "counting-00001-of-00002.array_record",
      "general-00000-of-00002.array_record", "general-00001-of-00002.array_record", "stats.json"]


def test_overwrite_replaces_every_earlier_shard(tmp_path, webdataset_tar):
  out = tmp_path / "out"
  prepare.prepare(str(webdataset_tar), str(out), num_shards=2, progress=False)
  (out / "notes.txt").write_text("not ours")
  stats = prepare.prepare(str(webdataset_tar), str(out), num_shards=1, general=False,
                          overwrite=True, progress=False)
  assert sorted(p.name for p in out.iterdir()) == [
      "counting-00000-of-00001.array_record", "counting-00000-of-00001.array_record.numbers.npy",
      "notes.txt", "stats.json"]
  assert json.loads((out / "stats.json").read_text()) == stats
  assert len(read_all(out, "counting")[0]) == 2


def test_jsonl_and_parquet_image_paths_stay_under_their_directory(tmp_path):
  data = tmp_path / "data"
  (data / "img").mkdir(parents=True)
  (data / "img" / "0.jpg").write_bytes(jpeg(10))
  outside = tmp_path / "outside.jpg"  # any readable file on the machine
  outside.write_bytes(jpeg(20))
  path = data / "pairs.jsonl"
  path.write_text("\n".join(json.dumps(l) for l in [
      {"image": "img/0.jpg", "caption": "two cups"},
      {"image": "img/../img/0.jpg", "caption": "three cups"},  # `..` that stays inside is fine
      {"image": str(outside), "caption": "four cups"},
      {"image": "../outside.jpg", "caption": "five cups"},
      {"image": "img/../../outside.jpg", "caption": "six cups"},
  ]) + "\n")
  hf = data / "hf.parquet"
  pq.write_table(pa.table({"image": [{"bytes": None, "path": "../outside.jpg"},
                                     {"bytes": jpeg(30), "path": "/elsewhere/x.jpg"}],
                           "caption": ["seven cups", "eight cups"]}), hf)
  inputs = f"{path},{hf}"
  stats = prepare.prepare(inputs, str(tmp_path / "out"), num_shards=1, progress=False)
  reason = "image path outside the input's directory"
  assert stats["skipped"] == {reason: 4}
  assert stats["skipped_examples"][reason] == [f"{path}:3", f"{path}:4", f"{path}:5", f"{hf}:0"]
  counting, _ = read_all(tmp_path / "out", "counting")
  assert [r["caption"] for r in counting] == ["two cups", "three cups", "eight cups"]
  stats = prepare.prepare(inputs, str(tmp_path / "out2"), num_shards=1, allow_outside_paths=True,
                          progress=False)
  assert stats["skipped"] == {} and stats["examples"]["counting"] == 7


def test_bad_utf8_is_skipped_the_same_for_every_input_kind(tmp_path):
  (tmp_path / "a.jpg").write_bytes(jpeg(1))
  jsonl = tmp_path / "pairs.jsonl"
  jsonl.write_bytes(b'{"image": "a.jpg", "caption": "two \xff cats"}\n'
                    b'{"image": "a.jpg", "caption": "three \\ud800 cats"}\n'  # a lone surrogate
                    b'{"image": "a.jpg", "caption": "four caf\xc3\xa9s"}\n')
  tar = tmp_path / "shard.tar"
  write_tar(tar, [("0.jpg", jpeg(2)), ("0.txt", b"five \xfe cats"),
                  ("1.jpg", jpeg(3)), ("1.json", b'{"caption": "six \xff cats"}'),
                  ("2.jpg", jpeg(4)), ("2.json", b'{"caption": "seven \\udfff cats"}'),
                  ("3.jpg", jpeg(5)), ("3.json", b'{"caption": '),
                  ("n\xe9e.jpg".encode("latin-1").decode("utf-8", "surrogateescape"), jpeg(6)),
                  ("n\xe9e.txt".encode("latin-1").decode("utf-8", "surrogateescape"),
                   b"eight cats")])
  parquet = tmp_path / "pairs.parquet"
  captions = pa.array([b"nine \xff cats", "ten caf\u00e9s".encode()]).view(pa.string())
  pq.write_table(pa.table({"image": [jpeg(7), jpeg(8)], "caption": captions}), parquet)
  binary = tmp_path / "binary.parquet"
  pq.write_table(pa.table({"image": [jpeg(9), jpeg(9)],
                           "text": pa.array([b"two \xc3 dogs", b"three dogs"])}), binary)
  stats = prepare.prepare(f"{jsonl},{tar},{parquet},{binary}", str(tmp_path / "out"),
                          num_shards=1, progress=False)
  reason = "text is not utf-8"
  assert stats["skipped"] == {reason: 7, "bad json": 1}
  assert stats["skipped_examples"][reason][:5] == [
      f"{jsonl}:1", f"{jsonl}:2", f"{tar}:0", f"{tar}:1", f"{tar}:2"]
  counting, _ = read_all(tmp_path / "out", "counting")
  assert [r["caption"] for r in counting] == ["four cafés", "eight cats", "ten cafés",
                                              "three dogs"]
  assert not any("\ufffd" in r["caption"] for r in counting)
  assert counting[1]["key"] == f"{tar}:n\\udce9e"  # a non-utf-8 member name, escaped in the key


def test_damage_inside_a_file_ends_that_file_only(tmp_path, webdataset_tar):
  damaged = tmp_path / "damaged.parquet"
  pq.write_table(pa.table({"image": [jpeg(i) for i in range(4)],
                           "caption": ["two a", "three b", "four c", "five d"]}), damaged,
                 row_group_size=2)
  offset = pq.ParquetFile(damaged).metadata.row_group(1).column(0).data_page_offset
  data = bytearray(damaged.read_bytes())
  data[offset:offset + 40] = b"\xff" * 40  # a page header; the footer (pre-flight) is intact
  damaged.write_bytes(bytes(data))
  stats = prepare.prepare(f"{damaged},{webdataset_tar}", str(tmp_path / "out"), num_shards=1,
                          progress=False)
  assert stats["skipped_inputs"] == {}
  assert stats["skipped"]["unreadable input file (OSError)"] == 1
  assert stats["skipped_examples"]["unreadable input file (OSError)"] == [str(damaged)]
  # The tar after it is read in full (how much of the damaged file comes first is pyarrow's).
  captions = [r["caption"] for r in read_all(tmp_path / "out", "counting")[0]]
  assert captions[-2:] == ["Three red apples on a table", "five birds on a wire"]


def test_the_bad_input_corpus_in_bounded_memory(tmp_path, webdataset_tar):
  """The command on thin images (a 164-byte 1x20000 PNG once took 4.1 GB to preprocess,
  2x60000 6.2 GB) beside valid and bad examples: the valid ones kept, each bad one counted by
  its reason, and the whole process's peak memory under 1 GB."""
  import os
  import subprocess
  import sys
  thin = tmp_path / "thin.tar"
  write_tar(thin, [("a.png", thin_png(1, 20_000)), ("a.txt", b"two poles"),
                   ("b.png", thin_png(2, 60_000)), ("b.txt", b"a fence"),
                   ("c.png", thin_png(60_000, 3)), ("c.txt", b"three rails")])
  out = tmp_path / "out"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The command in a child that reports its own peak, VmHWM: ru_maxrss would count this test
  # worker's memory too (Linux carries the high-water mark across fork and exec).
  measure = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
             "try: runpy.run_module('countclip_jax.data.prepare', run_name='__main__')\n"
             "except SystemExit as e: assert not e.code, e.code\n"
             "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
  result = subprocess.run([sys.executable, "-c", measure, "prepare", "--input",
                           f"{thin},{webdataset_tar}", "--output_dir", str(out),
                           "--num_shards", "4"],
                          cwd=root, check=True, capture_output=True, text=True, timeout=300)
  peak_bytes = int(result.stdout.split()[-1]) * 1024  # kB
  assert peak_bytes < 2**30, f"peak memory {peak_bytes / 2**20:.0f} MiB"
  stats = json.loads((out / "stats.json").read_text())
  assert stats["skipped"] == {
      "extreme aspect ratio": 3, "bad image": 1, "empty caption": 1, "missing image": 1,
      "several different counts in caption": 1, "text is not utf-8": 1,
      "unsafe path in tar (absolute or '..')": 2}
  assert stats["examples"] == {"counting": 2, "general": 2}
  assert all(os.path.getsize(out / name) > 0 for name in shard_files(out))
