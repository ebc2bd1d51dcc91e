"""ArrayRecord shards: records round-trip, shards are balanced, sidecars line up with records."""
import os
import pickle

import msgpack
import numpy as np
import pytest

from countclip_jax.data import records


def test_encode_decode_round_trip():
  data = records.encode(b"\xff\xd8jpeg", "three dogs on a sofa", 3, key="a/000")
  assert records.decode(data) == {"image": b"\xff\xd8jpeg", "caption": "three dogs on a sofa",
                                  "number": 3, "key": "a/000"}


@pytest.mark.parametrize("data", [
    b"",
    pickle.dumps({"image": b"x", "caption": "c", "number": 0, "key": ""}),
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"image": "not bytes", "caption": "c", "number": 0, "key": ""}),
    msgpack.packb({"image": b"x", "caption": "c", "number": 0}),  # no key
])
def test_decode_rejects_what_is_not_a_record(data):
  with pytest.raises(ValueError, match="record"):
    records.decode(data)


def test_encode_rejects_wrong_types():
  with pytest.raises(TypeError, match="caption"):
    records.encode(b"x", b"bytes caption", 3)


def test_writer_round_robin_and_sidecars(tmp_path):
  with records.ShardWriter(str(tmp_path), "counting", num_shards=3) as writer:
    for i in range(7):
      writer.write(bytes([i]), f"caption {i}", 2 + i % 9, key=str(i))
  paths = sorted(str(p) for p in tmp_path.glob("counting-*.array_record"))
  assert [os.path.basename(p) for p in paths] == [
      f"counting-{i:05d}-of-00003.array_record" for i in range(3)]
  source, found = records.data_source(str(tmp_path / "counting-*"))  # sidecars match too
  assert found == paths and len(source) == 7
  got = [records.decode(source[i]) for i in range(7)]
  # Shard s holds records s, s+3, ...; the source reads shard after shard.
  order = [0, 3, 6, 1, 4, 2, 5]
  assert [r["key"] for r in got] == [str(i) for i in order]
  assert [r["image"] for r in got] == [bytes([i]) for i in order]
  np.testing.assert_array_equal(records.numbers(found), [r["number"] for r in got])


def test_empty_shards_are_valid(tmp_path):
  with records.ShardWriter(str(tmp_path), "general", num_shards=4) as writer:
    writer.write(b"x", "a dog", 0)
  source, paths = records.data_source(str(tmp_path / "general-*.array_record"))
  assert len(paths) == 4 and len(source) == 1
  assert records.numbers(paths).tolist() == [0]


def test_clear_errors_for_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing-"):
    records.expand(str(tmp_path / "nothing-*"))
  with records.ShardWriter(str(tmp_path), "c", num_shards=1) as writer:
    writer.write(b"x", "two cats", 2)
  path = records.expand(str(tmp_path / "c-*"))[0]
  os.remove(path + records.NUMBERS_SUFFIX)
  with pytest.raises(FileNotFoundError, match="numbers"):
    records.numbers([path])
