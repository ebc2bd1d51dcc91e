"""fit_caption: long captions keep their number word, so the nine candidates stay distinct."""
import importlib.resources
import json

import pytest

from countclip_jax.text import numbers
from countclip_jax.text import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def countbench():
  text = (importlib.resources.files("countclip_jax") / "package_data/CountBench.json").read_text()
  return json.loads(text)


@pytest.fixture(scope="module")
def tok16(countbench):
  return tokenizer_lib.build_tokenizer([e["text"] for e in countbench], context_length=16)


def test_short_caption_unchanged(tok16):
  assert tokenizer_lib.fit_caption(tok16, "three dogs on a sofa", 3) == "three dogs on a sofa"
  assert tokenizer_lib.fit_caption(tok16, "a dog") == "a dog"


def test_long_caption_keeps_number_word_and_noun(tok16):
  caption = ("A very long description of a lovely sunny afternoon in the park where, after lunch, "
             "we finally saw the seven colorful hot air balloons rising over the trees")
  # Plain truncation loses the number: all candidates would be the same.
  assert len(set(map(bytes, tok16(numbers.count_captions(caption, 7))))) == 1
  fitted = tokenizer_lib.fit_caption(tok16, caption)
  assert fitted in caption
  assert "seven colorful hot air balloons" in fitted
  assert len(tok16.tokens(fitted)) <= 14
  assert len(set(map(bytes, tok16(numbers.count_captions(fitted, 7))))) == 9


def test_without_count_keeps_the_start(tok16):
  caption = " ".join(["dog"] * 40)
  fitted = tokenizer_lib.fit_caption(tok16, caption)
  assert caption.startswith(fitted) and len(tok16.tokens(fitted)) == 14


def test_longer_number_words_shrink_the_window():
  # "seven" is not in this vocabulary: it takes several tokens, "two" one.
  tok = tokenizer_lib.build_tokenizer(["a b c d e f g h two dogs"], context_length=8)
  caption = "a b c d e f g h two dogs a b c d"
  assert len(tok.tokens("seven")) > 1
  fitted = tokenizer_lib.fit_caption(tok, caption, 2)
  candidates = numbers.count_captions(fitted, 2)
  assert all(len(tok.tokens(c)) <= 6 for c in candidates)
  assert fitted.split().count("two") == 1
  assert len({bytes(row) for row in tok(candidates)}) == 9


def test_errors(tok16):
  with pytest.raises(ValueError, match="no number word 'five'"):
    tokenizer_lib.fit_caption(tok16, "two dogs", 5)
  tiny = tokenizer_lib.build_tokenizer(["dogs"], context_length=3)
  with pytest.raises(ValueError, match="does not fit 1 tokens"):
    tokenizer_lib.fit_caption(tiny, "seven dogs", 7)
  with pytest.raises(ValueError, match="2 captions but 1 counts"):
    tokenizer_lib.fit_captions(tok16, ["a", "b"], [2])


def test_countbench_candidates_stay_distinct(countbench, tok16):
  texts = [e["text"] for e in countbench]
  counts = [e["number"] for e in countbench]
  fitted = tokenizer_lib.fit_captions(tok16, texts, counts)
  cut = collided = 0
  for caption, fit, count in zip(texts, fitted, counts):
    cut += fit != caption
    collided += len({bytes(r) for r in tok16(numbers.count_captions(caption, count))}) < 9
    candidates = numbers.count_captions(fit, count)
    assert all(len(tok16.tokens(c)) <= 14 for c in candidates), fit  # nothing truncated
    assert len({bytes(row) for row in tok16(candidates)}) == 9, (caption, fit)
  # Without fitting, plain truncation makes the candidates of many captions identical.
  assert cut > 100 and collided > 20, (cut, collided)
