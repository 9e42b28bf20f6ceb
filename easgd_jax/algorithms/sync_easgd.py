"""Synchronous EASGD: every worker steps at once, and the center lives on the devices.

Each of the P devices holds its local W^i and an identical copy of the center W-bar. On an
exchange step (every tau-th step, counting from the first: `phases[1]`) all devices at once apply

  Eq. (1)  W^i <- W^i + u(Delta W^i) - alpha * (x^i - W-bar)
  Eq. (2)  W-bar <- W-bar + alpha * sum_i (x^i - W-bar)      (the sum is one all-reduce)

so the center never leaves the devices: no host round trip, which is what made Sync EASGD
5.3x faster than the original in the SC'17 paper. Other steps are local steps with no
communication (`phases[0]`: Eq. (1) without its pull). u is the inner optimizer's update; x^i is
W^i, or with Nesterov momentum (EAMSGD) W^i less its look-ahead shift (elastic.py).
"""

from typing import Any, NamedTuple

from easgd_jax import core, devices, elastic
from easgd_jax.algorithms.base import DataParallel


class SyncEASGDState(NamedTuple):
  center: Any  # W-bar, one identical copy per device
  locals: Any  # W^i, leading axis: this process's devices
  opt_states: Any
  step: int


class SyncEASGD(DataParallel):
  name = "sync_easgd"
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
    fused=False,
    available_devices=None,
  ):
    core.check_hyperparameters(momentum=momentum, tau=tau, num_devices=num_devices)
    self._place(num_devices, fused, available_devices)
    self.tau = tau
    alpha = core.moving_rate(alpha, learning_rate, rho)
    inner = core.inner_or_default(optimizer, learning_rate, momentum)
    self.optimizer = elastic.elastic(inner, alpha, tau)
    elastic_step = core.make_elastic_step(loss_fn, self.optimizer)  # Eq. (1)

    def local_step(state, batch):  # the gate e is 0: no pull, no collective
      local, opt_state, loss = elastic_step(state.locals, state.opt_states, state.center, batch)
      return state._replace(locals=local, opt_states=opt_state), loss

    def exchange_step(state, batch):  # e is 1: Eq. (1) against the old center, and Eq. (2)
      gaps = self.replica_sum(elastic.gap(state.locals, state.opt_states, state.center))
      local, opt_state, loss = elastic_step(state.locals, state.opt_states, state.center, batch)
      center = elastic.center_update(state.center, gaps, alpha)
      return SyncEASGDState(center, local, opt_state, None), loss

    self.phases = (local_step, exchange_step)

  def phase(self, step):
    return int(step % self.tau == 0)  # steps 0, tau, 2 tau, ... exchange

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    return cls(
      loss_fn,
      num_devices=config.num_devices,
      alpha=config.moving_rate,
      tau=config.tau,
      optimizer=cls.inner_optimizer(config),
      **cls.placement(config, available_devices),
    )

  def init(self, params_host) -> SyncEASGDState:
    return SyncEASGDState(
      center=devices.replicate(params_host, self.devices),
      locals=devices.replicate(params_host, self.devices),
      opt_states=devices.replicate(self.optimizer.init(params_host), self.devices),
      step=0,
    )

  def eval_params(self, state: SyncEASGDState):
    return devices.first_replica(state.center)

  def worker_points(self, state: SyncEASGDState):
    pairs = zip(
      devices.local_replicas(state.locals), devices.local_replicas(state.opt_states), strict=True
    )
    return [elastic.point(local, opt_state) for local, opt_state in pairs]
