"""The asynchronous family's order of events on the simulated cluster (see clock.py's costs).

`events`: the first n iterations of G workers around one master that run forever, in the order
the master applies them, with every read's staleness (the prefix property: a run's first n
iterations are the same whatever its total). `parameter_server`: a budgeted run of exactly
`steps` iterations (no prefix property), for the clock's own tests and studies.
"""

import heapq
import itertools
import math
import numbers
from typing import NamedTuple

import numpy as np

from easgd_jax import schedule
from easgd_jax.engines.simulated.clock import BYTES_PER_GBIT, StepTimes, _count


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
  """Asynchronous workers around one master (a locked worker/master rule): the schedule of
  a run of `steps` iterations of all workers together.

  A worker's round: tau local steps, a message of `num_bytes` to the master (a gradient, an
  accumulated update, or its point), the master's update in arrival order, and a reply of
  `num_bytes` (the weights) back; the worker's next round starts when the reply arrives. (For
  a rule whose exchange opens a round instead of closing it the timing is the same.)
  Iterations are given out in the order workers finish their steps, so a fast worker does more
  of the `steps` than a slow one, as real workers do. Every worker has its own link here
  (`events` alone reads node_size and shared_link).
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
    if schedule.exchanges(done[j] - 1, tau, opens=False):  # the round ends: send, wait
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
  transfer_s: float  # one message to the master, alone on its link
  service_s: float  # the master applying one update
  locked: bool  # updates applied one at a time (else they may overlap)
  reply_s: float  # one reply, alone on its link
  message_bytes: float
  reply_bytes: float
  links: int  # links to the master (each full duplex): G, one per node, or one shared
  sharers: int  # workers on each of them


_COMPUTED, _ARRIVED = 0, 1  # a worker's step finished; its message reached the master


def events(
  costs,
  num_workers,
  num_events,
  num_bytes,
  tau=1,
  seed=0,
  opens_round=False,
  locked=True,
  reply_bytes=None,
):
  """The first `num_events` iterations of G asynchronous workers around one master that run
  forever, their exchanges closing a round of tau steps or opening it (`opens_round`); `tau`
  may be a list, each worker's own.

  Closing: worker w computes its steps d = 0, 1, ... back to back; after step d with
  (d + 1) % tau == 0 it sends `num_bytes` to the master and starts step d + 1 when the reply
  (`reply_bytes`, by default `num_bytes`) arrives. Opening: before a step d with d % tau == 0
  (d = 0 at time 0 too) it sends, waits for the reply, then computes d. Either way step d is an
  exchange iteration, the others local. A message holds its link for `costs.transfer_s` of its
  bytes, queued first in first out behind those sent before on it: the worker's node's link
  (node_size 1: its own, never busy when it sends) or with `costs.shared_link` the master's
  one link; replies queue on the link's other direction. The master applies updates in arrival
  order: `locked`, one at a time (start = max(arrival, master free)); unlocked, on arrival,
  overlapping. The reply leaves when the update ends and carries the weights after it.
  Iterations are ordered by their key time, the master's start for an exchange, the compute's
  end for a local step, ties in the order the simulation recorded them. Independent of
  `num_events` but for the length (the prefix property).
  """
  num_workers = _count("num_workers", num_workers, 1)
  num_events = _count("num_events", num_events, 1)
  taus = [_count("tau", t, 1) for t in np.broadcast_to(np.asarray(tau, object), num_workers)]
  reply_bytes = num_bytes if reply_bytes is None else reply_bytes
  for name, value in (("num_bytes", num_bytes), ("reply_bytes", reply_bytes)):
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
      raise ValueError(f"{name} must be a finite number >= 0 (got {value!r})")
  times = StepTimes(costs, num_workers, seed)
  transfer, reply = costs.transfer_s(num_bytes), costs.transfer_s(reply_bytes)
  service = costs.service_s
  nodes, per_node = costs.nodes(num_workers)
  links, sharers = (1, num_workers) if costs.shared_link else (nodes, per_node)
  free = {"up": [0.0] * links, "down": [0.0] * links}  # when each link's queue empties

  def send(way, at, w, seconds):
    """When a message sent at `at` by (or to) worker w arrives, queued on its link. Messages are
    sent in time order (heap pops; replies as updates end), so the queue is first in first out."""
    link = 0 if costs.shared_link else w // per_node
    arrival = max(at, free[way][link]) + seconds
    free[way][link] = arrival
    return arrival

  queue, sequence = [], itertools.count()  # (time, sequence, kind, worker, own step): ties by seq

  def enqueue(at, kind, worker, own_step):
    heapq.heappush(queue, (at, next(sequence), kind, worker, own_step))

  for w in range(num_workers):
    if opens_round:
      enqueue(send("up", 0.0, w, transfer), _ARRIVED, w, 0)
    else:
      enqueue(times(w, 0), _COMPUTED, w, 0)
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
      enqueue(send("down", end, w, reply) + times(w, step), _COMPUTED, w, step)
      continue
    if not schedule.exchanges(d, taus[w], opens_round):  # a local step: its key is now
      records.append((w, d, now, times(w, d), -1, -1))
      settled += 1
    elif not opens_round:  # a closing exchange: its key is known when the message arrives
      enqueue(send("up", now, w, transfer), _ARRIVED, w, d)
      continue
    if opens_round and schedule.exchanges(d + 1, taus[w], opens_round):
      enqueue(send("up", now, w, transfer), _ARRIVED, w, d + 1)
    else:
      enqueue(now + times(w, d + 1), _COMPUTED, w, d + 1)
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
    reply_s=float(reply),
    message_bytes=float(num_bytes),
    reply_bytes=float(reply_bytes),
    links=links,
    sharers=sharers,
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
  G * virtual_time_s, at most 1; `communication_share`: 1 - it; `link_busy_share`: a message and
  a reply per exchange over the links' time; `master_utilization`: the exchanges' service time
  within virtual_time_s over it (above 1 only when unlocked updates overlap); `bytes_sent`: the
  messages and replies of those exchanges; `peak_bandwidth_gbps`: the largest message (or reply)
  over its step's compute time, times the workers sharing a link; `mean_staleness` of the
  exchanges (0.0 when none).
  """
  n = _first(events, n)
  virtual_time = float(events.time[n - 1])
  exchange = events.exchange[:n]
  count = int(exchange.sum())
  workers_time = events.num_workers * virtual_time
  compute_share = min(1.0, float(events.compute_s[:n].sum()) / workers_time)
  # An exchange's key is when the master starts it: the n-th may be one, its service not done
  # by virtual_time (counting it whole put a saturated locked master above 1).
  overhang = np.maximum(events.time[:n][exchange] + events.service_s - virtual_time, 0.0)
  utilization = (count * events.service_s - math.fsum(overhang)) / virtual_time
  largest = events.sharers * max(events.message_bytes, events.reply_bytes)
  return {
    "virtual_time_s": virtual_time,
    "compute_share": compute_share,
    "communication_share": 1.0 - compute_share,
    # min: the n-th key is when the master starts an update, so the last replies hang over it
    "link_busy_share": min(
      1.0, count * (events.transfer_s + events.reply_s) / (events.links * virtual_time)
    ),
    "master_utilization": min(1.0, utilization) if events.locked else utilization,
    "bytes_sent": count * (events.message_bytes + events.reply_bytes),
    "peak_bandwidth_gbps": float((largest / events.compute_s[:n][exchange]).max(initial=0.0))
    / BYTES_PER_GBIT,
    "mean_staleness": float(events.staleness[:n][exchange].mean()) if count else 0.0,
  }


def staleness_histogram(events, n):
  """(values, counts): the staleness of the exchanges among the first `n` iterations."""
  n = _first(events, n)
  return np.unique(events.staleness[:n][events.exchange[:n]], return_counts=True)
