"""Number words: the parse rules, swapping, candidates, and agreement with the real CountBench."""
import importlib.resources
import json
import re

import pytest

from countclip_jax.text import numbers


def _countbench():
  text = (importlib.resources.files("countclip_jax") / "package_data/CountBench.json").read_text()
  return json.loads(text)


def test_number_words():
  assert numbers.NUMBERS == tuple(range(2, 11))
  assert [numbers.number_word(n) for n in (2, 7, 10)] == ["two", "seven", "ten"]
  for bad in (0, 1, 11, "3"):
    with pytest.raises(ValueError, match="2..10"):
      numbers.number_word(bad)


@pytest.mark.parametrize("caption, count", [
    ("three dogs on a sofa", 3),
    ("Three dogs", 3),
    ("TEN red apples", 10),
    ("a set of ten", 10),
    ("Top ten smartphones", 10),
    ("two dogs and two cats", 2),           # the same number twice is one count
    ("Ten paperbacks for ten bucks", 10),   # the second ten is a price
    ("ten's company", 10),
    ("(two)", 2),                           # parentheses alone do not hide the only number
    ("a row of five cats", 5),              # a row of N is a count, rows of N are not
    ("two feet in the sand", 2),
])
def test_counts(caption, count):
  assert numbers.parse_count(caption) == count


@pytest.mark.parametrize("caption", [
    "a dog on a sofa",
    "stencils and often tent",              # "ten" inside words
    "3 cats",                               # numerals are not read
    "one cat",
    "two cats and three dogs",              # ambiguous
    "Two cucumbers and three tomatoes",
    "",
])
def test_no_count(caption):
  assert numbers.parse_count(caption) is None


# One or more examples per rule of `parse_count`: (caption, reason of the first number word).
RULES = [
    ("a two-tone bag", "hyphenated compound"),
    ("three-piece suit", "hyphenated compound"),
    ("Nine-month-old baby", "hyphenated compound"),
    ("two- and three-seat sofas", "hyphenated compound"),
    ("twenty-two cats", "hyphenated compound"),
    ("twenty two cats", "part of a larger number"),
    ("a hundred and ten cats", "part of a larger number"),
    ("two hundred cats", "part of a larger number"),
    ("two dozen eggs", "part of a larger number"),
    ("ten years of service", "age or duration"),
    ("a ten year old boy", "age or duration"),
    ("five minutes to go", "age or duration"),
    ("aged ten", "age or duration"),
    ("at the age of seven", "age or duration"),
    ("five o'clock tea", "clock time"),
    ("five o\u2019clock tea", "clock time"),
    ("the train at ten pm", "clock time"),
    ("ten p.m. news", "clock time"),
    ("half past two", "clock time"),
    ("quarter to ten", "clock time"),
    ("ten past six", "clock time"),
    ("two or three cats", "range"),
    ("one or two cats", "range"),
    ("five to ten people", "range"),
    ("two \u2013 4 cats", "range"),
    ("two thirds of the cake", "fraction"),
    ("two and a half men", "fraction"),
    ("ten percent off", "measure"),
    ("ten % off", "measure"),
    ("two times champion", "measure"),
    ("five dollars each", "measure"),
    ("ten miles away", "measure"),
    ("two kilos of apples", "measure"),
    ("nine out of ten dentists", "ratio"),
    ("one in ten people", "ratio"),
    ("part two of the saga", "label"),
    ("Chapter Three", "label"),
    ("no two snowflakes", "label"),
    ("size ten shoes", "label"),
    ("World War Two planes", "label"),
    ("more than two cats", "approximate"),
    ("at least three cats", "approximate"),
    ("up to ten guests", "approximate"),
    ("two or more cats", "approximate"),
    ("two rows of chairs", "arrangement"),
    ("rows of four chairs", "arrangement"),
    ("three to a row", "arrangement"),
]


@pytest.mark.parametrize("caption, reason", RULES)
def test_not_a_count_rules(caption, reason):
  first = numbers.find_numbers(caption)[0]
  assert first.reason == reason
  assert numbers.parse_count(caption) is None


