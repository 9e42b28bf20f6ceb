"""The GPT of easgd_jax/transformer.py: shapes, causality, the tied head, init, weight decay."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from easgd_jax.transformer import GPT, decay_mask

VOCAB = 84
SMALL = dict(vocab_size=VOCAB, num_layers=2, num_heads=2, width=32, context=16)
DEFAULT_PARAMETERS = 806_528  # vocab 84, 4 layers, 4 heads, width 128, context 64


def init(model, seed=0):
  key, tokens = jax.random.key(seed), jnp.zeros((1, model.context), jnp.int32)
  # XLA's optimization passes cost a second here, on a program that runs once (as models.py).
  init = jax.jit(model.init).lower(key, tokens).compile({"xla_backend_optimization_level": 0})
  return init(key, tokens)["params"]


def flat(params):
  return flax.traverse_util.flatten_dict(params, sep="/")


@pytest.fixture(scope="module")
def small():
  model = GPT(**SMALL)
  return model, init(model), jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


def random_tokens(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, size=shape), jnp.int32)


def test_logits_are_float32_batch_by_length_by_vocab(small):
  model, params, apply = small
  for length in (5, model.context):
    logits = apply(params, random_tokens((2, length)))
    assert logits.shape == (2, length, VOCAB) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match="context"):
    model.apply({"params": params}, random_tokens((1, model.context + 1)))


def test_parameter_tree_has_the_names_nanogpt_readers_expect(small):
  _, params, _ = small
  names = set(flat(params))
  block = {
    "ln_1/scale",
    "attn/query/kernel",
    "attn/key/kernel",
    "attn/value/kernel",
    "attn/proj/kernel",
    "ln_2/scale",
    "mlp/fc/kernel",
    "mlp/proj/kernel",
  }
  expected = {"wte/embedding", "wpe/embedding", "ln_f/scale"}
  expected |= {f"block_{layer}/{name}" for layer in range(2) for name in block}
  assert names == expected  # no biases, no separate head
  shapes = {name: value.shape for name, value in flat(params).items()}
  assert shapes["block_1/attn/query/kernel"] == (32, 32)
  assert shapes["block_1/mlp/fc/kernel"] == (32, 128)
  assert shapes["block_1/mlp/proj/kernel"] == (128, 32)
  assert shapes["wpe/embedding"] == (16, 32)


def test_a_future_token_changes_no_earlier_position(small):
  _, params, apply = small
  tokens = random_tokens((2, 16))
  changed_at = 9
  changed = tokens.at[:, changed_at].set((tokens[:, changed_at] + 1) % VOCAB)
  before, after = np.asarray(apply(params, tokens)), np.asarray(apply(params, changed))
  np.testing.assert_array_equal(after[:, :changed_at], before[:, :changed_at])  # exactly
  assert np.abs(after[:, changed_at] - before[:, changed_at]).min(axis=-1).min() > 0
  assert not np.allclose(after[:, changed_at + 1 :], before[:, changed_at + 1 :])


def test_the_output_head_is_the_token_embedding(small):
  _, params, apply = small
  embedding_shapes = {(VOCAB, 32), (32, VOCAB)}
  holders = [name for name, value in flat(params).items() if value.shape in embedding_shapes]
  assert holders == ["wte/embedding"]
  # A token that is not in the input: changing its embedding row can reach the logits only
  # through the head, so a tied head moves that token's logit at every position and no other.
  tokens = random_tokens((2, 16)) % (VOCAB - 1)
  absent = VOCAB - 1
  bumped = flat(params)
  # Not a constant: ln_f's output has zero mean over the width (scale 1, no bias), so adding a
  # constant to a row would leave that row's logits unchanged.
  bump = np.random.default_rng(2).normal(0, 0.5, size=32).astype(np.float32)
  bumped["wte/embedding"] = bumped["wte/embedding"].at[absent].add(bump)
  bumped = flax.traverse_util.unflatten_dict(bumped, sep="/")
  before, after = np.asarray(apply(params, tokens)), np.asarray(apply(bumped, tokens))
  assert (np.abs(after[..., absent] - before[..., absent]) > 1e-4).all()
  np.testing.assert_array_equal(after[..., :absent], before[..., :absent])


def reference_logits(params, tokens, num_heads):
  """The GPT's forward pass written out in float64 NumPy, from the nanoGPT description."""
  p = {name: np.asarray(value, np.float64) for name, value in flat(params).items()}
  erf = np.vectorize(math.erf)

  def layer_norm(x, scale):
    centered = x - x.mean(-1, keepdims=True)
    return centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-5) * scale

  wte = p["wte/embedding"]
  length = tokens.shape[1]
  x = wte[tokens] + p["wpe/embedding"][:length]
  for layer in range(sum(name.endswith("ln_1/scale") for name in p)):
    b = f"block_{layer}/"
    h = layer_norm(x, p[b + "ln_1/scale"])
    q, k, v = (h @ p[b + f"attn/{name}/kernel"] for name in ("query", "key", "value"))
    out = np.zeros_like(x)
    size = x.shape[-1] // num_heads
    for head in range(num_heads):
      cols = slice(head * size, (head + 1) * size)
      scores = q[..., cols] @ k[..., cols].transpose(0, 2, 1) / math.sqrt(size)
      scores[:, np.triu(np.ones((length, length), bool), 1)] = -np.inf
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      out[..., cols] = weights / weights.sum(-1, keepdims=True) @ v[..., cols]
    x = x + out @ p[b + "attn/proj/kernel"]
    hidden = layer_norm(x, p[b + "ln_2/scale"]) @ p[b + "mlp/fc/kernel"]
    hidden = 0.5 * hidden * (1 + erf(hidden / math.sqrt(2)))
    x = x + hidden @ p[b + "mlp/proj/kernel"]
  return layer_norm(x, p["ln_f/scale"]) @ wte.T


