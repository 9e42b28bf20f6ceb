"""DOWNPOUR, the EASGD paper's asynchronous baseline, and MDOWNPOUR (its momentum form).

Every worker keeps its own x^i and an accumulator v^i and takes local SGD steps at its own pace;
at the end of its every tau-th own step it pushes v^i to the master and pulls the master's x~,
first come first served:

  worker i, every step:  x^i <- x^i - eta * g^i(x^i),   v^i <- v^i - eta * g^i(x^i)
  every tau-th step:     master  x~ <- x~ + v^i                  (one worker at a time, a lock)
                         worker  x^i <- x~,  v^i <- 0            (x~ after its own push)

So each push carries exactly tau local steps, and a worker's first gradient after a pull is
taken at the x~ it pulled (the reply, its `view`). With tau = 1 a push is -eta * g^i at the
weights the worker read: parameter-server asynchronous SGD (async_sgd.py), as the authors' code
says of its own tau = 1 branch. Their implementation (github.com/sixin-zh/mpiT,
asyncsgd/optim-downpour.lua with pserver.lua) counts the worker's steps from 0 and pushes when
the count divides by tau before incrementing it, so its first push carries one step and every
later one tau; here every push carries tau. The master adds what it receives, with no learning
rate of its own.

MDOWNPOUR (`--momentum` delta > 0): "the Nesterov's momentum scheme is applied to the master's
update" (Zhang, Choromanska & LeCun, Deep learning with Elastic Averaging SGD, NeurIPS 2015,
arXiv:1412.6651, Sec. 5, which defines it for tau = 1 only; its pseudo-code is in that paper's
supplementary material). The master keeps a velocity u and applies Nesterov's update, in the
look-ahead form the paper uses for EAMSGD, to what it receives:

  u <- delta * u + v^i,    x~ <- x~ + delta * u + v^i

At tau = 1, v^i = -eta * g^i, and this is Nesterov's momentum (optax.sgd(nesterov=True)) on the
master with the gradient taken at the weights the worker read. At tau > 1 the paper leaves
MDOWNPOUR undefined; applying the same rule to the accumulated v^i is this codebase's extension:
say so when you report it. The workers keep no momentum.

A push's staleness is the number of master updates between the worker's previous pull and its
push: how far x~ moved while the worker computed on its own copy.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from easgd_jax import core, models, optimizers, schedule
from easgd_jax.algorithms.base import SGD_RECIPE, WorkerMasterRule


class WorkerState(NamedTuple):
  local: Any  # x^i
  accumulated: Any  # v^i: the sum of its local updates since its last push
  opt_state: Any  # its local SGD state (the schedule's count)
  step: Any  # its own steps so far (int32)


def master_optimizer(momentum):
  """What the master applies to a push v^i: x~ + v^i, or Nesterov's update of MDOWNPOUR.

  optax's transformations descend along their input, so they are given -v^i at rate 1:
  sgd(1) returns v^i itself; sgd(1, delta, nesterov) keeps u = -trace and returns
  delta * u_new + v^i.
  """
  return optax.sgd(1.0, momentum=momentum or None, nesterov=bool(momentum))


class Downpour(WorkerMasterRule):
  name = "downpour"
  optimizers = ("sgd", "nesterov")  # nesterov (--momentum > 0): MDOWNPOUR
  optimizers_why = "the workers take plain SGD steps; --momentum puts Nesterov on the master"
  settings = {"tau": 4}  # tau = 1 is async_sgd

  @classmethod
  def defaults(cls, config):
    found = super().defaults(config)
    if config.model in models.TRAINING:  # the workers take plain SGD, at a smaller eta
      # The recipe's 1.0 diverges: a push sums tau steps and every worker's push is stale (the
      # transformer, G = 4, 800 steps, final validation loss: 1.0 4.56 and 5.96, 0.1 3.27 and
      # 3.35, 0.03 2.97 and 2.89, 0.01 2.82, 2.79 and 2.79, 0.003 3.05; experiments/compare_lm.py).
      found.update(SGD_RECIPE, learning_rate=0.01)
    return found

  def __init__(self, loss_fn, *, learning_rate=None, tau=1, momentum=0.0, local_optimizer=None):
    core.check_hyperparameters(momentum=momentum, tau=tau)
    if local_optimizer is None:
      core.check_hyperparameters(learning_rate=learning_rate)
      local_optimizer = optax.sgd(learning_rate)
    self.tau, self.momentum = tau, momentum
    self.local_optimizer = local_optimizer
    self.master = master_optimizer(momentum)
    self.gradient = core.make_gradient(loss_fn)

  @classmethod
  def from_config(cls, config, loss_fn):
    eta = optimizers.schedule(
      config.lr_schedule,
      config.learning_rate,
      config.decay_steps or config.steps,
      config.warmup_steps,
      cls.steps_per_count(config),
      config.min_learning_rate,
    )
    return cls(
      loss_fn,
      tau=config.tau,
      momentum=config.momentum if config.optimizer == "nesterov" else 0.0,
      local_optimizer=optimizers.create("sgd", eta, grad_clip=config.grad_clip),
    )

  def master_init(self, params_host):
    return {"params": params_host, "opt_state": self.master.init(params_host)}

  def worker_init(self, params_host):
    zeros = jax.tree.map(jnp.zeros_like, params_host)
    opt_state = self.local_optimizer.init(params_host)
    return WorkerState(params_host, zeros, opt_state, jnp.zeros([], jnp.int32))

  def worker_step(self, worker, view, batch):
    """x^i and v^i move by u = -eta * g^i(x^i); a round's first step starts from the x~ pulled,
    its last one sends v^i (and starts the next round's v^i at 0)."""
    local = self.worker_point(worker, view)
    grads, loss = self.gradient(local, batch)
    updates, opt_state = self.local_optimizer.update(grads, worker.opt_state, local)
    local = optax.apply_updates(local, updates)
    accumulated = optax.apply_updates(worker.accumulated, updates)
    pushes = self.sends(worker.step)
    kept = jax.tree.map(lambda v: jnp.where(pushes, jnp.zeros_like(v), v), accumulated)
    return WorkerState(local, kept, opt_state, worker.step + 1), accumulated, loss

  def master_apply(self, master, accumulated, worker):
    """x~ <- x~ + v^i (MDOWNPOUR: + Nesterov's momentum); see master_optimizer."""
    minus_v = jax.tree.map(jnp.negative, accumulated)
    updates, opt_state = self.master.update(minus_v, master["opt_state"], master["params"])
    params = optax.apply_updates(master["params"], updates)
    return {"params": params, "opt_state": opt_state}, params

  def eval_params(self, master):
    return master["params"]

  def worker_point(self, worker, view):
    """x^i: the x~ it pulled, when its round has not begun yet; its own x^i otherwise."""
    pulled = schedule.exchanges(worker.step, self.tau, opens=True)
    return jax.tree.map(lambda x, pull: jnp.where(pulled, pull, x), worker.local, view)