@pytest.mark.parametrize("caption, count, reason", [
    ("six animals with four legs", 6, "part of the counted objects"),
    ("six bottles including three sweet & three hot sauces", 6, "part of the counted objects"),
    ("seven coins: 1821 (two), 1822 (two)", 7, "in parentheses"),
    ("ten coins (three silver, seven bronze)", 10, "in parentheses"),
    ("five children: Liam, eight, Finn, seven", 5, "breakdown after a colon"),
    ("Nine oranges sit together, three to a row.", 9, "arrangement"),
    ("eight portraits hung in two rows of four", 8, "arrangement"),
    ("Nine-month-old Jasmine and her two dads", 2, "hyphenated compound"),
])
def test_rules_leave_the_count(caption, count, reason):
  assert numbers.parse_count(caption) == count
  assert reason in {m.reason for m in numbers.find_numbers(caption)}


def test_parts_need_an_earlier_count():
  # "with" marks parts only of objects counted before it; otherwise it is the count.
  assert numbers.parse_count("a man with two dogs") == 2
  assert numbers.parse_count("with three leaves and six chairs") is None
  assert numbers.parse_count("two cats (three dogs)") == 2
  assert numbers.parse_count("two cats, three dogs: four birds") is None


def test_mentions_positions():
  caption = "Two cats, two-tone, TWO dogs"
  ms = numbers.find_numbers(caption)
  assert [(caption[m.start:m.end], m.reason) for m in ms] == [
      ("Two", None), ("two", "hyphenated compound"), ("TWO", None)]


@pytest.mark.parametrize("caption, n, swapped", [
    ("three dogs", 6, "six dogs"),
    ("Three dogs", 6, "Six dogs"),
    ("TEN dogs", 2, "TWO dogs"),
    ("a set of ten stencils, often ten", 4, "a set of four stencils, often four"),
    ("ten tents and ten's", 7, "seven tents and seven's"),
    ("Two dogs; two bowls; TWO leads", 9, "Nine dogs; nine bowls; NINE leads"),
    ("a two-tone bag with two pockets", 5, "a two-tone bag with five pockets"),
    ("Ten paperbacks for ten bucks", 3, "Three paperbacks for ten bucks"),
    ("three dogs", 3, "three dogs"),
])
def test_swap_count(caption, n, swapped):
  assert numbers.swap_count(caption, n) == swapped


def test_swap_with_given_count():
  # The caller's label picks the word when the caption is ambiguous ...
  assert numbers.swap_count("two cucumbers and three tomatoes", 5, count=3) == (
      "two cucumbers and five tomatoes")
  # ... or when its only mentions are not counts.
  assert numbers.swap_count("Nine-month-old Jasmine and her two dads", 4, count=9) == (
      "Four-month-old Jasmine and her two dads")


def test_swap_errors():
  with pytest.raises(ValueError, match="no single count"):
    numbers.swap_count("two cats and three dogs", 4)
  with pytest.raises(ValueError, match="no number word 'five'"):
    numbers.swap_count("two cats", 4, count=5)
  with pytest.raises(ValueError, match="2..10"):
    numbers.swap_count("two cats", 11)


def test_count_captions():
  caption = "Three dogs and three bowls"
  out = numbers.count_captions(caption, 3)
  assert len(out) == 9
  assert out[1] is caption
  assert out[0] == "Two dogs and two bowls"
  assert out[-1] == "Ten dogs and ten bowls"
  assert numbers.count_captions(caption, 3, numbers=(5, 3)) == ["Five dogs and five bowls", caption]


def test_countbench_agreement():
  entries = _countbench()
  assert len(entries) == 540
  parsed = [numbers.parse_count(e["text"]) for e in entries]
  agree = sum(p == e["number"] for p, e in zip(parsed, entries))
  assert agree / len(entries) >= 0.93, agree
  # The rules never read a wrong number: every disagreement is an ambiguous caption.
  assert all(p is None for p, e in zip(parsed, entries) if p != e["number"])


_WORDS = re.compile(r"\w+|\W+")


def test_countbench_candidates_differ_only_in_the_number_word():
  for e in _countbench():
    caption, count = e["text"], e["number"]
    candidates = numbers.count_captions(caption, count)
    assert len(set(candidates)) == 9, caption
    original = _WORDS.findall(caption)
    for n, candidate in zip(numbers.NUMBERS, candidates):
      words = _WORDS.findall(candidate)
      assert len(words) == len(original), candidate
      changed = [(a, b) for a, b in zip(original, words) if a != b]
      assert all(a.lower() == numbers.number_word(count) and b.lower() == numbers.number_word(n)
                 for a, b in changed), (caption, candidate)
      assert bool(changed) == (n != count)