def test_logits_match_a_numpy_forward_pass(small):
  model, params, apply = small
  # Weights of scale 1 / sqrt(fan_in) and random LayerNorm scales, so activations are of order 1
  # and a wrong detail (tanh GELU, a missing 1/sqrt(head_dim)) shows in the logits; embeddings
  # with a variance near LayerNorm's epsilon, so a wrong epsilon shows too.
  rng = np.random.default_rng(4)
  params = jax.tree.map(
    lambda x: rng.normal(1.0, 0.3, x.shape) if x.ndim == 1 else rng.normal(0, 1, x.shape),
    params,
  )
  params = {
    name: value / math.sqrt(value.shape[0]) if name.endswith("kernel") else value
    for name, value in flat(params).items()
  }
  params = {
    name: value * 0.003 if name.endswith("embedding") else value for name, value in params.items()
  }
  params = jax.tree.map(
    lambda x: jnp.asarray(x, jnp.float32), flax.traverse_util.unflatten_dict(params, sep="/")
  )
  tokens = np.asarray(random_tokens((2, 16), seed=5))
  expected = reference_logits(params, tokens, model.num_heads)
  logits = np.asarray(apply(params, tokens))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_default_shape_has_the_pinned_parameter_count():
  model = GPT(vocab_size=VOCAB)
  assert (model.num_layers, model.num_heads, model.width, model.context) == (4, 4, 128, 64)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64), jnp.int32))
  count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
  assert count == DEFAULT_PARAMETERS


def test_init_is_nanogpts_normal_with_scaled_residual_projections():
  # Wide enough that each standard deviation is estimated within ~2 % (tolerance 5 %).
  num_layers = 2
  model = GPT(vocab_size=VOCAB, num_layers=num_layers, num_heads=4, width=128, context=64)
  params = flat(init(model))
  residual = 0.02 / math.sqrt(2 * num_layers)
  for name, value in params.items():
    value = np.asarray(value)
    if name.endswith("scale"):
      np.testing.assert_array_equal(value, 1.0, err_msg=name)
      continue
    expected = residual if name.endswith("/proj/kernel") else 0.02
    assert abs(value.std() / expected - 1) < 0.05, (name, value.std(), expected)
    assert abs(value.mean()) < 0.2 * expected, name
  # Distinct draws: no two matrices of a shape are equal.
  assert not np.array_equal(params["block_0/attn/query/kernel"], params["block_0/attn/key/kernel"])


def test_decay_mask_is_true_exactly_for_matrices_and_embeddings(small):
  _, params, _ = small
  mask = flat(decay_mask(params))
  for name, value in flat(params).items():
    assert mask[name] == (value.ndim >= 2), name
  assert mask["wte/embedding"] and mask["wpe/embedding"] and mask["block_0/mlp/fc/kernel"]
  assert not mask["ln_f/scale"] and not mask["block_1/ln_2/scale"]
  # It works on shapes alone too (what an optimizer's init may be given).
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert flat(decay_mask(shapes)) == mask


def test_a_few_adamw_steps_on_a_repeated_batch_lower_the_loss(small):
  model, params, _ = small
  tokens = random_tokens((4, 17), seed=3)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  optimizer = optax.adamw(3e-3, b2=0.99, weight_decay=0.1, mask=decay_mask(params))

  def loss_fn(params):
    logits = model.apply({"params": params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = optimizer.init(params)
  # Unoptimized by XLA: ten steps of a tiny model run in no time, its optimization passes don't.
  step = jax.jit(step).lower(params, state).compile({"xla_backend_optimization_level": 0})
  losses = []
  for _ in range(10):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert abs(losses[0] - math.log(VOCAB)) < 0.1  # nanoGPT's init starts near uniform
  assert losses[-1] < losses[0] - 0.5, losses
