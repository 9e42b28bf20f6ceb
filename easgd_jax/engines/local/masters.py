"""The local engine's reading of a worker/master rule: its functions jitted, its master, and its
workers' iterations (which the threads and Algorithm 1's host scheduler both run).

- `Compiled`: the rule's pure functions, each one jitted call (on its arguments' device).
- `Workers`: each worker's state, last reply (`view`) and the version it read; one iteration:
  an exchange that opens the step sends `worker_message` and steps against the reply; else the
  step runs against the last reply and, on an exchange step, its message is sent after it.
- `LockedMaster` (`locked`): the master's state on the master device; `apply` runs
  master_apply one message at a time under a lock, and records the update.
- `HostLockedMaster` (`locked`, CPU devices): the same with the master's state in host memory,
  each update run on the device of the worker that sends it, so that neither W nor the message
  is copied between devices (the worker threads' master on CPU devices).
- `SharedMaster` (unlocked and `additive`): Niu et al.'s lock-free memory model. The weights are
  one flat float32 buffer in host memory (`SharedBuffer`); a worker reads it where it lies,
  without a lock, and adds its increment in place (`np.add(..., out=)`, which releases the GIL,
  so several workers write at once). On a CPU device a jitted call uses a 64-byte-aligned NumPy
  argument in place and `np.asarray` of its result is a view of XLA's output, so a worker's
  step copies W neither in nor out (an accelerator copies both ways, as it must).
"""

import collections
import concurrent.futures
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from easgd_jax import devices
from easgd_jax.engines.base import Applied, speed

ALIGNMENT = 64  # bytes; XLA:CPU copies a less aligned NumPy argument instead of using it in place
RECENT = 100_000  # applied updates kept in memory (with their timings) for tests and notebooks


def on_device(fn, device):
  """`fn` jitted to run on `device`, taking NumPy arguments from where they lie in host memory:
  in place on a CPU device when aligned, copied to an accelerator."""
  return jax.jit(fn, in_shardings=SingleDeviceSharding(device))


class Compiled:
  """A worker/master rule's functions, jitted once."""

  def __init__(self, rule):
    self.rule = rule
    self.worker_step = jax.jit(rule.worker_step)
    self.master_apply = jax.jit(rule.master_apply)
    self.worker_message = jax.jit(rule.worker_message) if rule.opens_round else None


class Record:
  """Applied updates: the entries not yet handed to the trainer, and the recent ones timed."""

  def __init__(self):
    self.new, self.recent, self.lock = [], collections.deque(maxlen=RECENT), threading.Lock()

  def add(self, update):
    with self.lock:  # a worker thread adds while the main thread takes
      self.new.append(update)
      self.recent.append(update)

  def take(self):
    with self.lock:
      taken, self.new = self.new, []
    return [update.entry() for update in taken]


class LockedMaster:
  """master_apply under a lock, one message at a time, on the master's device."""

  def __init__(self, compiled, master_host, device, num_workers, version=0):
    self.compiled, self.device = compiled, device
    self.state = devices.put(master_host, device)
    self.version = version  # updates applied so far
    self.lock = threading.Lock()
    self.record = Record()
    # The worker index as a device scalar made once: no host transfer per update.
    self._ids = [devices.put(jnp.int32(j), device) for j in range(num_workers)]

  def apply(self, j, worker_step, message, read_at):
    """(the reply, this update's version)."""
    with self.lock:
      start = time.perf_counter()
      self.state, reply = self.compiled.master_apply(self.state, message, self._ids[j])
      self.record_update(j, worker_step, read_at, start)
      return reply, self.version

  def record_update(self, j, worker_step, read_at, start=0.0):
    self.version += 1
    self.record.add(Applied(j, worker_step, read_at, self.version, start, time.perf_counter()))

  def snapshot(self):
    """The weights to evaluate: immutable device arrays, safe while updates go on."""
    return self.compiled.rule.eval_params(self.state)

  def checkpoint(self):
    with self.lock:
      return self.state, self.version

  def load(self, state, version):
    self.state, self.version = state, version


