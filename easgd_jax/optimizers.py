"""The local (inner) optimizer every algorithm steps its weights with, and its schedule.

`--optimizer` picks it: `sgd` (W <- W - eta * Delta W), `momentum` (heavy ball), `nesterov`
(Zhang et al.'s momentum, below) or `adamw`. Left unset it is `nesterov` when `--momentum` > 0
(EAMSGD, as the flag always meant) and `sgd` otherwise; DiLoCo defaults to `adamw`.

`--lr_schedule` scales eta over the run: `constant`, `cosine` (to 0 at `--decay_steps`) or
`warmup_cosine` (linear warm-up over `--warmup_steps`, then cosine). Schedules count run steps
(`--steps`' unit): an algorithm whose step is one worker's iteration (round-robin and the
asynchronous family) advances a worker's own count once per G run steps, so its schedule is read
at own_count * G. The elastic moving rate alpha is a constant that no schedule touches.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from easgd_jax import models

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


class NesterovState(NamedTuple):
  velocity: Any  # v, Zhang et al.'s momentum variable
  momentum: jax.Array  # delta, kept beside v so that `lookahead_shift` needs nothing else
  count: jax.Array  # updates so far, for the schedule


def nesterov(learning_rate, momentum) -> optax.GradientTransformation:
  """Nesterov momentum held at the look-ahead point W = x + delta * v (Zhang et al., Alg. 2):

    v <- delta * v - eta * g(x + delta * v),   x <- x + v

  in W: W <- W - delta * v_old + (1 + delta) * v_new. These are the iterates of
  optax.sgd(nesterov=True); this form keeps v itself in the state, so the elastic term can act
  on x = W - delta * v (`lookahead_shift`), exactly as Algorithm 2 does, also under a schedule.
  """
  schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return NesterovState(zeros, jnp.asarray(momentum, jnp.float32), jnp.zeros([], jnp.int32))

  def update(grads, state, params=None):
    del params
    eta, delta = schedule(state.count), state.momentum
    velocity = jax.tree.map(lambda v, g: delta * v - eta * g, state.velocity, grads)
    updates = jax.tree.map(
      lambda old, new: new + delta * (new - old), state.velocity, velocity
    )  # (1 + delta) v_new - delta v_old
    return updates, NesterovState(velocity, state.momentum, state.count + 1)

  return optax.GradientTransformation(init, update)


def lookahead_shift(inner_state):
  """delta * v of the Nesterov state inside `inner_state` (W - x), or None for other optimizers."""
  found = [
    s
    for s in jax.tree.leaves(inner_state, is_leaf=lambda s: isinstance(s, NesterovState))
    if isinstance(s, NesterovState)
  ]
  if not found:
    return None
  (state,) = found
  return jax.tree.map(lambda v: state.momentum * v, state.velocity)


def schedule(name, learning_rate, decay_steps, warmup_steps=0, steps_per_count=1, floor=0.0):
  """eta(count) as an optax schedule; `steps_per_count` run steps pass per optimizer count;
  the cosine schedules end at `floor`."""
  if name == "constant":
    return learning_rate  # a number: no step count in the optimizer state
  if name == "cosine":
    base = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=floor / learning_rate)
  else:  # warmup_cosine
    base = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, max(decay_steps, warmup_steps + 1), end_value=floor
    )
  return base if steps_per_count == 1 else (lambda count: base(count * steps_per_count))


def create(
  name, learning_rate, momentum=0.0, weight_decay=1e-4, beta2=0.999, mask=None, grad_clip=0.0
):
  """The inner optimizer `name` at `learning_rate` (a number or a schedule); AdamW decays the
  parameters `mask` picks (all when None); `grad_clip` > 0 clips the gradient's global norm
  first."""
  if name == "sgd":
    found = optax.sgd(learning_rate)
  elif name == "momentum":
    found = optax.sgd(learning_rate, momentum=momentum or 0.9)
  elif name == "nesterov":
    found = nesterov(learning_rate, momentum or 0.9)
  elif name == "adamw":
    found = optax.adamw(learning_rate, b2=beta2, weight_decay=weight_decay, mask=mask)
  else:
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
  return optax.chain(optax.clip_by_global_norm(grad_clip), found) if grad_clip else found


def from_config(config, steps_per_count=1, default="sgd"):
  """The inner optimizer a Config asks for (see the module docstring); `default` when the
  config has not been resolved (easgd_jax.algorithms.resolve writes the default in)."""
  eta = schedule(
    config.lr_schedule,
    config.learning_rate,
    config.decay_steps or config.steps,
    config.warmup_steps,
    steps_per_count,
    config.min_learning_rate,
  )
  name = config.optimizer or ("nesterov" if config.momentum else default)
  mask = models.DECAY_MASK.get(config.model)
  return create(
    name, eta, config.momentum, config.weight_decay, config.beta2, mask, config.grad_clip
  )
