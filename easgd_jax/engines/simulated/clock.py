"""The simulated cluster's clock: what each operation costs, and the order of events that gives.

The simulated engine runs G workers' arithmetic fused on one device; which worker reads and
writes the master when, with what staleness, comes from here (events.py for the parameter-server
family): a discrete-event simulation in NumPy over a cost model, deterministic for a seed. The
arithmetic then runs that schedule; nothing here touches JAX.

Costs (`Costs`, all > 0 and finite): one local step of one worker (`compute_s`), one message's
latency (`latency_s`) plus its bytes over the link's bandwidth (`bandwidth_bytes_s`; every worker
has its own link to the master, full duplex), and the master's time to apply one update
(`service_s`; it applies one at a time, first come first served, or for an unlocked master in
`events` each on arrival, overlapping). Compute times may vary: a seeded lognormal factor with
sigma `jitter` on every step (mean 1), and `stragglers` workers (the last ones)
`straggler_slowdown` times slower.

What a schedule reports, all in virtual seconds:
- `makespan`: when the last worker finished its last step;
- `compute_share`: the workers' compute time over G * makespan; `communication_share` = 1 - it,
  the share of worker time spent sending, receiving or waiting on the master (the quantity the
  SC'17 paper of the elastic averaging family reports as time in communication);
- `link_busy_share`: the time links carry bytes over G * makespan;
- `master_utilization`: the master's service time over the makespan;
- the staleness of every master update: updates applied between the worker's previous read and
  this update.

Every worker's compute times come from its own stream (`StepTimes`), and `events` simulates
workers that run forever, so the asynchronous family's event stream, like the `synchronous` and
`round_robin` clocks, has the prefix property: a run's first n iterations are the same whatever
its total, and a run resumed with a raised --steps continues the same stream. (`parameter_server`,
a budgeted run of exactly `steps` iterations, does not have it.)
"""

import dataclasses
import math
import operator
from typing import NamedTuple

import numpy as np

from easgd_jax import schedule


@dataclasses.dataclass(frozen=True)
class Costs:
  compute_s: float  # one local step (forward, backward, update) of one worker
  latency_s: float  # one message, one way
  bandwidth_bytes_s: float  # one link, one way
  service_s: float  # the master applying one update
  jitter: float = 0.0  # sigma of the lognormal factor on every step's compute time (mean 1)
  stragglers: int = 0  # this many workers (the last ones) are slower
  straggler_slowdown: float = 4.0  # by this factor

  def __post_init__(self):
    for name in ("compute_s", "latency_s", "bandwidth_bytes_s", "service_s", "straggler_slowdown"):
      value = getattr(self, name)
      if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 (got {value!r})")
    if not (
      isinstance(self.jitter, int | float) and math.isfinite(self.jitter) and self.jitter >= 0
    ):
      raise ValueError(f"jitter must be a finite number >= 0 (got {self.jitter!r})")
    if not (isinstance(self.stragglers, int) and self.stragglers >= 0):
      raise ValueError(f"stragglers must be an integer >= 0 (got {self.stragglers!r})")

  def transfer_s(self, num_bytes):
    """One message of `num_bytes`: its latency, then its bytes at the link's bandwidth."""
    return self.latency_s + num_bytes / self.bandwidth_bytes_s

  def mean_step_s(self, num_workers):
    """[worker] the mean compute seconds of each worker's step (the jitter's factor has mean 1):
    its speed is 1 / this."""
    slowed = np.arange(num_workers) >= num_workers - self.stragglers
    return self.compute_s * np.where(slowed, self.straggler_slowdown, 1.0)

  def step_times(self, num_workers, num_steps, rng):
    """[worker, step] compute seconds: jitter on every step, the last `stragglers` slowed."""
    if self.stragglers > num_workers:
      raise ValueError(f"stragglers ({self.stragglers}) must be at most the {num_workers} workers")
    times = np.full((num_workers, num_steps), self.compute_s)
    if self.jitter:  # lognormal with mean 1: exp(N(-sigma^2 / 2, sigma^2))
      times *= rng.lognormal(-(self.jitter**2) / 2, self.jitter, size=times.shape)
    if self.stragglers:
      times[num_workers - self.stragglers :] *= self.straggler_slowdown
    return times


def _count(name, value, least):
  """`value` as an int, or a ValueError naming `name` unless it is an integer >= `least`."""
  try:
    if isinstance(value, bool):  # True is an int, but not a count
      raise TypeError
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer >= {least} (got {value!r})") from None
  if value < least:
    raise ValueError(f"{name} must be an integer >= {least} (got {value!r})")
  return value


