"""Parameter-server asynchronous SGD: the master applies W <- W - eta * Delta W^i, one at a time.

Every worker loops on its own device, never waiting for the others: read the master's W, compute
Delta W^i on its own random batch, send it to the master (device 0). The master applies each
arriving gradient under a lock, so two updates never interleave ("the master uses a lock to avoid
weight update conflicts, one worker at a time"). A gradient's staleness is the number of master
updates applied between the read it was computed from and its own application.

The master steps with the inner optimizer (`--optimizer`: SGD, momentum, Nesterov or AdamW, all
optax), whose state lives with it and is updated under the same lock.
"""

import threading
import time
from typing import NamedTuple

import jax

from easgd_jax import core, devices
from easgd_jax.algorithms.base import WORKERS, Defaults


class Update(NamedTuple):
  """One master update, logged in the order it was applied (for staleness and the tests)."""

  worker: int
  read_at: int  # master updates done when the worker read W
  applied_as: int  # this update's number, 1, 2, ...
  start: float  # perf_counter() entering / leaving the critical section
  end: float


class AsyncSGD(Defaults):
  """Master weights on device 0 behind a lock; drive it with `workers.Run` (threads)."""

  name = "async_sgd"
  engines = ("local", "ray", "simulated")
  driven_by = WORKERS
  batches_per_step = 1  # a step is one worker's iteration: one master update

  def __init__(
    self,
    loss_fn,
    *,
    num_workers,
    learning_rate=None,
    momentum=0.0,
    optimizer=None,
    available_devices=None,
  ):
    core.check_hyperparameters(num_workers=num_workers)
    self.devices = devices.worker_devices(num_workers, available_devices)
    self.master_device = self.devices[0]
    self.optimizer = core.inner_or_default(optimizer, learning_rate, momentum)
    self._gradient = jax.jit(core.make_gradient(loss_fn))
    self._apply_gradient = jax.jit(core.make_apply_gradient(self.optimizer))
    self.lock = threading.Lock()

  @classmethod
  def steps_per_count(cls, config):
    return 1  # the master's optimizer takes every run step

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    return cls(
      loss_fn,
      num_workers=config.num_devices,
      optimizer=cls.inner_optimizer(config),
      available_devices=available_devices,
    )

  def init(self, params_host):
    self.params = devices.put(params_host, self.master_device)
    self.opt_state = devices.put(self.optimizer.init(params_host), self.master_device)
    self.updates, self.log = 0, []

  def init_worker(self, j, params_host):
    return None  # a worker keeps nothing between iterations: it always starts from the master

  # The worker's rule and the master's rule, apart: the local engine composes them in
  # `iterate`, the Ray engine (engines/ray.py) runs them in a worker actor and a server actor.

  def read(self):
    """W and the master's update count, from the same moment."""
    with self.lock:
      return self.params, self.updates

  def gradient(self, params, batch):
    """The worker's rule: Delta W^i and the batch loss at the W it read."""
    return self._gradient(params, batch)

  def apply(self, j, grads, read_at):
    """The master's rule, one worker at a time: W <- W + u(Delta W^i); returns the staleness."""
    with self.lock:
      start = time.perf_counter()
      self.params, self.opt_state = self._apply_gradient(self.params, self.opt_state, grads)
      staleness = self.updates - read_at
      self.updates += 1
      self.log.append(Update(j, read_at, self.updates, start, time.perf_counter()))
    return staleness

  def iterate(self, j, worker_state, batch_host):
    params, read_at = self.read()
    # The NumPy batch goes to the device of the weights inside the jitted call.
    grads, loss = self.gradient(devices.put(params, self.devices[j]), batch_host)
    grads = jax.block_until_ready(devices.put(grads, self.master_device))  # computed and sent
    return worker_state, loss, self.apply(j, grads, read_at)

  def snapshot(self):
    return self.params  # immutable device arrays: safe to evaluate while updates go on

  def master_state(self):
    with self.lock:
      return {"params": self.params, "opt_state": self.opt_state, "updates": self.updates}

  def load_master(self, state):
    self.params, self.opt_state, self.updates = (
      state["params"],
      state["opt_state"],
      state["updates"],
    )

  # The simulated engine (engines/simulated.py) runs the same two rules as one pure function,
  # its workers stacked on one device, in the order its virtual clock gives the master.
  opens_round = False  # the exchange ends an iteration: the gradient travels after it
  locked = True  # the master applies one update at a time

  def fused_init(self, params_host):
    """(master, one worker): the master's W and optimizer state; the W the worker read."""
    return {"params": params_host, "opt_state": self.optimizer.init(params_host)}, params_host

  def fused_iteration(self, master, read, batch, exchange):
    """Delta W^i at the W the worker read, the master's update, and the reply: the worker
    reads W after its own update (what a thread reading right after `apply` sees)."""
    del exchange  # every iteration is one
    grads, loss = self._gradient(read, batch)
    params, opt_state = self._apply_gradient(master["params"], master["opt_state"], grads)
    return {"params": params, "opt_state": opt_state}, params, loss

  def fused_eval(self, master):
    return master["params"]
