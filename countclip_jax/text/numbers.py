"""Number words in captions: the stated object count, swapping it, the nine candidate captions.

A counting caption states how many objects an image shows with one spelled number word, two..ten
("three dogs on a sofa"). `parse_count` finds that count, `swap_count` rewrites it, and
`count_captions` makes the candidates that the counting loss and the CountBench eval score.
Words are matched at word boundaries only: an earlier replication replaced substrings and turned
"stencils" into "ssixcils".

Not every number word is a count. `find_numbers` tags each one with the reason it is not
(`Mention.reason`, None for a count), by the rules in `_NOT_A_COUNT`; the docstring of
`parse_count` lists them with examples.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable

NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten"}
NUMBERS = tuple(NUMBER_WORDS)
WORD_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()}

_WORD_RE = re.compile(r"\b(" + "|".join(NUMBER_WORDS.values()) + r")\b", re.IGNORECASE)
# Another number in a ratio or range ("one in ten", "two or 3"): a word or a short numeral ("in
# 2018" is a year, not a ratio).
_ANY_NUMBER = r"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|\d{1,3}\b)"
_HYPHEN = "-\u2010\u2011"

# (reason, pattern that ends just before the word, pattern that starts just after it).
_NOT_A_COUNT = tuple((reason, before and re.compile(before + r"$", re.I),
                      after and re.compile(after, re.I)) for reason, before, after in (
    ("hyphenated compound", rf"\w[{_HYPHEN}]", rf"[{_HYPHEN}](?:\w|\s+(?:and|or|to)\b)"),
    ("part of a larger number",
     r"\b(?:twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred|thousand)(?:\s+and)?\s+",
     r"\s+(?:hundreds?|thousands?|millions?|billions?|dozens?)\b"),
    ("age or duration", r"\b(?:aged?|ages)(?:\s+of)?\s+",
     r"\s+(?:years?|yrs?|months?|weeks?|days?|nights?|hours?|hrs?|minutes?|mins?|seconds?|secs?"
     r"|decades?|centur(?:y|ies))\b"),
    ("clock time", r"\b(?:quarter|half)\s+(?:past|to)\s+|\b(?:twenty|ten|five)\s+past\s+",
     rf"\s*(?:o['\u2019]?\s?clock\b|[ap]\.\s?m\.|[ap]m\b)|\s+past\s+{_ANY_NUMBER}"),
    ("range", rf"\b{_ANY_NUMBER}\s*(?:to|or|\u2013|\u2014)\s*",
     rf"\s*(?:to|or|\u2013|\u2014)\s*{_ANY_NUMBER}"),
    ("fraction", None, r"[\s-]*(?:thirds|fourths|fifths|sixths|sevenths|eighths|ninths|tenths)\b"
                       r"|\s+and\s+a\s+half\b"),
    ("measure", None,
     r"\s*(?:%|(?:percent|per\s*cent|times|fold|degrees?|dollars?|bucks|cents?|euros?|pounds?|pence"
     r"|miles?|kilomet(?:er|re)s?|km|met(?:er|re)s?|inch(?:es)?|cm|mm|yards?|kilos?|kilograms?|kg"
     r"|grams?|lbs?|ounces?|oz|lit(?:er|re)s?|gallons?)\b)"),
    ("ratio", rf"\b{_ANY_NUMBER}\s+(?:out\s+of|in)\s+", rf"\s+(?:out\s+of|in)\s+{_ANY_NUMBER}"),
    ("label", r"\b(?:part|chapter|volume|vol\.|season|episode|act|phase|level|round|step|number"
              r"|no\.?|size|grade|version|world\s+war)\s+", None),
    ("approximate", r"\b(?:more|fewer|less)\s+than\s+|\bat\s+(?:least|most)\s+|\bup\s+to\s+",
     r"\s+or\s+(?:more|so|fewer|less)\b|\s*\+|\s+plus\b"),
    ("arrangement", r"\b(?:rows|columns|tiers)\s+of\s+",
     r"\s+(?:rows|columns|tiers)\b|\s+(?:to\s+a|per|in\s+each|in\s+every)\s+(?:row|column|tier)\b"),
))
# A number introduced by these describes parts or contents of the objects counted before it.
_PART_RE = re.compile(r"\b(?:with|including|includes?|featuring|features|containing|contains)\s+$",
                      re.I)


@dataclasses.dataclass(frozen=True)
class Mention:
  """A number word in a caption: `caption[start:end]` states `value`; `reason` is why it is not
  the object count, or None when it is one."""
  value: int
  start: int
  end: int
  reason: str | None = None


def number_word(n: int) -> str:
  """2..10 -> "two".."ten"."""
  if n not in NUMBER_WORDS:
    raise ValueError(f"Counts are spelled for 2..10 only, got {n!r}.")
  return NUMBER_WORDS[n]


def find_numbers(caption: str) -> list[Mention]:
  """Every number word two..ten in `caption`, in order, each tagged with why it is not a count."""
  mentions = []
  for m in _WORD_RE.finditer(caption):
    before, after = caption[:m.start()], caption[m.end():]
    reason = next((r for r, b, a in _NOT_A_COUNT
                   if (b and b.search(before)) or (a and a.match(after))), None)
    mentions.append(Mention(WORD_NUMBERS[m.group().lower()], m.start(), m.end(), reason))
  return _mark_subordinate(caption, mentions)


def _mark_subordinate(caption: str, mentions: list[Mention]) -> list[Mention]:
  """Numbers that describe parts of the objects counted first ("six bottles including three
  sweet ...") are not counts. The whole value goes: "including three sweet & three hot"."""
  counts = [m for m in mentions if m.reason is None]
  if not counts:
    return mentions
  head = counts[0]
  dropped: dict[int, str] = {}
  for m in counts[1:]:
    if m.value == head.value or m.value in dropped:
      continue
    before = caption[:m.start]
    if _PART_RE.search(before):
      dropped[m.value] = "part of the counted objects"
    elif before.count("(") > before.count(")"):
      dropped[m.value] = "in parentheses"
    elif ":" in caption[head.end:m.start]:
      dropped[m.value] = "breakdown after a colon"
  return [dataclasses.replace(m, reason=dropped[m.value])
          if m.reason is None and m.value in dropped else m for m in mentions]


def parse_count(caption: str) -> int | None:
  """The object count a caption states with a number word two..ten, or None.

  None when the caption has no such word, or when two different numbers are counts ("two cats
  and three dogs" is ambiguous). Number words that are not object counts are ignored:
    - hyphenated compounds: "two-tone", "three-piece", "Nine-month-old", "two- and three-seat";
    - part of a larger number: "twenty two", "hundred and ten", "two hundred", "two dozen";
    - ages and durations: "ten years", "five minutes", "aged ten";
    - clock times: "five o'clock", "ten pm", "half past two", "quarter to ten", "ten past six";
    - ranges: "two or three", "one or two", "five to ten", "two\u2013four";
    - fractions: "two thirds", "two and a half";
    - measures: "ten percent", "two times", "five dollars", "ten miles", "two kilos"
      ("feet" stays a count: "two feet" in a photo are usually feet);
    - ratios: "nine out of ten", "one in ten";
    - labels: "part two", "chapter three", "no two", "size ten", "World War Two";
    - approximate counts: "more than two", "at least three", "up to ten", "two or more";
    - arrangements: "two rows", "rows of four", "three to a row" (but "a row of five" counts).
  Numbers that describe parts of objects already counted by an earlier, different number are
  ignored too: after "with"/"including" ("six animals with four legs"), inside parentheses
  ("seven coins, 1821 (two), 1822 (two)"), or after a colon ("five children: ..., eight, ...").
  "Top ten" and "set of ten" are counts; spelled numbers only, numerals ("3 cats") are not read.
  """
  values = {m.value for m in find_numbers(caption) if m.reason is None}
  return values.pop() if len(values) == 1 else None


def _like(word: str, template: str) -> str:
  """`word` in the case pattern of `template`: "Three" -> "Six", "TEN" -> "TWO"."""
  if template.isupper():
    return word.upper()
  if template[:1].isupper():
    return word.capitalize()
  return word


def swap_count(caption: str, n: int, count: int | None = None) -> str:
  """`caption` with its count word replaced by the word for `n`, in the same case.

  `count` is the number the caption states (default: `parse_count`). Every mention of it that is
  a count is replaced, at word boundaries only ("stencil" keeps its "ten"); mentions that are not
  counts stay ("a set of four 'Four-corners' chairs" -> "a set of six 'Four-corners' chairs"),
  unless none is, when the caller's `count` says which word it is and all are replaced.
  """
  new = number_word(n)
  if count is None:
    count = parse_count(caption)
    if count is None:
      raise ValueError(f"Caption states no single count two..ten to swap: {caption!r}")
  mentions = [m for m in find_numbers(caption) if m.value == count]
  if not mentions:
    raise ValueError(f"Caption has no number word {number_word(count)!r}: {caption!r}")
  mentions = [m for m in mentions if m.reason is None] or mentions
  out, last = [], 0
  for m in mentions:
    out += [caption[last:m.start], _like(new, caption[m.start:m.end])]
    last = m.end
  return "".join(out) + caption[last:]


def count_captions(caption: str, count: int, numbers: Iterable[int] = NUMBERS) -> list[str]:
  """The caption rewritten with each of `numbers`, in order; the entry for `count` is `caption`."""
  return [caption if n == count else swap_count(caption, n, count) for n in numbers]
