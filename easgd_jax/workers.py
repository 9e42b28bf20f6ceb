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

`run` hands out numbered iterations ("tickets") until `steps` of them are done in total, so
`--steps` counts iterations across all workers, each one master update for async SGD and Hogwild.
Every `eval_every` finished iterations it puts a snapshot of the master on a queue that the
calling (main) thread evaluates while the workers carry on; every `checkpoint_every` the snapshot
also carries the master's and every worker's state and the samplers' positions, for a checkpoint.
A worker whose loss turns NaN/inf stops the run (`diverged`), since the master it wrote is shared.
"""

import dataclasses
import queue
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
  wall_time_s: float  # since the workers started
  losses: list  # the workers' batch losses since the previous evaluation (floats)
  staleness: list  # staleness of each master update since the previous evaluation
  worker_steps: list  # iterations finished per worker so far
  evaluate: bool = True  # False: taken only for a checkpoint
  state: dict | None = None  # for a checkpoint: master, workers, samplers (see `_state`)


@dataclasses.dataclass
class Failure:
  worker: int
  step: int  # the worker's own iteration at which it raised
  error: str

  def describe(self):
    return f"worker {self.worker} failed at its step {self.step}: {self.error}"


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
    self.save_state = save_state  # snapshots carry the full state, for checkpoints
    self.checkpoint_every = checkpoint_every if save_state else 0  # 0: none between
    self.fail_fast, self.inject = fail_fast, failure  # inject: (worker, own step) or None
    self.nan_at = nan_at  # the iteration (ticket) whose batch is poisoned with NaN, or None
    self.num_workers = len(samplers)
    self.lock = threading.Lock()  # guards the bookkeeping below, never the weights
    self.issued = self.done = 0
    self.worker_steps = [0] * self.num_workers
    self.worker_states = [None] * self.num_workers
    self.losses, self.staleness, self.all_staleness = [], [], []
    self.failures: list[Failure] = []
    self.diverged = None  # (worker, its step, iteration, loss) of the first NaN/inf loss
    self.stopped = False  # True when `should_stop` ended the run early
    self.stop = threading.Event()
    self.snapshots: queue.Queue = queue.Queue()
    self.start_time = None

  def restore(self, done, worker_steps, worker_states, sampler_states):
    """Continue a run from a checkpoint: `done` iterations finished, workers where they were."""
    self.issued = self.done = done
    self.worker_steps = list(worker_steps)
    self.worker_states = list(worker_states)
    for sampler, position in zip(self.samplers, sampler_states, strict=True):
      sampler.set_state(position)

  def _take_ticket(self):
    """The number (1, 2, ...) of the iteration to do next, or None when there is none left."""
    with self.lock:
      if self.issued >= self.steps or self.stop.is_set():
        return None
      self.issued += 1
      return self.issued

  def _finish(self, j, worker_state, loss, staleness):
    with self.lock:
      self.done += 1
      self.worker_steps[j] += 1
      self.worker_states[j] = worker_state
      self.losses.append(loss)
      if staleness is not None:
        self.staleness.append(staleness)
        self.all_staleness.append(staleness)
      if self.done >= self.steps:
        return  # the last snapshot is taken after every worker has stopped
      evaluate = self.done % self.eval_every == 0
      checkpoint = bool(self.checkpoint_every) and self.done % self.checkpoint_every == 0
      if evaluate or checkpoint:
        self._snapshot(evaluate, checkpoint)

  def _state(self):
    """Everything a checkpoint needs; called with the lock held, between two iterations."""
    return {
      "master": self.algorithm.master_state(),
      "workers": list(self.worker_states),
      "samplers": [sampler.state() for sampler in self.samplers],
    }

  def _snapshot(self, evaluate, checkpoint):
    self.snapshots.put(
      Snapshot(
        step=self.done,
        params=self.algorithm.snapshot(),
        wall_time_s=time.perf_counter() - self.start_time,
        losses=self.losses,
        staleness=self.staleness,
        worker_steps=list(self.worker_steps),
        evaluate=evaluate,
        state=self._state() if checkpoint else None,
      )
    )
    if evaluate:
      self.losses, self.staleness = [], []
    else:  # the next evaluation still needs them
      self.losses, self.staleness = list(self.losses), list(self.staleness)

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
        loss = float(loss)  # a worker finishes its iteration before it takes another
      except Exception as error:
        with self.lock:
          self.issued -= 1  # the iteration was not done: another worker will do it
          self.failures.append(Failure(j, own_step, f"{type(error).__name__}: {error}"))
        logging.error("worker %d failed at its step %d:\n%s", j, own_step, traceback.format_exc())
        if self.fail_fast:
          self.stop.set()
        return
      if not np.isfinite(loss):
        with self.lock:
          self.diverged = self.diverged or (j, own_step, ticket, loss)
        self.stop.set()  # the master it wrote to is shared: nobody can go on from it
        return
      self._finish(j, worker_state, loss, staleness)
      own_step += 1

  def run(self, params_host, on_snapshot, should_stop=None):
    """Start the workers, feed `on_snapshot` in this thread, return the final snapshot.

    `should_stop()` is polled here; when it returns True the workers stop after their current
    iteration and the final snapshot (with the full state) is returned with `stopped` set.
    """
    for j in range(self.num_workers):
      if self.worker_states[j] is None:
        self.worker_states[j] = self.algorithm.init_worker(j, params_host)
    threads = [
      threading.Thread(target=self._worker, args=(j,), name=f"worker-{j}", daemon=True)
      for j in range(self.num_workers)
    ]
    self.start_time = time.perf_counter()
    for thread in threads:
      thread.start()
    try:
      while any(t.is_alive() for t in threads) or not self.snapshots.empty():
        if should_stop is not None and should_stop() and not self.stop.is_set():
          self.stopped = True
          self.stop.set()
        try:
          on_snapshot(self.snapshots.get(timeout=0.05))
        except queue.Empty:
          pass
    except BaseException:  # Ctrl-C or a failing evaluation: stop every worker before leaving
      self.stop.set()
      for thread in threads:
        thread.join()
      raise
    if self.diverged is None and self.fail_fast and self.failures:
      raise WorkerFailure(f"{self.failures[0].describe()} (--fail_fast stops the run)")
    if self.done < self.steps and not self.stop.is_set():
      raise WorkerFailure(
        f"all {self.num_workers} workers failed after {self.done} of {self.steps} iterations; "
        f"first: {self.failures[0].describe()}"
      )
    with self.lock:
      self._snapshot(evaluate=True, checkpoint=self.save_state)
    return self.snapshots.get()


def worker_seed(seed, worker):
  """Worker 0 draws exactly the batches single-device SGD would; worker j > 0 its own stream."""
  return seed if worker == 0 else [seed, worker]


def staleness_summary(values):
  """Median, mean, max and the full histogram {staleness: count} of the master updates."""
  if not values:
    return None
  values = np.asarray(values)
  counts = np.bincount(values)
  return {
    "median": float(np.median(values)),
    "mean": float(values.mean()),
    "max": int(values.max()),
    "histogram": {str(s): int(c) for s, c in enumerate(counts) if c},
  }