class HostLockedMaster(LockedMaster):
  """A locked master whose state lies in host memory, applied on the calling worker's device.

  For CPU devices only, where every device's memory is the host's: a jitted call reads a NumPy
  argument where it lies and `np.asarray` of its result is a view, so the master's state never
  moves, the message never leaves the worker's device and the reply is made on it. Copying W to
  a master device and back instead (LockedMaster) cost two transfers of ~110 us each per
  iteration for the digits MLP, against a 150 us step (BENCHMARKS.md, (g)).
  """

  device = None  # the master has no device of its own: messages stay where they are made

  def __init__(self, compiled, master_host, worker_devices, version=0):
    self.compiled, self.version = compiled, version
    self.state = jax.tree.map(np.asarray, master_host)
    self.lock = threading.Lock()
    self.record = Record()
    self._applies = [on_device(compiled.rule.master_apply, d) for d in worker_devices]
    if compiled.rule.opens_round:
      self._exchanges = [on_device(self._message_and_apply, d) for d in worker_devices]
    self._ids = [devices.put(jnp.int32(j), d) for j, d in enumerate(worker_devices)]

  def _message_and_apply(self, state, worker, j):
    rule = self.compiled.rule
    return rule.master_apply(state, rule.worker_message(worker), j)

  def apply(self, j, worker_step, message, read_at):
    """(the reply, on worker j's device, this update's version)."""
    return self._update(self._applies[j], j, worker_step, message, read_at)

  def exchange(self, j, worker_step, worker, read_at):
    """`apply` of the message an `opens_round` worker sends (worker_message), made in the same
    call: one dispatch and one wait under the lock instead of two."""
    return self._update(self._exchanges[j], j, worker_step, worker, read_at)

  def _update(self, call, j, worker_step, argument, read_at):
    with self.lock:
      start = time.perf_counter()
      state, reply = call(self.state, argument, self._ids[j])
      self.state = jax.tree.map(np.asarray, state)  # waits for it: one update at a time
      self.record_update(j, worker_step, read_at, start)
      return reply, self.version

  def load(self, state, version):
    self.state, self.version = jax.tree.map(np.asarray, state), version


