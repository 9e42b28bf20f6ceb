"""Local SGD: every worker takes tau inner steps on its own data, then all average their weights.

  every step     W^i <- W^i + u_i(Delta W^i)                      (each worker, no communication)
  every tau-th   W^i <- W-bar <- (1/G) sum_i W^i                  (one all-reduce)

u_i is worker i's inner optimizer, whose state (momentum, AdamW moments) stays its own across
rounds: neither averaged nor reset. A step is one inner step of every worker, G * b samples
from the same sharded streams as sync_sgd; with tau = 1 and SGD (or momentum) it *is* sync_sgd,
since averaging weights after a linear update equals updating with the averaged gradient.
W-bar, the last average, is what gets evaluated.
"""

from typing import Any, NamedTuple

from jax import lax

from easgd_jax import core, devices
from easgd_jax.algorithms.base import Defaults


class LocalSGDState(NamedTuple):
  center: Any  # W-bar, the last average, one identical copy per device
  locals: Any  # W^i, leading axis: this process's devices
  opt_states: Any  # each worker's own inner optimizer state
  step: int


class LocalSGD(Defaults):
  name = "local_sgd"
  data_parallel = True

  def __init__(
    self, loss_fn, *, num_devices, tau=1, learning_rate=None, momentum=0.0, optimizer=None
  ):
    core.check_hyperparameters(tau=tau, num_devices=num_devices)
    self.devices = devices.replica_devices(num_devices)
    self.batches_per_step = num_devices
    self.local_ids = devices.local_replica_ids(self.devices)
    self.tau = tau
    self.optimizer = core.inner_or_default(optimizer, learning_rate, momentum)
    inner_step = core.make_sgd_step(loss_fn, self.optimizer)

    def local_step(local, opt_state, center, batch):
      local, opt_state, loss = inner_step(local, opt_state, batch)
      return local, opt_state, center, loss

    def averaging_step(local, opt_state, center, batch):
      local, opt_state, loss = inner_step(local, opt_state, batch)
      average = lax.pmean(local, devices.AXIS)
      return average, opt_state, average, loss

    self._steps = (
      devices.pmap(local_step, self.devices),
      devices.pmap(averaging_step, self.devices),
    )
    self.max_in_flight = devices.max_in_flight(self.devices)

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    return cls(
      loss_fn, num_devices=config.num_devices, tau=config.tau, optimizer=cls.inner_optimizer(config)
    )

  def init(self, params_host) -> LocalSGDState:
    replicated = devices.replicate(params_host, self.devices)
    opt_states = devices.replicate(self.optimizer.init(params_host), self.devices)
    return LocalSGDState(replicated, replicated, opt_states, 0)

  def step(self, state: LocalSGDState, batch_local):
    batch = devices.put_replicas(batch_local, self.devices)
    averaging = (state.step + 1) % self.tau == 0  # after the tau-th inner step of a round
    local, opt_state, center, loss = self._steps[averaging](
      state.locals, state.opt_states, state.center, batch
    )
    return LocalSGDState(center, local, opt_state, state.step + 1), loss

  def eval_params(self, state: LocalSGDState):
    return devices.first_replica(state.center)

  def worker_points(self, state: LocalSGDState):
    return devices.local_replicas(state.locals)
