"""Round-robin EASGD (Algorithm 1) against its equations, its placement and its special cases."""

import jax
import numpy as np
import pytest

from easgd_jax import devices
from easgd_jax.algorithms import SGD, RoundRobinEASGD
from easgd_jax.engines.local import steps

import reference
from helpers import assert_params_close, random_batches, run_steps, stepper

PROBLEM_SEED = 3


@pytest.fixture(scope="module")
def batches():
  """A fixed sequence of 12 batches."""
  return random_batches(12, seed=0)


def own_steps(state):
  """Steps each worker of a round-robin state has taken (its elastic optimizer's count)."""
  return [int(worker.opt_state.count) for worker in state["workers"]]


def test_gradient_matches_numpy_backprop(problem, batches):
  loss_fn, params = problem
  grads = jax.grad(lambda p: loss_fn(p, batches[0])[0])(params)
  expected = reference.mlp_gradient(
    reference.to_layers(params), batches[0]["image"], batches[0]["label"]
  )
  assert_params_close(grads, expected)


@pytest.mark.parametrize("tau", [1, 2])
def test_matches_numpy_reference_of_eq1_eq2(problem, batches, cpu_devices, tau):
  loss_fn, params = problem
  eta, rho, workers = 0.1, 0.7, 3
  easgd = RoundRobinEASGD(loss_fn, learning_rate=eta, rho=rho, tau=tau)
  state = run_steps(easgd, params, batches, num_devices=workers, devices=cpu_devices).state
  center, local = reference.round_robin_easgd(
    reference.to_layers(params), batches, workers, eta, rho, tau
  )
  assert sum(own_steps(state)) == len(batches)
  assert_params_close(state["master"], center)
  for j in range(workers):
    assert_params_close(state["workers"][j].local, local[j])


def test_round_robin_order_and_exchange_schedule(problem, cpu_devices):
  loss_fn, params = problem
  easgd = RoundRobinEASGD(loss_fn, learning_rate=0.1, rho=1.0, tau=2)
  runner = stepper(easgd, params, num_devices=3, devices=cpu_devices)
  schedule = [runner.who(t) for t in range(12)]
  assert [j for j, _ in schedule] == [0, 1, 2] * 4
  # Each worker exchanges on its own steps 0, 2 (iterations 0-2 and 6-8), not on 1, 3.
  assert [easgd.sends(own) for _, own in schedule] == (
    [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
  )


def test_center_on_device_0_and_each_local_on_its_own_device(problem, batches, cpu_devices):
  loss_fn, params = problem
  easgd = RoundRobinEASGD(loss_fn, learning_rate=0.1, rho=0.5)
  runner = stepper(easgd, params, num_devices=4, devices=cpu_devices)
  for t, batch in enumerate(batches):
    runner.step(t, batch)
    state = runner.state
    assert devices.device_of(state["master"]) == cpu_devices[0]
    for j in range(4):
      assert devices.device_of(state["workers"][j].local) == cpu_devices[j]
      opt_state = state["workers"][j].opt_state
      for leaf in jax.tree.leaves(opt_state):  # none for plain SGD, a trace with momentum
        assert leaf.devices() == {cpu_devices[j]}


def test_workers_share_devices_when_there_are_fewer(problem, batches, cpu_devices):
  loss_fn, params = problem
  easgd = RoundRobinEASGD(loss_fn, learning_rate=0.1, rho=0.5)
  runner = steps.RoundRobin(None, easgd, None, params, devices.worker_devices(5, cpu_devices[:2]))
  for t, batch in enumerate(batches[:5]):
    runner.step(t, batch)
  assert [devices.device_of(runner.state["workers"][j].local) for j in range(5)] == [
    cpu_devices[j % 2] for j in range(5)
  ]


def test_rho_zero_makes_each_worker_plain_sgd_on_its_own_batches(problem, batches, cpu_devices):
  loss_fn, params = problem
  workers, eta = 3, 0.1
  easgd = RoundRobinEASGD(loss_fn, learning_rate=eta, rho=0.0)
  state = run_steps(easgd, params, batches, num_devices=workers, devices=cpu_devices).state
  for j in range(workers):
    sgd = SGD(loss_fn, learning_rate=eta)
    sgd_state = run_steps(sgd, params, batches[j::workers], devices=[cpu_devices[j]]).state
    jax.tree.map(assert_one_rounding, state["workers"][j].local, sgd_state.params)
  # With rho = 0 nothing pulls the center: it stays at the initial weights.
  jax.tree.map(np.testing.assert_array_equal, state["master"], params)


def assert_one_rounding(actual, desired):
  """Equal up to float32 rounding: with rho = 0 the elastic gate is a traced 0, so XLA cannot
  drop the term, and W + (u - 0 * d) rounds once more than SGD's fused W + u may."""
  np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=1e-8)


def test_one_worker_with_rho_zero_equals_sgd(problem, batches, cpu_devices):
  loss_fn, params = problem
  easgd = RoundRobinEASGD(loss_fn, learning_rate=0.1, rho=0.0)
  easgd_state = run_steps(easgd, params, batches, num_devices=1, devices=cpu_devices).state
  sgd = SGD(loss_fn, learning_rate=0.1)
  sgd_state = run_steps(sgd, params, batches, devices=cpu_devices[:1]).state
  jax.tree.map(assert_one_rounding, easgd_state["workers"][0].local, sgd_state.params)


def test_sgd_matches_numpy_reference(problem, batches, cpu_devices):
  loss_fn, params = problem
  sgd = SGD(loss_fn, learning_rate=0.1)
  state = run_steps(sgd, params, batches, devices=cpu_devices[:1]).state
  assert_params_close(state.params, reference.sgd(reference.to_layers(params), batches, 0.1))
