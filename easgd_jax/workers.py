"""The asynchronous runtime: one thread per worker, each driving its own device at its own pace.

Why threads and not processes: JAX releases the GIL while it dispatches and runs a computation,
so worker threads that each drive their own device compute at the same time; and threads share
host memory, so Hogwild's shared weights can be one NumPy buffer that every worker writes in place
(processes would need shared-memory segments and one JAX runtime per worker, i.e. 8 runtimes on a
2-core host). The only serialization left is the master's lock, where the algorithm asks for one.

An asynchronous algorithm supplies `init_worker(j, params_host)` and `iterate(j, worker_state,
batch) -> (worker_state, loss, staleness)`, one worker iteration including its exchange with the
master, plus `snapshot()`, the master's weights now (for evaluation, without stopping anyone), and
`master_state()` / `load_master(state)`, everything the master holds (for checkpoints).

`Run` hands out numbered iterations ("tickets") until `steps` of them are done in total, so
`--steps` counts iterations across all workers, each one master update for async SGD and Hogwild.
The calling (main) thread does everything else, so the workers never wait on the host:

- Evaluation: every `eval_every` finished iterations the master's weights are snapshotted into a
  single slot that the main thread scores while the workers carry on. At most one snapshot
  exists at a time: an evaluation point reached while the previous one is still being scored is
  skipped (counted in the next row's `evaluations_skipped`; its losses go into that row), so a
  slow evaluation can neither queue up memory nor delay a shutdown.
- Checkpoints: tickets are handed out only up to the next checkpoint step; when every iteration
  issued so far has finished, the workers are idle at that barrier, and the master, every
  worker's state, every sampler and the log of applied iterations are taken from that one
  instant. Nothing is in flight, so a resumed run applies each iteration exactly once.
- Losses stay on the device until an evaluation or checkpoint pulls them; the trainer checks
  them there, and its DivergenceError stops every worker on its way out of `run`.
- `should_stop()` (SIGTERM/SIGINT) stops the ticket counter; each worker finishes the iteration it
  is in, and the final snapshot carries the whole state for the checkpoint.
"""

import collections
import dataclasses
import threading
import time
import traceback

import numpy as np
from absl import logging


class WorkerFailure(RuntimeError):
  """A worker raised and the run cannot go on (no workers left, or --fail_fast)."""


class InjectedFailure(RuntimeError):
  """The simulated device failure `--inject_failure=J:S` raises in worker J at its step S."""


@dataclasses.dataclass
class Snapshot:
  step: int  # iterations finished (all workers) when it was taken
  params: object  # the master's weights at that moment
  wall_time_s: float  # training seconds so far in this launch (see `Run.train_seconds`)
  losses: list  # the workers' batch losses since the previous evaluation (floats)
  staleness: list  # staleness of each master update since the previous evaluation
  worker_steps: list  # iterations finished per worker so far
  evaluate: bool = True  # False: taken only for a checkpoint
  state: dict | None = None  # for a checkpoint: master, workers, samplers, applied (see `_state`)
  skipped: int = 0  # evaluation points skipped since the previous evaluation (one was running)
  workers: list | None = None  # every worker's state at that moment (for the gap diagnostic)


@dataclasses.dataclass
class Failure:
  worker: int
  step: int  # the worker's own iteration at which it raised
  error: str

  def describe(self):
    return f"worker {self.worker} failed at its step {self.step}: {self.error}"


class _Loss:
  """One iteration's loss, still on its device, with who produced it (for the NaN message)."""

  __slots__ = ("ticket", "worker", "worker_step", "value")

  def __init__(self, ticket, worker, worker_step, value):
    self.ticket, self.worker, self.worker_step, self.value = ticket, worker, worker_step, value


