"""Synchronous data-parallel SGD: the seed's data parallelism on P devices.

The training set is split into P parts, one per device. Every step each device computes the
subgradient of its own batch, an all-reduce combines them, and every replica applies the same
update, so the replicas never drift apart: the seed's "master sums the subgradients, then
broadcasts W", without a master. With per-device mean losses the gradient of the mean loss over
all P*b samples is the *mean* of the device gradients, hence `replica_mean` (a sum scaled 1/P):

  every step     W <- W + u((1/P) sum_i Delta W^i)      (one all-reduce)

With --model_parallel=M the replicas form the data axis of a (P / M, M) mesh and each layer is
split across the model axis; the step is then one program over the whole batch, whose mean loss
makes XLA sum the data-parallel gradients itself.
"""

from typing import Any, NamedTuple

from easgd_jax import collectives, core
from easgd_jax.algorithms.base import StepRule


class SyncSGDState(NamedTuple):
  params: Any  # W, the same on every replica
  opt_state: Any


class SyncSGD(StepRule):
  name = "sync_sgd"
  data_parallel = True
  model_parallel = True

  def __init__(self, loss_fn, *, learning_rate=None, momentum=0.0, optimizer=None):
    self.optimizer = core.inner_or_default(optimizer, learning_rate, momentum)
    sgd_step = core.make_sgd_step(loss_fn, self.optimizer, collectives.replica_mean)

    def step(state, batch):
      params, opt_state, loss = sgd_step(state.params, state.opt_state, batch)
      return SyncSGDState(params, opt_state), loss

    self.phases = (step,)

  @classmethod
  def from_config(cls, config, loss_fn):
    return cls(loss_fn, optimizer=cls.inner_optimizer(config))

  def init(self, params_host) -> SyncSGDState:
    return SyncSGDState(params_host, self.optimizer.init(params_host))
