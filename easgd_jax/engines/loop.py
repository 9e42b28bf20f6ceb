"""The stepping loop every step-at-a-time engine shares: the host schedulers of the local
engine, Algorithm 1 driving Ray actors, and the simulated cluster's chunks.

A `Stepper` knows how one engine advances the run and where its state lives:

  advance(step, count) -> [(step, loss, who)]   take `count` run steps from `step` (losses may
                                                 stay on the device until a snapshot)
  host_losses(pending) -> the same on the host  (a collective, multi-process)
  eval_params(), worker_points(), checkpoint() -> (arrays, record)
  diagnostics() -> the rule's diagnostics of the state it evaluates, as host floats
  agree(signum) -> the stop every process got   (a collective, multi-process; else signum)
  extra(step) -> the row's engine columns, applied() -> new applied-update entries
  chunk: run steps per `advance` at most; shared: several processes step together

`run_steps` asks the trainer's Plan where the points are, and yields a Snapshot at each.
"""

import jax
import numpy as np

from easgd_jax import checkpoints
from easgd_jax.engines.base import Progress, Snapshot, Stopwatch


class Stepper:
  """What the step-at-a-time schedulers share: sampling, the losses, the engine columns."""

  # Run steps per `advance`: the loop's events and checks once per chunk, not per step (with one
  # step per advance, Algorithm 1 on 4 devices ran at 0.82x of its speed before the redesign,
  # with 64 at 0.97x: BENCHMARKS.md (l)).
  chunk, shared, max_in_flight = 64, False, None
  eval_placement = None  # where the trainer scores the weights (None: this process's device 0)

  def __init__(self, config, sampler):
    self.config, self.sampler = config, sampler

  def advance(self, step, count):
    pending = []
    for t in range(step, step + count):  # t: steps done before this one
      batch = self.sampler.next(self.config.batch_size)
      if t + 1 == self.config.inject_nan:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      loss, who = self.step(t, batch)
      pending.append((t + 1, loss, who))
      if self.max_in_flight and (t + 1) % self.max_in_flight == 0:
        jax.block_until_ready(loss)  # CPU collectives: keep the queue short (devices.py)
    return pending

  def host_losses(self, pending):
    return [(s, host_values(loss), who) for s, loss, who in pending]

  def agree(self, signum):
    return signum

  def extra(self, step):
    return {}

  def diagnostics(self):
    return {}

  def applied(self):
    return []

  def take_events(self):
    """Workers lost or rejoined since the last call (WorkerLost, WorkerJoined)."""
    return []

  def summary(self):
    return {}

  def write_outputs(self, workdir):
    pass

  def describe(self):
    return f"devices: {', '.join(map(str, self.devices))}"

  def checkpoint(self):
    return self.checkpoint_arrays(), {"samplers": self.sampler.state()}

  def checkpoint_arrays(self):
    return checkpoints.to_host(self.state)

  def restore(self, arrays, record):
    self.state = checkpoints.like(self.state, arrays)
    self.sampler.set_state(record["samplers"])


def run_steps(stepper, plan, start, pending, stopwatch=None):
  """Advance `stepper` from run step `start` to plan.steps; a generator of events.

  `pending`: losses since the last evaluation (a resumed run's come from its checkpoint).
  Training seconds leave out every snapshot's handling (`stopwatch`, which the caller may read
  for the throughput).
  """
  stopwatch = stopwatch or Stopwatch(start)
  step = start
  while step < plan.steps:
    count = min(stepper.chunk, plan.next_point(step) - step)
    advanced = stepper.advance(step, count)
    if stopwatch.warmed is None:  # the first advance compiles: the warm-up ends once it ran
      jax.block_until_ready(advanced)
    pending += advanced
    step += count
    stopwatch.reached = step
    stopwatch.warm(step)  # the first advance of a launch compiles: throughput leaves it out
    yield Progress(step)
    yield from stepper.take_events()
    evaluate, save = plan.evaluates(step), plan.checkpoints(step)
    stopping = None if stepper.shared else plan.stopping
    if not (evaluate or save or stopping):
      continue
    pending = stepper.host_losses(pending)  # the loop's only wait on the devices
    if stepper.shared and plan.checkpointing:  # several processes agree on a stop here
      stopping = stepper.agree(plan.stopping)
    snapshot = Snapshot(
      step,
      stopwatch.seconds(),
      pending,
      stopped=stopping,
      extra=stepper.extra(step),
      applied=stepper.applied(),
    )
    if evaluate:
      snapshot.params, snapshot.points = stepper.eval_params(), stepper.worker_points()
      snapshot.extra.update(stepper.diagnostics())
    if save or stopping:
      snapshot.state = stepper.checkpoint()
    with stopwatch.paused():
      yield snapshot
    if evaluate:
      pending = []
    if stopping:
      return


class StepEngine:
  """The Engine face (engines/base.py) over a Stepper: restore, run, throughput, outputs."""

  def __init__(self, stepper):
    self.stepper = stepper
    self.start, self.pending, self.stopwatch = 0, [], None

  @property
  def state(self):
    return self.stepper.state

  @property
  def eval_placement(self):
    return self.stepper.eval_placement

  def describe(self):
    return self.stepper.describe()

  def checkpoint_arrays(self):
    return self.stepper.checkpoint_arrays()

  def restore(self, arrays, record):
    self.stepper.restore(arrays, record)
    self.start = record["step"]
    self.pending = [(s, np.asarray(v, np.float32), None) for s, v in record["losses"]]

  def run(self, plan):
    self.stopwatch = Stopwatch(self.start)
    return run_steps(self.stepper, plan, self.start, list(self.pending), self.stopwatch)

  def throughput(self):
    return self.stopwatch.throughput() if self.stopwatch else (0, 0.0)

  def final_params(self):
    return self.stepper.eval_params()

  def summary(self):
    return self.stepper.summary()

  def write_outputs(self, workdir):
    self.stepper.write_outputs(workdir)


def host_floats(found):
  """A rule's diagnostics ({name: scalar on a device}) as floats for a row."""
  return {name: float(value) for name, value in found.items()}


def host_values(loss):
  """A step's loss on the host, flat: one value, or one per device (one process's devices)."""
  if isinstance(loss, np.ndarray):
    return loss.reshape(-1)
  return np.concatenate([np.asarray(s.data).reshape(-1) for s in loss.addressable_shards])
