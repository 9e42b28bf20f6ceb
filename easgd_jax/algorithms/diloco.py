"""DiLoCo (Douillard et al., 2023): local SGD whose averaging step is an outer optimizer.

  every step     W^i <- W^i + u_i(Delta W^i)            inner optimizer, AdamW by default
  every tau-th   g_outer = W-bar - (1/G) sum_i W^i      the pseudo-gradient (one all-reduce)
                 W-bar <- W-bar + outer(g_outer)        Nesterov SGD, lr 0.7, momentum 0.9
                 W^i <- W-bar                           every worker restarts from the center

Both optimizers are optax. Each worker's inner state stays its own across rounds; the outer
state is the same on every device (every device computes the same outer step). With outer
learning rate 1 and no outer momentum, W-bar <- mean_i W^i: DiLoCo is then local SGD.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from easgd_jax import core, devices
from easgd_jax.algorithms.base import Defaults


class DiLoCoState(NamedTuple):
  center: Any  # W-bar, the global model, one identical copy per device
  outer_state: Any  # the outer optimizer's state, one identical copy per device
  locals: Any  # W^i, leading axis: this process's devices
  opt_states: Any  # each worker's own inner optimizer state
  step: int


def outer_optimizer(learning_rate=0.7, momentum=0.9):
  """The paper's outer step: SGD with Nesterov momentum on the pseudo-gradient."""
  return optax.sgd(learning_rate, momentum=momentum or None, nesterov=bool(momentum))


class DiLoCo(Defaults):
  name = "diloco"
  data_parallel = True
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
  ):
    core.check_hyperparameters(tau=tau, num_devices=num_devices)
    if not (0 <= outer_momentum < 1 and outer_learning_rate > 0):
      raise ValueError(
        f"outer_learning_rate must be > 0 and outer_momentum in [0, 1) (got "
        f"{outer_learning_rate!r}, {outer_momentum!r})"
      )
    self.devices = devices.replica_devices(num_devices)
    self.batches_per_step = num_devices
    self.local_ids = devices.local_replica_ids(self.devices)
    self.tau = tau
    if optimizer is None:
      core.check_hyperparameters(learning_rate=learning_rate)
      optimizer = optax.adamw(learning_rate)
    self.optimizer = optimizer
    self.outer = outer_optimizer(outer_learning_rate, outer_momentum)
    inner_step = core.make_sgd_step(loss_fn, self.optimizer)

    def local_step(local, opt_state, center, outer_state, batch):
      local, opt_state, loss = inner_step(local, opt_state, batch)
      return local, opt_state, center, outer_state, loss

    def outer_step(local, opt_state, center, outer_state, batch):
      local, opt_state, loss = inner_step(local, opt_state, batch)
      average = lax.pmean(local, devices.AXIS)
      pseudo_gradient = jax.tree.map(jnp.subtract, center, average)
      updates, outer_state = self.outer.update(pseudo_gradient, outer_state, center)
      center = optax.apply_updates(center, updates)
      return center, opt_state, center, outer_state, loss

    self._steps = (devices.pmap(local_step, self.devices), devices.pmap(outer_step, self.devices))
    self.max_in_flight = devices.max_in_flight(self.devices)

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    return cls(
      loss_fn,
      num_devices=config.num_devices,
      tau=config.tau,
      optimizer=cls.inner_optimizer(config),
      outer_learning_rate=config.outer_learning_rate,
      outer_momentum=config.outer_momentum,
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

  def step(self, state: DiLoCoState, batch_local):
    batch = devices.put_replicas(batch_local, self.devices)
    outer = (state.step + 1) % self.tau == 0  # after the tau-th inner step of a round
    local, opt_state, center, outer_state, loss = self._steps[outer](
      state.locals, state.opt_states, state.center, state.outer_state, batch
    )
    return DiLoCoState(center, outer_state, local, opt_state, state.step + 1), loss

  def eval_params(self, state: DiLoCoState):
    return devices.first_replica(state.center)

  def worker_points(self, state: DiLoCoState):
    return devices.local_replicas(state.locals)
