"""SGD on one device, W <- W - eta * Delta W: the baseline for every parallel algorithm."""

from typing import Any, NamedTuple

import jax

from easgd_jax import core, devices


class SGDState(NamedTuple):
  params: Any  # W, on the device
  opt_state: Any  # the optimizer's state (momentum trace when --momentum > 0)
  step: int  # iterations done


class SGD:
  replicas = 1  # one batch per iteration

  def __init__(self, loss_fn, *, learning_rate, momentum=0.0, device=None):
    core.check_hyperparameters(learning_rate=learning_rate, momentum=momentum)
    self.device = device or jax.devices()[0]
    self.devices = [self.device]
    self.optimizer = core.local_optimizer(learning_rate, momentum)
    self._sgd_step = jax.jit(core.make_sgd_step(loss_fn, self.optimizer))

  def init(self, params_host) -> SGDState:
    params = devices.put(params_host, self.device)
    return SGDState(params, devices.put(self.optimizer.init(params_host), self.device), 0)

  def step(self, state: SGDState, batch_host):
    """One iteration on a host batch; returns the new state and the batch loss (on device)."""
    batch = devices.put(batch_host, self.device)
    params, opt_state, loss = self._sgd_step(state.params, state.opt_state, batch)
    return SGDState(params, opt_state, state.step + 1), loss

  def eval_params(self, state: SGDState):
    return state.params
