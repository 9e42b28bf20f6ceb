"""elastic.py on its own: Eq. (1) with SGD is the seed's rule, the tau gate counts a worker's
own steps, and a step is branch-free, so it vmaps over stacked workers and scans over steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from easgd_jax import elastic, optimizers

ETA, RHO, TAU = 0.1, 0.7, 3


def tree(rng, scale=1.0):
  return {
    "w": (scale * rng.standard_normal((3, 2))).astype(np.float32),
    "b": np.ones(2, np.float32),
  }


def test_eq1_with_sgd_is_the_seeds_rule_on_exchange_steps_only():
  rng = np.random.default_rng(0)
  w, center = tree(rng), tree(rng, 2.0)
  tx = elastic.elastic(optax.sgd(ETA), ETA * RHO, TAU)
  state = tx.init(w)
  for t in range(7):
    grads = tree(rng, 0.5)
    updates, state = tx.update(grads, state, w, center=center)
    new = optax.apply_updates(w, updates)
    pull = RHO if t % TAU == 0 else 0.0  # the worker's own steps 0, tau, 2 tau, ...
    for key in w:  # W - eta * (Delta W + rho * (W - W-bar)), in float64
      g, wi, c = (np.asarray(x[key], np.float64) for x in (grads, w, center))
      np.testing.assert_allclose(new[key], wi - ETA * (g + pull * (wi - c)), rtol=1e-6)
    w = new
  assert int(state.count) == 7


def test_a_step_vmaps_over_workers_and_scans_over_steps():
  """Four workers' ten steps as one jitted scan of a vmapped update equal a Python loop."""
  rng = np.random.default_rng(1)
  workers = [tree(rng) for _ in range(4)]
  center = tree(rng)
  grads = [[tree(rng, 0.3) for _ in workers] for _ in range(10)]
  tx = elastic.elastic(optimizers.nesterov(ETA, 0.9), 0.05, TAU)

  looped = []
  for i, w in enumerate(workers):
    state = tx.init(w)
    for step in grads:
      updates, state = tx.update(step[i], state, w, center=center)
      w = optax.apply_updates(w, updates)
    looped.append(w)

  def one(w, state, g):
    updates, state = tx.update(g, state, w, center=center)
    return optax.apply_updates(w, updates), state

  def body(carry, g):
    return jax.vmap(one)(*carry, g), None

  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
  w0 = stack(workers)
  (scanned, state), _ = jax.jit(lambda w, s, g: jax.lax.scan(body, (w, s), g))(
    w0, jax.vmap(tx.init)(w0), stack([stack(step) for step in grads])
  )
  for i, w in enumerate(looped):
    jax.tree.map(
      lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-7), scanned, w
    )
  assert np.asarray(state.count).tolist() == [10] * 4


def test_the_point_is_w_less_the_lookahead_shift():
  """x = W - delta * v for Nesterov (EAMSGD's Algorithm 2), W itself for any other optimizer."""
  rng = np.random.default_rng(2)
  w = tree(rng)
  for inner, delta in ((optimizers.nesterov(ETA, 0.9), 0.9), (optax.adamw(1e-3), 0.0)):
    tx = elastic.elastic(inner, 0.05, 1)
    state = tx.init(w)
    _, state = tx.update(tree(rng), state, w, center=w)
    x = elastic.point(w, state)
    shift = optimizers.lookahead_shift(state.inner)
    for key in w:
      expected = w[key] - (delta * np.asarray(state.inner.velocity[key]) if delta else 0)
      np.testing.assert_allclose(x[key], expected, rtol=1e-6)
    assert (shift is None) == (delta == 0)
