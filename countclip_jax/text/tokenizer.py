"""CLIP tokenizer: transformers' fast CLIP BPE, fixed-length int32 ids, offline test vocabularies.

`Tokenizer` wraps `transformers.CLIPTokenizerFast` (hub id or local directory) and returns ids
padded/truncated to the context length exactly as `tokenizer(texts, padding="max_length",
truncation=True, max_length=L)` does in transformers: `<|startoftext|> ... <|endoftext|> pad...`.

`build_tokenizer(words)` makes a small CLIP-compatible BPE (same normaliser, pre-tokeniser, byte
alphabet and special tokens as OpenAI's) whose merges spell the given words, so the synthetic
world and the tests have a real tokenizer without a download.
"""
from __future__ import annotations

import collections
import heapq
import json
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np
import tokenizers
import transformers
from etils import epath

# The input pipeline's threads (data.num_threads) already tokenize in parallel with everything
# else; the tokenizers library's own thread pool on top spin-waits between calls, which cost
# up to 30 % of the records pipeline's CPU on 2 shared cores (benchmarks/input_pipeline.py,
# 128-154 -> 171-186 examples per CPU-second, one thread). A caller's own setting wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


class Tokenizer:
  """Fixed-length CLIP tokenization: `tokenizer(texts) -> int32 (B, context_length)`."""

  def __init__(self, hf_tokenizer, context_length: int = 77):
    if context_length < 3:
      raise ValueError(f"context_length must be >= 3 (bos, a token, eos), got {context_length}")
    self.hf = hf_tokenizer
    self.context_length = context_length

  @classmethod
  def from_pretrained(cls, name_or_path: str, context_length: int | None = None) -> "Tokenizer":
    """Loads from a hub id, a local directory or a gs:// directory (copied to a temp dir).

    `context_length` defaults to the tokenizer's `model_max_length` (tokenizer_config.json: 77
    for OpenAI's, the model's for our exports), or 77 where that is unset.
    """
    path = str(name_or_path)
    if path.startswith("gs://"):
      path = _copy_to_local(path, TOKENIZER_FILES)
    elif os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f"Tokenizer path {path} is a file; pass the directory that holds it.")
    hf = transformers.CLIPTokenizerFast.from_pretrained(path)
    if context_length is None:  # transformers' "unset" is int(1e30)
      context_length = hf.model_max_length if hf.model_max_length < 1_000_000 else 77
    return cls(hf, context_length)

  @property
  def eos_token_id(self) -> int:
    return self.hf.eos_token_id

  @property
  def bos_token_id(self) -> int:
    return self.hf.bos_token_id

  @property
  def pad_token_id(self) -> int:
    return self.hf.pad_token_id

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    ids = self.hf(list(texts), padding="max_length", truncation=True,
                  max_length=self.context_length, return_attention_mask=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32).reshape(len(texts), self.context_length)

  def tokens(self, text: str | Sequence[str]) -> list[int] | list[list[int]]:
    """Ids of `text` without bos/eos, padding or truncation (for several texts, one call: a
    list of each one's ids)."""
    texts = text if isinstance(text, str) else list(text)
    return self.hf(texts, add_special_tokens=False, verbose=False)["input_ids"]

  def save(self, out_dir: str) -> None:
    """Writes the tokenizer files in Hugging Face format to a local or gs:// directory.

    Readers look for tokenizer.json, so it is written last, and no file is ever seen half
    written: local files are renamed into place, and a GCS object appears whole or not at all.
    """
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    local = "://" not in str(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
      self.hf.save_pretrained(tmp)
      for name in sorted(os.listdir(tmp), key=lambda n: n == "tokenizer.json"):
        with open(os.path.join(tmp, name), "rb") as f:
          data = f.read()
        if local:
          partial = out / f".{name}.partial"
          partial.write_bytes(data)
          os.replace(partial, out / name)
        else:
          (out / name).write_bytes(data)


def _copy_to_local(remote_dir: str, names: Iterable[str]) -> str:
  local = tempfile.mkdtemp(prefix="countclip_tok_")
  remote = epath.Path(remote_dir)
  for name in names:
    if (remote / name).exists():
      with open(os.path.join(local, name), "wb") as f:
        f.write((remote / name).read_bytes())
  return local


def build_tokenizer(words: Iterable[str], context_length: int = 77,
                    out_dir: str | None = None) -> Tokenizer:
  """A small CLIP BPE trained on `words` (any texts): each word seen becomes one token.

  The normaliser, pre-tokeniser, byte alphabet and `</w>` suffix are CLIP's, so any text still
  tokenizes (byte fallback, as in CLIP). The special tokens come last, as in OpenAI's
  vocabulary, so eos is the largest id.
  """
  # Learn merges on the pieces a real CLIPTokenizerFast sees (its normaliser and pre-tokeniser).
  base = _write_and_load({**{c: i for i, c in enumerate(_alphabet())}, BOS: 256, EOS: 257}, [])
  normalizer = base.backend_tokenizer.normalizer
  pre_tokenizer = base.backend_tokenizer.pre_tokenizer
  pieces = collections.Counter(
      piece for text in words
      for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
  merges = _learn_merges(pieces)
  vocab: dict[str, int] = {}
  for symbol in list(_alphabet()) + [c + END_OF_WORD for c in _alphabet()]:
    vocab.setdefault(symbol, len(vocab))
  for left, right in merges:
    vocab.setdefault(left + right, len(vocab))
  vocab[BOS] = len(vocab)
  vocab[EOS] = len(vocab)
  tokenizer = Tokenizer(_write_and_load(vocab, merges), context_length)
  if out_dir is not None:
    tokenizer.save(out_dir)
  return tokenizer


def _learn_merges(pieces: collections.Counter) -> list[tuple[str, str]]:
  """Byte-pair merges until every piece is one symbol; the most frequent pair first, ties
  broken by the pair itself. (The `tokenizers` trainer breaks ties by hash order, so its
  vocabulary, and the ids a model is trained on, changed from one process to the next.)"""
  words = [[*piece[:-1], piece[-1] + END_OF_WORD] for piece in sorted(pieces)]
  freqs = [pieces[piece] for piece in sorted(pieces)]
  counts: collections.Counter = collections.Counter()
  where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)

  def account(i: int, sign: int):
    for pair in zip(words[i], words[i][1:]):
      counts[pair] += sign * freqs[i]
      if sign > 0:
        where[pair].add(i)

  for i in range(len(words)):
    account(i, +1)
  heap = [(-c, pair) for pair, c in counts.items()]
  heapq.heapify(heap)
  merges = []
  while heap:
    negative, pair = heapq.heappop(heap)
    if counts.get(pair, 0) != -negative or -negative <= 0:
      continue  # a stale entry: the pair's count changed after it was pushed
    merges.append(pair)
    for i in sorted(where.pop(pair)):
      account(i, -1)
      merged, j = [], 0
      while j < len(words[i]):
        if tuple(words[i][j:j + 2]) == pair:
          merged.append(pair[0] + pair[1])
          j += 2
        else:
          merged.append(words[i][j])
          j += 1
      words[i] = merged
      account(i, +1)
      for new in zip(merged, merged[1:]):
        heapq.heappush(heap, (-counts[new], new))
    counts.pop(pair, None)
  return merges


def _write_and_load(vocab: dict[str, int], merges: Sequence[tuple[str, str]]):
  """vocab.json + merges.txt -> CLIPTokenizerFast: the one format every transformers reads."""
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return transformers.CLIPTokenizerFast.from_pretrained(tmp)


def _alphabet() -> list[str]:
  """CLIP's 256 byte symbols (GPT-2's printable byte map), sorted: the first vocab entries."""
  return sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())


