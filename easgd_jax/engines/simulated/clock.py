"""The simulated cluster's clock: what each operation costs, and the order of events that gives.

The simulated engine runs G workers' arithmetic fused on one device; which worker reads and
writes the master when, with what staleness, comes from here (events.py for the parameter-server
family): a discrete-event simulation in NumPy over a cost model, deterministic for a seed. The
arithmetic then runs that schedule; nothing here touches JAX.

Costs (`Costs`, all > 0 and finite): one local step of one worker (`compute_s`), one message's
latency (`latency_s`) plus its bytes over the link's bandwidth (`bandwidth_bytes_s`), and the
master's time to apply one update (`service_s`; it applies one at a time, first come first
served, or for an unlocked master in `events` each on arrival, overlapping). Compute times may
vary: a seeded lognormal factor with sigma `jitter` on every step (mean 1), and `stragglers`
workers (the last ones) `straggler_slowdown` times slower.

The network has two levels: workers in nodes of `node_size`, the node's own links fast
(`intra_latency_s`, `intra_bandwidth_bytes_s`) and one link per node to the rest (the latency
and bandwidth above; node_size 1, the default: every worker its own node, a flat network).
A link carries one message at a time, first in first out, each holding it for its latency plus
its bytes over the bandwidth; each direction is its own queue (full duplex).
- An all-reduce is hierarchical (`all_reduce_s`): a ring reduce-scatter inside each node, a ring
  across the nodes (every node's link carrying its shards), a ring all-gather inside; one node
  of a single worker each is the flat ring. `intra_all_reduce_s` alone is a worker of several
  devices all-reducing its gradient inside its node, every step (`synchronous`'s inner_s).
- A step-driven run (`synchronous`) costs the transfers its rule declares after each step
  (StepRule.transfers: bytes, overlap k). One starts when the step's compute ends and queues on
  the link behind those still in flight (the collectives of one communicator run in order); it
  overlaps the next k steps' compute, and step s + k + 1 waits only for what has not landed.
- A parameter-server worker's messages to and from the master travel on its node's link (with
  node_size 1, its own), or all on the master's one link (`shared_link`), queueing there.

What a clock reports up to a run step, in virtual seconds unless said:
- `virtual_time_s`: when the next step may start: this one done, and every transfer that the
  next one waits for landed (the makespan);
- `compute_share`, the compute utilization: the workers' compute time over G * makespan;
  `communication_share` = 1 - it, the share of worker time spent sending, receiving or waiting
  on the master or the slowest peer (the quantity the SC'17 paper of the elastic averaging
  family reports as time in communication); communication hidden behind compute is not in it;
- `link_busy_share`: the time links carry bytes over the links' time;
- `master_utilization` (events.py): the master's service time within the makespan over it;
- `bytes_sent`: every byte put on a link by then, all workers and the master together;
- `peak_bandwidth_gbps`: the link speed between nodes at which compute never waits, latency
  aside: the most bytes a node's link must move within one step's compute time (a transfer
  overlapping k steps spread over them, a blocking one over one step), over that time;
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
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from easgd_jax import schedule

BYTES_PER_GBIT = 1e9 / 8


@dataclasses.dataclass(frozen=True)
class Costs:
  compute_s: float  # one local step (forward, backward, update) of one worker
  latency_s: float  # one message, one way
  bandwidth_bytes_s: float  # one link, one way
  service_s: float  # the master applying one update
  jitter: float = 0.0  # sigma of the lognormal factor on every step's compute time (mean 1)
  stragglers: int = 0  # this many workers (the last ones) are slower
  straggler_slowdown: float = 4.0  # by this factor
  node_size: int = 1  # workers per node; the link above is the one between nodes
  intra_latency_s: float = 2e-6  # one message inside a node, one way (NVLink: ~2 us) ...
  intra_bandwidth_bytes_s: float = 300e9  # ... and its link's bandwidth (NVLink 3: 300 GB/s)
  shared_link: bool = False  # the parameter server's messages all on the master's one link

  def __post_init__(self):
    positive = ("compute_s", "latency_s", "bandwidth_bytes_s", "service_s", "straggler_slowdown")
    for name in (*positive, "intra_latency_s", "intra_bandwidth_bytes_s"):
      value = getattr(self, name)
      if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 (got {value!r})")
    if not (
      isinstance(self.jitter, int | float) and math.isfinite(self.jitter) and self.jitter >= 0
    ):
      raise ValueError(f"jitter must be a finite number >= 0 (got {self.jitter!r})")
    if not (isinstance(self.stragglers, int) and self.stragglers >= 0):
      raise ValueError(f"stragglers must be an integer >= 0 (got {self.stragglers!r})")
    _count("node_size", self.node_size, 1)
    if not isinstance(self.shared_link, bool):
      raise ValueError(f"shared_link must be True or False (got {self.shared_link!r})")

  def transfer_s(self, num_bytes):
    """One message of `num_bytes` between nodes: its latency, then its bytes at the bandwidth."""
    return self.latency_s + num_bytes / self.bandwidth_bytes_s

  def mean_step_s(self, num_workers):
    """[worker] the mean compute seconds of each worker's step (the jitter's factor has mean 1):
    its speed is 1 / this."""
    slowed = np.arange(num_workers) >= num_workers - self.stragglers
    return self.compute_s * np.where(slowed, self.straggler_slowdown, 1.0)

  def nodes(self, num_workers):
    """(nodes, workers per node) of `num_workers`: nodes of node_size, or one of them all."""
    per_node = min(self.node_size, num_workers)
    if num_workers % per_node:
      raise ValueError(f"node_size ({self.node_size}) must divide the {num_workers} workers")
    return num_workers // per_node, per_node

  def intra_all_reduce_s(self, num_bytes, parties):
    """A ring all-reduce of `num_bytes` among `parties` devices of one node: 2 (p - 1) messages
    of num_bytes / p in turn on the node's fast links (also a worker made of several devices
    all-reducing its gradient inside its node)."""
    hops = 2 * (parties - 1)
    message = num_bytes / parties / self.intra_bandwidth_bytes_s
    return hops * (self.intra_latency_s + message) if hops else 0.0

  def all_reduce_s(self, num_bytes, num_workers):
    """An all-reduce of `num_bytes` among `num_workers`, hierarchical: reduce-scatter inside each
    node ((K - 1) messages of 1/K), a ring across the N nodes (2 (N - 1) messages of 1/N of the
    whole, every node's link carrying all K of its shards' rings), all-gather inside. One worker
    a node: the flat ring, 2 (G - 1) messages of num_bytes / G on every link."""
    nodes, per_node = self.nodes(num_workers)
    hops = 2 * (nodes - 1)
    across = hops * self.transfer_s(num_bytes / nodes) if hops else 0.0
    return self.intra_all_reduce_s(num_bytes, per_node) + across

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
  """A clock step by step (`synchronous`, `round_robin`); `at(n)` its metrics up to step n."""

  step_end: np.ndarray  # [steps] when step s + 1 may start: s done, and what s + 1 waits for
  worked: Callable  # n -> the workers' compute seconds in the first n steps
  busy: Callable  # n -> link seconds up to step_end[n - 1]
  links: int  # busy is shared by this many links (1: every link busy at once)
  sent: Callable  # n -> bytes on the links up to step_end[n - 1], every link together
  peak: np.ndarray  # [steps] bytes/s: the peak bandwidth the transfers so far need
  num_workers: int

  def at(self, n):
    """The clock up to run step n (the first n steps), as the rows' columns."""
    makespan = float(self.step_end[n - 1]) if n else 0.0
    workers_time = self.num_workers * makespan
    # min: one worker's share is its steps over their own sum, 1 up to rounding (never above)
    compute_share = min(1.0, float(self.worked(n) / workers_time)) if makespan else 1.0
    return {
      "virtual_time_s": makespan,
      "compute_share": compute_share,
      "communication_share": 1.0 - compute_share,
      "link_busy_share": float(self.busy(n) / (self.links * makespan)) if makespan else 0.0,
      "bytes_sent": float(self.sent(n)),
      "peak_bandwidth_gbps": float(self.peak[n - 1]) / BYTES_PER_GBIT if n else 0.0,
    }


