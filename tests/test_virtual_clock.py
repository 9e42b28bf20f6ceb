"""The simulated cluster's clock (easgd_jax/engines/simulated/clock.py and events.py) against
hand-derived cases."""

import math

import numpy as np
import pytest

from easgd_jax.algorithms.base import Transfer
from easgd_jax.engines.simulated.clock import Costs, StepTimes, round_robin, synchronous
from easgd_jax.engines.simulated.events import (
  events,
  metrics,
  parameter_server,
  staleness_histogram,
)

MB = 2**20


def costs(**changes):
  base = dict(compute_s=0.01, latency_s=1e-4, bandwidth_bytes_s=1e9, service_s=1e-3)
  return Costs(**{**base, **changes})


def every(steps, num_bytes, tau=1):
  """The default data-parallel transfers: a blocking all-reduce closing every tau-th step."""
  return [(Transfer(num_bytes),) if (s + 1) % tau == 0 else () for s in range(steps)]


@pytest.mark.parametrize(
  "field, value",
  [
    ("compute_s", 0.0),
    ("latency_s", math.nan),
    ("bandwidth_bytes_s", -1.0),
    ("service_s", math.inf),
    ("jitter", -0.1),
    ("stragglers", -1),
    ("straggler_slowdown", 0),
  ],
)
def test_a_bad_cost_is_refused_by_name(field, value):
  with pytest.raises(ValueError, match=field):
    costs(**{field: value})


@pytest.mark.parametrize("tau", [1, 4])
def test_one_worker_runs_rounds_of_tau_steps_and_one_round_trip(tau):
  c = costs()
  steps, num_bytes = 40, 4 * MB
  schedule = parameter_server(c, 1, steps, num_bytes, tau=tau)
  transfer = c.latency_s + num_bytes / c.bandwidth_bytes_s
  rounds = steps // tau
  # Each round: tau steps, the message, the master's update, and (but for the last) the reply.
  expected = rounds * (tau * c.compute_s + transfer + c.service_s) + (rounds - 1) * transfer
  assert schedule.makespan == pytest.approx(expected, rel=1e-12)
  assert schedule.worker_step.tolist() == [tau * (r + 1) for r in range(rounds)]
  assert schedule.read_at.tolist() == list(range(rounds)) and not schedule.staleness.any()
  assert schedule.compute_share == pytest.approx(steps * c.compute_s / expected)
  assert schedule.link_busy_share == pytest.approx(2 * rounds * transfer / expected)
  assert schedule.master_utilization == pytest.approx(rounds * c.service_s / expected)


def test_equal_workers_with_free_communication_take_turns_and_never_wait():
  c = costs(latency_s=1e-9, bandwidth_bytes_s=1e15, service_s=1e-9)
  schedule = parameter_server(c, 4, 400, 1000)
  assert schedule.worker.tolist() == [0, 1, 2, 3] * 100
  assert schedule.staleness[4:].tolist() == [3] * 396  # the other three updates in between
  assert schedule.compute_share > 0.999 and schedule.communication_share < 1e-3


def test_a_slow_master_is_the_bottleneck():
  c = costs(service_s=1.0, latency_s=1e-6)  # 100 steps' time per update
  schedule = parameter_server(c, 4, 200, 1000)
  assert schedule.master_utilization > 0.95
  assert schedule.communication_share > 0.95  # the workers mostly wait in the master's queue
  assert np.median(schedule.staleness[4:]) == 3
  assert (np.diff(schedule.start) >= c.service_s - 1e-12).all()  # one update at a time


