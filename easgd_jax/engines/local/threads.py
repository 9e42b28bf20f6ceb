"""Worker threads on one machine: the local engine's way of running an asynchronous worker/master
rule, each worker driving its own device at its own pace.

Why threads and not processes: JAX releases the GIL while it dispatches and runs a computation,
so threads that each drive their own device compute at the same time, and threads share host
memory, so an unlocked additive master can be one buffer every worker writes in place. A locked
master applies one message at a time; on CPU devices its state lies in host memory and each
update runs on the sender's device (masters.HostLockedMaster). Each accelerator gets a thread;
CPU devices get at most one per core (devices.host_threads), each running the iterations of
workers t, t + T, ... in turn, so no thread waits for the GIL behind one the OS descheduled.

One iteration of worker j, read off the rule's facts (algorithms/base.py): an exchange that
opens the step sends `worker_message`, takes the reply and steps against it; otherwise the step
runs against the last reply (its `view`) and, on an exchange step, sends its message after.

Iterations are numbered tickets handed out until --steps of them are done across all workers;
a worker's second of a launch waits until every live worker's first (its compilation) is done,
else the first to compile would take every iteration of a short run. The main thread (the `run`
generator) does everything else, so the workers never wait on it:

- Evaluation: at each of the plan's evaluation points the master's weights are snapshotted
  into a single slot that the trainer scores while the workers carry on. At most one snapshot
  exists at a time: a point reached while the previous one is still being scored is skipped
  (counted in the next row's `evaluations_skipped`; its losses go into that row).
- Checkpoints: tickets are handed out only up to the plan's next checkpoint step; when every
  iteration issued so far has finished, the workers wait at that barrier and the master, every
  worker, every sampler and the counters are taken from that one instant.
- A stop signal stops the ticket counter; each worker finishes the iteration it is in, and the
  final snapshot carries the whole state.
- Exchange periods from speeds (a rule's `periods_from_speeds`): before the first launch's first
  step every worker's step is timed at once, each on its device (masters.Workers.speeds); the
  periods the rule picks from those speeds go into every checkpoint, so a resume keeps them.
- A worker that raises is logged and named in the summary; the others take over its share
  (--fail_fast stops the run instead). On resume each worker's view is the master's weights as
  restored: a fresh read.
"""

import collections
import dataclasses
import threading
import traceback

import numpy as np
from absl import logging

from easgd_jax import checkpoints, data, devices
from easgd_jax.engines.base import Progress, Snapshot, Stopwatch, WorkerLost, peek, worker_seed
from easgd_jax.engines.base import staleness_summary as staleness_of
from easgd_jax.engines.local import masters
from easgd_jax.errors import InjectedFailure, WorkerFailure


@dataclasses.dataclass
class Failure:
  worker: int
  step: int  # the worker's own iteration at which it raised
  error: str

  def describe(self):
    return f"worker {self.worker} failed at its step {self.step}: {self.error}"