class StepTimes:
  """Compute seconds of every worker's own steps, each worker from its own stream.

  Worker w's lognormal jitter factors come from `np.random.default_rng([seed, w])`, drawn in order
  of its own steps, so a step's time depends neither on how many steps are asked for nor on the
  other workers' progress. The last `costs.stragglers` workers are `straggler_slowdown` slower.
  """

  BLOCK = 1024  # draws per refill; a generator's draws are the same in blocks of any size

  def __init__(self, costs, num_workers, seed=0):
    num_workers = _count("num_workers", num_workers, 1)
    if costs.stragglers > num_workers:
      raise ValueError(f"stragglers ({costs.stragglers}) must be at most the {num_workers} workers")
    self.costs, self.num_workers, self.seed = costs, num_workers, seed
    self._slowdown = np.where(
      np.arange(num_workers) >= num_workers - costs.stragglers, costs.straggler_slowdown, 1.0
    )
    self._rngs = [None] * num_workers  # made on the first draw: no jitter, no generator
    self._times = [np.empty(0) for _ in range(num_workers)]  # grown by doubling
    self._drawn = [0] * num_workers  # valid entries of each

  def _draw(self, worker, count):
    """Worker `worker`'s first `count` step times, drawn if not yet."""
    drawn = self._drawn[worker]
    if drawn >= count:
      return
    if self._rngs[worker] is None:
      self._rngs[worker] = np.random.default_rng([self.seed, worker])
    more = -(-(count - drawn) // self.BLOCK) * self.BLOCK
    sigma = self.costs.jitter  # lognormal with mean 1: exp(N(-sigma^2 / 2, sigma^2))
    factors = self._rngs[worker].lognormal(-(sigma**2) / 2, sigma, size=more)
    times = self._times[worker]
    if len(times) < drawn + more:  # doubling: drawing n steps copies O(n) times in all
      grown = np.empty(2 * (drawn + more))
      grown[:drawn] = times[:drawn]
      times = self._times[worker] = grown
    times[drawn : drawn + more] = self.costs.compute_s * factors * self._slowdown[worker]
    self._drawn[worker] = drawn + more

  def __call__(self, worker, own_step):
    """Seconds worker `worker` takes for its own step `own_step` (0-based)."""
    if own_step < 0:
      raise ValueError(f"own_step must be >= 0 (got {own_step!r})")
    if not self.costs.jitter:
      return float(self.costs.compute_s * self._slowdown[worker])
    self._draw(worker, own_step + 1)
    return float(self._times[worker][own_step])

  def table(self, num_steps):
    """[num_workers, num_steps]: every worker's first `num_steps` step times."""
    num_steps = _count("num_steps", num_steps, 0)
    if not self.costs.jitter:
      return np.full((self.num_workers, num_steps), self.costs.compute_s) * self._slowdown[:, None]
    for w in range(self.num_workers):
      self._draw(w, num_steps)
    return np.stack([times[:num_steps] for times in self._times])


class Timing(NamedTuple):
  """A synchronous run's clock: every step waits for the slowest worker."""

  step_end: np.ndarray  # [steps] when each step (and its all-reduce, if any) finished
  makespan: float
  compute_share: float
  link_busy_share: float

  @property
  def communication_share(self):
    return 1.0 - self.compute_share


def synchronous(costs, num_workers, steps, num_bytes, tau=1, seed=0, opens=False):
  """Workers stepping together (the step-driven data-parallel rules): every step all G
  compute, and on every tau-th one (schedule.exchanges: opening or closing a round) they
  all-reduce `num_bytes` as a ring does: 2 (G - 1) messages of num_bytes / G in turn on every
  link. The time a fast worker waits for the slowest counts as communication, as it does on a
  real cluster."""
  num_workers = _count("num_workers", num_workers, 1)
  tau = _count("tau", tau, 1)
  step_times = StepTimes(costs, num_workers, seed).table(steps)
  hops = 2 * (num_workers - 1)
  all_reduce = hops * costs.transfer_s(num_bytes / num_workers) if hops else 0.0
  exchanges = schedule.exchanges(np.arange(steps), tau, opens) * all_reduce
  step_end = np.cumsum(step_times.max(axis=0) + exchanges)
  makespan = float(step_end[-1]) if steps else 0.0
  busy = float(exchanges.astype(bool).sum()) * all_reduce
  return Timing(
    step_end=step_end,
    makespan=makespan,
    # min: one worker's share is its steps over their own sum, 1 up to rounding (never above)
    compute_share=min(1.0, float(step_times.sum() / (num_workers * makespan))) if makespan else 1.0,
    link_busy_share=busy / makespan if makespan else 0.0,
  )


def round_robin(costs, num_workers, steps, num_bytes, tau=1, seed=0, opens=True):
  """Algorithm 1 as the seed runs it: iteration t on worker j = t mod G alone. On j's exchange
  steps (its own steps 0, tau, 2 tau, ...) the center travels to device j, j takes its step, and
  x^j travels back for the master's Eq. (2); other iterations are one local step. One device
  works at a time, so with G workers at most 1/G of the workers' time is compute."""
  num_workers = _count("num_workers", num_workers, 1)
  tau = _count("tau", tau, 1)
  step_times = StepTimes(costs, num_workers, seed).table(-(-steps // num_workers))
  worker, own = schedule.round_robin(np.arange(steps), num_workers)
  compute = step_times[worker, own]
  round_trip = 2 * costs.transfer_s(num_bytes)
  exchanges = schedule.exchanges(own, tau, opens)
  step_end = np.cumsum(compute + exchanges * (round_trip + costs.service_s))
  makespan = float(step_end[-1]) if steps else 0.0
  return Timing(
    step_end=step_end,
    makespan=makespan,
    compute_share=min(1.0, float(compute.sum() / (num_workers * makespan))) if makespan else 1.0,
    link_busy_share=float(exchanges.sum() * round_trip / (num_workers * makespan))
    if makespan
    else 0.0,
  )