class Run:
  """The shared bookkeeping of one asynchronous run; `run()` drives it."""

  def __init__(
    self,
    algorithm,
    samplers,
    *,
    steps,
    eval_every,
    batch_size,
    fail_fast,
    failure,
    checkpoint_every=0,
    nan_at=None,
    save_state=False,
  ):
    self.algorithm, self.samplers = algorithm, samplers
    self.steps, self.eval_every, self.batch_size = steps, eval_every, batch_size
    self.save_state = save_state  # the final snapshot carries the full state, for a checkpoint
    self.checkpoint_every = checkpoint_every if save_state else 0  # 0: none between
    self.fail_fast, self.inject = fail_fast, failure  # inject: (worker, own step) or None
    self.nan_at = nan_at  # the iteration (ticket) whose batch is poisoned with NaN, or None
    self.num_workers = len(samplers)
    self.lock = threading.Lock()  # guards the bookkeeping below, never the weights
    self.changed = threading.Condition(self.lock)  # a ticket, slot or barrier changed
    self.issued = self.done = 0
    self.worker_steps = [0] * self.num_workers
    self.worker_states = [None] * self.num_workers
    self.applied = []  # (worker, its own step) of every finished iteration, in finishing order
    self.losses, self.staleness = [], []  # since the previous evaluation
    self.all_staleness = collections.Counter()  # {staleness: count} over the whole run
    self.evaluations_skipped = 0  # over the whole run
    self._skipped = 0  # since the previous evaluation
    self._slot = None  # the one evaluation snapshot waiting for, or in, the main thread
    self._slot_busy = False
    self.failures: list[Failure] = []
    self.stopped = False  # True when `should_stop` ended the run early
    self.stop = threading.Event()
    self.start_time = None
    self._barrier = steps  # tickets are issued up to here (the next checkpoint step)
    self._start_done = 0  # iterations done before this launch
    self._warm = set()  # workers whose first (compiling) iteration of this launch is done
    self._warm_time = None  # when the last live worker finished its first iteration
    self._warm_done = self._warm_paused = 0  # iterations done and seconds paused by then
    self._paused_s = 0.0  # seconds the workers waited at checkpoint barriers

  def restore(self, done, worker_steps, worker_states, sampler_states, applied=(), staleness=None):
    """Continue a run from a checkpoint: `done` iterations finished, workers where they were."""
    self.issued = self.done = self._start_done = done
    self.worker_steps = list(worker_steps)
    self.worker_states = list(worker_states)
    self.applied = [tuple(pair) for pair in applied]
    self.all_staleness = collections.Counter({int(s): c for s, c in (staleness or {}).items()})
    for sampler, position in zip(self.samplers, sampler_states, strict=True):
      sampler.set_state(position)

  # --- Worker threads -------------------------------------------------------------------------

  def _take_ticket(self):
    """The number (1, 2, ...) of the iteration to do next, or None when there is none left."""
    with self.changed:
      while self.issued >= self._barrier and not self.stop.is_set() and self.issued < self.steps:
        self.changed.wait()  # at a checkpoint barrier: the main thread saves, then lifts it
      if self.issued >= self.steps or self.stop.is_set():
        return None
      self.issued += 1
      return self.issued

  def _finish(self, j, ticket, worker_state, loss, staleness):
    with self.changed:
      self.done += 1
      self.losses.append(_Loss(ticket, j, self.worker_steps[j], loss))
      self.applied.append((j, self.worker_steps[j]))
      self.worker_steps[j] += 1
      self.worker_states[j] = worker_state
      if staleness is not None:
        self.staleness.append(staleness)
        self.all_staleness[staleness] += 1
      if j not in self._warm:
        self._warm.add(j)
        if self._warm_time is None and len(self._warm) >= self.num_workers - len(self.failures):
          self._warm_time, self._warm_done = time.perf_counter(), self.done
          self._warm_paused = self._paused_s
      if self.done < self.steps and self.done % self.eval_every == 0:
        if self._slot is None and not self._slot_busy:
          self._slot = self._snapshot(evaluate=True, state=None)
        else:
          self._skipped += 1
          self.evaluations_skipped += 1
      self.changed.notify_all()

  def _worker(self, j):
    own_step = self.worker_steps[j]
    worker_state = self.worker_states[j]
    while (ticket := self._take_ticket()) is not None:
      try:
        if self.inject == (j, own_step):
          raise InjectedFailure(f"injected failure (--inject_failure={j}:{own_step})")
        batch = self.samplers[j].next(self.batch_size)
        if ticket == self.nan_at:
          batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        worker_state, loss, staleness = self.algorithm.iterate(j, worker_state, batch)
      except Exception as error:
        with self.changed:
          self.issued -= 1  # the iteration was not done: another worker will do it
          self.failures.append(Failure(j, own_step, f"{type(error).__name__}: {error}"))
          self.changed.notify_all()
        logging.error("worker %d failed at its step %d:\n%s", j, own_step, traceback.format_exc())
        if self.fail_fast:
          self.stop.set()
        return
      self._finish(j, ticket, worker_state, loss, staleness)
      own_step += 1

  # --- The main thread ------------------------------------------------------------------------

  def train_seconds(self):
    """Seconds since the workers started in this launch, less the checkpoint barriers."""
    return max(time.perf_counter() - self.start_time - self._paused_s, 0.0)

  def throughput(self):
    """(iterations, seconds) of this launch with each worker's first, compiling, iteration and
    the checkpoint barriers left out: the basis of `samples_per_s`."""
    if self._warm_time is None:  # some worker never finished an iteration: count everything
      return self.done - self._start_done, self.train_seconds()
    seconds = time.perf_counter() - self._warm_time - (self._paused_s - self._warm_paused)
    return self.done - self._warm_done, max(seconds, 0.0)

  def _snapshot(self, evaluate, state):
    """A Snapshot of now (lock held); hands over and resets the per-row losses when evaluating."""
    snapshot = Snapshot(
      step=self.done,
      params=self.algorithm.snapshot() if evaluate else None,
      wall_time_s=self.train_seconds(),
      losses=self.losses,
      staleness=self.staleness,
      worker_steps=list(self.worker_steps),
      evaluate=evaluate,
      state=state,
      skipped=self._skipped,
      workers=list(self.worker_states) if evaluate else None,
    )
    if evaluate:
      self.losses, self.staleness, self._skipped = [], [], 0
    else:  # a checkpoint: the next evaluation still needs them
      self.losses, self.staleness = list(self.losses), list(self.staleness)
    return snapshot

  def _state(self):
    """Everything a checkpoint needs; called with the lock held and no iteration in flight."""
    return {
      "master": self.algorithm.master_state(),
      "workers": list(self.worker_states),
      "samplers": [sampler.state() for sampler in self.samplers],
      "applied": list(self.applied),
      "staleness": {str(s): c for s, c in sorted(self.all_staleness.items())},
      "evaluations_skipped": self.evaluations_skipped,
    }

  @staticmethod
  def _pull_losses(snapshot):
    """The snapshot's losses on the host, (iteration, [value], who): the one sync per row."""
    entries = snapshot.losses
    # np.asarray per scalar: ~100x cheaper than one jax.device_get of the list, on the hot thread.
    values = np.array([np.asarray(e.value) for e in entries], np.float64).reshape(-1)
    snapshot.losses = [
      (e.ticket, values[i : i + 1], f"worker {e.worker}, its step {e.worker_step}")
      for i, e in enumerate(entries)
    ]

  def _checkpoint_due(self):
    if self.stop.is_set():  # stopping: the final snapshot carries the state instead
      return False
    return self._barrier < self.steps and self.done == self.issued == self._barrier

  def run(self, params_host, on_snapshot, should_stop=None, tick=None):
    """Start the workers, feed `on_snapshot` in this thread, return the final snapshot.

    `should_stop()` is polled here; when it returns True the workers stop after their current
    iteration and the final snapshot (with the full state) is returned with `stopped` set.
    """
    for j in range(self.num_workers):
      if self.worker_states[j] is None:
        self.worker_states[j] = self.algorithm.init_worker(j, params_host)
    if self.checkpoint_every:
      self._barrier = min(
        (self.done // self.checkpoint_every + 1) * self.checkpoint_every, self.steps
      )
    threads = [
      threading.Thread(target=self._worker, args=(j,), name=f"worker-{j}", daemon=True)
      for j in range(self.num_workers)
    ]
    self.start_time = time.perf_counter()
    for thread in threads:
      thread.start()
    try:
      while True:
        if should_stop is not None and should_stop() and not self.stop.is_set():
          self.stopped = True
          self.stop.set()
          with self.changed:
            self.changed.notify_all()
        if tick is not None:
          tick(self.done)
        with self.changed:
          if self._slot is None and not self._checkpoint_due():
            if not any(t.is_alive() for t in threads):
              break
            self.changed.wait(timeout=0.05)
            continue
          if self._slot is not None:
            snapshot, self._slot, self._slot_busy = self._slot, None, True
          else:  # every worker waits at the barrier: this instant is consistent
            paused_at = time.perf_counter()
            snapshot = self._snapshot(evaluate=False, state=self._state())
        if snapshot.evaluate:
          try:
            self._pull_losses(snapshot)
            if not self.stop.is_set():
              on_snapshot(snapshot)
          finally:
            with self.changed:
              self._slot_busy = False
          continue
        self._pull_losses(snapshot)
        on_snapshot(snapshot)
        with self.changed:
          self._paused_s += time.perf_counter() - paused_at
          self._barrier = min(self._barrier + self.checkpoint_every, self.steps)
          self.changed.notify_all()
    except BaseException:  # Ctrl-C or a failing evaluation: stop every worker before leaving
      self.stop.set()
      with self.changed:
        self.changed.notify_all()
      for thread in threads:
        thread.join()
      raise
    for thread in threads:
      thread.join()
    if self.fail_fast and self.failures:
      raise WorkerFailure(f"{self.failures[0].describe()} (--fail_fast stops the run)")
    if self.done < self.steps and not self.stop.is_set():
      raise WorkerFailure(
        f"all {self.num_workers} workers failed after {self.done} of {self.steps} iterations; "
        f"first: {self.failures[0].describe()}"
      )
    with self.changed:
      final = self._snapshot(evaluate=True, state=self._state() if self.save_state else None)
    self._pull_losses(final)
    return final


def worker_seed(seed, worker):
  """Worker 0 draws exactly the batches single-device SGD would; worker j > 0 its own stream."""
  return seed if worker == 0 else [seed, worker]


def staleness_summary(histogram):
  """Median, mean, max and the histogram {staleness: count}, from a histogram or a list."""
  if not isinstance(histogram, dict):
    histogram = collections.Counter(int(s) for s in histogram)
  counts = {int(s): int(c) for s, c in histogram.items() if c}
  if not counts:
    return None
  values = np.repeat(np.array(sorted(counts)), [counts[s] for s in sorted(counts)])
  return {
    "median": float(np.median(values)),
    "mean": float(values.mean()),
    "max": int(values.max()),
    "histogram": {str(s): counts[s] for s in sorted(counts)},
  }
