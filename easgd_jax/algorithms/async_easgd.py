"""Asynchronous EASGD and Hogwild EASGD: each worker exchanges with the center when it is ready.

Every worker keeps its own W^i on its own device and takes local steps at its own pace. On its
every tau-th own step (its steps 0, tau, 2 tau, ...) it exchanges with the master, first come
first served:

  master (device 0):  read W-bar, then W-bar <- W-bar + eta * rho * (W^i - W-bar)         Eq. (2)
  worker i:           W^i <- W^i - eta * (Delta W^i + rho * (W^i - W-bar_read))          Eq. (1)

`AsyncEASGD` holds the center on device 0 and does the read-and-update under a lock, one worker
at a time, so the center is exactly the sequence of Eq. (2) updates in arrival order (the
exchange log records that order). `HogwildEASGD` does the same exchange without the lock: the
center is a shared host buffer that workers update in place concurrently (see hogwild.py for what
that can lose). `--momentum` makes the local steps Nesterov (Async EAMSGD) via optax, as in the
synchronous algorithms.

A worker's staleness at an exchange is the number of exchanges other workers made since its own
previous one: how far the center moved without it.
"""

import threading
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from easgd_jax import core, devices
from easgd_jax.algorithms.hogwild import SharedBuffer, on_device


class WorkerState(NamedTuple):
  local: Any  # W^i, on worker i's device
  opt_state: Any  # its optimizer state (momentum trace), beside it
  step: int  # the worker's own iterations so far
  last_seen: int  # exchanges done at the end of its previous exchange


class Exchange(NamedTuple):
  """One exchange, logged in the order the center applied it."""

  worker: int
  worker_step: int  # the worker's own step at which it exchanged
  start: float  # perf_counter() around the center's read-and-update
  end: float


class AsyncEASGD:
  """Center on device 0 behind a lock; drive it with `workers.Run` (threads)."""

  def __init__(
    self, loss_fn, *, num_workers, learning_rate, rho, tau=1, momentum=0.0, available_devices=None
  ):
    core.check_hyperparameters(
      learning_rate=learning_rate, momentum=momentum, rho=rho, tau=tau, num_workers=num_workers
    )
    self.devices = devices.worker_devices(num_workers, available_devices)
    self.master_device = self.devices[0]
    self.tau, self.eta, self.rho = tau, learning_rate, rho
    self.optimizer = core.local_optimizer(learning_rate, momentum)
    self._sgd_step = jax.jit(core.make_sgd_step(loss_fn, self.optimizer))
    self._elastic_step = jax.jit(core.make_elastic_step(loss_fn, self.optimizer, self.eta, rho))
    self._center_update = jax.jit(core.make_center_update(self.eta, rho))
    self.lock = threading.Lock()

  def init(self, params_host):
    self.center = devices.put(params_host, self.master_device)
    self.exchanges, self.log = 0, []

  def init_worker(self, j, params_host):
    device = self.devices[j]
    opt_state = self.optimizer.init(params_host)
    return WorkerState(devices.put(params_host, device), devices.put(opt_state, device), 0, 0)

  def iterate(self, j, worker, batch_host):
    batch = batch_host  # goes to W^i's device inside the jitted call: no device_put in Python
    if worker.step % self.tau:  # a local step between exchanges
      local, opt_state, loss = self._sgd_step(worker.local, worker.opt_state, batch)
      return worker._replace(local=local, opt_state=opt_state, step=worker.step + 1), loss, None
    center, before = self._exchange(j, worker)
    center = devices.put(center, self.devices[j])
    local, opt_state, loss = self._elastic_step(worker.local, worker.opt_state, center, batch)
    staleness = before - worker.last_seen
    return WorkerState(local, opt_state, worker.step + 1, before + 1), loss, staleness

  def _exchange(self, j, worker):
    """Eq. (2) for worker j under the lock; returns the center it read and exchanges before it."""
    local = jax.block_until_ready(devices.put(worker.local, self.master_device))
    with self.lock:
      start = time.perf_counter()
      center, before = self.center, self.exchanges
      self.center = self._center_update(center, local)
      self.exchanges += 1
      self.log.append(Exchange(j, worker.step, start, time.perf_counter()))
    return center, before

  def snapshot(self):
    return self.center

  def master_state(self):
    with self.lock:
      return {"center": self.center, "exchanges": self.exchanges}

  def load_master(self, state):
    self.center, self.exchanges = state["center"], state["exchanges"]


class HogwildEASGD(AsyncEASGD):
  """The same exchange with no lock: the center is a host buffer every worker updates in place.

  An exchange is one jitted call and one NumPy write. The call reads the shared center where it
  lies (in place on a CPU device, see hogwild.py), takes the worker's Eq. (1) step against that
  read and returns Eq. (2)'s increment eta * rho * (W^i - W-bar_read); the worker then adds the
  increment to the shared center in place, without a lock. Both equations use the same read, so
  the elastic force moves W^i and W-bar by equal and opposite amounts, as in Eq. (1)/(2); an
  exchange by another worker between the read and the write is added to, not overwritten.
  """

  _layout = None  # the parameter layout the exchange steps were jitted for

  def init(self, params_host):
    self.shared = SharedBuffer(params_host)
    self.center = self.shared.tree  # W-bar as a parameter pytree: views of the shared buffer
    self.exchanges, self.log = 0, []
    self._count_lock = threading.Lock()  # the exchange counter only; never the center
    if self._layout != self.shared.layout:  # jit once per parameter layout
      self._layout = self.shared.layout
      by_device = {d: on_device(self._hogwild_exchange, d) for d in set(self.devices)}
      self._exchange_steps = [by_device[d] for d in self.devices]

  def _hogwild_exchange(self, local, opt_state, center_flat, batch):
    """Eq. (1) against the center read, and Eq. (2)'s increment to the center, flat."""
    center = self.shared.unravel(center_flat)
    new_local, opt_state, loss = self._elastic_step(local, opt_state, center, batch)
    gap = self.shared.ravel(core.elastic_difference(local, center))  # W^i - W-bar_read
    return new_local, opt_state, loss, self.eta * self.rho * gap

  def iterate(self, j, worker, batch_host):
    if worker.step % self.tau:  # a local step between exchanges
      return super().iterate(j, worker, batch_host)
    c = self.shared.flat
    before = self.exchanges
    # Unlocked read of the center: it may mix concurrent updates.
    step = self._exchange_steps[j]
    local, opt_state, loss, increment = step(worker.local, worker.opt_state, c, batch_host)
    increment = np.asarray(increment)  # waits for it: the write needs it
    start = time.perf_counter()
    np.add(c, increment, out=c)  # Eq. (2) in place, no lock
    end = time.perf_counter()
    with self._count_lock:
      self.exchanges += 1
      self.log.append(Exchange(j, worker.step, start, end))
    staleness = before - worker.last_seen
    return WorkerState(local, opt_state, worker.step + 1, before + 1), loss, staleness

  def snapshot(self):
    return self.shared.copy()

  def master_state(self):
    return {"center": self.snapshot(), "exchanges": self.exchanges}

  def load_master(self, state):
    self.shared.load(state["center"])
    self.exchanges = state["exchanges"]
