"""The simulated cluster's clock: what each operation costs, and the order of events that gives.

The simulated engine (issue "Simulated clusters", in progress) runs G workers' arithmetic fused on
one device; which worker reads and writes the master when, with what staleness, comes from here:
a discrete-event simulation in NumPy over a cost model, deterministic for a seed. The arithmetic
then runs that schedule; nothing here touches JAX.

Costs (`Costs`, all > 0 and finite): one local step of one worker (`compute_s`), one message's
latency (`latency_s`) plus its bytes over the link's bandwidth (`bandwidth_bytes_s`; every worker
has its own link to the master, full duplex), and the master's time to apply one update
(`service_s`; it applies one at a time, first come first served). Compute times may vary: a
seeded lognormal factor with sigma `jitter` on every step (mean 1), and `stragglers` workers (the
last ones) `straggler_slowdown` times slower.

What a schedule reports, all in virtual seconds:
- `makespan`: when the last worker finished its last step;
- `compute_share`: the workers' compute time over G * makespan; `communication_share` = 1 - it,
  the share of worker time spent sending, receiving or waiting on the master (the quantity the
  SC'17 EASGD paper reports as time in communication);
- `link_busy_share`: the time links carry bytes over G * makespan;
- `master_utilization`: the master's service time over the makespan;
- the staleness of every master update: updates applied between the worker's previous read and
  this update.
"""

import dataclasses
import math
from typing import NamedTuple

import numpy as np


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


class Schedule(NamedTuple):
  """A parameter-server run in the order the master applied the updates."""

  worker: np.ndarray  # [updates] the worker whose update the master applied
  worker_step: np.ndarray  # [updates] that worker's own steps done when it sent it
  read_at: np.ndarray  # [updates] master updates done when the worker last read
  arrival: np.ndarray  # [updates] when the message reached the master
  start: np.ndarray  # [updates] when the master started applying it
  end: np.ndarray  # [updates] when it finished (and sent its reply)
  makespan: float
  compute_share: float
  link_busy_share: float
  master_utilization: float

  @property
  def communication_share(self):
    return 1.0 - self.compute_share

  @property
  def staleness(self):
    """Updates applied between each update's read and its application."""
    return np.arange(len(self.worker)) - self.read_at


def parameter_server(costs, num_workers, steps, num_bytes, tau=1, seed=0):
  """Asynchronous workers around one master (async_sgd, downpour, async_easgd): the schedule of
  a run of `steps` iterations of all workers together.

  A worker's round: tau local steps, a message of `num_bytes` to the master (a gradient, an
  accumulated update, or its point), the master's update in arrival order, and a reply of
  `num_bytes` (the weights) back; the worker's next round starts when the reply arrives. (For
  async_easgd the exchange opens a round instead of closing it; the timing is the same.)
  Iterations are given out in the order workers finish their steps, so a fast worker does more
  of the `steps` than a slow one, as real workers do.
  """
  if not (isinstance(num_workers, int) and num_workers >= 1):
    raise ValueError(f"num_workers must be an integer >= 1 (got {num_workers!r})")
  if not (isinstance(tau, int) and tau >= 1):
    raise ValueError(f"tau must be an integer >= 1 (got {tau!r})")
  rng = np.random.default_rng(seed)
  step_times = costs.step_times(num_workers, steps, rng)
  transfer = costs.transfer_s(num_bytes)
  ready = np.zeros(num_workers)  # when each worker starts its next step (inf: awaiting a reply)
  done = np.zeros(num_workers, np.int64)  # own steps done
  read_at = np.zeros(num_workers, np.int64)  # master updates done at each worker's last read
  # (arrival, worker, own steps, read_at): messages on their way. Every message costs the same
  # transfer time, so they arrive in the order they were sent: the list is in arrival order.
  pending = []
  master_free, log, compute, finish, taken = 0.0, [], 0.0, 0.0, 0

  def serve():
    nonlocal master_free
    arrival, w, own, read = pending.pop(0)
    start = max(arrival, master_free)  # one at a time, in arrival order
    master_free = start + costs.service_s
    log.append((w, own, read, arrival, start, master_free))
    read_at[w] = len(log)  # the reply carries the weights after this update
    ready[w] = master_free + transfer

  while taken < steps or pending:
    finishes = ready + step_times[np.arange(num_workers), np.minimum(done, steps - 1)]
    j = int(np.argmin(finishes))  # the next step to finish (ties: the lowest index)
    if pending and (taken == steps or pending[0][0] <= finishes[j]):
      serve()
      continue
    compute += finishes[j] - ready[j]
    ready[j], finish, taken = finishes[j], max(finish, finishes[j]), taken + 1
    done[j] += 1
    if done[j] % tau == 0:  # the round ends: send, and wait for the reply
      pending.append((ready[j] + transfer, j, int(done[j]), int(read_at[j])))
      ready[j] = math.inf
  makespan = max(finish, master_free)
  columns = list(zip(*log, strict=True)) if log else [()] * 6
  worker, worker_step, read, arrival, start, end = (np.asarray(c) for c in columns)
  return Schedule(
    worker=worker.astype(np.int64),
    worker_step=worker_step.astype(np.int64),
    read_at=read.astype(np.int64),
    arrival=arrival.astype(np.float64),
    start=start.astype(np.float64),
    end=end.astype(np.float64),
    makespan=float(makespan),
    compute_share=float(compute / (num_workers * makespan)),
    link_busy_share=float(2 * len(log) * transfer / (num_workers * makespan)),
    master_utilization=float(len(log) * costs.service_s / makespan),
  )


