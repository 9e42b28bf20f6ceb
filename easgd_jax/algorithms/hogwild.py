"""Hogwild: asynchronous SGD with the lock removed; workers write the shared W at the same time.

W is one flat float32 NumPy buffer in host memory, shared by every worker thread (`SharedBuffer`;
`params` views it as the parameter pytree). A worker iteration is one jitted call and one NumPy
write:

  eta * Delta W^i, loss = scaled_gradient(W, batch)    # reads W where it lies, without a lock
  W <- W - eta * Delta W^i                             # np.subtract(..., out=W): in place, no lock

On a CPU device the jitted call reads the shared buffer itself: XLA:CPU uses a 64-byte-aligned
NumPy argument in place, so there is no copy of W on the way in, and `np.asarray` of the result
is a view of XLA's output, so none on the way out either (an accelerator copies both ways, as it
must). The loss stays on the device; the one host sync per iteration is the write waiting for its
gradient. NumPy releases the GIL inside the subtraction, so several workers really do write at
once.

What can go wrong, and why Hogwild tolerates it: two workers that write the same element at the
same moment can lose one of the two increments (read-modify-write race), and a gradient can be
computed from a W that another worker is halfway through writing. Each lost or mixed update is a
small, bounded perturbation of one SGD step; Niu et al. show SGD still converges when such
collisions are sparse or rare, and here they are rare because a write takes microseconds and a
gradient much longer. The test suite checks that writes do overlap and that accuracy still gets
there.

Plain SGD only: a momentum trace shared without a lock would need its own analysis.
"""

import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from easgd_jax import core, devices
from easgd_jax.algorithms.base import WORKERS, Defaults

ALIGNMENT = 64  # bytes; XLA:CPU copies a less aligned NumPy argument instead of using it in place


class SharedBuffer:
  """A pytree of float32 arrays laid out end to end in one flat, aligned NumPy buffer.

  `flat` is the buffer the workers read and write in place; `tree` is the same memory as the
  parameter pytree (NumPy views); `unravel` and `ravel` convert inside a jitted function.
  """

  def __init__(self, params_host):
    leaves, self.treedef = jax.tree.flatten(params_host)
    self.shapes = [np.shape(leaf) for leaf in leaves]
    self.bounds = np.cumsum([0] + [int(np.prod(s)) for s in self.shapes]).tolist()
    raw = np.empty(self.bounds[-1] * 4 + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    self.flat = raw[start : start + self.bounds[-1] * 4].view(np.float32)
    self.tree = self.unravel(self.flat)
    for view, leaf in zip(jax.tree.leaves(self.tree), leaves, strict=True):
      view[...] = leaf

  @property
  def layout(self):
    return self.treedef, tuple(self.shapes)

  def unravel(self, flat):
    """The pytree whose leaves are consecutive slices of `flat` (views, for a NumPy `flat`)."""
    parts = zip(self.bounds, self.bounds[1:], self.shapes, strict=False)
    return jax.tree.unflatten(self.treedef, [flat[a:b].reshape(s) for a, b, s in parts])

  def ravel(self, tree):
    """`tree`'s leaves end to end, in the buffer's order (inside a jitted function)."""
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])

  def copy(self):
    return jax.tree.map(np.copy, self.tree)

  def load(self, tree):
    jax.tree.map(np.copyto, self.tree, tree)  # the buffer stays the same


def on_device(fn, device):
  """`fn` jitted to run on `device`, taking its NumPy arguments from where they lie in host
  memory: in place on a CPU device when aligned, copied to an accelerator."""
  return jax.jit(fn, in_shardings=SingleDeviceSharding(device))


class Write(NamedTuple):
  """One unlocked in-place write, logged for staleness and for the overlap test."""

  worker: int
  read_at: int  # writes finished when the worker started reading W
  start: float  # perf_counter() around the in-place subtraction
  end: float


class Hogwild(Defaults):
  name = "hogwild"
  engines = ("local", "ray", "simulated")
  driven_by = WORKERS
  optimizers = ("sgd",)
  optimizers_why = "an unlocked in-place write has no optimizer state"
  schedules = ("constant",)  # ... and no step count for a schedule
  batches_per_step = 1

  def __init__(self, loss_fn, *, num_workers, learning_rate, available_devices=None):
    core.check_hyperparameters(learning_rate=learning_rate, num_workers=num_workers)
    self.devices = devices.worker_devices(num_workers, available_devices)
    self.eta = learning_rate
    self._gradient = core.make_gradient(loss_fn)
    self._layout, self._steps = None, None
    # Counts finished writes for the staleness statistic only; the weights never take it.
    self._count_lock = threading.Lock()

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    return cls(
      loss_fn,
      num_workers=config.num_devices,
      learning_rate=config.learning_rate,
      available_devices=available_devices,
    )

  def init(self, params_host):
    self.shared = SharedBuffer(params_host)
    self.params = self.shared.tree  # W as a parameter pytree: views of the shared buffer
    self.updates, self.log = 0, []
    if self._layout != self.shared.layout:  # jit once per parameter layout, not per run
      self._layout = self.shared.layout
      by_device = {d: on_device(self._scaled_gradient, d) for d in set(self.devices)}
      self._steps = [by_device[d] for d in self.devices]

  def _scaled_gradient(self, weights, batch):
    """eta * Delta W^i as one flat array, and the loss, from the flat W read."""
    grads, loss = self._gradient(self.shared.unravel(weights), batch)
    return self.eta * self.shared.ravel(grads), loss

  def init_worker(self, j, params_host):
    return None

  # The worker's rule and the master's rule, apart (see async_sgd.py): no lock in either.

  def worker_update(self, j, weights, batch):
    """eta * Delta W^i (flat, on the host) and the loss, at `weights` (a flat host buffer)."""
    update, loss = self._steps[j](weights, batch)
    return np.asarray(update), loss  # waits for the gradient: the write needs it

  def write(self, j, update, read_at):
    """W <- W - eta * Delta W^i in place, no lock; returns the staleness (writes since the read)."""
    w = self.shared.flat
    start = time.perf_counter()
    np.subtract(w, update, out=w)
    end = time.perf_counter()
    with self._count_lock:
      staleness = self.updates - read_at
      self.updates += 1
      self.log.append(Write(j, read_at, start, end))
    return staleness

  def iterate(self, j, worker_state, batch_host):
    read_at = self.updates
    # Unlocked read of the shared buffer: it may mix concurrent writes.
    update, loss = self.worker_update(j, self.shared.flat, batch_host)
    return worker_state, loss, self.write(j, update, read_at)

  def snapshot(self):
    return self.shared.copy()

  def master_state(self):
    return {"params": self.snapshot(), "updates": self.updates}

  def load_master(self, state):
    self.shared.load(state["params"])
    self.updates = state["updates"]

  # The simulated engine (engines/simulated.py): the same rule as one pure function. Its memory
  # model: no lock and no queue, so writes are applied the moment they arrive and may overlap
  # one another; each write is whole (no torn reads or lost elements: those are this engine's
  # and the threads' business), and a worker computes on the W it received after its own write
  # while the others write.
  opens_round = False
  locked = False

  def fused_init(self, params_host):
    return {"params": params_host}, params_host

  def fused_iteration(self, master, read, batch, exchange):
    """W <- W - eta * Delta W^i(W read); the worker reads W after its write."""
    del exchange
    grads, loss = self._gradient(read, batch)
    params = jax.tree.map(lambda w, g: w - self.eta * g, master["params"], grads)
    return {"params": params}, params, loss

  def fused_eval(self, master):
    return master["params"]
