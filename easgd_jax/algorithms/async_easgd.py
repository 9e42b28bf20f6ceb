"""Asynchronous EASGD and Hogwild EASGD: each worker exchanges with the center when it is ready.

Every worker keeps its own W^i on its own device and takes local steps at its own pace. On its
every tau-th own step (its steps 0, tau, 2 tau, ...) it exchanges with the master, first come
first served:

  master (device 0):  read W-bar, then W-bar <- W-bar + alpha * (x^i - W-bar)              Eq. (2)
  worker i:           W^i <- W^i + u(Delta W^i) - alpha * (x^i - W-bar_read)              Eq. (1)

(u the inner optimizer's update, x^i the worker's point: W^i, or W^i less its Nesterov look-ahead
for Async EAMSGD; elastic.py holds both equations.)

`AsyncEASGD` holds the center on device 0 and does the read-and-update under a lock, one worker
at a time, so the center is exactly the sequence of Eq. (2) updates in arrival order (the
exchange log records that order). `HogwildEASGD` does the same exchange without the lock: the
center is a shared host buffer that workers update in place concurrently (see hogwild.py for what
that can lose).

A worker's staleness at an exchange is the number of exchanges other workers made since its own
previous one: how far the center moved without it.
"""

import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from easgd_jax import core, devices, elastic
from easgd_jax.algorithms.base import WORKERS, Defaults
from easgd_jax.algorithms.hogwild import SharedBuffer, on_device


class WorkerState(NamedTuple):
  local: Any  # W^i, on worker i's device
  opt_state: Any  # its elastic optimizer state (own count, inner state), beside it
  step: int  # the worker's own iterations so far
  last_seen: int  # exchanges done at the end of its previous exchange


class Exchange(NamedTuple):
  """One exchange, logged in the order the center applied it."""

  worker: int
  worker_step: int  # the worker's own step at which it exchanged
  start: float  # perf_counter() around the center's read-and-update
  end: float


class AsyncEASGD(Defaults):
  """Center on device 0 behind a lock; drive it with `workers.Run` (threads)."""

  name = "async_easgd"
  engines = ("local", "ray", "simulated")
  driven_by = WORKERS
  elastic = True
  batches_per_step = 1  # a step is one worker's iteration

  def __init__(
    self,
    loss_fn,
    *,
    num_workers,
    learning_rate=None,
    rho=None,
    tau=1,
    momentum=0.0,
    alpha=None,
    optimizer=None,
    available_devices=None,
  ):
    core.check_hyperparameters(momentum=momentum, tau=tau, num_workers=num_workers)
    self.devices = devices.worker_devices(num_workers, available_devices)
    self.master_device = self.devices[0]
    self.tau = tau
    self.alpha = core.moving_rate(alpha, learning_rate, rho)
    inner = core.inner_or_default(optimizer, learning_rate, momentum)
    self.optimizer = elastic.elastic(inner, self.alpha, tau)
    self._elastic_step = jax.jit(core.make_elastic_step(loss_fn, self.optimizer))
    self._point = jax.jit(elastic.point)
    self._center_update = jax.jit(
      lambda center, x: elastic.center_update(
        center, jax.tree.map(jnp.subtract, x, center), self.alpha
      )
    )
    self.lock = threading.Lock()

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    return cls(
      loss_fn,
      num_workers=config.num_devices,
      alpha=config.moving_rate,
      tau=config.tau,
      optimizer=cls.inner_optimizer(config),
      available_devices=available_devices,
    )

  def init(self, params_host):
    self.center = devices.put(params_host, self.master_device)
    self.exchanges, self.log = 0, []

  def init_worker(self, j, params_host):
    device = self.devices[j]
    opt_state = self.optimizer.init(params_host)
    return WorkerState(devices.put(params_host, device), devices.put(opt_state, device), 0, 0)

  # The worker's rules and the master's rule, apart: the local engine composes them in
  # `iterate`, the Ray engine (engines/ray.py) runs them in a worker actor and a server actor.

  def exchanges_now(self, worker):
    """Whether the worker's next step is an exchange (its steps 0, tau, 2 tau, ...)."""
    return worker.step % self.tau == 0

  def point_of(self, worker):
    """x^i, the worker's side of Eq. (2), on its device."""
    return self._point(worker.local, worker.opt_state)

  def local_step(self, worker, batch):
    """A step between exchanges (the gate is 0: W^i itself stands in for the center)."""
    local, opt_state, loss = self._elastic_step(worker.local, worker.opt_state, worker.local, batch)
    return worker._replace(local=local, opt_state=opt_state, step=worker.step + 1), loss

  def exchange_step(self, worker, center, before, batch):
    """Eq. (1) against the center read at an exchange (`before`: exchanges done before it);
    returns the worker, its loss and its staleness."""
    local, opt_state, loss = self._elastic_step(worker.local, worker.opt_state, center, batch)
    staleness = before - worker.last_seen
    return WorkerState(local, opt_state, worker.step + 1, before + 1), loss, staleness

  def exchange(self, j, worker_step, x):
    """The master's rule, one worker at a time: read W-bar, then Eq. (2) with x^j; returns the
    center read and the exchanges done before this one."""
    with self.lock:
      start = time.perf_counter()
      center, before = self.center, self.exchanges
      self.center = self._center_update(center, x)
      self.exchanges += 1
      self.log.append(Exchange(j, worker_step, start, time.perf_counter()))
    return center, before

  def iterate(self, j, worker, batch_host):
    batch = batch_host  # goes to W^i's device inside the jitted call: no device_put in Python
    if not self.exchanges_now(worker):
      worker, loss = self.local_step(worker, batch)
      return worker, loss, None
    x = jax.block_until_ready(devices.put(self.point_of(worker), self.master_device))
    center, before = self.exchange(j, worker.step, x)
    return self.exchange_step(worker, devices.put(center, self.devices[j]), before, batch)

  def snapshot(self):
    return self.center

  def worker_points(self, state):
    """x^i of each worker in a checkpoint-shaped state {"master", "workers"}."""
    return [elastic.point(w.local, w.opt_state) for w in state["workers"] if w is not None]

  def master_state(self):
    with self.lock:
      return {"center": self.center, "exchanges": self.exchanges}

  def load_master(self, state):
    self.center, self.exchanges = state["center"], state["exchanges"]

  # The simulated engine (engines/simulated.py): `iterate` as one pure function.
  opens_round = True  # the exchange opens its step: Eq. (1) needs the center it reads
  locked = True

  def fused_init(self, params_host):
    return {"center": params_host}, (params_host, self.optimizer.init(params_host))

  def fused_iteration(self, master, worker, batch, exchange):
    """On an exchange, Eq. (2) with x^i and Eq. (1) against the center read; otherwise a local
    step (the gate in the optimizer state is 0, so the center read adds nothing)."""
    local, opt_state = worker
    center = master["center"]
    new_center = jax.lax.cond(
      exchange,
      lambda: self._center_update(center, self._point(local, opt_state)),
      lambda: center,
    )
    local, opt_state, loss = self._elastic_step(local, opt_state, center, batch)
    return {"center": new_center}, (local, opt_state), loss

  def fused_eval(self, master):
    return master["center"]

  def fused_point(self, worker):
    return self._point(*worker)