class Timing(NamedTuple):
  """A synchronous run's clock: every step waits for the slowest worker."""

  step_end: np.ndarray  # [steps] when each step (and its all-reduce, if any) finished
  makespan: float
  compute_share: float
  link_busy_share: float

  @property
  def communication_share(self):
    return 1.0 - self.compute_share


def synchronous(costs, num_workers, steps, num_bytes, tau=1, seed=0):
  """Workers stepping together (sync_sgd, sync_easgd, local_sgd, diloco): every step all G
  compute, and on every tau-th one they all-reduce `num_bytes` as a ring does: 2 (G - 1)
  messages of num_bytes / G in turn on every link. The time a fast worker waits for the
  slowest counts as communication, as it does on a real cluster."""
  if not (isinstance(num_workers, int) and num_workers >= 1):
    raise ValueError(f"num_workers must be an integer >= 1 (got {num_workers!r})")
  if not (isinstance(tau, int) and tau >= 1):
    raise ValueError(f"tau must be an integer >= 1 (got {tau!r})")
  step_times = costs.step_times(num_workers, steps, np.random.default_rng(seed))
  hops = 2 * (num_workers - 1)
  all_reduce = hops * costs.transfer_s(num_bytes / num_workers) if hops else 0.0
  exchanges = (np.arange(1, steps + 1) % tau == 0) * all_reduce
  step_end = np.cumsum(step_times.max(axis=0) + exchanges)
  makespan = float(step_end[-1]) if steps else 0.0
  busy = float(exchanges.astype(bool).sum()) * all_reduce
  return Timing(
    step_end=step_end,
    makespan=makespan,
    compute_share=float(step_times.sum() / (num_workers * makespan)) if makespan else 1.0,
    link_busy_share=busy / makespan if makespan else 0.0,
  )


def round_robin(costs, num_workers, steps, num_bytes, tau=1, seed=0):
  """Algorithm 1 as the seed runs it: iteration t on worker j = t mod G alone. On j's exchange
  steps (its own steps 0, tau, 2 tau, ...) the center travels to device j, j takes its step, and
  x^j travels back for the master's Eq. (2); other iterations are one local step. One device
  works at a time, so with G workers at most 1/G of the workers' time is compute."""
  if not (isinstance(num_workers, int) and num_workers >= 1):
    raise ValueError(f"num_workers must be an integer >= 1 (got {num_workers!r})")
  if not (isinstance(tau, int) and tau >= 1):
    raise ValueError(f"tau must be an integer >= 1 (got {tau!r})")
  step_times = costs.step_times(num_workers, -(-steps // num_workers), np.random.default_rng(seed))
  t = np.arange(steps)
  worker, own = t % num_workers, t // num_workers
  compute = step_times[worker, own]
  round_trip = 2 * costs.transfer_s(num_bytes)
  exchanges = own % tau == 0
  step_end = np.cumsum(compute + exchanges * (round_trip + costs.service_s))
  makespan = float(step_end[-1]) if steps else 0.0
  return Timing(
    step_end=step_end,
    makespan=makespan,
    compute_share=float(compute.sum() / (num_workers * makespan)) if makespan else 1.0,
    link_busy_share=float(exchanges.sum() * round_trip / (num_workers * makespan))
    if makespan
    else 0.0,
  )
