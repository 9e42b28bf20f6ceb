"""The simulated cluster's clock (easgd_jax/engines/virtual_clock.py) against hand-derived cases."""

import math

import numpy as np
import pytest

from easgd_jax.engines.virtual_clock import Costs, parameter_server, round_robin, synchronous

MB = 2**20


def costs(**changes):
  base = dict(compute_s=0.01, latency_s=1e-4, bandwidth_bytes_s=1e9, service_s=1e-3)
  return Costs(**{**base, **changes})


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
  timing = synchronous(c, workers, steps, num_bytes, tau=tau)
  ring = 2 * (workers - 1) * (c.latency_s + num_bytes / workers / c.bandwidth_bytes_s)
  expected = steps * 3 * c.compute_s + steps // tau * ring
  assert timing.makespan == pytest.approx(expected, rel=1e-12)
  assert timing.compute_share == pytest.approx(steps * 6 * c.compute_s / (workers * expected))
  assert timing.link_busy_share == pytest.approx(steps // tau * ring / expected)
  one = synchronous(c, 1, steps, num_bytes)
  assert one.link_busy_share == 0  # one worker has nobody to all-reduce with


def test_algorithm_1_runs_one_device_at_a_time():
  c = costs()
  workers, steps, tau, num_bytes = 8, 80, 2, 16 * MB
  timing = round_robin(c, workers, steps, num_bytes, tau=tau)
  round_trip = 2 * (c.latency_s + num_bytes / c.bandwidth_bytes_s)
  exchanges = steps // tau  # own steps 0, 2, 4, ... of each worker
  expected = steps * c.compute_s + exchanges * (round_trip + c.service_s)
  assert timing.makespan == pytest.approx(expected, rel=1e-12)
  assert timing.compute_share == pytest.approx(steps * c.compute_s / (workers * expected))
  assert timing.communication_share > 1 - 1 / workers  # seven devices idle at every moment
  assert timing.link_busy_share == pytest.approx(exchanges * round_trip / (workers * expected))
