"""The Ray engine's actors: one generic parameter server and generic workers, for any
worker/master rule, which they receive whole (pickled with its pure functions).

`Server` holds the master: for a locked rule a serial actor (`max_concurrency=1`, Ray runs one
of its calls at a time: that is the lock) whose `apply` runs master_apply on its node's JAX
device; for an unlocked additive rule a threaded actor whose `add` writes one flat NumPy buffer
in place, unlocked (the local engine's SharedBuffer). Every update is numbered (its version)
and recorded; the driver takes the new entries of the record at its points.

`Worker` is worker j: its own JAX device, the dataset loaded on its own node (a TFDS
`--data_dir` must exist on every node), its seeded batch stream (the local engine's), its state
and its last reply. It runs the rule's worker side as the local engine's threads do, with the
server in place of the master. Weights travel through Ray's object store as NumPy arrays.
"""

import os
import signal
import threading
import time

import jax
import numpy as np
import ray

from easgd_jax import data, devices
from easgd_jax.engines.base import Applied, peek, speed
from easgd_jax.engines.local.masters import SharedBuffer

SERVER_CPUS = 0.25  # what each actor asks Ray for: several fit on a small node
WORKER_CPUS = 0.25


def worker_options(config):
  """A worker actor's request: a fraction of a CPU (several share a node), `--ray_worker_gpus`,
  and spread over the cluster's nodes rather than packed onto the driver's."""
  return Worker.options(
    num_cpus=WORKER_CPUS, num_gpus=config.ray_worker_gpus, scheduling_strategy="SPREAD"
  )


def where():
  """Node address, process id, device and Ray node id of the calling actor, for the log (the
  nodes of a cluster on one machine share an address)."""
  node = ray.get_runtime_context().get_node_id()
  return (
    f"node {ray.util.get_node_ip_address()} pid {os.getpid()} {jax.local_devices()[0]} ({node})"
  )


def host(tree):
  """Device arrays to NumPy (Python ints stay ints)."""
  return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)


def shared(rule):
  """Whether the rule's master is written in place, unlocked and additive."""
  return rule.additive and not rule.locked


@ray.remote
class Server:
  """The parameter server; one per run, on the driver's node."""

  def __init__(self, rule, master_host, version):
    self.rule, self.version = rule, version
    self.device = jax.local_devices()[0]
    self.record, self.count = [], threading.Lock()  # the version and the record only
    if shared(rule):
      self.buffer = SharedBuffer(master_host)
    else:
      self.state = devices.put(master_host, self.device)
      self._apply = jax.jit(rule.master_apply)

  def where(self):
    return where()

  def ping(self):
    return True

  def apply(self, j, worker_step, message, read_at):
    """The master's rule for one message (serial: one at a time); (the reply, its version)."""
    start = time.perf_counter()
    self.state, reply = self._apply(self.state, devices.put(message, self.device), j)
    self.version += 1
    self.record.append(Applied(j, worker_step, read_at, self.version, start, time.perf_counter()))
    return host(reply), self.version

  def pull(self):
    """(W as it is, mid-write or not, flat; the version): an unlocked read."""
    return self.buffer.flat.copy(), self.version

  def add(self, j, worker_step, increment, read_at, reply):
    """W <- W + increment in place, unlocked; (a fresh pull or None, its version)."""
    start = time.perf_counter()
    np.add(self.buffer.flat, increment, out=self.buffer.flat)
    end = time.perf_counter()
    with self.count:
      self.version += 1
      version = self.version
      self.record.append(Applied(j, worker_step, read_at, version, start, end))
    return (self.pull() if reply else None), version

  def snapshot(self):
    master = self.buffer.copy() if shared(self.rule) else self.state
    return host(self.rule.eval_params(master))

  def checkpoint(self):
    """(the master on the host, its version)."""
    if shared(self.rule):
      return self.buffer.copy(), self.version
    return host(self.state), self.version

  def take_record(self):
    with self.count:
      taken, self.record = self.record, []
    return [update.entry() for update in taken]