def synchronous(costs, num_workers, transfers, seed=0, inner_s=0.0):
  """Workers stepping together (the step-driven data-parallel rules), one run step per entry of
  `transfers`: every step all G compute, and the slowest sets its end (a fast worker's wait
  counts as communication, as it does on a real cluster). After step s its transfers
  (`transfers[s]`: (num_bytes, overlap_steps) pairs, StepRule.transfers) start, each an
  all-reduce (`Costs.all_reduce_s`), queued on the link in order; one with overlap k must land
  before step s + k + 1 starts. A blocking all-reduce of the whole model every tau-th step is
  today's data-parallel rule: 2 (G - 1) ring messages of num_bytes / G each time. Workers of
  several devices (--devices_per_worker) first all-reduce every step's gradient among their own
  devices on the node's fast links: `inner_s` (Costs.intra_all_reduce_s) after each step's
  compute, before anything is sent (communication time; its bytes stay off the links between
  nodes, so not in bytes_sent or link_busy_share).

  The loop keeps times relative to the current step's start, so that a step whose transfers are
  all blocking and start on an idle link ends exactly compute + all-reduce after its start."""
  num_workers = _count("num_workers", num_workers, 1)
  steps = len(transfers)
  reach = max([s + max(k, 1) + 1 for s, sent in enumerate(transfers) for _, k in sent] + [steps])
  times = StepTimes(costs, num_workers, seed)
  slowest = times.table(reach).max(axis=0).tolist()  # lock-step: each step the slowest's time
  took = np.empty(steps)  # step s's start to step s + 1's
  nodes, _ = costs.nodes(num_workers)  # of an all-reduce's bytes, a node's link sends this much:
  link_share = 2 * (nodes - 1) / nodes
  link_free, due, flight, demand, best = 0.0, {}, [], {}, 0.0
  landed, counts, partial, peak = [], np.zeros(steps, np.int64), np.zeros(steps), np.zeros(steps)
  for s in range(steps):
    compute_end = slowest[s] + inner_s
    for num_bytes, k in transfers[s]:
      seconds = costs.all_reduce_s(num_bytes, num_workers)
      begin = max(compute_end, link_free)  # behind the transfers still on the link
      link_free = begin + seconds
      due[s + k + 1] = max(due.get(s + k + 1, -math.inf), link_free)
      flight.append((begin, link_free, seconds, 2 * (num_workers - 1) * num_bytes))
      width = max(k, 1)  # a blocking transfer: as if over one step (no speed would hide it)
      for t in range(s + 1, s + 1 + width):
        demand[t] = demand.get(t, 0.0) + link_share * num_bytes / width
        best = max(best, demand[t] / slowest[t])
    took[s] = end = max(compute_end, due.pop(s + 1, compute_end))
    demand.pop(s + 1, None)  # no later transfer adds to step s + 1
    still = []
    for begin, land, seconds, num_bytes in flight:
      if land <= end:
        landed.append((seconds, num_bytes))
      else:  # on its way at the step's end: the part so far is link time
        still.append((begin - end, land - end, seconds, num_bytes))
        partial[s] += max(0.0, end - begin)
    flight, counts[s], peak[s] = still, len(landed), best
    link_free -= end
    due = {t: land - end for t, land in due.items()}
  landed_s = [seconds for seconds, _ in landed]
  landed_bytes = [num_bytes for _, num_bytes in landed]
  return Timing(
    step_end=np.cumsum(took),
    worked=lambda n: times.table(n).sum(),
    # fsum: exact, so k equal all-reduces are k times one, bit for bit
    busy=lambda n: math.fsum(landed_s[: counts[n - 1]]) + partial[n - 1] if n else 0.0,
    links=1,
    sent=lambda n: math.fsum(landed_bytes[: counts[n - 1]]) if n else 0.0,
    peak=peak,
    num_workers=num_workers,
  )


