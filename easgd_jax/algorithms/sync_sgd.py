"""Synchronous data-parallel SGD: the seed's data parallelism on P devices.

The training set is split into P parts, one per device. Every step each device computes the
subgradient of its own batch, an all-reduce combines them, and every replica applies the same
update, so the replicas never drift apart: the seed's "master sums the subgradients, then
broadcasts W", without a master. With per-device mean losses the gradient of the mean loss over
all P*b samples is the *mean* of the device gradients, hence `pmean` (a sum scaled by 1/P):

  every step     W <- W + u((1/P) sum_i Delta W^i)      (one all-reduce)
"""

from typing import Any, NamedTuple

from easgd_jax import core, devices
from easgd_jax.algorithms.base import DataParallel


class SyncSGDState(NamedTuple):
  params: Any  # W, one identical copy per device (leading axis: this process's devices)
  opt_state: Any
  step: int


class SyncSGD(DataParallel):
  name = "sync_sgd"
  model_parallel = True

  def __init__(
    self,
    loss_fn,
    *,
    num_devices,
    learning_rate=None,
    momentum=0.0,
    optimizer=None,
    fused=False,
    available_devices=None,
  ):
    core.check_hyperparameters(num_devices=num_devices)
    self._place(num_devices, fused, available_devices)
    self.optimizer = core.inner_or_default(optimizer, learning_rate, momentum)
    sgd_step = core.make_sgd_step(loss_fn, self.optimizer, self.replica_mean)

    def step(state, batch):
      params, opt_state, loss = sgd_step(state.params, state.opt_state, batch)
      return SyncSGDState(params, opt_state, None), loss

    self.phases = (step,)

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    if config.model_parallel > 1:  # the same step on a (P / M, M) mesh
      from easgd_jax.algorithms.model_parallel import ModelParallelSGD

      return ModelParallelSGD.from_config(config, loss_fn)
    return cls(
      loss_fn,
      num_devices=config.num_devices,
      optimizer=cls.inner_optimizer(config),
      **cls.placement(config, available_devices),
    )

  def init(self, params_host) -> SyncSGDState:
    return SyncSGDState(
      params=devices.replicate(params_host, self.devices),
      opt_state=devices.replicate(self.optimizer.init(params_host), self.devices),
      step=0,
    )

  def eval_params(self, state: SyncSGDState):
    return devices.first_replica(state.params)
