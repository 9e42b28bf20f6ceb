"""A decoder-only GPT in Flax, shaped as karpathy/nanoGPT's model.py, for character-level text.

Pre-LayerNorm blocks (x + attn(ln_1(x)), then x + mlp(ln_2(x))), a final ln_f, and an output
head tied to the token embedding: the logits are `wte.attend(x)`, so there is no head parameter.
No biases (LayerNorms have a scale only) and no dropout. The defaults are nanoGPT's CPU "baby"
shakespeare_char model (4 layers, 4 heads, width 128, context 64); with the Shakespeare corpus's
84 characters it has 806,528 parameters: 10,752 in `wte`, 8,192 in `wpe`, 196,864 per block and
128 in `ln_f` (nanoGPT's printout leaves out `wpe`: 798,336).

Initialized as nanoGPT, not with the Xavier init of the image models (models.py): normal with
standard deviation 0.02 for every Dense kernel and both embeddings, 0.02 / sqrt(2 * num_layers)
for the two projections that write into the residual stream (GPT-2's scaling, so the stream's
variance does not grow with depth), LayerNorm scales 1. The quality bar is a validation loss
beside nanoGPT's trained the same way (experiments/torch_gpt.py), so both must start alike; and
the tied head reads the embedding, which at Xavier scale (std 0.097 for 84 x 128, not 0.02) gives
initial logits four times as large (std 1.06, not 0.25) and a first loss of 5.06 nats instead of
4.46, near log(84) = 4.43 (measured at the default shape).

Query, key and value are separate [width, width] kernels whose heads are contiguous column blocks
(head h is columns h * head_dim to (h + 1) * head_dim), so a column-wise split of them across
devices keeps whole heads together.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

STDDEV = 0.02  # nanoGPT's (and GPT-2's) init scale
LAYER_NORM_EPSILON = 1e-5  # PyTorch's default, which nanoGPT's LayerNorm uses


def _dense(features, stddev, name):
  return nn.Dense(features, use_bias=False, kernel_init=nn.initializers.normal(stddev), name=name)


def _rows(layer, x):
  """`layer` applied to x's rows as one [rows, width] matrix, the leading axes put back. Applied
  to [batch, T, width] directly, the gradient of a Dense kernel contracts two axes at once, and
  XLA:CPU leaves its fast matrix product for a slow loop: the default model's gradient took
  73-79 ms a step, 46-51 ms with every Dense and the head on rows (BENCHMARKS.md (m))."""
  found = layer(x.reshape(-1, x.shape[-1]))
  return found.reshape(*x.shape[:-1], found.shape[-1])


def _layer_norm(name):
  # Two-pass variance, as PyTorch's layer_norm computes it, so both sides round alike.
  return nn.LayerNorm(
    epsilon=LAYER_NORM_EPSILON, use_bias=False, use_fast_variance=False, name=name
  )


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention in which position t sees positions 0..t only."""

  num_heads: int
  residual_stddev: float

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not a multiple of num_heads {self.num_heads}")
    head_dim = width // self.num_heads

    def heads(name):  # [b, T, width] -> [b, T, heads, head_dim]: head h is column block h
      return _rows(_dense(width, STDDEV, name), x).reshape(batch, length, self.num_heads, head_dim)

    query, key, value = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((length, length), bool))
    # Every row keeps its diagonal, so -inf never makes a row all -inf (no NaN from softmax).
    scores = jnp.where(causal, scores.astype(jnp.float32), -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, length, width)
    return _rows(_dense(width, self.residual_stddev, "proj"), mixed)


class MLP(nn.Module):
  residual_stddev: float

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    hidden = _rows(_dense(4 * width, STDDEV, "fc"), x)
    hidden = nn.gelu(hidden, approximate=False)  # the erf form, as PyTorch's nn.GELU()
    return _rows(_dense(width, self.residual_stddev, "proj"), hidden)


class Block(nn.Module):
  num_heads: int
  residual_stddev: float

  @nn.compact
  def __call__(self, x):
    x = x + CausalSelfAttention(self.num_heads, self.residual_stddev, name="attn")(
      _layer_norm("ln_1")(x)
    )
    return x + MLP(self.residual_stddev, name="mlp")(_layer_norm("ln_2")(x))


class GPT(nn.Module):
  """int tokens [b, T] (T <= context) -> float32 next-token logits [b, T, vocab_size]."""

  vocab_size: int
  num_layers: int = 4
  num_heads: int = 4
  width: int = 128
  context: int = 64

  @nn.compact
  def __call__(self, tokens):
    length = tokens.shape[-1]
    if length > self.context:
      raise ValueError(f"{length} tokens are more than the model's context of {self.context}")
    embedding_init = nn.initializers.normal(STDDEV)
    wte = nn.Embed(self.vocab_size, self.width, embedding_init=embedding_init, name="wte")
    wpe = nn.Embed(self.context, self.width, embedding_init=embedding_init, name="wpe")
    x = wte(tokens) + wpe(jnp.arange(length))
    residual_stddev = STDDEV / math.sqrt(2 * self.num_layers)
    for layer in range(self.num_layers):
      x = Block(self.num_heads, residual_stddev, name=f"block_{layer}")(x)
    x = _layer_norm("ln_f")(x)
    return _rows(wte.attend, x).astype(jnp.float32)


def decay_mask(params):
  """True for the parameters AdamW should decay: those of 2 or more dimensions (matrices and
  embeddings), as nanoGPT's configure_optimizers; False for the 1-D LayerNorm scales."""
  return jax.tree.map(lambda param: param.ndim >= 2, params)


def generate(model, params, tokens, length, temperature, key):
  """`tokens` (ints) followed by `length` more drawn one at a time, as nanoGPT's generate: the
  last `model.context` tokens in, the next drawn from softmax(logits / temperature), or the most
  likely one at temperature 0. Returns a list of ints."""

  # One program for every step: the window is right-padded to the context, and since attention
  # is causal, the padding never reaches the logits read at the window's last real token.
  @jax.jit
  def next_token(window, last, key):
    logits = model.apply({"params": params}, window[None])[0, last]
    if temperature == 0:
      return jnp.argmax(logits)
    return jax.random.categorical(key, logits / temperature)

  tokens = [int(t) for t in tokens]
  if not tokens:
    raise ValueError("generate needs at least one token to start from")
  for _ in range(length):
    key, draw = jax.random.split(key)
    recent = tokens[-model.context :]
    window = jnp.zeros(model.context, jnp.int32).at[: len(recent)].set(jnp.asarray(recent))
    tokens.append(int(next_token(window, len(recent) - 1, draw)))
  return tokens