class HogwildEASGD(AsyncEASGD):
  """The same exchange with no lock: the center is a host buffer every worker updates in place.

  An exchange is one jitted call and one NumPy write. The call reads the shared center where it
  lies (in place on a CPU device, see hogwild.py), takes the worker's Eq. (1) step against that
  read and returns Eq. (2)'s increment alpha * (W^i - W-bar_read); the worker then adds the
  increment to the shared center in place, without a lock. Both equations use the same read, so
  the elastic force moves W^i and W-bar by equal and opposite amounts, as in Eq. (1)/(2); an
  exchange by another worker between the read and the write is added to, not overwritten.
  Plain SGD only: the local steps could keep optimizer state, but the shared center is a
  lock-free sum of increments, and the tests check it as such.
  """

  name = "hogwild_easgd"
  optimizers = ("sgd",)
  optimizers_why = "an unlocked in-place write has no optimizer state"

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
    gap = self.shared.ravel(elastic.gap(local, opt_state, center))  # x^i - W-bar_read
    new_local, new_opt_state, loss = self._elastic_step(local, opt_state, center, batch)
    return new_local, new_opt_state, loss, self.alpha * gap

  def hogwild_exchange_step(self, j, worker, center, before, batch):
    """Eq. (1) against `center` (a flat host buffer, read without a lock), and Eq. (2)'s
    increment alpha * (x^i - W-bar_read) for the master (flat, on the host)."""
    step = self._exchange_steps[j]
    local, opt_state, loss, increment = step(worker.local, worker.opt_state, center, batch)
    staleness = before - worker.last_seen
    worker = WorkerState(local, opt_state, worker.step + 1, before + 1)
    return worker, loss, staleness, np.asarray(increment)  # waits for it: the write needs it

  def add(self, j, worker_step, increment):
    """The master's rule with no lock: W-bar <- W-bar + increment, in place."""
    c = self.shared.flat
    start = time.perf_counter()
    np.add(c, increment, out=c)
    end = time.perf_counter()
    with self._count_lock:
      self.exchanges += 1
      self.log.append(Exchange(j, worker_step, start, end))

  def iterate(self, j, worker, batch_host):
    if not self.exchanges_now(worker):  # a local step between exchanges
      return super().iterate(j, worker, batch_host)
    before = self.exchanges
    # Unlocked read of the center: it may mix concurrent updates.
    step = worker.step
    worker, loss, staleness, increment = self.hogwild_exchange_step(
      j, worker, self.shared.flat, before, batch_host
    )
    self.add(j, step, increment)
    return worker, loss, staleness

  def snapshot(self):
    return self.shared.copy()

  def master_state(self):
    return {"center": self.snapshot(), "exchanges": self.exchanges}

  def load_master(self, state):
    self.shared.load(state["center"])
    self.exchanges = state["exchanges"]

  # The simulated engine: AsyncEASGD's arithmetic with no lock and no queue at the master; an
  # exchange reads and updates the center the moment it arrives, whole (see Hogwild's model).
  locked = False
