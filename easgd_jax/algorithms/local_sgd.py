"""Local SGD: every worker takes tau inner steps on its own data, then all average their weights.

  every step     W^i <- W^i + u_i(Delta W^i)                      (each worker, no communication)
  every tau-th   W^i <- W-bar <- (1/G) sum_i W^i                  (one all-reduce)

the averaging (`phases[1]`) following that step's inner step, on steps tau - 1, 2 tau - 1, ...
(counting from 0).

u_i is worker i's inner optimizer, whose state (momentum, AdamW moments) stays its own across
rounds: neither averaged nor reset. A step is one inner step of every worker, G * b samples
from the same sharded streams as sync_sgd; with tau = 1 and SGD (or momentum) it *is* sync_sgd,
since averaging weights after a linear update equals updating with the averaged gradient.
W-bar, the last average, is what gets evaluated.
"""

from typing import Any, NamedTuple

from easgd_jax import core, devices
from easgd_jax.algorithms.base import DataParallel


class LocalSGDState(NamedTuple):
  center: Any  # W-bar, the last average, one identical copy per device
  locals: Any  # W^i, leading axis: this process's devices
  opt_states: Any  # each worker's own inner optimizer state
  step: int


class LocalSGD(DataParallel):
  name = "local_sgd"

  def __init__(
    self,
    loss_fn,
    *,
    num_devices,
    tau=1,
    learning_rate=None,
    momentum=0.0,
    optimizer=None,
    fused=False,
    available_devices=None,
  ):
    core.check_hyperparameters(tau=tau, num_devices=num_devices)
    self._place(num_devices, fused, available_devices)
    self.tau = tau
    self.optimizer = core.inner_or_default(optimizer, learning_rate, momentum)
    inner_step = core.make_sgd_step(loss_fn, self.optimizer)

    def local_step(state, batch):
      local, opt_state, loss = inner_step(state.locals, state.opt_states, batch)
      return state._replace(locals=local, opt_states=opt_state), loss

    def averaging_step(state, batch):
      local, opt_state, loss = inner_step(state.locals, state.opt_states, batch)
      average = self.replica_mean(local)
      return LocalSGDState(average, average, opt_state, None), loss

    self.phases = (local_step, averaging_step)

  def phase(self, step):
    return int((step + 1) % self.tau == 0)  # after the tau-th inner step of a round

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    return cls(
      loss_fn,
      num_devices=config.num_devices,
      tau=config.tau,
      optimizer=cls.inner_optimizer(config),
      **cls.placement(config, available_devices),
    )

  def init(self, params_host) -> LocalSGDState:
    replicated = devices.replicate(params_host, self.devices)
    opt_states = devices.replicate(self.optimizer.init(params_host), self.devices)
    return LocalSGDState(replicated, replicated, opt_states, 0)

  def eval_params(self, state: LocalSGDState):
    return devices.first_replica(state.center)

  def worker_points(self, state: LocalSGDState):
    return devices.local_replicas(state.locals)