def test_every_finished_round_is_applied_once_in_arrival_order():
  c = costs(jitter=0.5, latency_s=3e-3, service_s=2e-3)
  tau, steps = 3, 301
  schedule = parameter_server(c, 5, steps, 10 * MB, tau=tau, seed=7)
  assert (np.diff(schedule.arrival) >= 0).all()
  assert (schedule.start >= schedule.arrival).all() and (
    schedule.start[1:] >= schedule.end[:-1]
  ).all()
  assert (schedule.worker_step % tau == 0).all()
  last = {}
  for k, (j, own, read) in enumerate(
    zip(schedule.worker, schedule.worker_step, schedule.read_at, strict=True)
  ):
    assert read == last.get(j, (0, 0))[1]  # it read the weights its previous update left
    assert own == last.get(j, (0, 0))[0] + tau
    last[j] = (own, k + 1)
  own_steps = {j: own for j, (own, _) in last.items()}
  assert sum(own_steps.values()) <= steps < sum(own_steps.values()) + 5 * tau


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another():
  c = costs(jitter=0.3)
  a, b = parameter_server(c, 4, 200, MB, seed=1), parameter_server(c, 4, 200, MB, seed=1)
  other = parameter_server(c, 4, 200, MB, seed=2)
  assert all(np.array_equal(x, y) for x, y in zip(a[:6], b[:6], strict=True))
  assert a.makespan == b.makespan and a.worker.tolist() != other.worker.tolist()


def test_a_straggler_does_its_share_of_the_steps():
  c = costs(stragglers=1, straggler_slowdown=4.0, latency_s=1e-6, service_s=1e-6)
  schedule = parameter_server(c, 4, 1300, 1000)
  counts = np.bincount(schedule.worker, minlength=4)
  assert counts[3] == pytest.approx(counts[0] / 4, rel=0.05)  # a quarter of the others' pace


