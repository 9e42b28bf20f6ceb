"""Elastic averaging as optax transformations: Eq. (1) and Eq. (2) over any inner optimizer.

With the moving rate alpha (a constant: --alpha, or eta * rho from --rho and the base learning
rate) and the inner optimizer's update u(Delta W^i), a worker's step is

  Eq. (1)  W^i <- W^i + u(Delta W^i) - alpha * e * (x^i - W-bar)
  Eq. (2)  W-bar <- W-bar + alpha * sum_i e * (x^i - W-bar)      (the workers exchanging now)

where e = 1 on the worker's exchange steps (its own steps 0, tau, 2 tau, ...) and 0 otherwise,
and x^i is the worker's point: W^i itself, or for Nesterov momentum (EAMSGD) W^i less its
look-ahead shift delta * v, since Zhang et al.'s Algorithm 2 pulls x, not the point x + delta * v
where the gradient is taken. With plain SGD, u = -eta * Delta W^i and Eq. (1) is the seed's
W^i <- W^i - eta * (Delta W^i + rho * (W^i - W-bar)).

The exchange counter is an array in the state and e is arithmetic on it (as in optax.lookahead
and optax.MultiSteps), so a step is branch-free and jits, vmaps and scans. The schedulers still
know from their own step count when an exchange happens, so they move the center only then.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from easgd_jax import optimizers


class ElasticState(NamedTuple):
  count: jax.Array  # the worker's own steps so far
  inner: Any  # the inner optimizer's state, never averaged or reset


def exchanges(count, tau):
  """e: 1.0 on the worker's own steps 0, tau, 2 tau, ... (an array; no Python branch)."""
  return (count % tau == 0).astype(jnp.float32)


def point(params, state):
  """x^i, the point the elastic force acts on: W^i less the inner optimizer's look-ahead."""
  inner = state.inner if isinstance(state, ElasticState) else state
  shift = optimizers.lookahead_shift(inner)
  return params if shift is None else jax.tree.map(jnp.subtract, params, shift)


def elastic(inner, alpha, tau=1) -> optax.GradientTransformationExtraArgs:
  """Eq. (1) around `inner`: update(grads, state, params, center=W-bar) -> (updates, state)."""

  def init(params):
    return ElasticState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(grads, state, params, *, center, **extra):
    del extra
    x = point(params, state)
    pull = alpha * exchanges(state.count, tau)
    updates, inner_state = inner.update(grads, state.inner, params)
    updates = jax.tree.map(lambda u, xi, c: u - pull * (xi - c), updates, x, center)
    return updates, ElasticState(state.count + 1, inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def gap(params, state, center):
  """x^i - W-bar, what worker i sends to the center on an exchange."""
  return jax.tree.map(jnp.subtract, point(params, state), center)


def center_update(center, gaps, alpha):
  """Eq. (2): W-bar <- W-bar + alpha * gaps, `gaps` = sum_i (x^i - W-bar) over the exchangers."""
  return jax.tree.map(lambda c, d: c + alpha * d, center, gaps)
