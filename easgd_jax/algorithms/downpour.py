"""DOWNPOUR, the EASGD paper's asynchronous baseline, and MDOWNPOUR (its momentum form).

Every worker keeps its own x^i and an accumulator v^i and takes local SGD steps at its own pace;
at the end of its every tau-th own step it pushes v^i to the master and pulls the master's x~,
first come first served:

  worker i, every step:  x^i <- x^i - eta * g^i(x^i),   v^i <- v^i - eta * g^i(x^i)
  every tau-th step:     master  x~ <- x~ + v^i                  (one worker at a time, a lock)
                         worker  x^i <- x~,  v^i <- 0            (x~ after its own push)

So each push carries exactly tau local steps, and a worker's first gradient after a pull is
taken at the x~ it pulled. With tau = 1 a push is -eta * g^i at the weights the worker read:
parameter-server asynchronous SGD (async_sgd.py), as the authors' code says of its own tau = 1
branch. Their implementation (github.com/sixin-zh/mpiT, asyncsgd/optim-downpour.lua with
pserver.lua) counts the worker's steps from 0 and pushes when the count divides by tau before
incrementing it, so its first push carries one step and every later one tau; here every push
carries tau. The master adds what it receives, with no learning rate of its own.

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

import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from easgd_jax import core, devices, optimizers
from easgd_jax.algorithms.base import WORKERS, Defaults


class WorkerState(NamedTuple):
  local: Any  # x^i, on worker i's device
  accumulated: Any  # v^i: the sum of its local updates since its last push
  opt_state: Any  # its local SGD state (the schedule's count)
  step: int  # the worker's own iterations so far
  read_at: int  # master updates done when it last pulled x~


class Push(NamedTuple):
  """One push, logged in the order the master applied it."""

  worker: int
  worker_step: int  # the worker's own steps when it pushed (a multiple of tau)
  read_at: int  # master updates done at the worker's previous pull
  applied_as: int  # this update's number, 1, 2, ...
  start: float  # perf_counter() entering / leaving the critical section
  end: float


def master_optimizer(momentum):
  """What the master applies to a push v^i: x~ + v^i, or Nesterov's update of MDOWNPOUR.

  optax's transformations descend along their input, so they are given -v^i at rate 1:
  sgd(1) returns v^i itself; sgd(1, delta, nesterov) keeps u = -trace and returns
  delta * u_new + v^i.
  """
  return optax.sgd(1.0, momentum=momentum or None, nesterov=bool(momentum))


class Downpour(Defaults):
  """The master on device 0 behind a lock; drive it with `workers.Run` (threads)."""

  name = "downpour"
  driven_by = WORKERS
  batches_per_step = 1  # a step is one worker's iteration
  optimizers = ("sgd", "nesterov")  # nesterov (--momentum > 0): MDOWNPOUR
  optimizers_why = "the workers take plain SGD steps; --momentum puts Nesterov on the master"

  def __init__(
    self,
    loss_fn,
    *,
    num_workers,
    learning_rate=None,
    tau=1,
    momentum=0.0,
    local_optimizer=None,
    available_devices=None,
  ):
    core.check_hyperparameters(momentum=momentum, tau=tau, num_workers=num_workers)
    if local_optimizer is None:
      core.check_hyperparameters(learning_rate=learning_rate)
      local_optimizer = optax.sgd(learning_rate)
    self.devices = devices.worker_devices(num_workers, available_devices)
    self.master_device = self.devices[0]
    self.tau, self.momentum = tau, momentum
    self.local_optimizer = local_optimizer
    self.master = master_optimizer(momentum)
    self._local_step = jax.jit(self._make_local_step(loss_fn))
    self._apply_push = jax.jit(self._make_apply_push())
    self.lock = threading.Lock()

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    eta = optimizers.schedule(
      config.lr_schedule,
      config.learning_rate,
      config.decay_steps or config.steps,
      config.warmup_steps,
      cls.steps_per_count(config),
    )
    return cls(
      loss_fn,
      num_workers=config.num_devices,
      tau=config.tau,
      momentum=config.momentum if config.inner_optimizer == "nesterov" else 0.0,
      local_optimizer=optimizers.create("sgd", eta),
      available_devices=available_devices,
    )

  def _make_local_step(self, loss_fn):
    gradient, optimizer = core.make_gradient(loss_fn), self.local_optimizer

    def local_step(local, accumulated, opt_state, batch):
      """x^i <- x^i + u and v^i <- v^i + u, with u = -eta * g^i(x^i)."""
      grads, loss = gradient(local, batch)
      updates, opt_state = optimizer.update(grads, opt_state, local)
      local, accumulated = (
        optax.apply_updates(local, updates),
        optax.apply_updates(accumulated, updates),
      )
      return local, accumulated, opt_state, loss

    return local_step

  def _make_apply_push(self):
    master = self.master

    def apply_push(params, master_state, accumulated):
      """x~ <- x~ + v^i (MDOWNPOUR: + Nesterov's momentum); see master_optimizer."""
      minus_v = jax.tree.map(jnp.negative, accumulated)
      updates, master_state = master.update(minus_v, master_state, params)
      return optax.apply_updates(params, updates), master_state

    return apply_push

  def init(self, params_host):
    self.params = devices.put(params_host, self.master_device)
    self.master_opt_state = devices.put(self.master.init(params_host), self.master_device)
    self.updates, self.log = 0, []

  def init_worker(self, j, params_host):
    device = self.devices[j]
    zeros = jax.tree.map(jnp.zeros_like, params_host)
    opt_state = self.local_optimizer.init(params_host)
    return WorkerState(
      devices.put(params_host, device),
      devices.put(zeros, device),
      devices.put(opt_state, device),
      0,
      0,
    )

  # The worker's rule and the master's rule, apart, as in async_sgd.py and async_easgd.py.

  def local_step(self, worker, batch):
    """One local SGD step of worker i: x^i and v^i move by -eta * g^i(x^i)."""
    local, accumulated, opt_state, loss = self._local_step(
      worker.local, worker.accumulated, worker.opt_state, batch
    )
    worker = worker._replace(
      local=local, accumulated=accumulated, opt_state=opt_state, step=worker.step + 1
    )
    return worker, loss

  def pushes_now(self, worker):
    """Whether the step the worker just took ends a round of tau (its steps tau, 2 tau, ...)."""
    return worker.step % self.tau == 0

  def push(self, j, worker_step, read_at, accumulated):
    """The master's rule, one worker at a time: x~ <- x~ + v^j; returns x~ after it, the
    number of updates done and the push's staleness."""
    with self.lock:
      start = time.perf_counter()
      self.params, self.master_opt_state = self._apply_push(
        self.params, self.master_opt_state, accumulated
      )
      staleness = self.updates - read_at
      self.updates += 1
      self.log.append(Push(j, worker_step, read_at, self.updates, start, time.perf_counter()))
      return self.params, self.updates, staleness

  def iterate(self, j, worker, batch_host):
    worker, loss = self.local_step(worker, batch_host)  # the batch goes to x^i's device in jit
    if not self.pushes_now(worker):
      return worker, loss, None
    accumulated = jax.block_until_ready(devices.put(worker.accumulated, self.master_device))
    params, updates, staleness = self.push(j, worker.step, worker.read_at, accumulated)
    worker = worker._replace(
      local=devices.put(params, self.devices[j]),
      accumulated=jax.tree.map(jnp.zeros_like, worker.accumulated),
      read_at=updates,
    )
    return worker, loss, staleness

  def snapshot(self):
    return self.params  # immutable device arrays: safe to evaluate while pushes go on

  def master_state(self):
    with self.lock:
      return {"params": self.params, "opt_state": self.master_opt_state, "updates": self.updates}

  def load_master(self, state):
    self.params, self.master_opt_state, self.updates = (
      state["params"],
      state["opt_state"],
      state["updates"],
    )

  # The simulated engine (engines/simulated.py): `iterate` as one pure function.
  opens_round = False  # the push ends the round's last step
  locked = True

  def fused_init(self, params_host):
    master = {"params": params_host, "opt_state": self.master.init(params_host)}
    zeros = jax.tree.map(np.zeros_like, params_host)
    return master, (params_host, zeros, self.local_optimizer.init(params_host))

  def fused_iteration(self, master, worker, batch, exchange):
    """A local step; on the round's last (`exchange`) the push, and the pull of x~."""
    local, accumulated, opt_state, loss = self._local_step(*worker, batch)

    def push():
      params, master_state = self._apply_push(master["params"], master["opt_state"], accumulated)
      zeros = jax.tree.map(jnp.zeros_like, accumulated)
      return {"params": params, "opt_state": master_state}, (params, zeros, opt_state)

    return *jax.lax.cond(exchange, push, lambda: (master, (local, accumulated, opt_state))), loss

  def fused_eval(self, master):
    return master["params"]

  def fused_point(self, worker):
    return worker[0]
