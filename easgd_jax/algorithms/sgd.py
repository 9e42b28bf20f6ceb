"""SGD on one device, W <- W - eta * Delta W: the baseline for every parallel algorithm.

With --model_parallel=M the same step runs on a 1 x M mesh, every layer split across the M
devices (the local engine's placement; easgd_jax/partitioning.py says where each slice lives).
"""

from typing import Any, NamedTuple

from easgd_jax import core
from easgd_jax.algorithms.base import StepRule


class SGDState(NamedTuple):
  params: Any  # W
  opt_state: Any  # the inner optimizer's state


class SGD(StepRule):
  name = "sgd"
  model_parallel = True

  def __init__(self, loss_fn, *, learning_rate=None, momentum=0.0, optimizer=None):
    """`optimizer`: any optax transformation; default SGD at `learning_rate` (Nesterov with
    `momentum`)."""
    self.optimizer = core.inner_or_default(optimizer, learning_rate, momentum)
    sgd_step = core.make_sgd_step(loss_fn, self.optimizer)

    def step(state, batch):
      params, opt_state, loss = sgd_step(state.params, state.opt_state, batch)
      return SGDState(params, opt_state), loss

    self.phases = (step,)

  @classmethod
  def from_config(cls, config, loss_fn):
    return cls(loss_fn, optimizer=cls.inner_optimizer(config))

  def init(self, params_host) -> SGDState:
    return SGDState(params_host, self.optimizer.init(params_host))
