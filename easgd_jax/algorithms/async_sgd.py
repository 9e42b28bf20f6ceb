"""Parameter-server asynchronous SGD: the master applies W <- W - eta * Delta W^i, one at a time.

Every worker loops at its own pace, never waiting for the others:

  worker i:  Delta W^i, loss = gradient(W read, its own batch)     (worker_step; sent after it)
  master:    W <- W + u(Delta W^i), under a lock                   (master_apply; replies W)

u is the inner optimizer (`--optimizer`: SGD, momentum, Nesterov or AdamW, all optax), whose state
lives with the master and is updated under the same lock ("the master uses a lock to avoid
weight update conflicts, one worker at a time"). The worker's next gradient is taken at the W
of the reply. A gradient's staleness is the number of master updates applied between the read
it was computed from and its own application.
"""

from easgd_jax import core
from easgd_jax.algorithms.base import WorkerMasterRule


class AsyncSGD(WorkerMasterRule):
  name = "async_sgd"

  def __init__(self, loss_fn, *, learning_rate=None, momentum=0.0, optimizer=None):
    self.optimizer = core.inner_or_default(optimizer, learning_rate, momentum)
    self.gradient = core.make_gradient(loss_fn)
    self.apply_gradient = core.make_apply_gradient(self.optimizer)

  @classmethod
  def steps_per_count(cls, config):
    return 1  # the master's optimizer takes every run step

  @classmethod
  def from_config(cls, config, loss_fn):
    return cls(loss_fn, optimizer=cls.inner_optimizer(config))

  def master_init(self, params_host):
    return {"params": params_host, "opt_state": self.optimizer.init(params_host)}

  def worker_init(self, params_host):
    return ()  # a worker keeps nothing: it always computes at the W of its last reply

  def worker_step(self, worker, view, batch):
    grads, loss = self.gradient(view, batch)
    return worker, grads, loss

  def master_apply(self, master, grads, worker):
    params, opt_state = self.apply_gradient(master["params"], master["opt_state"], grads)
    return {"params": params, "opt_state": opt_state}, params

  def eval_params(self, master):
    return master["params"]
