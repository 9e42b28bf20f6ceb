"""The simulated cluster's clock: what each operation costs, and the order of events that gives.

The simulated engine (issue "Simulated clusters", in progress) runs G workers' arithmetic fused on
one device; which worker reads and writes the master when, with what staleness, comes from here:
a discrete-event simulation in NumPy over a cost model, deterministic for a seed. The arithmetic
then runs that schedule; nothing here touches JAX.

Costs (`Costs`, all > 0 and finite): one local step of one worker (`compute_s`), one message's
latency (`latency_s`) plus its bytes over the link's bandwidth (`bandwidth_bytes_s`; every worker
has its own link to the master, full duplex), and the master's time to apply one update
(`service_s`; it applies one at a time, first come first served, or for the Hogwild family in
`events` each on arrival, overlapping). Compute times may vary: a seeded lognormal factor with
sigma `jitter` on every step (mean 1), and `stragglers` workers (the last ones)
`straggler_slowdown` times slower.

What a schedule reports, all in virtual seconds:
- `makespan`: when the last worker finished its last step;
- `compute_share`: the workers' compute time over G * makespan; `communication_share` = 1 - it,
  the share of worker time spent sending, receiving or waiting on the master (the quantity the
  SC'17 EASGD paper reports as time in communication);
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
import heapq
import itertools
import math
import numbers
import operator
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
  num_workers = _count("num_workers", num_workers, 1)
  tau = _count("tau", tau, 1)
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
  num_workers = _count("num_workers", num_workers, 1)
  tau = _count("tau", tau, 1)
  step_times = StepTimes(costs, num_workers, seed).table(steps)
  hops = 2 * (num_workers - 1)
  all_reduce = hops * costs.transfer_s(num_bytes / num_workers) if hops else 0.0
  exchanges = (np.arange(1, steps + 1) % tau == 0) * all_reduce
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


def round_robin(costs, num_workers, steps, num_bytes, tau=1, seed=0):
  """Algorithm 1 as the seed runs it: iteration t on worker j = t mod G alone. On j's exchange
  steps (its own steps 0, tau, 2 tau, ...) the center travels to device j, j takes its step, and
  x^j travels back for the master's Eq. (2); other iterations are one local step. One device
  works at a time, so with G workers at most 1/G of the workers' time is compute."""
  num_workers = _count("num_workers", num_workers, 1)
  tau = _count("tau", tau, 1)
  step_times = StepTimes(costs, num_workers, seed).table(-(-steps // num_workers))
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
    compute_share=min(1.0, float(compute.sum() / (num_workers * makespan))) if makespan else 1.0,
    link_busy_share=float(exchanges.sum() * round_trip / (num_workers * makespan))
    if makespan
    else 0.0,
  )


class Events(NamedTuple):
  """An asynchronous run's iterations (`events`) in the order the fused arithmetic applies them."""

  worker: np.ndarray  # [iterations] int64: whose iteration
  own_step: np.ndarray  # [iterations] int64: its number among that worker's own, from 0
  exchange: np.ndarray  # [iterations] bool: it touches the master
  time: np.ndarray  # [iterations] float64: the key (exchange: master's start; local: compute's end)
  compute_s: np.ndarray  # [iterations] float64: that step's compute time
  staleness: np.ndarray  # [iterations] int64: updates by others since the worker's read; -1 local
  update: np.ndarray  # [iterations] int64: the master's update number; -1 local
  num_workers: int
  transfer_s: float  # one message, one way
  service_s: float  # the master applying one update
  locked: bool  # updates applied one at a time (else they may overlap)


_COMPUTED, _ARRIVED = 0, 1  # a worker's step finished; its message reached the master


def events(
  costs, num_workers, num_events, num_bytes, tau=1, seed=0, opens_round=False, locked=True
):
  """The first `num_events` iterations of G asynchronous workers around one master that run
  forever (async_sgd, downpour, hogwild: closing; async_easgd, hogwild_easgd: `opens_round`).

  Closing: worker w computes its steps d = 0, 1, ... back to back; after step d with
  (d + 1) % tau == 0 it sends `num_bytes` to the master and starts step d + 1 when the reply
  (`num_bytes`) arrives. Opening: before a step d with d % tau == 0 (d = 0 at time 0 too) it sends,
  waits for the reply, then computes d. Either way step d is an exchange iteration, the others
  local. Each message costs `costs.transfer_s(num_bytes)` on the worker's own full-duplex link.
  The master applies updates in arrival order: `locked`, one at a time (start = max(arrival,
  master free)); unlocked (the Hogwild family), on arrival, overlapping. The reply leaves when
  the update ends and carries the weights after it. Iterations are ordered by their key time, the
  master's start for an exchange, the compute's end for a local step, ties in the order the
  simulation recorded them. Independent of `num_events` but for the length (the prefix property).
  """
  num_workers = _count("num_workers", num_workers, 1)
  num_events = _count("num_events", num_events, 1)
  tau = _count("tau", tau, 1)
  if not (isinstance(num_bytes, numbers.Real) and math.isfinite(num_bytes) and num_bytes >= 0):
    raise ValueError(f"num_bytes must be a finite number >= 0 (got {num_bytes!r})")
  times = StepTimes(costs, num_workers, seed)
  transfer, service = costs.transfer_s(num_bytes), costs.service_s
  phase = 0 if opens_round else tau - 1  # own step d is an exchange when d % tau == phase
  queue, sequence = [], itertools.count()  # (time, sequence, kind, worker, own step): ties by seq

  def schedule(at, kind, worker, own_step):
    heapq.heappush(queue, (at, next(sequence), kind, worker, own_step))

  for w in range(num_workers):
    if opens_round:
      schedule(transfer, _ARRIVED, w, 0)
    else:
      schedule(times(w, 0), _COMPUTED, w, 0)
  # Why sorting by key time gives a valid order (all costs > 0):
  # (a) Each worker's keys increase with its own steps. After a local step's key (its compute's
  #     end) come the next compute's end, or the next message's arrival and the master's start
  #     on it, later still. After an exchange's key (the master's start) the worker computes
  #     (closing: its next step; opening: this one) only once the reply is back, a service and a
  #     transfer later. A worker has one event pending at a time, so its iterations are recorded
  #     in order too, and equal keys (a tiny cost lost in a float's rounding) keep it.
  # (b) Update numbers are given at arrival, in the order the heap pops arrivals, and the start
  #     times follow it: locked, each starts after the previous one's end; unlocked, start =
  #     arrival. Exchanges are recorded at arrival too, so ties keep the application order.
  records = []  # (worker, own step, key, compute, staleness, update) in recording order
  read = [0] * num_workers  # the version each worker holds: the master's updates it has seen
  updates, master_free = 0, 0.0
  # Every iteration recorded from now on has key >= now (a local step's key is the time it is
  # recorded, an exchange's start no earlier than its arrival), so once num_events recorded keys
  # are <= now, the first num_events of the stable sort are final.
  settled, unsettled = 0, []  # how many recorded keys are <= now; the other keys (a heap)
  while True:
    now, _, kind, w, d = heapq.heappop(queue)
    while unsettled and unsettled[0] <= now:
      heapq.heappop(unsettled)
      settled += 1
    if settled >= num_events:
      break
    if kind == _ARRIVED:
      start = max(now, master_free) if locked else now
      end = start + service
      if locked:
        master_free = end
      records.append((w, d, start, times(w, d), updates - read[w], updates))
      if start <= now:
        settled += 1
      else:
        heapq.heappush(unsettled, start)
      read[w] = updates + 1  # the reply carries the weights after this update
      updates += 1
      step = d if opens_round else d + 1  # the step the reply lets the worker compute
      schedule(end + transfer + times(w, step), _COMPUTED, w, step)
      continue
    if d % tau != phase:  # a local step: its key is now
      records.append((w, d, now, times(w, d), -1, -1))
      settled += 1
    elif not opens_round:  # a closing exchange: its key is known when the message arrives
      schedule(now + transfer, _ARRIVED, w, d)
      continue
    if opens_round and (d + 1) % tau == phase:
      schedule(now + transfer, _ARRIVED, w, d + 1)
    else:
      schedule(now + times(w, d + 1), _COMPUTED, w, d + 1)
  worker, own_step, key, compute, staleness, update = map(np.asarray, zip(*records, strict=True))
  order = np.argsort(key, kind="stable")[:num_events]
  return Events(
    worker=worker[order].astype(np.int64),
    own_step=own_step[order].astype(np.int64),
    exchange=update[order] >= 0,
    time=key[order].astype(np.float64),
    compute_s=compute[order].astype(np.float64),
    staleness=staleness[order].astype(np.int64),
    update=update[order].astype(np.int64),
    num_workers=num_workers,
    transfer_s=float(transfer),
    service_s=float(service),
    locked=bool(locked),
  )


def _first(events, n):
  """`n` as an int, or a ValueError unless 1 <= n <= the events simulated."""
  n = _count("n", n, 1)
  if n > len(events.time):
    raise ValueError(f"n ({n}) must be at most the {len(events.time)} events simulated")
  return n


def metrics(events, n):
  """The clock of the first `n` iterations of `events`, as a dict.

  `virtual_time_s`: the n-th iteration's key time; `compute_share`: their compute time over
  G * virtual_time_s, at most 1; `communication_share`: 1 - it; `link_busy_share`: two messages
  per exchange over G * virtual_time_s; `master_utilization`: the exchanges' service time over
  virtual_time_s (above 1 when unlocked updates overlap); `mean_staleness` of the exchanges (0.0
  when none).
  """
  n = _first(events, n)
  virtual_time = float(events.time[n - 1])
  exchange = events.exchange[:n]
  count = int(exchange.sum())
  workers_time = events.num_workers * virtual_time
  compute_share = min(1.0, float(events.compute_s[:n].sum()) / workers_time)
  return {
    "virtual_time_s": virtual_time,
    "compute_share": compute_share,
    "communication_share": 1.0 - compute_share,
    # min: the n-th key is when the master starts an update, so the last replies hang over it
    "link_busy_share": min(1.0, 2 * count * events.transfer_s / workers_time),
    "master_utilization": count * events.service_s / virtual_time,
    "mean_staleness": float(events.staleness[:n][exchange].mean()) if count else 0.0,
  }


def staleness_histogram(events, n):
  """(values, counts): the staleness of the exchanges among the first `n` iterations."""
  n = _first(events, n)
  return np.unique(events.staleness[:n][events.exchange[:n]], return_counts=True)
