"""Local SGD: every worker takes tau inner steps on its own data, then all average their weights.

  every step     W^i <- W^i + u_i(Delta W^i)                      (each worker, no communication)
  every tau-th   W^i <- W-bar <- (1/G) sum_i W^i                  (one all-reduce)

the averaging (`phases[1]`) following that step's inner step, on steps tau - 1, 2 tau - 1, ...
(counting from 0).

u_i is worker i's inner optimizer, whose state (momentum, AdamW moments) stays its own across
rounds: neither averaged nor reset. A step is one inner step of every worker, G * b samples
from the same sharded streams as sync_sgd; with tau = 1 and SGD (or momentum) it *is* sync_sgd,
since averaging weights after a linear update equals updating with the averaged gradient.
W-bar, the last average, is what gets evaluated.
"""

from typing import Any, NamedTuple

from easgd_jax import collectives, core
from easgd_jax.algorithms.base import StepRule


class LocalSGDState(NamedTuple):
  center: Any  # W-bar, the last average, the same on every replica
  local: Any  # W^i
  opt_state: Any  # worker i's own inner optimizer state


class LocalSGD(StepRule):
  name = "local_sgd"
  data_parallel = True
  settings = {"tau": 4}  # tau = 1 is sync_sgd

  def __init__(self, loss_fn, *, tau=1, learning_rate=None, momentum=0.0, optimizer=None):
    core.check_hyperparameters(tau=tau)
    self.tau = tau
    self.optimizer = core.inner_or_default(optimizer, learning_rate, momentum)
    inner_step = core.make_sgd_step(loss_fn, self.optimizer)

    def local_step(state, batch):
      local, opt_state, loss = inner_step(state.local, state.opt_state, batch)
      return state._replace(local=local, opt_state=opt_state), loss

    def averaging_step(state, batch):
      local, opt_state, loss = inner_step(state.local, state.opt_state, batch)
      average = collectives.replica_mean(local)
      return LocalSGDState(average, average, opt_state), loss

    self.phases = (local_step, averaging_step)

  @classmethod
  def from_config(cls, config, loss_fn):
    return cls(loss_fn, tau=config.tau, optimizer=cls.inner_optimizer(config))

  def init(self, params_host) -> LocalSGDState:
    return LocalSGDState(params_host, params_host, self.optimizer.init(params_host))

  def eval_params(self, state):
    return state.center

  def worker_point(self, state):
    return state.local
