"""The networks, in Flax: three image models, Xavier-initialized (Algorithm 1, line 2), for any
NHWC input shape, and the char-level transformer (transformer.py) with its training recipe.

Layer widths are multiples of 8 so every layer can later be split evenly across up to 8 devices.
Convolutions use SAME padding and pooling rounds up, so even 8x8 digits pass through every model.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from easgd_jax import transformer

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


# A convolution runs as one matmul on a map of at most SMALL_MAP positions (8x8 digits, where it
# was measured faster) whose spread kernel has at most SMALL_SPREAD entries (4 MB: digits' take
# 32,768; many input channels, as in --synthetic_shape=8,8,512, keep nn.Conv).
SMALL_MAP, SMALL_SPREAD = 64, 2**20


@functools.cache  # every trace of a model asks again; read-only, so one copy serves them all
def same_conv_taps(height, width, size):
  """T[p, q] = the kernel tap d (dy * size + dx) through which input position p feeds output
  position q of a stride-1 SAME convolution of odd `size` on a height x width map (positions
  row-major), or size**2 where p does not feed q."""
  taps = np.full((height * width, height * width), size * size, np.int32)
  half = size // 2
  for y, x, dy, dx in np.ndindex(height, width, size, size):
    source_y, source_x = y + dy - half, x + dx - half
    if 0 <= source_y < height and 0 <= source_x < width:
      taps[source_y * width + source_x, y * width + x] = dy * size + dx
  taps.flags.writeable = False
  return taps


class SmallMapConv(nn.Module):
  """nn.Conv(features, (size, size), padding="SAME") with the same parameters and init, computed
  as one dense matmul: the kernel spread over every (input, output) pair of positions.

  Why: on a map of a few positions XLA:CPU runs a 5x5 convolution on a generic loop (on 8x8
  digits LeNet's second convolution, a 4x4 map, took most of the gradient's time), while one
  matmul takes its fast path: LeNet's SGD step on digits goes from 1.34 ms to 0.51 ms on one
  thread (experiments/benchmark_steps.py; BENCHMARKS.md). The function is the same to float32
  rounding (the sums run in another order). The spread kernel holds positions^2 x channels x
  features numbers, so it is for small maps only (SMALL_MAP, SMALL_SPREAD)."""

  features: int
  size: int = 5

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    shape = (self.size, self.size, channels, self.features)
    kernel = self.param("kernel", xavier, shape)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    # The spread kernel gathered from the taps and a row of zeros: a gather forward and a
    # scatter-add backward, where multiplying by a 0/1 tensor of taps cost two dense products
    # as large as the convolution's own (LeNet's step on digits: 0.63 -> 0.51 ms, one thread).
    table = kernel.reshape(-1, channels, self.features)
    table = jnp.concatenate([table, jnp.zeros_like(table[:1])])
    spread = jnp.transpose(table[same_conv_taps(height, width, self.size)], (0, 2, 1, 3))
    # The output channels stay an axis of their own, so a model-parallel split of them (the
    # kernel's last axis) runs through without a gather, as it does through nn.Conv.
    out = jnp.einsum("bpc,pcqf->bqf", x.reshape(batch, height * width, channels), spread)
    return out.reshape(batch, height, width, self.features) + bias


def conv(x, features, name):
  """A 5x5 SAME convolution, as one matmul on a small map (SmallMapConv), else nn.Conv."""
  positions, channels = x.shape[1] * x.shape[2], x.shape[3]
  if positions <= SMALL_MAP and positions**2 * channels * features <= SMALL_SPREAD:
    return SmallMapConv(features, name=name)(x)
  return nn.Conv(features, (5, 5), padding="SAME", kernel_init=xavier, name=name)(x)


class LeNet(nn.Module):
  """LeNet-5 style: two conv/pool stages, then 120-ish and 84-ish dense layers (rounded to 8s)."""

  num_classes: int
  features: Sequence[int] = (8, 16)
  hidden: Sequence[int] = (128, 64)

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.features):
      x = nn.relu(conv(x, width, f"Conv_{i}"))
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


MODELS = {"mlp": MLP, "lenet": LeNet, "cifar_cnn": CifarCNN, "transformer": transformer.GPT}
# A model's own training recipe: the defaults an algorithm takes for it where it declares none
# of its own (algorithms/base.py, `defaults`). The transformer's is nanoGPT's shakespeare_char
# "baby" setting: AdamW 1e-3 (betas 0.9, 0.99), weight decay 0.1 on matrices only, gradients
# clipped at norm 1, 100 warm-up steps then cosine to 1e-4, 12 windows per worker.
TRAINING = {
  "transformer": dict(
    optimizer="adamw",
    learning_rate=1e-3,
    beta2=0.99,
    weight_decay=0.1,
    grad_clip=1.0,
    lr_schedule="warmup_cosine",
    warmup_steps=100,
    min_learning_rate=1e-4,
    batch_size=12,
  ),
}
# Which parameters AdamW decays, where not all (the transformer: matrices and embeddings only).
DECAY_MASK = {"transformer": transformer.decay_mask}


def create(name, num_classes, **overrides) -> nn.Module:
  return MODELS[name](num_classes, **overrides)


def from_config(config, num_classes):
  """The model --model names, at --num_layers, --num_heads, --width, --context if a transformer."""
  if config.model != "transformer":
    return create(config.model, num_classes)
  sizes = dict(num_layers=config.num_layers, num_heads=config.num_heads, width=config.width)
  return create(config.model, num_classes, context=config.context, **sizes)


def init_params(model, image_shape, seed, dtype=jnp.float32):
  """Parameters created once, on the host CPU (the seed's "initialize W on CPU"), as NumPy;
  `image_shape` and `dtype` are one example's input (a transformer's: int tokens)."""
  cpu = jax.local_devices(backend="cpu")[0]
  with jax.default_device(cpu):
    dummy = jnp.zeros((1, *image_shape), dtype)
    key = jax.random.key(seed)
    # Compiled without XLA's optimization passes: they take ~2 s on LeNet's random-number graph,
    # on every launch, for a program that runs once; the values are bitwise the same (tested).
    init = jax.jit(model.init).lower(key, dummy).compile(INIT_COMPILER_OPTIONS)
    variables = init(key, dummy)
  return jax.tree.map(np.asarray, variables["params"])


INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
