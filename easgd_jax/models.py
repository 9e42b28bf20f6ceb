"""The three networks, in Flax, Xavier-initialized (Algorithm 1, line 2), for any NHWC input shape.

Layer widths are multiples of 8 so every layer can later be split evenly across up to 8 devices.
Convolutions use SAME padding and pooling rounds up, so even 8x8 digits pass through every model.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

xavier = nn.initializers.xavier_uniform()


class MLP(nn.Module):
  num_classes: int
  hidden: Sequence[int] = (256, 128)

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, kernel_init=xavier)(x))
    return nn.Dense(self.num_classes, kernel_init=xavier)(x)


class LeNet(nn.Module):
  """LeNet-5 style: two conv/pool stages, then 120-ish and 84-ish dense layers (rounded to 8s)."""

  num_classes: int
  features: Sequence[int] = (8, 16)
  hidden: Sequence[int] = (128, 64)

  @nn.compact
  def __call__(self, x):
    for width in self.features:
      x = nn.relu(nn.Conv(width, (5, 5), padding="SAME", kernel_init=xavier)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, kernel_init=xavier)(x))
    return nn.Dense(self.num_classes, kernel_init=xavier)(x)


class CifarCNN(nn.Module):
  """A small AlexNet-style network (the classic cuda-convnet CIFAR-10 layout, narrower)."""

  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden: Sequence[int] = (256, 128)

  @nn.compact
  def __call__(self, x):
    for width in self.features:
      x = nn.relu(nn.Conv(width, (5, 5), padding="SAME", kernel_init=xavier)(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, kernel_init=xavier)(x))
    return nn.Dense(self.num_classes, kernel_init=xavier)(x)


MODELS = {"mlp": MLP, "lenet": LeNet, "cifar_cnn": CifarCNN}


def create(name, num_classes, **overrides) -> nn.Module:
  return MODELS[name](num_classes=num_classes, **overrides)


def init_params(model, image_shape, seed):
  """Parameters created once, on the host CPU (the seed's "initialize W on CPU"), as NumPy."""
  cpu = jax.local_devices(backend="cpu")[0]
  with jax.default_device(cpu):
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    key = jax.random.key(seed)
    # Compiled without XLA's optimization passes: they take ~2 s on LeNet's random-number graph,
    # on every launch, for a program that runs once; the values are bitwise the same (tested).
    init = jax.jit(model.init).lower(key, dummy).compile(INIT_COMPILER_OPTIONS)
    variables = init(key, dummy)
  return jax.tree.map(np.asarray, variables["params"])


INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