def test_synchronous_steps_wait_for_the_slowest_and_all_reduce_every_tau():
  c = costs(stragglers=1, straggler_slowdown=3.0)
  workers, steps, tau, num_bytes = 4, 12, 3, 8 * MB
  timing = synchronous(c, workers, every(steps, num_bytes, tau)).at(steps)
  ring = 2 * (workers - 1) * (c.latency_s + num_bytes / workers / c.bandwidth_bytes_s)
  expected = steps * 3 * c.compute_s + steps // tau * ring
  assert timing["virtual_time_s"] == pytest.approx(expected, rel=1e-12)
  assert timing["compute_share"] == pytest.approx(steps * 6 * c.compute_s / (workers * expected))
  assert timing["link_busy_share"] == pytest.approx(steps // tau * ring / expected)
  one = synchronous(c, 1, every(steps, num_bytes)).at(steps)
  assert one["link_busy_share"] == 0  # one worker has nobody to all-reduce with


def test_algorithm_1_runs_one_device_at_a_time():
  c = costs()
  workers, steps, tau, num_bytes = 8, 80, 2, 16 * MB
  timing = round_robin(c, workers, steps, num_bytes, tau=tau).at(steps)
  round_trip = 2 * (c.latency_s + num_bytes / c.bandwidth_bytes_s)
  exchanges = steps // tau  # own steps 0, 2, 4, ... of each worker
  expected = steps * c.compute_s + exchanges * (round_trip + c.service_s)
  assert timing["virtual_time_s"] == pytest.approx(expected, rel=1e-12)
  assert timing["compute_share"] == pytest.approx(steps * c.compute_s / (workers * expected))
  assert timing["communication_share"] > 1 - 1 / workers  # seven devices idle at every moment
  assert timing["link_busy_share"] == pytest.approx(exchanges * round_trip / (workers * expected))


# --- Per-worker compute streams and prefix-stable clocks ---------------------------------------

MODES = [  # (opens_round, locked): async_sgd/downpour, hogwild, async_easgd, hogwild_easgd
  (False, True),
  (False, False),
  (True, True),
  (True, False),
]
ARRAYS = ("worker", "own_step", "exchange", "time", "compute_s", "staleness", "update")


def test_step_times_are_each_workers_own_stream_whatever_the_blocks():
  sigma, seed = 0.3, 5
  # StepTimes relies on this: a generator's lognormal draws do not depend on how they are blocked.
  factors = lambda w: np.random.default_rng([seed, w]).lognormal(-(sigma**2) / 2, sigma, size=3000)
  rng = np.random.default_rng([seed, 1])
  blocks = np.concatenate(
    [rng.lognormal(-(sigma**2) / 2, sigma, size=k) for k in (1, 7, 1024, 1968)]
  )
  rng = np.random.default_rng([seed, 1])
  singles = [rng.lognormal(-(sigma**2) / 2, sigma) for _ in range(3000)]
  assert np.array_equal(factors(1), blocks) and np.array_equal(factors(1), singles)

  c = costs(jitter=sigma, stragglers=1, straggler_slowdown=3.0)
  times = StepTimes(c, 3, seed)
  late = times(0, 2999)  # past the first block, before any earlier step was asked for
  one_by_one = [times(1, d) for d in range(3000)]  # three blocks, drawn as they are reached
  table = times.table(3000)
  assert table.shape == (3, 3000) and late == table[0, 2999]
  assert np.array_equal(table[0], c.compute_s * factors(0))
  assert one_by_one == (c.compute_s * factors(1)).tolist() == table[1].tolist()
  assert np.array_equal(table[2], c.compute_s * factors(2) * 3.0)  # the last one straggles
  assert table[0].mean() / c.compute_s == pytest.approx(1.0, abs=0.03)  # mean 1 (sd 0.006)
  assert [times(0, d) for d in (5, 0, 2048)] == table[0, [5, 0, 2048]].tolist()

  steady = StepTimes(costs(stragglers=1, straggler_slowdown=3.0), 2, seed)
  assert steady(0, 10**9) == 0.01 and steady(1, 0) == pytest.approx(0.03, rel=1e-15)
  assert steady.table(4).tolist() == [[0.01] * 4, [0.01 * 3.0] * 4]


def test_synchronous_and_round_robin_clocks_do_not_depend_on_the_number_of_steps():
  c = costs(jitter=0.3, stragglers=1)
  clocks = {
    "synchronous": lambda steps, seed: synchronous(c, 3, every(steps, MB, 2), seed=seed),
    "round_robin": lambda steps, seed: round_robin(c, 3, steps, MB, tau=2, seed=seed),
  }
  for name, clock in clocks.items():
    short, long = clock(50, 4), clock(80, 4)
    assert np.array_equal(short.step_end, long.step_end[:50]), name
    assert short.at(50)["virtual_time_s"] == long.step_end[49], name
    assert short.at(50) == long.at(50), name
    other = clock(50, 5)
    assert not np.array_equal(short.step_end, other.step_end), name


# --- The asynchronous family's event stream ------------------------------------------------------


@pytest.mark.parametrize("tau", [1, 4])
def test_one_closing_worker_runs_rounds_of_tau_steps_then_a_round_trip(tau):
  c = costs()
  num_bytes, rounds = 4 * MB, 3
  found = events(c, 1, rounds * tau, num_bytes, tau=tau)
  transfer = c.latency_s + num_bytes / c.bandwidth_bytes_s
  period = tau * c.compute_s + transfer + c.service_s + transfer  # steps, send, update, reply
  expected = []
  for r in range(rounds):
    expected += [r * period + (j + 1) * c.compute_s for j in range(tau - 1)]  # compute's end
    expected.append(r * period + tau * c.compute_s + transfer)  # the master starts on arrival
  assert found.time == pytest.approx(expected, rel=1e-12)
  assert found.worker.tolist() == [0] * rounds * tau
  assert found.own_step.tolist() == list(range(rounds * tau))
  assert found.exchange.tolist() == ([False] * (tau - 1) + [True]) * rounds
  assert found.update[found.exchange].tolist() == [0, 1, 2]
  assert found.staleness[found.exchange].tolist() == [0, 0, 0]
  assert (found.update[~found.exchange] == -1).all() and (
    found.staleness[~found.exchange] == -1
  ).all()
  clock = metrics(found, rounds * tau)
  assert clock["virtual_time_s"] == pytest.approx(expected[-1], rel=1e-12)
  assert clock["compute_share"] == pytest.approx(rounds * tau * c.compute_s / expected[-1])
  assert clock["link_busy_share"] == pytest.approx(2 * rounds * transfer / expected[-1])
  # The last update starts at the row's time: its service lies after it, not within
  assert clock["master_utilization"] == pytest.approx((rounds - 1) * c.service_s / expected[-1])
  assert clock["mean_staleness"] == 0.0
  values, counts = staleness_histogram(found, rounds * tau)  # the exchanges only
  assert values.tolist() == [0] and counts.tolist() == [rounds]


def test_one_opening_worker_exchanges_before_it_computes():
  c = costs()
  num_bytes, tau = 4 * MB, 2
  found = events(c, 1, 4, num_bytes, tau=tau, opens_round=True)
  t, s, step = c.latency_s + num_bytes / c.bandwidth_bytes_s, c.service_s, c.compute_s
  first_done = t + s + t + step  # step 0 computes on the reply's weights
  expected = [
    t,  # step 0's exchange: the master starts on arrival, before any compute
    first_done + step,  # step 1, local
    first_done + step + t,  # step 2's exchange: sent as step 1 ends
    first_done + step + t + s + t + 2 * step,  # step 3, local: after step 2's reply and compute
  ]
  assert found.time == pytest.approx(expected, rel=1e-12)
  assert found.own_step.tolist() == [0, 1, 2, 3]
  assert found.exchange.tolist() == [True, False, True, False]
  assert found.update.tolist() == [0, -1, 1, -1] and found.staleness.tolist() == [0, -1, 0, -1]
  # The exchange's compute ends after its key: the share is capped at 1.
  assert metrics(found, 1)["compute_share"] == 1.0


def test_equal_workers_with_free_communication_take_turns():
  c = costs(latency_s=1e-9, bandwidth_bytes_s=1e15, service_s=1e-9)
  found = events(c, 4, 400, 1000)
  assert found.worker.tolist() == [0, 1, 2, 3] * 100 and found.exchange.all()
  assert found.update.tolist() == list(range(400))
  assert found.staleness[:4].tolist() == [0, 1, 2, 3]  # all read version 0 at the start
  assert found.staleness[4:].tolist() == [3] * 396  # the other three updates in between
  values, counts = staleness_histogram(found, 400)
  assert values.tolist() == [0, 1, 2, 3] and counts.tolist() == [1, 1, 1, 397]
  clock = metrics(found, 400)
  assert clock["compute_share"] > 0.999 and clock["communication_share"] < 1e-3
  assert clock["mean_staleness"] == pytest.approx((0 + 1 + 2 + 3 * 397) / 400)


@pytest.mark.parametrize("opens_round, locked", MODES)
def test_the_first_iterations_do_not_depend_on_how_many_are_asked_for(opens_round, locked):
  # A saturated master (5 workers, an update per 2 steps, 0.8 step's time each): updates queue, so
  # exchanges are recorded well before the master starts them and later local steps sort first.
  c = costs(jitter=0.3, stragglers=1, latency_s=2e-3, service_s=8e-3)

  def run(n):
    return events(c, 5, n, MB, tau=2, seed=2, opens_round=opens_round, locked=locked)

  whole = run(200)
  assert len(whole.time) == 200
  for n in [*range(1, 41), 50, 120]:
    prefix = run(n)
    for name in ARRAYS:
      assert np.array_equal(getattr(prefix, name), getattr(whole, name)[:n]), (n, name)


@pytest.mark.parametrize("opens_round, locked", MODES)
def test_the_order_replays_each_worker_and_the_master(opens_round, locked):
  c = costs(jitter=0.5, stragglers=1, latency_s=3e-3, service_s=4e-3)
  workers, tau, n = 5, 3, 300
  found = events(c, workers, n, 10 * MB, tau=tau, seed=7, opens_round=opens_round, locked=locked)
  t, s = c.transfer_s(10 * MB), c.service_s
  assert (np.diff(found.time) >= 0).all()
  exchanges = found.exchange
  assert found.update[exchanges].tolist() == list(range(exchanges.sum()))
  assert (found.update[~exchanges] == -1).all() and (found.staleness[~exchanges] == -1).all()
  times = StepTimes(c, workers, 7)
  ready, read, arrival = [0.0] * workers, [0] * workers, []
  for w in range(workers):
    assert found.own_step[found.worker == w].tolist() == list(range((found.worker == w).sum()))
  # Replay each worker's timeline from the keys: local keys are compute ends, an exchange's
  # key (the master's start) comes no earlier than its message, and the reply a service and a
  # transfer later.
  for w, d, exchange, key, compute, stale, k in zip(
    *(getattr(found, a) for a in ARRAYS), strict=True
  ):
    assert compute == times(w, d)
    assert exchange == (d % tau == (0 if opens_round else tau - 1))
    if not exchange:
      ready[w] += compute
      assert key == pytest.approx(ready[w], rel=1e-12)
      continue
    arrival.append(ready[w] + (t if opens_round else compute + t))
    assert stale == k - read[w]
    read[w] = k + 1
    ready[w] = key + s + t + (compute if opens_round else 0.0)
  start = found.time[exchanges]
  assert (np.diff(arrival) >= -1e-12).all()  # applied in arrival order
  if locked:  # first come, first served, one at a time
    previous_end = np.concatenate([[0.0], start[:-1] + s])
    assert start == pytest.approx(np.maximum(arrival, previous_end), rel=1e-12)
  else:  # on arrival
    assert start == pytest.approx(arrival, rel=1e-12)


def test_a_locked_slow_master_is_the_bottleneck_and_unlocked_updates_overlap():
  c = costs(service_s=1.0, latency_s=1e-6)  # 100 steps' time per update
  locked, unlocked = events(c, 4, 200, 1000), events(c, 4, 200, 1000, locked=False)
  clock, free = metrics(locked, 200), metrics(unlocked, 200)
  assert clock["master_utilization"] > 0.95 and clock["communication_share"] > 0.95
  assert (np.diff(locked.time) >= c.service_s - 1e-12).all()  # one update at a time
  assert free["virtual_time_s"] < clock["virtual_time_s"] / 3  # four updates at a time
  assert free["master_utilization"] > 3  # overlapping updates: above 1
  assert staleness_histogram(unlocked, 200)[0].tolist() == [0, 1, 2, 3]


def test_the_same_seed_gives_the_same_events_and_another_seed_others():
  c = costs(jitter=0.3)
  a, b = events(c, 4, 200, MB, tau=2, seed=1), events(c, 4, 200, MB, tau=2, seed=1)
  other = events(c, 4, 200, MB, tau=2, seed=2)
  assert all(np.array_equal(getattr(a, x), getattr(b, x)) for x in ARRAYS)
  assert a.worker.tolist() != other.worker.tolist()
  assert not np.array_equal(a.compute_s, other.compute_s)


@pytest.mark.parametrize(
  "name, call",
  [
    ("num_workers", lambda c: events(c, 0, 10, MB)),
    ("tau", lambda c: events(c, 2, 10, MB, tau=0)),
    ("num_events", lambda c: events(c, 2, 0, MB)),
    ("num_bytes", lambda c: events(c, 2, 10, -1)),
    ("stragglers", lambda c: events(costs(stragglers=3), 2, 10, MB)),
    ("num_workers", lambda c: StepTimes(c, 0)),
    ("n", lambda c: metrics(events(c, 2, 10, MB), 0)),
    ("n", lambda c: staleness_histogram(events(c, 2, 10, MB), 11)),
  ],
)
def test_a_bad_argument_is_refused_by_name(name, call):
  with pytest.raises(ValueError, match=rf"\b{name}\b"):
    call(costs())
