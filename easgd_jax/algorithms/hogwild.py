"""Hogwild: asynchronous SGD with the lock removed; workers write the shared W at the same time.

W is one set of NumPy arrays in host memory shared by every worker thread. A worker copies it
(without a lock, so the copy can mix two updates), computes Delta W^i on its own device, brings it
back and subtracts eta * Delta W^i from the shared arrays *in place*, with no lock: NumPy releases
the GIL inside the in-place subtraction, so several workers really do write at once.

What can go wrong, and why Hogwild tolerates it: two workers that write the same array element at
the same moment can lose one of the two increments (read-modify-write race), and a reader can see
some layers before and some after an update. Each lost or mixed update is a small, bounded
perturbation of one SGD step; Niu et al. show SGD still converges when such collisions are
sparse or rare, and here they are rare because a write takes microseconds and a gradient
milliseconds. The test suite checks that writes do overlap and that accuracy still gets there.

Plain SGD only: a momentum trace shared without a lock would need its own analysis.
"""

import threading
import time
from typing import NamedTuple

import jax
import numpy as np

from easgd_jax import core, devices


class Write(NamedTuple):
  """One unlocked in-place write, logged for staleness and for the overlap test."""

  worker: int
  read_at: int  # writes finished when the worker copied W
  start: float  # perf_counter() around the in-place subtraction
  end: float


class Hogwild:
  def __init__(self, loss_fn, *, num_workers, learning_rate, available_devices=None):
    self.devices = devices.worker_devices(num_workers, available_devices)
    self.eta = np.float32(learning_rate)
    self._gradient = jax.jit(core.make_gradient(loss_fn))
    # Counts finished writes for the staleness statistic only; the weights never take it.
    self._count_lock = threading.Lock()

  def init(self, params_host):
    self.params = jax.tree.map(lambda x: np.array(x, dtype=np.float32), params_host)
    self.updates, self.log = 0, []

  def init_worker(self, j, params_host):
    return None

  def iterate(self, j, worker_state, batch_host):
    device = self.devices[j]
    read_at = self.updates
    params = jax.tree.map(np.copy, self.params)  # unlocked read: may mix concurrent writes
    grads, loss = self._gradient(devices.put(params, device), devices.put(batch_host, device))
    grads = jax.device_get(grads)
    start = time.perf_counter()
    for w, g in zip(jax.tree.leaves(self.params), jax.tree.leaves(grads), strict=True):
      np.subtract(w, self.eta * g, out=w)  # W <- W - eta * Delta W^i, in place, no lock
    end = time.perf_counter()
    with self._count_lock:
      staleness = self.updates - read_at
      self.updates += 1
      self.log.append(Write(j, read_at, start, end))
    return worker_state, loss, staleness

  def snapshot(self):
    return jax.tree.map(np.copy, self.params)

  def master_state(self):
    return {"params": self.snapshot(), "updates": self.updates}

  def load_master(self, state):
    jax.tree.map(np.copyto, self.params, state["params"])  # the shared buffer stays the same
    self.updates = state["updates"]
