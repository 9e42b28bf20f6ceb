"""Synchronous EASGD: every worker steps at once, and the center lives on the devices.

Each of the P devices holds its local W^i and an identical copy of the center W-bar. On an
exchange step (every tau-th step, counting from the first) all devices at once apply

  Eq. (1)  W^i <- W^i - eta * (Delta W^i + rho * (W^i - W-bar))
  Eq. (2)  W-bar <- W-bar + eta * rho * sum_i (W^i - W-bar)      (the sum is one all-reduce)

so the center never leaves the devices: no host round trip, which is what made Sync EASGD
5.3x faster than the original in the SC'17 paper. Other steps are local SGD with no
communication. With --momentum the local step is Nesterov momentum (EAMSGD).
"""

from typing import Any, NamedTuple

from jax import lax

from easgd_jax import core, devices


class SyncEASGDState(NamedTuple):
  center: Any  # W-bar, one identical copy per device
  locals: Any  # W^i, leading axis: this process's devices
  opt_states: Any
  step: int


class SyncEASGD:
  def __init__(self, loss_fn, *, num_devices, learning_rate, rho, tau=1, momentum=0.0):
    core.check_hyperparameters(
      learning_rate=learning_rate, momentum=momentum, rho=rho, tau=tau, num_devices=num_devices
    )
    self.devices = devices.replica_devices(num_devices)
    self.replicas = num_devices
    self.local_ids = devices.local_replica_ids(self.devices)
    self.tau = tau
    self.optimizer = core.local_optimizer(learning_rate, momentum)
    eta = learning_rate

    local_step = core.make_elastic_step(loss_fn, self.optimizer, eta, rho)  # Eq. (1)

    def elastic_step(local, opt_state, center, batch):
      differences = lax.psum(core.elastic_difference(local, center), devices.AXIS)
      new_center = core.elastic_center_update(center, differences, eta, rho)  # Eq. (2)
      local, opt_state, loss = local_step(local, opt_state, center, batch)
      return local, opt_state, new_center, loss

    self._elastic_step = devices.pmap(elastic_step, self.devices)
    self._sgd_step = devices.pmap(core.make_sgd_step(loss_fn, self.optimizer), self.devices)
    self.max_in_flight = devices.max_in_flight(self.devices)

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
      local, opt_state, center, loss = self._elastic_step(
        state.locals, state.opt_states, center, batch
      )
    else:
      local, opt_state, loss = self._sgd_step(state.locals, state.opt_states, batch)
    return SyncEASGDState(center, local, opt_state, state.step + 1), loss

  def eval_params(self, state: SyncEASGDState):
    return devices.first_replica(state.center)