@ray.remote(concurrency_groups={"query": 1})
class Worker:
  """Worker j of an asynchronous run, or of Algorithm 1 (driven step by step)."""

  def __init__(
    self, config, rule, j, server, state, sampler_state, seed, template=None, restarted=False
  ):
    """`state`: (worker state, last reply or None, its version, own steps, exchange period) on
    the host; `restarted`: a new actor in a dead one's place (an injected failure fires once)."""
    self.config, self.rule, self.j, self.server = config, rule, j, server
    dataset = data.load(config)  # on this node
    self.dataset = dataset
    self.sampler = data.Sampler(dataset, seed)
    if sampler_state is not None:
      self.sampler.set_state(sampler_state)
    self.device = jax.local_devices()[0]
    worker, view, self.read_at, self.step, self.period = state
    self.worker = devices.put(rule.with_period(worker, self.period), self.device)
    self.view = None if view is None else devices.put(view, self.device)
    self.failure = None if restarted else config.failure_point
    self.pipeline = config.ray_pipeline
    self.in_flight = None  # the message not yet answered, with --ray_pipeline
    self._step = jax.jit(rule.worker_step)
    self._message = jax.jit(rule.worker_message) if rule.opens_round else None
    if shared(rule):  # the unlocked step reads W flat, as the local engine's threads do
      buffer = SharedBuffer(template)
      unravel = buffer.unravel

      def unlocked(worker, flat, batch):
        view = unravel(flat)
        if rule.opens_round:
          increment = rule.increment(view, rule.worker_message(worker))
          worker, _, loss = rule.worker_step(worker, view, batch)
        else:
          worker, message, loss = rule.worker_step(worker, view, batch)
          increment = rule.increment(view, message)
        return worker, buffer.ravel(increment), loss

      self._unlocked = jax.jit(unlocked)
      self._silent = jax.jit(lambda w, flat, b: rule.worker_step(w, unravel(flat), b)[::2])

  def where(self):
    return where()

  def _batch(self):
    if self.failure == (self.j, self.step):
      _die()
    return self.sampler.next(self.config.batch_size)

  def iterate(self):
    """One iteration against the server; returns (loss, staleness or None)."""
    batch, own, rule = self._batch(), self.step, self.rule
    exchange, staleness = rule.sends(own, self.period), None
    if shared(rule):
      loss, staleness = self._unlocked_iteration(own, exchange, batch)
    elif rule.opens_round:
      if exchange:
        message = host(self._message(self.worker))
        call = self.server.apply.remote(self.j, own, message, self.read_at)
        staleness = self._send(call, needs_reply=self.view is None)
      view = self.view if exchange else None
      self.worker, _, loss = self._step(self.worker, view, batch)
    else:
      self.worker, message, loss = self._step(self.worker, self.view, batch)
      if exchange:
        call = self.server.apply.remote(self.j, own, host(message), self.read_at)
        staleness = self._send(call, needs_reply=False)
    self.step += 1
    return float(loss), staleness

  def speed(self):
    """Steps per second of this worker's step (engines/base.speed) on its next batch, which it
    still draws afterwards; the results are dropped (the rule is pure)."""
    batch = devices.put(peek(self.sampler, self.config.batch_size), self.device)
    if shared(self.rule) and not self.rule.opens_round:
      flat = self._read()[0]
      return speed(lambda: self._silent(self.worker, flat, batch))
    return speed(lambda: self._step(self.worker, self.view, batch))

  def set_period(self, period):
    """Exchange every `period` own steps from now on (the rule's fact, in the state too)."""
    self.period = period
    self.worker = devices.put(self.rule.with_period(self.worker, period), self.device)

  def _send(self, call, needs_reply):
    """Wait for the answer to `call`, or with --ray_pipeline keep it in flight and take the
    previous one's (one step more stale); the answer's reply becomes the view. Returns the
    staleness of the update answered, or None. `needs_reply`: the next step has nothing to
    read otherwise, so the first answer is waited for."""
    call = (call, self.read_at)
    if self.pipeline:
      previous, self.in_flight = self.in_flight, call
      if previous is not None:
        return self._answer(*previous)
      if not needs_reply:  # nothing answered yet: the step takes the view it has
        return None
      self.in_flight = None
    return self._answer(*call)

  def _answer(self, call, read_at):
    answer, version = ray.get(call)
    self.read_at = version
    if shared(self.rule):
      self.view = answer  # a fresh pull (flat W, its version), or None
    else:
      self.view = devices.put(answer, self.device)
    return version - 1 - read_at

  def _unlocked_iteration(self, own, exchange, batch):
    """Unlocked and additive: compute at W as read, add the increment in place."""
    rule = self.rule
    if not exchange:
      if rule.opens_round:
        self.worker, _, loss = self._step(self.worker, None, batch)
      else:
        self.worker, loss = self._silent(self.worker, self._read()[0], batch)
      return loss, None
    if rule.opens_round:  # a fresh read; staleness: exchanges since its own previous one
      flat, _ = ray.get(self.server.pull.remote())
    else:  # the W its last write's reply carried; staleness: writes since that read
      flat, self.read_at = self._read()
    self.worker, increment, loss = self._unlocked(self.worker, flat, batch)
    answer = not rule.opens_round  # a closing write brings back the next read
    call = self.server.add.remote(self.j, own, np.asarray(increment), self.read_at, answer)
    self.view = None  # until the answer: the next read is a fresh one
    return loss, self._send(call, needs_reply=False)

  def _read(self):
    """(W flat, its version): the last write's reply, or a fresh unlocked read."""
    if self.view is None:
      self.view = ray.get(self.server.pull.remote())
    return self.view

  def drain(self):
    """Wait for the message in flight (--ray_pipeline): the server then holds every update.
    Returns the staleness of that update, or None."""
    call, self.in_flight = self.in_flight, None
    return None if call is None else self._answer(*call)

  def checkpoint(self):
    """(worker state, sampler state, own steps, the version it last read) on the host: after
    `drain`, consistent."""
    return host(self.worker), self.sampler.state(), self.step, self.read_at

  @ray.method(concurrency_group="query")  # answered while an iteration runs
  def point(self):
    """x^j now (the gap diagnostic), or None."""
    view = None if self.rule.opens_round or isinstance(self.view, tuple) else self.view
    found = self.rule.worker_point(self.worker, view)
    return None if found is None else host(found)

  # Algorithm 1: the driver holds the master and sends the batch's indices and the reply.

  def message(self):
    return host(self._message(self.worker))

  def rr_step(self, batch, view):
    """One step of Algorithm 1 against `view` (None: no exchange); (loss, message)."""
    if self.failure == (self.j, self.step):
      _die()
    if not isinstance(batch, dict):  # the indices of the driver's sampler
      batch = self.dataset.take(batch)
    view = None if view is None else devices.put(view, self.device)
    self.worker, message, loss = self._step(self.worker, view, batch)
    self.step += 1
    return float(loss), None if message is None else host(message)


def _die():
  """--inject_failure on Ray: this worker's process ends, as a killed one or a lost node would.
  It waits a moment first: the reply of the step it finished just before is sent after that
  step returns, and a process killed then takes the reply with it (the driver counts that step
  as lost, although its update may have reached the server). The injected death is exact."""
  time.sleep(1)
  killed()


def killed():
  """--inject_failure's death on Ray: the process SIGKILLs itself, exactly as a kill from
  outside would end it (no clean-up, no reply), but at a known step."""
  os.kill(os.getpid(), signal.SIGKILL)
