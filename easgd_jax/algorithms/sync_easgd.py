"""Synchronous EASGD: every worker steps at once, and the center lives on the devices.

Each of the P devices holds its local W^i and an identical copy of the center W-bar. On an
exchange step (every tau-th step, counting from the first) all devices at once apply

  Eq. (1)  W^i <- W^i + u(Delta W^i) - alpha * (x^i - W-bar)
  Eq. (2)  W-bar <- W-bar + alpha * sum_i (x^i - W-bar)      (the sum is one all-reduce)

so the center never leaves the devices: no host round trip, which is what made Sync EASGD
5.3x faster than the original in the SC'17 paper. Other steps are local steps with no
communication. u is the inner optimizer's update; x^i is W^i, or with Nesterov momentum
(EAMSGD) W^i less its look-ahead shift (elastic.py).
"""

from typing import Any, NamedTuple

from jax import lax

from easgd_jax import core, devices, elastic
from easgd_jax.algorithms.base import Defaults


class SyncEASGDState(NamedTuple):
  center: Any  # W-bar, one identical copy per device
  locals: Any  # W^i, leading axis: this process's devices
  opt_states: Any
  step: int


class SyncEASGD(Defaults):
  name = "sync_easgd"
  data_parallel = True
  elastic = True
  all_at_once = True

  def __init__(
    self,
    loss_fn,
    *,
    num_devices,
    learning_rate=None,
    rho=None,
    tau=1,
    momentum=0.0,
    alpha=None,
    optimizer=None,
  ):
    core.check_hyperparameters(momentum=momentum, tau=tau, num_devices=num_devices)
    self.devices = devices.replica_devices(num_devices)
    self.batches_per_step = num_devices
    self.local_ids = devices.local_replica_ids(self.devices)
    self.tau = tau
    alpha = core.moving_rate(alpha, learning_rate, rho)
    inner = core.inner_or_default(optimizer, learning_rate, momentum)
    self.optimizer = elastic.elastic(inner, alpha, tau)
    local_step = core.make_elastic_step(loss_fn, self.optimizer)  # Eq. (1)

    def exchange_step(local, opt_state, center, batch):
      gaps = lax.psum(elastic.gap(local, opt_state, center), devices.AXIS)
      new_center = elastic.center_update(center, gaps, alpha)  # Eq. (2)
      local, opt_state, loss = local_step(local, opt_state, center, batch)
      return local, opt_state, new_center, loss

    self._exchange_step = devices.pmap(exchange_step, self.devices)
    self._local_step = devices.pmap(local_step, self.devices)  # the gate is 0: no collective
    self.max_in_flight = devices.max_in_flight(self.devices)

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    return cls(
      loss_fn,
      num_devices=config.num_devices,
      alpha=config.moving_rate,
      tau=config.tau,
      optimizer=cls.inner_optimizer(config),
    )

  def init(self, params_host) -> SyncEASGDState:
    return SyncEASGDState(
      center=devices.replicate(params_host, self.devices),
      locals=devices.replicate(params_host, self.devices),
      opt_states=devices.replicate(self.optimizer.init(params_host), self.devices),
      step=0,
    )

  def step(self, state: SyncEASGDState, batch_local):
    batch = devices.put_replicas(batch_local, self.devices)
    center = state.center
    if state.step % self.tau == 0:
      local, opt_state, center, loss = self._exchange_step(
        state.locals, state.opt_states, center, batch
      )
    else:
      local, opt_state, loss = self._local_step(state.locals, state.opt_states, center, batch)
    return SyncEASGDState(center, local, opt_state, state.step + 1), loss

  def eval_params(self, state: SyncEASGDState):
    return devices.first_replica(state.center)

  def worker_points(self, state: SyncEASGDState):
    pairs = zip(
      devices.local_replicas(state.locals), devices.local_replicas(state.opt_states), strict=True
    )
    return [elastic.point(local, opt_state) for local, opt_state in pairs]
