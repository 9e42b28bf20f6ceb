"""What every engine gives the trainer, and what the trainer gives every engine.

An engine is an interpreter of an algorithm's declared facts (algorithms/base.py): it decides
who applies which update when, and never writes an equation or names an algorithm. Its face
(`Engine`) is small: `run(plan)` trains from where it stands to the plan's end and yields
events; the trainer (easgd_jax/trainer.py) alone decides what to do with them.

Events: `Progress(step)`, often (progress lines; the trainer polls the stop signal here); a
`Snapshot` at each of the plan's points (the losses since the previous one, the weights to
evaluate, the workers' points, the whole state when a checkpoint or a stop asks for it, the new
applied-update entries); `WorkerLost(worker, step, error, at)`, `WorkerJoined(worker, at)`.

The `Plan` is the trainer's one point rule: where to evaluate, where to checkpoint, whether to
stop. Engines ask it and take their snapshots where it says.
"""

import collections
import contextlib
import dataclasses
import statistics
import time
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

# A worker's speed, when a rule's exchange periods come from speeds: the median of at least this
# many timed steps, and as many more as fit in this many seconds (a tiny model's step is noise).
SPEED_REPEATS, SPEED_SECONDS = 5, 0.5


@dataclasses.dataclass
class Progress:
  step: int


@dataclasses.dataclass
class Snapshot:
  step: int  # run steps done
  wall_time_s: float  # training seconds of this launch so far (pauses left out)
  losses: list  # [(step, values, who)] since the previous evaluation, on the host
  params: Any = None  # the weights to evaluate (the center), or None: no evaluation here
  points: list | None = None  # each worker's x^i beside the center, for the gap diagnostic
  state: tuple | None = None  # (arrays, record) of this instant, to be checkpointed
  stopped: int | None = None  # the stop signal that arrived: save the state, then stop
  extra: dict = dataclasses.field(default_factory=dict)  # the engine's columns of the row
  applied: list = dataclasses.field(default_factory=list)  # applied-update entries since last


@dataclasses.dataclass
class WorkerLost:
  worker: int
  step: int  # the worker's own step at which it failed
  error: str
  at: int  # the run step at which it was found lost


@dataclasses.dataclass
class WorkerJoined:
  worker: int
  at: int  # the run step at which it (a new actor in its place) joined


class Plan:
  """The trainer's points: evaluation every --eval_every and at the end, checkpoints every
  --checkpoint_every and at the end (with a workdir), and a stop when a signal arrived."""

  def __init__(self, config, checkpointing, stop_request=None):
    self.steps, self.eval_every = config.steps, config.eval_every
    self.checkpoint_every = config.checkpoint_every if checkpointing else 0
    self.checkpointing = checkpointing
    self.stop_request = stop_request

  def evaluates(self, step):
    return step % self.eval_every == 0 or step == self.steps

  def checkpoints(self, step):
    if not self.checkpointing:
      return False
    return step == self.steps or bool(self.checkpoint_every and step % self.checkpoint_every == 0)

  def next_checkpoint(self, step):
    """The first checkpoint step after `step` (the end when there is none between)."""
    if not self.checkpoint_every:
      return self.steps
    return min((step // self.checkpoint_every + 1) * self.checkpoint_every, self.steps)

  def next_point(self, step):
    """The first step after `step` that evaluates or checkpoints."""
    found = min((step // self.eval_every + 1) * self.eval_every, self.steps)
    return min(found, self.next_checkpoint(step)) if self.checkpointing else found

  @property
  def stopping(self):
    """The stop signal that arrived (SIGTERM / SIGINT), or None."""
    return self.stop_request.signum if self.stop_request is not None else None


class Engine(Protocol):
  state: Any  # the whole state now (for notebooks and tests)
  eval_placement: Any  # where the trainer scores the weights (None: this process's device 0)

  def describe(self) -> str:
    """Where the run's workers are, for the start-up line."""

  def checkpoint_arrays(self) -> dict:
    """{path name: array} of the state now: the template a restore fills."""

  def restore(self, arrays, record) -> None:
    """Continue from a checkpoint (the record is the JSON saved with it)."""

  def run(self, plan) -> Any:
    """Train to plan.steps, yielding Progress, Snapshot, WorkerLost and WorkerJoined."""

  def throughput(self) -> tuple:
    """(iterations, seconds) of this launch, compilation and pauses left out."""

  def final_params(self) -> Any: ...

  def summary(self) -> dict:
    """The engine's part of summary.json."""

  def write_outputs(self, workdir) -> None:
    """Files of the engine's own beside the usual outputs."""


class Stopwatch:
  """Training seconds of one launch: `paused()` leaves out what the trainer does at a snapshot;
  `warm(steps)` marks the end of the compiling first step, which throughput leaves out."""

  def __init__(self, done=0):
    self.start, self.paused_s = time.perf_counter(), 0.0
    self.done = self.reached = done  # steps done at the launch, and now
    self.warmed = None  # (steps done, seconds) when the first steps had compiled

  def seconds(self):
    return time.perf_counter() - self.start - self.paused_s

  @contextlib.contextmanager
  def paused(self):
    begin = time.perf_counter()
    try:
      yield
    finally:
      self.paused_s += time.perf_counter() - begin

  def warm(self, done):
    if self.warmed is None:
      self.warmed = (done, self.seconds())

  def throughput(self):
    """(iterations, seconds) after the warm-up; all of them when it never ended."""
    if self.warmed is None:
      return self.reached - self.done, self.seconds()
    return self.reached - self.warmed[0], max(self.seconds() - self.warmed[1], 0.0)


class Applied(NamedTuple):
  """One update the master applied, in the order applied: the record every engine keeps.

  (worker, worker_step, read_at, applied_as) go to WORKDIR/applied_updates.jsonl, a line each;
  `start` and `end` (perf_counter() around the master's update, on the local engine) stay in
  memory, for the tests of its memory model.
  """

  worker: int
  worker_step: int  # the worker's own step (0-based) its message came from
  read_at: int  # the master version the worker's message was computed against
  applied_as: int  # the version this update made: 1, 2, ...
  start: float = 0.0
  end: float = 0.0

  def entry(self):
    return [self.worker, self.worker_step, self.read_at, self.applied_as]


def speed(step, repeats=SPEED_REPEATS, seconds=SPEED_SECONDS):
  """Steps per second of `step()` (a worker's step, its result dropped): one call to compile,
  then the median time of `repeats` or more calls, each waited for, over `seconds` at least."""
  jax.block_until_ready(step())
  times, begin = [], time.perf_counter()
  while len(times) < repeats or time.perf_counter() - begin < seconds:
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  return 1 / statistics.median(times)


def peek(sampler, batch_size):
  """The sampler's next batch, the sampler left where it was."""
  position = sampler.state()
  batch = sampler.next(batch_size)
  sampler.set_state(position)
  return batch


def worker_seed(seed, worker):
  """Worker 0 draws exactly the batches a one-device run would; worker j > 0 its own stream."""
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
