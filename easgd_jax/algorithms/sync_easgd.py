"""Synchronous EASGD: every worker steps at once, and the center lives with the replicas.

Each of the P replicas holds its local W^i and an identical copy of the center W-bar. On an
exchange step (every tau-th step, counting from the first: `phases[1]`) all of them at once apply

  Eq. (1)  W^i <- W^i + u(Delta W^i) - alpha * (x^i - W-bar)
  Eq. (2)  W-bar <- W-bar + alpha * sum_i (x^i - W-bar)      (the sum is one all-reduce)

so the center never leaves the devices: no host round trip, which is what made Sync EASGD
5.3x faster than the original in the SC'17 paper. Other steps are local steps with no
communication (`phases[0]`: Eq. (1) without its pull). u is the inner optimizer's update; x^i is
W^i, or with Nesterov momentum (EAMSGD) W^i less its look-ahead shift (elastic.py).
"""

from typing import Any, NamedTuple

from easgd_jax import collectives, core, elastic
from easgd_jax.algorithms.base import StepRule


class SyncEASGDState(NamedTuple):
  center: Any  # W-bar, the same on every replica
  local: Any  # W^i
  opt_state: Any  # its elastic optimizer state (its count, its inner state)


class SyncEASGD(StepRule):
  name = "sync_easgd"
  data_parallel = True
  elastic = True
  all_at_once = True
  opens_round = True  # the exchange on steps 0, tau, 2 tau, ...

  def __init__(
    self,
    loss_fn,
    *,
    learning_rate=None,
    rho=None,
    tau=1,
    momentum=0.0,
    alpha=None,
    optimizer=None,
  ):
    core.check_hyperparameters(momentum=momentum, tau=tau)
    self.tau = tau
    alpha = core.moving_rate(alpha, learning_rate, rho)
    inner = core.inner_or_default(optimizer, learning_rate, momentum)
    self.optimizer = elastic.elastic(inner, alpha, tau)
    elastic_step = core.make_elastic_step(loss_fn, self.optimizer)  # Eq. (1)

    def local_step(state, batch):  # the gate e is 0: no pull, no collective
      local, opt_state, loss = elastic_step(state.local, state.opt_state, state.center, batch)
      return state._replace(local=local, opt_state=opt_state), loss

    def exchange_step(state, batch):  # e is 1: Eq. (1) against the old center, and Eq. (2)
      gaps = collectives.replica_sum(elastic.gap(state.local, state.opt_state, state.center))
      local, opt_state, loss = elastic_step(state.local, state.opt_state, state.center, batch)
      center = elastic.center_update(state.center, gaps, alpha)
      return SyncEASGDState(center, local, opt_state), loss

    self.phases = (local_step, exchange_step)

  @classmethod
  def from_config(cls, config, loss_fn):
    return cls(
      loss_fn, alpha=config.moving_rate, tau=config.tau, optimizer=cls.inner_optimizer(config)
    )

  def init(self, params_host) -> SyncEASGDState:
    return SyncEASGDState(params_host, params_host, self.optimizer.init(params_host))

  def eval_params(self, state):
    return state.center

  def worker_point(self, state):
    return elastic.point(state.local, state.opt_state)