def fit_caption(tokenizer: Tokenizer, caption: str, count: int | None = None) -> str:
  """`caption` cut to whole words that fit the context, keeping its number word.

  The tokenizer keeps the first `context_length - 2` tokens; when that cuts the number word, the
  nine count candidates of a caption tokenize the same (a defect of an earlier replication). This
  keeps a window of whole words around the first counting mention of `count` (default:
  `numbers.parse_count`) -- a quarter of the room before it, the rest after, for the object noun
  that follows -- small enough that every candidate of `numbers.count_captions` fits too. Without
  a count it keeps the start. Returns a substring of `caption`, so case and spelling are kept.
  """
  from countclip_jax.text import numbers  # pylint: disable=g-import-not-at-top

  room = tokenizer.context_length - 2
  if count is None:
    count = numbers.parse_count(caption)
  encoding = tokenizer.hf(caption, add_special_tokens=False, return_offsets_mapping=True,
                          verbose=False)
  # Words as (first char, end char, number of tokens): cut only where a token ends a word.
  words, start, n = [], None, 0
  for token, (a, b) in zip(tokenizer.hf.convert_ids_to_tokens(encoding["input_ids"]),
                           encoding["offset_mapping"]):
    start, n = a if start is None else start, n + 1
    if token.endswith(END_OF_WORD):
      words.append((start, b, n))
      start, n = None, 0
  if start is not None:
    words.append((start, len(caption), n))
  if not words:
    return caption

  anchor = 0
  if count is not None:
    mentions = [m for m in numbers.find_numbers(caption) if m.value == count]
    if not mentions:
      raise ValueError(f"Caption has no number word {numbers.number_word(count)!r}: {caption!r}")
    first = next((m for m in mentions if m.reason is None), mentions[0])
    anchor = next(i for i, w in enumerate(words) if w[1] > first.start)
  lo, hi = anchor, anchor + 1
  used = words[anchor][2]
  while lo > 0 and used + words[lo - 1][2] <= room // 4:
    lo, used = lo - 1, used + words[lo - 1][2]
  while hi < len(words) and used + words[hi][2] <= room:
    hi, used = hi + 1, used + words[hi][2]
  while lo > 0 and used + words[lo - 1][2] <= room:
    lo, used = lo - 1, used + words[lo - 1][2]

  def fits(text):
    candidates = numbers.count_captions(text, count) if count is not None else [text]
    return all(len(tokenizer.tokens(c)) <= room for c in candidates)

  # Candidates with a longer number word, or re-tokenization at the cut, can need fewer words.
  while True:
    text = caption[words[lo][0]:words[hi - 1][1]] if (lo, hi) != (0, len(words)) else caption
    if fits(text):
      return text
    if hi - 1 > anchor:
      hi -= 1
    elif lo < anchor:
      lo += 1
    else:
      raise ValueError(f"The number word of {caption!r} alone does not fit {room} tokens "
                       f"(context_length={tokenizer.context_length}).")


def fit_captions(tokenizer: Tokenizer, captions: Sequence[str],
                 counts: Sequence[int | None] | None = None) -> list[str]:
  """`fit_caption` over a batch; `counts` defaults to parsing each caption."""
  counts = [None] * len(captions) if counts is None else counts
  if len(counts) != len(captions):
    raise ValueError(f"{len(captions)} captions but {len(counts)} counts.")
  return [fit_caption(tokenizer, c, n) for c, n in zip(captions, counts)]
