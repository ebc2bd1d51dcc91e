"""text/tokenizer.py: fixed-length ids exactly as transformers gives them; offline vocabularies."""
import numpy as np
import pytest
import transformers

from countclip_jax.text.tokenizer import Tokenizer, build_tokenizer

CAPTIONS = ["a photo of three red stars", "Two cats, playing on a sofa!", "TEN stencils"]


@pytest.fixture(scope="module")
def tokenizer():
  return build_tokenizer(CAPTIONS, context_length=8)


def test_every_word_seen_is_one_token(tokenizer):
  for word in ["three", "stencils", "playing", "sofa", "cats", ","]:
    assert len(tokenizer.tokens(word)) == 1, word
  assert tokenizer.tokens("Three") == tokenizer.tokens("three")  # CLIP lower-cases
  assert len(tokenizer.tokens("zebra")) == 5  # unseen words fall back to bytes


def test_ids_are_fixed_length_int32_like_transformers(tokenizer):
  ids = tokenizer(CAPTIONS)
  assert ids.dtype == np.int32 and ids.shape == (3, 8)
  ref = tokenizer.hf(CAPTIONS, padding="max_length", truncation=True, max_length=8)["input_ids"]
  np.testing.assert_array_equal(ids, ref)
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  assert ids[0].tolist() == [bos] + tokenizer.tokens(CAPTIONS[0]) + [eos]
  assert ids[2].tolist() == [bos] + tokenizer.tokens("ten stencils") + [eos] * 5  # eos pads
  assert ids[1, -1] == eos and len(tokenizer.tokens(CAPTIONS[1])) > 6  # truncated, eos kept


def test_special_tokens_come_last(tokenizer):
  assert tokenizer.eos_token_id == tokenizer.vocab_size - 1
  assert tokenizer.bos_token_id == tokenizer.vocab_size - 2
  assert tokenizer.pad_token_id == tokenizer.eos_token_id  # as in OpenAI's CLIP


def test_save_and_reload(tokenizer, tmp_path):
  tokenizer.save(str(tmp_path))
  again = Tokenizer.from_pretrained(str(tmp_path), context_length=8)
  np.testing.assert_array_equal(again(CAPTIONS), tokenizer(CAPTIONS))
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert hf("three red stars")["input_ids"] == tokenizer(["three red stars"])[0, :5].tolist()


def test_bad_arguments(tokenizer, tmp_path):
  with pytest.raises(ValueError, match="context_length must be >= 3"):
    Tokenizer(tokenizer.hf, context_length=2)
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(ValueError, match="is a file; pass the directory"):
    Tokenizer.from_pretrained(str(tmp_path / "vocab.json"))


def test_save_is_never_seen_half_written(tokenizer, tmp_path, monkeypatch):
  """Other processes of a pod run wait for tokenizer.json: it must come last, and every file
  must appear whole (renamed into place), so no reader sees a partial tokenizer."""
  import os
  placed = []
  real_replace = os.replace
  def replace(src, dst):
    assert os.path.basename(str(src)).endswith(".partial")
    placed.append(os.path.basename(str(dst)))
    return real_replace(src, dst)
  monkeypatch.setattr(os, "replace", replace)
  tokenizer.save(str(tmp_path / "tok"))
  assert placed[-1] == "tokenizer.json" and len(placed) >= 2
  assert sorted(os.listdir(tmp_path / "tok")) == sorted(placed)  # no partial file left