class SharedBuffer:
  """A pytree of float32 arrays laid out end to end in one flat, aligned NumPy buffer.

  `flat` is the buffer the workers read and write in place; `tree` is the same memory as the
  pytree (NumPy views); `unravel` and `ravel` convert inside a jitted function.
  """

  def __init__(self, tree_host):
    leaves, self.treedef = jax.tree.flatten(tree_host)
    self.shapes = [np.shape(leaf) for leaf in leaves]
    self.bounds = np.cumsum([0] + [int(np.prod(s)) for s in self.shapes]).tolist()
    raw = np.empty(self.bounds[-1] * 4 + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    self.flat = raw[start : start + self.bounds[-1] * 4].view(np.float32)
    self.tree = self.unravel(self.flat)
    self.load(tree_host)

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
    jax.tree.map(np.copyto, self.tree, jax.tree.map(np.asarray, tree))  # the buffer stays


class SharedMaster:
  """An unlocked additive master: W in a SharedBuffer, increments added in place, no lock."""

  def __init__(self, rule, master_host, worker_devices, version=0):
    self.rule = rule
    self.buffer = SharedBuffer(master_host)
    self.version = version
    self._count = threading.Lock()  # the version counter and the record only; never W
    self.record = Record()
    by_device = {d: on_device(self._step, d) for d in set(worker_devices)}
    self.steps = [by_device[d] for d in worker_devices]
    silent = {d: on_device(self._silent_step, d) for d in set(worker_devices)}
    self.silent_steps = [silent[d] for d in worker_devices]

  def _step(self, worker, flat, batch):
    """The worker's step at the W it reads, and the increment for the master, flat: one call."""
    rule, view = self.rule, self.buffer.unravel(flat)
    if rule.opens_round:
      increment = rule.increment(view, rule.worker_message(worker))
      worker, _, loss = rule.worker_step(worker, view, batch)
    else:
      worker, message, loss = rule.worker_step(worker, view, batch)
      increment = rule.increment(view, message)
    return worker, self.buffer.ravel(increment), loss

  def _silent_step(self, worker, flat, batch):
    """A step with no exchange, for a rule whose step sends after it (it reads W still)."""
    worker, _, loss = self.rule.worker_step(worker, self.buffer.unravel(flat), batch)
    return worker, loss

  def add(self, j, worker_step, increment, read_at):
    """W <- W + increment, in place and unlocked; returns this update's version."""
    w = self.buffer.flat
    start = time.perf_counter()
    np.add(w, increment, out=w)
    end = time.perf_counter()
    with self._count:
      self.version += 1
      self.record.add(Applied(j, worker_step, read_at, self.version, start, end))
      return self.version

  def snapshot(self):
    return self.rule.eval_params(self.buffer.copy())

  def checkpoint(self):
    return self.buffer.copy(), self.version

  def load(self, state, version):
    self.buffer.load(state)
    self.version = version


class Workers:
  """G workers of a rule, worker j's state on devices[j], around `master` (Locked or Shared).

  `wait`: a message is on the master's device before the master is asked (concurrent
  workers: no lock is held while a transfer runs); `fused`: master and every worker share one
  device and run one at a time, so an exchange and its step are one call.
  """

  def __init__(self, compiled, master, worker_host, worker_devices, wait=True, fused=False):
    self.rule, self.compiled, self.master = compiled.rule, compiled, master
    self.devices, self.wait = worker_devices, wait
    self.shared = isinstance(master, SharedMaster)
    self.states = [devices.put(worker_host, d) for d in worker_devices]
    self.own = [0] * len(worker_devices)  # each worker's own steps so far
    self.periods = [int(self.rule.tau)] * len(worker_devices)  # each one's exchange period
    self.reads = [0] * len(worker_devices)  # the master version each last received
    self.fresh_views()
    if fused and self.rule.opens_round and not self.shared:
      self._fused = jax.jit(self._exchange_and_step)

  _fused = None

  def fresh_views(self):
    """Each worker's view: the master's weights now (a closing rule steps against them)."""
    if self.rule.opens_round or self.shared:
      self.views = [None] * len(self.devices)  # opening: the reply comes with the exchange
    else:
      weights = self.master.snapshot()
      self.views = [devices.put(weights, d) for d in self.devices]

  def points(self, states=None, views=None):
    """x^i of every worker (eagerly: a diagnostic), or None."""
    views = self.views if views is None else views
    found = [
      self.rule.worker_point(w, v) for w, v in zip(states or self.states, views, strict=True)
    ]
    return None if found[0] is None else found

  def speeds(self, batches, threads=None):
    """Each worker's steps per second (engines/base.speed) on its own device and `batches[j]`,
    timed on `threads` threads at once (default one per worker), so that they share the host
    as they will in the run. The states stay as they were: the rule is pure, the results are
    dropped."""

    def timed(j):
      batch = devices.put(batches[j], self.devices[j])
      if self.shared and not self.rule.opens_round:  # the step that reads W where it lies
        flat = self.master.buffer.flat
        return speed(lambda: self.master.silent_steps[j](self.states[j], flat, batch))
      return speed(lambda: self.compiled.worker_step(self.states[j], self.views[j], batch))

    with concurrent.futures.ThreadPoolExecutor(threads or len(self.devices)) as pool:
      return list(pool.map(timed, range(len(self.devices))))

  def set_periods(self, periods):
    """Each worker's exchange period, here (for `sends`) and in its state (the rule's)."""
    self.periods = [int(p) for p in periods]
    pairs = zip(self.states, self.periods, self.devices, strict=True)
    self.states = [devices.put(self.rule.with_period(s, p), d) for s, p, d in pairs]

  def _exchange_and_step(self, master, worker, batch):
    rule = self.rule
    master, reply = rule.master_apply(master, rule.worker_message(worker), 0)
    worker, _, loss = rule.worker_step(worker, reply, batch)
    return master, worker, loss

  def _to_master(self, tree):
    if self.master.device is not None:  # else it is applied where it is (HostLockedMaster)
      tree = devices.put(tree, self.master.device)
    return jax.block_until_ready(tree) if self.wait else tree

  def _apply(self, j, own, message):
    """The master's update with worker j's message; (its reply on j's device, staleness)."""
    reply, version = self.master.apply(j, own, self._to_master(message), self.reads[j])
    if self.master.device is not None:
      reply = devices.put(reply, self.devices[j])
    return reply, self._received(j, version)

  def _exchange(self, j, own, worker):
    """HostLockedMaster.exchange with worker j's state: (the reply on j's device, staleness)."""
    reply, version = self.master.exchange(j, own, worker, self.reads[j])
    return reply, self._received(j, version)

  def _received(self, j, version):
    """Worker j now holds the master's `version`: the updates others made since its last read."""
    staleness, self.reads[j] = version - 1 - self.reads[j], version
    return staleness

  def iterate(self, j, batch):
    """Worker j's next iteration: (its loss, the staleness of its update or None)."""
    rule, own, worker = self.rule, self.own[j], self.states[j]
    exchange, staleness = rule.sends(own, self.periods[j]), None
    self.own[j] += 1
    if self.shared:
      return self._unlocked(j, worker, own, exchange, batch)
    if exchange and self._fused is not None:
      self.master.state, self.states[j], loss = self._fused(self.master.state, worker, batch)
      self.master.record_update(j, own, self.reads[j])
      self.reads[j] = self.master.version
      return loss, None
    if rule.opens_round:
      view = None
      if exchange and self.master.device is None:  # the message made in the master's update
        view, staleness = self._exchange(j, own, worker)
      elif exchange:  # the message, the master's update, then the step against its reply
        view, staleness = self._apply(j, own, self.compiled.worker_message(worker))
      self.states[j], _, loss = self.compiled.worker_step(worker, view, batch)
      return loss, staleness
    self.states[j], message, loss = self.compiled.worker_step(worker, self.views[j], batch)
    if exchange:  # computed and sent: the worker's next step is at the master's reply
      self.views[j], staleness = self._apply(j, own, message)
    return loss, staleness

  def _unlocked(self, j, worker, own, exchange, batch):
    """Unlocked and additive: read W where it lies without a lock, add the increment in place."""
    master, flat = self.master, self.master.buffer.flat
    if not exchange:
      if self.rule.opens_round:
        self.states[j], _, loss = self.compiled.worker_step(worker, None, batch)
      else:
        self.states[j], loss = master.silent_steps[j](worker, flat, batch)
      return loss, None
    read = self.reads[j] if self.rule.opens_round else master.version
    self.states[j], increment, loss = master.steps[j](worker, flat, batch)
    # np.asarray waits for the increment: the write needs it (the loss stays on the device).
    self.reads[j] = master.add(j, own, np.asarray(increment), read)
    return loss, self.reads[j] - 1 - read
