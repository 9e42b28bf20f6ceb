"""DiLoCo (Douillard et al., 2023): local SGD whose averaging step is an outer optimizer.

  every step     W^i <- W^i + u_i(Delta W^i)            inner optimizer, AdamW by default
  every tau-th   g_outer = W-bar - (1/G) sum_i W^i      the pseudo-gradient (one all-reduce)
                 W-bar <- W-bar + outer(g_outer)        Nesterov SGD, lr 0.7, momentum 0.9
                 W^i <- W-bar                           every worker restarts from the center

the outer step (`phases[1]`) following that step's inner step, on steps tau - 1, 2 tau - 1, ...
(counting from 0).

Both optimizers are optax. Each worker's inner state stays its own across rounds; the outer
state is the same on every device (every device computes the same outer step). With outer
learning rate 1 and no outer momentum, W-bar <- mean_i W^i: DiLoCo is then local SGD.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from easgd_jax import core, devices
from easgd_jax.algorithms.base import DataParallel


class DiLoCoState(NamedTuple):
  center: Any  # W-bar, the global model, one identical copy per device
  outer_state: Any  # the outer optimizer's state, one identical copy per device
  locals: Any  # W^i, leading axis: this process's devices
  opt_states: Any  # each worker's own inner optimizer state
  step: int


def outer_optimizer(learning_rate=0.7, momentum=0.9):
  """The paper's outer step: SGD with Nesterov momentum on the pseudo-gradient."""
  return optax.sgd(learning_rate, momentum=momentum or None, nesterov=bool(momentum))


class DiLoCo(DataParallel):
  name = "diloco"
  default_optimizer = "adamw"

  def __init__(
    self,
    loss_fn,
    *,
    num_devices,
    tau=1,
    learning_rate=None,
    optimizer=None,
    outer_learning_rate=0.7,
    outer_momentum=0.9,
    fused=False,
    available_devices=None,
  ):
    core.check_hyperparameters(tau=tau, num_devices=num_devices)
    if not (0 <= outer_momentum < 1 and outer_learning_rate > 0):
      raise ValueError(
        f"outer_learning_rate must be > 0 and outer_momentum in [0, 1) (got "
        f"{outer_learning_rate!r}, {outer_momentum!r})"
      )
    self._place(num_devices, fused, available_devices)
    self.tau = tau
    if optimizer is None:
      core.check_hyperparameters(learning_rate=learning_rate)
      optimizer = optax.adamw(learning_rate)
    self.optimizer = optimizer
    self.outer = outer_optimizer(outer_learning_rate, outer_momentum)
    inner_step = core.make_sgd_step(loss_fn, self.optimizer)

    def local_step(state, batch):
      local, opt_state, loss = inner_step(state.locals, state.opt_states, batch)
      return state._replace(locals=local, opt_states=opt_state), loss

    def outer_step(state, batch):
      local, opt_state, loss = inner_step(state.locals, state.opt_states, batch)
      average = self.replica_mean(local)
      pseudo_gradient = jax.tree.map(jnp.subtract, state.center, average)
      updates, outer_state = self.outer.update(pseudo_gradient, state.outer_state, state.center)
      center = optax.apply_updates(state.center, updates)
      return DiLoCoState(center, outer_state, center, opt_state, None), loss

    self.phases = (local_step, outer_step)

  def phase(self, step):
    return int((step + 1) % self.tau == 0)  # after the tau-th inner step of a round

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    return cls(
      loss_fn,
      num_devices=config.num_devices,
      tau=config.tau,
      optimizer=cls.inner_optimizer(config),
      outer_learning_rate=config.outer_learning_rate,
      outer_momentum=config.outer_momentum,
      **cls.placement(config, available_devices),
    )

  def init(self, params_host) -> DiLoCoState:
    replicated = devices.replicate(params_host, self.devices)
    return DiLoCoState(
      center=replicated,
      outer_state=devices.replicate(self.outer.init(params_host), self.devices),
      locals=replicated,
      opt_states=devices.replicate(self.optimizer.init(params_host), self.devices),
      step=0,
    )

  def eval_params(self, state: DiLoCoState):
    return devices.first_replica(state.center)

  def worker_points(self, state: DiLoCoState):
    return devices.local_replicas(state.locals)