class ThreadEngine:
  eval_placement = None  # scored on this process's first device

  def __init__(self, config, rule, dataset, params_host, samplers=None):
    self.config, self.rule, self.num_workers = config, rule, config.num_devices
    self.devices = devices.worker_devices(self.num_workers)
    self.num_threads = devices.host_threads(self.devices, config.worker_threads)
    compiled = masters.Compiled(rule)
    master_host = rule.master_init(params_host)
    if rule.additive and not rule.locked:
      self.master = masters.SharedMaster(rule, master_host, self.devices)
    elif all(d.platform == "cpu" for d in self.devices):
      self.master = masters.HostLockedMaster(compiled, master_host, self.devices)
    else:
      self.master = masters.LockedMaster(compiled, master_host, self.devices[0], self.num_workers)
    self.workers = masters.Workers(
      compiled, self.master, rule.worker_init(params_host), self.devices
    )
    self.samplers = samplers or [
      data.Sampler(dataset, worker_seed(config.seed, j)) for j in range(self.num_workers)
    ]
    self.histogram = collections.Counter()  # {staleness: count} over the whole run
    self.done, self.evaluations_skipped, self.failures = 0, 0, []
    self.pending = []  # losses restored from a checkpoint, for the next row
    self.stopwatch, self.final = None, None
    self.periods_chosen = not rule.periods_from_speeds  # else measured at the first launch

  @property
  def state(self):
    return self.master

  @property
  def worker_steps(self):
    return self.workers.own

  def describe(self):
    inline = ", each call on its caller's thread" if devices.dispatches_inline() else ""
    threads, n = "one thread per worker", self.num_threads
    if n < self.num_workers:
      threads = f"{self.num_workers} workers taking turns on {n} thread{'s' * (n > 1)}"
    return f"{threads}{inline}, devices: {', '.join(map(str, self.devices))}"

  # --- checkpoints ----------------------------------------------------------------------------

  def _tree(self):
    return {"master": self.master.checkpoint()[0], "workers": list(self.workers.states)}

  def checkpoint_arrays(self):
    return checkpoints.to_host(self._tree())

  def restore(self, arrays, record):
    state = checkpoints.like(self._tree(), arrays)
    self.master.load(state["master"], record["version"])
    self.workers.states = state["workers"]
    self.workers.own, self.workers.reads = list(record["worker_steps"]), list(record["reads"])
    self.done = record["step"]
    for sampler, position in zip(self.samplers, record["samplers"], strict=True):
      sampler.set_state(position)
    self.histogram = collections.Counter({int(s): c for s, c in record["staleness"].items()})
    self.evaluations_skipped = record["evaluations_skipped"]
    if "periods" in record:  # the states hold them too; a resume keeps the first launch's
      self.workers.periods, self.periods_chosen = list(record["periods"]), True
    self.pending = [(s, np.asarray(v, np.float64).reshape(-1), None) for s, v in record["losses"]]
    self.workers.fresh_views()
    logging.info("asynchronous: the continuation is not bitwise the uninterrupted run")

  def _checkpoint(self):
    """Everything a checkpoint needs; called with no iteration in flight."""
    record = {
      "version": self.master.version,
      "worker_steps": list(self.workers.own),
      "reads": list(self.workers.reads),
      "samplers": [sampler.state() for sampler in self.samplers],
      "staleness": {str(s): c for s, c in sorted(self.histogram.items())},
      "evaluations_skipped": self.evaluations_skipped,
      "periods": list(self.workers.periods),
    }
    return self.checkpoint_arrays(), record

  def _choose_periods(self):
    """Each worker's exchange period from its speed, measured once before its first step
    (masters.Workers.speeds) on its next batch, which it still draws afterwards."""
    batches = [peek(sampler, self.config.batch_size) for sampler in self.samplers]
    speeds = self.workers.speeds(batches, self.num_threads)
    self.workers.set_periods(self.rule.periods(speeds))
    self.periods_chosen = True
    rounded = [round(v, 1) for v in speeds]
    logging.info("worker speeds %s steps/s: exchange periods %s", rounded, self.workers.periods)

  # --- the run --------------------------------------------------------------------------------

  def run(self, plan):
    if self.done >= plan.steps:
      return
    if not self.periods_chosen:
      self._choose_periods()
    run = _Run(self, plan)
    try:
      yield from run.main()
    finally:
      run.stop_workers()
    self.final = self.master.snapshot()
    for failure in self.failures:
      logging.warning("%s; the run went on with the other workers", failure.describe())

  def throughput(self):
    return self.stopwatch.throughput() if self.stopwatch else (0, 0.0)

  def final_params(self):
    return self.final if self.final is not None else self.master.snapshot()

  def summary(self):
    found = {
      "staleness": staleness_of(self.histogram),
      "worker_steps": list(self.workers.own),
      "evaluations_skipped": self.evaluations_skipped,
    }
    if self.rule.periods_from_speeds:
      found["exchange_periods"] = list(self.workers.periods)
    return found

  def write_outputs(self, workdir):
    pass


