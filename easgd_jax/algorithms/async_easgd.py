"""Asynchronous EASGD and Hogwild EASGD: each worker exchanges with the center when it is ready.

Every worker keeps its own W^i and takes local steps at its own pace. Its every tau-th own step
(its steps 0, tau, 2 tau, ...) opens with an exchange, first come first served:

  worker i sends x^i                                                       (worker_message)
  master:   read W-bar, then W-bar <- W-bar + alpha * (x^i - W-bar)        Eq. (2), replies the read
  worker i: W^i <- W^i + u(Delta W^i) - alpha * (x^i - W-bar_read)         Eq. (1), worker_step

(u the inner optimizer's update, x^i the worker's point: W^i, or W^i less its Nesterov look-ahead
for Async EAMSGD; elastic.py holds both equations.) Both equations use the same read, so the
elastic force moves W^i and W-bar by equal and opposite amounts.

`AsyncEASGD` is locked: the center is exactly the sequence of Eq. (2) updates in arrival order.
`HogwildEASGD` is the same rule unlocked: an engine may add Eq. (2)'s increment to a shared
center in place, computed from a read that another exchange may be halfway through (see
hogwild.py for what that can lose); an exchange by another worker between the read and the
write is added to, not overwritten. Round-robin EASGD (easgd.py) is the same rule in
Algorithm 1's order.

A worker's staleness at an exchange is the number of exchanges other workers made since its own
previous one: how far the center moved without it.
"""

from typing import Any, NamedTuple

import jax

from easgd_jax import core, elastic
from easgd_jax.algorithms.base import WorkerMasterRule


class WorkerState(NamedTuple):
  local: Any  # W^i
  opt_state: Any  # its elastic optimizer state (its own step count, its inner state)


class AsyncEASGD(WorkerMasterRule):
  name = "async_easgd"
  elastic = True
  opens_round = True
  additive = True

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
    """alpha, or rho with the base learning_rate (alpha = learning_rate * rho); `optimizer` is
    the inner optax transformation (default SGD at learning_rate, Nesterov with momentum)."""
    core.check_hyperparameters(momentum=momentum, tau=tau)
    self.tau = tau
    self.alpha = core.moving_rate(alpha, learning_rate, rho)
    inner = core.inner_or_default(optimizer, learning_rate, momentum)
    self.optimizer = elastic.elastic(inner, self.alpha, tau)
    self.elastic_step = core.make_elastic_step(loss_fn, self.optimizer)

  @classmethod
  def from_config(cls, config, loss_fn):
    return cls(
      loss_fn, alpha=config.moving_rate, tau=config.tau, optimizer=cls.inner_optimizer(config)
    )

  def master_init(self, params_host):
    return params_host  # W-bar

  def worker_init(self, params_host):
    return WorkerState(params_host, self.optimizer.init(params_host))

  def worker_message(self, worker):
    return elastic.point(worker.local, worker.opt_state)  # x^i

  def increment(self, center, x):
    return jax.tree.map(lambda xi, c: self.alpha * (xi - c), x, center)  # Eq. (2)'s change

  def worker_step(self, worker, view, batch):
    # Eq. (1) against the center read. A step that did not exchange pulls nothing (its gate in
    # the optimizer state is 0), so W^i itself stands in for the center: no transfer.
    center = worker.local if view is None else view
    local, opt_state, loss = self.elastic_step(worker.local, worker.opt_state, center, batch)
    return WorkerState(local, opt_state), None, loss

  def worker_point(self, worker, view):
    return elastic.point(worker.local, worker.opt_state)


class HogwildEASGD(AsyncEASGD):
  """The same exchange with no lock."""

  name = "hogwild_easgd"
  locked = False
  optimizers = ("sgd",)
  optimizers_why = "an unlocked in-place write has no optimizer state"