def round_robin(costs, num_workers, steps, num_bytes, tau=1, seed=0, opens=True, reply_bytes=None):
  """Algorithm 1 as the seed runs it: iteration t on worker j = t mod G alone. On j's exchange
  steps (its own steps 0, tau, 2 tau, ...) the center travels to device j (`reply_bytes`, by
  default `num_bytes`), j takes its step, and x^j (`num_bytes`) travels back for the master's
  Eq. (2); other iterations are one local step. One device works at a time, so with G workers
  at most 1/G of the workers' time is compute, and no two messages share a link."""
  num_workers = _count("num_workers", num_workers, 1)
  tau = _count("tau", tau, 1)
  reply_bytes = num_bytes if reply_bytes is None else reply_bytes
  step_times = StepTimes(costs, num_workers, seed).table(-(-steps // num_workers))
  worker, own = schedule.round_robin(np.arange(steps), num_workers)
  compute = step_times[worker, own]
  round_trip = costs.transfer_s(num_bytes) + costs.transfer_s(reply_bytes)
  exchanges = schedule.exchanges(own, tau, opens)
  rate = np.where(exchanges, max(num_bytes, reply_bytes) / compute, 0.0)
  return Timing(
    step_end=np.cumsum(compute + exchanges * (round_trip + costs.service_s)),
    worked=lambda n: compute[:n].sum(),
    busy=lambda n: exchanges[:n].sum() * round_trip,
    links=num_workers,
    sent=lambda n: exchanges[:n].sum() * (num_bytes + reply_bytes),
    peak=np.maximum.accumulate(rate) if steps else rate,
    num_workers=num_workers,
  )
