"""The networks, in Flax: three image models, Xavier-initialized (Algorithm 1, line 2), for any
NHWC input shape, and the char-level transformer (transformer.py) with its training recipe.

Layer widths are multiples of 8 so every layer can later be split evenly across up to 8 devices.
Convolutions use SAME padding and pooling rounds up, so even 8x8 digits pass through every model.
"""

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