class _Run:
  """One launch of the workers: tickets, the evaluation slot, the barriers, the main loop."""

  def __init__(self, engine, plan):
    self.engine, self.plan, self.config = engine, plan, engine.config
    self.lock = threading.Lock()  # the bookkeeping below, never the weights
    self.changed = threading.Condition(self.lock)
    self.issued = engine.done
    self.losses, self.staleness = [], []  # since the previous evaluation
    self.skipped = 0  # evaluation points skipped since the previous evaluation
    self.slot, self.slot_busy = None, False  # the one evaluation snapshot in hand
    self.stop = threading.Event()
    self.reported = len(engine.failures)  # failures handed to the trainer as WorkerLost
    self.barrier = plan.next_checkpoint(engine.done)  # tickets are issued up to here
    engine.stopwatch = self.clock = Stopwatch(engine.done)
    self.warm = set()  # workers whose first (compiling) iteration of this launch is done
    count = engine.num_threads
    self.threads = [
      threading.Thread(
        target=self._thread, args=(list(range(t, engine.num_workers, count)),), daemon=True
      )
      for t in range(count)
    ]

  # --- worker threads -------------------------------------------------------------------------

  def _take_ticket(self, j):
    """The number (1, 2, ...) of worker j's next iteration, or None when there is none left."""
    with self.changed:
      while not self.stop.is_set() and self.issued < self.plan.steps:
        if self.issued < self.barrier and (j not in self.warm or self._all_warm()):
          break
        self.changed.wait()  # a checkpoint's barrier (the main thread saves, then lifts it)
      if self.issued >= self.plan.steps or self.stop.is_set():
        return None
      self.issued += 1
      return self.issued

  def _all_warm(self):  # each ticket asks: after the warm-up, one test
    if self.clock.warmed is not None:
      return True
    return len(self.warm | {f.worker for f in self.engine.failures}) == self.engine.num_workers

  def _thread(self, hosted):
    """One iteration of each worker in `hosted` in turn, until no ticket is left; a worker that
    fails leaves the turn."""
    turn = 0
    while hosted and (ticket := self._take_ticket(j := hosted[turn % len(hosted)])) is not None:
      if self._iterate(j, ticket):
        turn += 1
      else:
        hosted.remove(j)  # the next worker now stands at `turn`

  def _iterate(self, j, ticket):
    """Worker j's iteration number `ticket`; False if it raised (logged and recorded)."""
    engine, config = self.engine, self.config
    own = engine.workers.own[j]
    try:
      if config.failure_point == (j, own):
        raise InjectedFailure(f"injected failure (--inject_failure={j}:{own})")
      batch = engine.samplers[j].next(config.batch_size)
      if ticket == config.inject_nan:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      loss, staleness = engine.workers.iterate(j, batch)
    except Exception as error:
      with self.changed:
        engine.workers.own[j] = own  # the iteration was not done
        self.issued -= 1  # the iteration was not done: another worker will do it
        engine.failures.append(Failure(j, own, f"{type(error).__name__}: {error}"))
        self.changed.notify_all()
      logging.error("worker %d failed at its step %d:\n%s", j, own, traceback.format_exc())
      if config.fail_fast:
        self.stop.set()
      return False
    self._finish(j, ticket, loss, staleness)
    return True

  def _finish(self, j, ticket, loss, staleness):
    engine = self.engine
    with self.changed:
      engine.done = self.clock.reached = engine.done + 1
      self.losses.append((ticket, loss, f"worker {j}, its step {engine.workers.own[j] - 1}"))
      if staleness is not None:
        self.staleness.append(staleness)
        engine.histogram[staleness] += 1
      if j not in self.warm:
        self.warm.add(j)
        self.changed.notify_all()  # the others may be waiting for this worker's first iteration
      if self.clock.warmed is None and self._all_warm():
        self.clock.warm(engine.done)
      if engine.done < self.plan.steps and self.plan.evaluates(engine.done):
        if self.slot is None and not self.slot_busy:
          self.slot = self._snapshot(evaluate=True)
        else:
          self.skipped += 1
          engine.evaluations_skipped += 1
      # Wake the main thread only for work (a snapshot, a barrier, the end): woken every step it
      # took the GIL from the workers (0.76x, BENCHMARKS.md (l)); a 50 ms timeout does the rest.
      if self.slot is not None or engine.done in (self.barrier, self.plan.steps):
        self.changed.notify_all()

  # --- the main thread ------------------------------------------------------------------------

  def _snapshot(self, evaluate, state=None):
    """A Snapshot of now (lock held); hands over the per-row losses when evaluating."""
    engine = self.engine
    staleness = staleness_of(self.staleness)
    snapshot = Snapshot(
      engine.done,
      self.clock.seconds(),
      self.losses,
      params=engine.master.snapshot() if evaluate else None,
      points=(list(engine.workers.states), list(engine.workers.views)) if evaluate else None,
      state=state,
      extra={
        "staleness_median": staleness and staleness["median"],
        "staleness_max": staleness and staleness["max"],
        "worker_steps": list(engine.workers.own),
        "evaluations_skipped": self.skipped,
      },
    )
    if evaluate:
      self.losses, self.staleness, self.skipped = [], [], 0
    else:  # a checkpoint: the next evaluation still needs them
      self.losses, self.staleness = list(self.losses), list(self.staleness)
    return snapshot

  def _host(self, snapshot):
    """The snapshot's losses on the host and x^i of its workers: the one sync per row."""
    engine = self.engine
    # np.asarray per scalar: ~100x cheaper than one jax.device_get of the list.
    values = np.array([np.asarray(v) for _, v, _ in snapshot.losses], np.float64).reshape(-1)
    snapshot.losses = [
      (ticket, values[i : i + 1], who) for i, (ticket, _, who) in enumerate(snapshot.losses)
    ]
    snapshot.points = snapshot.points and engine.workers.points(*snapshot.points)
    snapshot.applied = engine.master.record.take()
    if engine.pending:
      snapshot.losses = engine.pending + snapshot.losses
      if snapshot.params is not None or snapshot.stopped:
        engine.pending = []
    return snapshot

  def _checkpoint_due(self):
    if self.stop.is_set():  # stopping: the final snapshot carries the state instead
      return False
    done = self.engine.done
    return self.barrier < self.plan.steps and done == self.issued == self.barrier

  def main(self):
    engine, plan = self.engine, self.plan
    for thread in self.threads:
      thread.start()
    while True:
      if plan.stopping and not self.stop.is_set():
        self.stop.set()
        with self.changed:
          self.changed.notify_all()
      yield Progress(engine.done)
      yield from self._report_failures()
      with self.changed:
        if self.slot is None and not self._checkpoint_due():
          if not any(t.is_alive() for t in self.threads):
            break
          self.changed.wait(timeout=0.05)
          continue
        if self.slot is not None:
          snapshot, self.slot, self.slot_busy = self.slot, None, True
        else:  # every worker waits at the barrier: this instant is consistent
          snapshot = self._snapshot(evaluate=False, state=engine._checkpoint())
      if snapshot.params is not None:
        try:
          if not self.stop.is_set():
            yield self._host(snapshot)
        finally:
          with self.changed:
            self.slot_busy = False
        continue
      with self.clock.paused():
        yield self._host(snapshot)
      with self.changed:
        self.barrier = plan.next_checkpoint(self.barrier)
        self.changed.notify_all()
    self.stop_workers()
    yield from self._report_failures()
    if self.config.fail_fast and engine.failures:
      raise WorkerFailure(f"{engine.failures[0].describe()} (--fail_fast stops the run)")
    stopped = plan.stopping if self.stop.is_set() and engine.done < plan.steps else None
    if engine.done < plan.steps and stopped is None:
      raise WorkerFailure(
        f"all {engine.num_workers} workers failed after {engine.done} of {plan.steps} "
        f"iterations; first: {engine.failures[0].describe()}"
      )
    with self.changed:
      state = engine._checkpoint() if plan.checkpointing else None
      final = self._snapshot(evaluate=stopped is None, state=state)
    final.stopped = stopped
    yield self._host(final)

  def _report_failures(self):
    engine = self.engine
    while self.reported < len(engine.failures):
      failure = engine.failures[self.reported]
      self.reported += 1
      yield WorkerLost(failure.worker, failure.step, failure.error, engine.done)

  def stop_workers(self):
    self.stop.set()
    with self.changed:
      self.changed.notify_all()
    for thread in self.threads:
      if thread.is_alive():
        thread.join()
