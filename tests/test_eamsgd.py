"""EAMSGD (Zhang et al., 2015, Algorithm 2) in every schedule, against a NumPy replay in x and v.

Algorithm 2 on worker i's own step (exchanging on its steps 0, tau, 2 tau, ...):

  x = x^i
  if exchanging:  x^i <- x^i - alpha (x - x~);  x~ <- x~ + alpha (x - x~)
  v^i <- delta v^i - eta grad f(x + delta v^i);  x^i <- x^i + v^i

The library stores W^i = x^i + delta v^i (where the gradient is taken); the elastic force acts on
x = W^i - delta v^i. The references (tests/reference.py) are written in x and v, in float64, and
converted to W only for the comparison.
"""

import jax
import numpy as np
import pytest

from easgd_jax.algorithms import AsyncEASGD, RoundRobinEASGD, SyncEASGD

import reference
from helpers import assert_params_close, random_batches, run_steps, run_threads

DELTA = 0.9
PROBLEM_SEED = 11


def make_batches(count, seed):
  return random_batches(count, seed)


def replica(tree, index):
  """The copy held by the index-th device of a pmapped pytree, on the host."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[index].data[0]), tree)


def relative_distance(a_layers, b_layers, origin_layers):
  """|a - b| / |b - origin| over all parameters: how far apart, relative to how far b moved."""
  flat = lambda layers: np.concatenate([np.ravel(p) for layer in layers for p in layer])
  a, b, origin = flat(a_layers), flat(b_layers), flat(origin_layers)
  return np.linalg.norm(a - b) / np.linalg.norm(b - origin)


def test_round_robin_eamsgd_matches_algorithm_2(problem, cpu_devices):
  loss_fn, params = problem
  eta, rho, tau, num_workers = 0.05, 2.0, 3, 3  # alpha = 0.1
  batches = make_batches(num_workers * 7, seed=1)  # 7 own steps each: exchanges at 0, 3, 6
  easgd = RoundRobinEASGD(loss_fn, learning_rate=eta, rho=rho, tau=tau, momentum=DELTA)
  state = run_steps(easgd, params, batches, num_devices=num_workers, devices=cpu_devices).state
  center, local = reference.round_robin_easgd(
    reference.to_layers(params), batches, num_workers, eta, rho, tau, DELTA
  )
  assert_params_close(state["master"], center)
  for j in range(num_workers):
    assert_params_close(state["workers"][j].local, local[j])


def test_sync_eamsgd_matches_algorithm_2(problem):
  loss_fn, params = problem
  eta, rho, tau, replicas = 0.05, 2.0, 2, 4  # alpha = 0.1, alpha + beta = 0.5 < 2
  steps = [make_batches(replicas, seed=100 + t) for t in range(7)]
  sync = SyncEASGD(loss_fn, learning_rate=eta, rho=rho, tau=tau, momentum=DELTA)
  runner = run_steps(sync, params, steps, num_devices=replicas)
  state = runner.state
  center, local = reference.sync_easgd(reference.to_layers(params), steps, eta, rho, tau, DELTA)
  assert_params_close(runner.eval_params(), center)
  for i in range(replicas):
    assert_params_close(replica(state.center, i), center)  # every device's copy of the center
    assert_params_close(replica(state.local, i), local[i])


def test_sync_eamsgd_pulls_x_not_the_lookahead_point(problem):
  """The elastic force on W = x + delta v (the old rule) gives a clearly different center."""
  loss_fn, params = problem
  eta, rho, tau, replicas = 0.05, 2.0, 1, 4
  steps = [make_batches(replicas, seed=200 + t) for t in range(8)]
  sync = SyncEASGD(loss_fn, learning_rate=eta, rho=rho, tau=tau, momentum=DELTA)
  runner = run_steps(sync, params, steps, num_devices=replicas)
  got = reference.to_layers(jax.device_get(runner.eval_params()))
  start = reference.to_layers(params)
  on_x, _ = reference.sync_easgd(start, steps, eta, rho, tau, DELTA)
  on_w, _ = reference.sync_easgd(start, steps, eta, rho, tau, DELTA, elastic_on_w=True)
  assert relative_distance(got, on_x, start) < 1e-4
  # The two rules move the center apart by far more than float32 rounding.
  assert relative_distance(got, on_w, start) > 0.05
  assert relative_distance(on_x, on_w, start) > 0.05


@pytest.mark.parametrize("num_workers, tau", [(2, 2), (3, 3)])
def test_async_eamsgd_center_equals_replay_of_the_exchange_log(
  problem, cpu_devices, num_workers, tau
):
  loss_fn, params = problem
  eta, rho, steps = 0.05, 2.0, 36  # alpha = 0.1
  streams = [make_batches(steps, seed=300 + j) for j in range(num_workers)]
  async_easgd = AsyncEASGD(loss_fn, learning_rate=eta, rho=rho, tau=tau, momentum=DELTA)
  engine, final, _ = run_threads(async_easgd, params, streams, steps, fail_fast=True)
  order = [(e.worker, e.worker_step) for e in engine.master.record.recent]
  assert len({w for w, _ in order}) > 1  # both or all workers exchanged
  assert all(step % tau == 0 for _, step in order)
  # Replay in x and v: before each logged exchange the worker takes its local steps since its
  # last one; the exchange reads the center, moves it by alpha (x - read) and takes Algorithm 2's
  # step against the read.
  alpha = eta * rho
  center = reference.to_layers(params)
  x = [center] * num_workers
  v = [reference.zeros_like(center)] * num_workers
  done = [0] * num_workers

  def own_step(j, read=None):
    x[j], v[j], gap = reference.eamsgd_step(
      x[j], v[j], streams[j][done[j]], eta, DELTA, alpha, read
    )
    done[j] += 1
    return gap

  for j, worker_step in order:
    while done[j] < worker_step:
      own_step(j)
    gap = own_step(j, read=center)
    center = reference.axpy(alpha, gap, center)
  for j in range(num_workers):  # the local steps after each worker's last exchange
    while done[j] < engine.worker_steps[j]:
      own_step(j)
  assert sum(done) == steps
  assert_params_close(engine.master.state, center)
  assert_params_close(final.params, center)
  for j in range(num_workers):
    assert_params_close(engine.workers.states[j].local, reference.lookahead(x[j], v[j], DELTA))
