"""Synchronous data-parallel SGD: the seed's data parallelism on P devices.

The training set is split into P parts, one per device. Every step each device computes the
subgradient of its own batch, an all-reduce combines them, and every replica applies the same
update, so the replicas never drift apart: the seed's "master sums the subgradients, then
broadcasts W", without a master. With per-device mean losses the gradient of the mean loss over
all P*b samples is the *mean* of the device gradients, hence `pmean` (a sum scaled by 1/P).
"""

from typing import Any, NamedTuple

from jax import lax

from easgd_jax import core, devices
from easgd_jax.algorithms.base import Defaults


class SyncSGDState(NamedTuple):
  params: Any  # W, one identical copy per device (leading axis: this process's devices)
  opt_state: Any
  step: int


class SyncSGD(Defaults):
  name = "sync_sgd"
  data_parallel = True
  model_parallel = True

  def __init__(self, loss_fn, *, num_devices, learning_rate=None, momentum=0.0, optimizer=None):
    core.check_hyperparameters(num_devices=num_devices)
    self.devices = devices.replica_devices(num_devices)
    self.batches_per_step = num_devices  # per-device batches per step, across all processes
    self.local_ids = devices.local_replica_ids(self.devices)
    self.optimizer = core.inner_or_default(optimizer, learning_rate, momentum)
    step = core.make_sgd_step(loss_fn, self.optimizer, lambda g: lax.pmean(g, devices.AXIS))
    self._sgd_step = devices.pmap(step, self.devices)
    self.max_in_flight = devices.max_in_flight(self.devices)

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    if config.model_parallel > 1:  # the same step on a (P / M, M) mesh
      from easgd_jax.algorithms.model_parallel import ModelParallelSGD

      return ModelParallelSGD.from_config(config, loss_fn)
    return cls(loss_fn, num_devices=config.num_devices, optimizer=cls.inner_optimizer(config))

  def init(self, params_host) -> SyncSGDState:
    return SyncSGDState(
      params=devices.replicate(params_host, self.devices),
      opt_state=devices.replicate(self.optimizer.init(params_host), self.devices),
      step=0,
    )

  def step(self, state: SyncSGDState, batch_local):
    """batch_local: this process's batches, leading axis one per local device."""
    batch = devices.put_replicas(batch_local, self.devices)
    params, opt_state, loss = self._sgd_step(state.params, state.opt_state, batch)
    return SyncSGDState(params, opt_state, state.step + 1), loss

  def eval_params(self, state: SyncSGDState):
    return devices.first_replica(state.params)
