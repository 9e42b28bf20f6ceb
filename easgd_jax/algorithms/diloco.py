"""DiLoCo (Douillard et al., 2023): local SGD whose averaging step is an outer optimizer.

  every step     W^i <- W^i + u_i(Delta W^i)            inner optimizer, AdamW by default
  every tau-th   g_outer = W-bar - (1/G) sum_i W^i      the pseudo-gradient (one all-reduce)
                 W-bar <- W-bar + outer(g_outer)        Nesterov SGD, lr 0.7, momentum 0.9
                 W^i <- W-bar                           every worker restarts from the center

the outer step (`phases[1]`) following that step's inner step, on steps tau - 1, 2 tau - 1, ...
(counting from 0).

Both optimizers are optax. Each worker's inner state stays its own across rounds; the outer
state is the same on every replica (each computes the same outer step). With outer learning
rate 1 and no outer momentum, W-bar <- mean_i W^i: DiLoCo is then local SGD.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from easgd_jax import collectives, core, models
from easgd_jax.algorithms.base import StepRule


class DiLoCoState(NamedTuple):
  center: Any  # W-bar, the global model, the same on every replica
  outer_state: Any  # the outer optimizer's state, the same on every replica
  local: Any  # W^i
  opt_state: Any  # worker i's own inner optimizer state


def outer_optimizer(learning_rate=0.7, momentum=0.9):
  """The paper's outer step: SGD with Nesterov momentum on the pseudo-gradient."""
  return optax.sgd(learning_rate, momentum=momentum or None, nesterov=bool(momentum))


class DiLoCo(StepRule):
  name = "diloco"
  data_parallel = True

  @classmethod
  def defaults(cls, config):
    """On a model with no recipe of its own (the image models): AdamW at 2e-3 (the paper's
    inner optimizer; SGD's 0.05 would be far too large for it), H = 10."""
    recipe = models.TRAINING.get(config.model) or dict(optimizer="adamw", learning_rate=2e-3)
    return {**recipe, "tau": 10}

  def __init__(
    self,
    loss_fn,
    *,
    tau=1,
    learning_rate=None,
    optimizer=None,
    outer_learning_rate=0.7,
    outer_momentum=0.9,
  ):
    core.check_hyperparameters(tau=tau)
    if not (0 <= outer_momentum < 1 and outer_learning_rate > 0):
      raise ValueError(
        f"outer_learning_rate must be > 0 and outer_momentum in [0, 1) (got "
        f"{outer_learning_rate!r}, {outer_momentum!r})"
      )
    self.tau = tau
    if optimizer is None:
      core.check_hyperparameters(learning_rate=learning_rate)
      optimizer = optax.adamw(learning_rate)
    self.optimizer = optimizer
    self.outer = outer_optimizer(outer_learning_rate, outer_momentum)
    inner_step = core.make_sgd_step(loss_fn, self.optimizer)

    def local_step(state, batch):
      local, opt_state, loss = inner_step(state.local, state.opt_state, batch)
      return state._replace(local=local, opt_state=opt_state), loss

    def outer_step(state, batch):
      local, opt_state, loss = inner_step(state.local, state.opt_state, batch)
      average = collectives.replica_mean(local)
      pseudo_gradient = jax.tree.map(jnp.subtract, state.center, average)
      updates, outer_state = self.outer.update(pseudo_gradient, state.outer_state, state.center)
      center = optax.apply_updates(state.center, updates)
      return DiLoCoState(center, outer_state, center, opt_state), loss

    self.phases = (local_step, outer_step)

  @classmethod
  def from_config(cls, config, loss_fn):
    return cls(
      loss_fn,
      tau=config.tau,
      optimizer=cls.inner_optimizer(config),
      outer_learning_rate=config.outer_learning_rate,
      outer_momentum=config.outer_momentum,
    )

  def init(self, params_host) -> DiLoCoState:
    return DiLoCoState(
      params_host, self.outer.init(params_host), params_host, self.optimizer.init(params_host)
    )

  def eval_params(self, state):
    return state.center

  def worker_point(self, state):
    return state.local
