"""SGD on one device, W <- W - eta * Delta W: the baseline for every parallel algorithm."""

from typing import Any, NamedTuple

import jax

from easgd_jax import core, devices
from easgd_jax.algorithms.base import Defaults


class SGDState(NamedTuple):
  params: Any  # W, on the device
  opt_state: Any  # the inner optimizer's state
  step: int  # iterations done


class SGD(Defaults):
  name = "sgd"
  model_parallel = True
  batches_per_step = 1

  def __init__(self, loss_fn, *, learning_rate=None, momentum=0.0, optimizer=None, device=None):
    """`optimizer`: any optax transformation; default SGD at `learning_rate` (Nesterov with
    `momentum`)."""
    self.device = device or jax.devices()[0]
    self.devices = [self.device]
    self.optimizer = core.inner_or_default(optimizer, learning_rate, momentum)
    sgd_step = core.make_sgd_step(loss_fn, self.optimizer)

    def step(state, batch):  # in DataParallel's replica form, for the simulated engine's vmap
      params, opt_state, loss = sgd_step(state.params, state.opt_state, batch)
      return SGDState(params, opt_state, None), loss

    self.phases = (step,)
    self._step = jax.jit(step)

  def phase(self, step):
    return 0

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    if config.model_parallel > 1:  # the same step on a (1, M) mesh
      from easgd_jax.algorithms.model_parallel import ModelParallelSGD

      return ModelParallelSGD.from_config(config, loss_fn)
    return cls(loss_fn, optimizer=cls.inner_optimizer(config))

  def init(self, params_host) -> SGDState:
    params = devices.put(params_host, self.device)
    return SGDState(params, devices.put(self.optimizer.init(params_host), self.device), 0)

  def step(self, state: SGDState, batch_host):
    """One iteration on a host batch; returns the new state and the batch loss (on device)."""
    batch = devices.put(batch_host, self.device)
    new, loss = self._step(state._replace(step=None), batch)
    return new._replace(step=state.step + 1), loss

  def eval_params(self, state: SGDState):
    return state.params
