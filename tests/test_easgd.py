"""Round-robin EASGD (Algorithm 1) against its equations, its placement and its special cases."""

import jax
import numpy as np
import pytest

from easgd_jax import core, devices, models
from easgd_jax.algorithms import SGD, RoundRobinEASGD

import reference

NUM_CLASSES, IMAGE_SHAPE, BATCH = 3, (4, 4, 1), 6


@pytest.fixture(scope="module")
def problem():
  """A small ReLU MLP, its initial host weights and a fixed sequence of 12 batches."""
  model = models.create("mlp", NUM_CLASSES, hidden=(7,))
  params = models.init_params(model, IMAGE_SHAPE, seed=3)
  rng = np.random.default_rng(0)
  batches = [
    {
      "image": rng.standard_normal((BATCH, *IMAGE_SHAPE)).astype(np.float32),
      "label": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
    }
    for _ in range(12)
  ]
  return core.make_loss_fn(model), params, batches


def assert_params_close(actual, expected_layers, rtol=1e-5, atol=1e-6):
  expected = reference.from_layers(expected_layers)
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol),
    actual,
    expected,
  )


def test_gradient_matches_numpy_backprop(problem):
  loss_fn, params, batches = problem
  grads = jax.grad(lambda p: loss_fn(p, batches[0])[0])(params)
  expected = reference.mlp_gradient(
    reference.to_layers(params), batches[0]["image"], batches[0]["label"]
  )
  assert_params_close(grads, expected)


@pytest.mark.parametrize("tau", [1, 2])
def test_matches_numpy_reference_of_eq1_eq2(problem, cpu_devices, tau):
  loss_fn, params, batches = problem
  eta, rho, workers = 0.1, 0.7, 3
  easgd = RoundRobinEASGD(
    loss_fn, num_workers=workers, learning_rate=eta, rho=rho, tau=tau, available_devices=cpu_devices
  )
  state, _ = easgd.run(easgd.init(params), batches)
  center, local = reference.round_robin_easgd(
    reference.to_layers(params), batches, workers, eta, rho, tau
  )
  assert state.step == len(batches)
  assert_params_close(state.center, center)
  for j in range(workers):
    assert_params_close(state.locals[j], local[j])


def test_round_robin_order_and_exchange_schedule(problem, cpu_devices):
  loss_fn, _, _ = problem
  easgd = RoundRobinEASGD(
    loss_fn, num_workers=3, learning_rate=0.1, rho=1.0, tau=2, available_devices=cpu_devices
  )
  schedule = [easgd.worker(t) for t in range(12)]
  assert [j for j, _ in schedule] == [0, 1, 2] * 4
  # Each worker exchanges on its own steps 0, 2 (iterations 0-2 and 6-8), not on 1, 3.
  assert [x for _, x in schedule] == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3


def test_center_on_device_0_and_each_local_on_its_own_device(problem, cpu_devices):
  loss_fn, params, batches = problem
  easgd = RoundRobinEASGD(
    loss_fn, num_workers=4, learning_rate=0.1, rho=0.5, available_devices=cpu_devices
  )
  state = easgd.init(params)
  for batch in batches:
    state, _ = easgd.step(state, batch)
    assert devices.device_of(state.center) == cpu_devices[0]
    for j in range(4):
      assert devices.device_of(state.locals[j]) == cpu_devices[j]
      for leaf in jax.tree.leaves(state.opt_states[j]):  # none for plain SGD, a trace with momentum
        assert leaf.devices() == {cpu_devices[j]}


def test_workers_share_devices_when_there_are_fewer(problem, cpu_devices):
  loss_fn, params, batches = problem
  easgd = RoundRobinEASGD(
    loss_fn, num_workers=5, learning_rate=0.1, rho=0.5, available_devices=cpu_devices[:2]
  )
  state, _ = easgd.run(easgd.init(params), batches[:5])
  assert [devices.device_of(state.locals[j]) for j in range(5)] == [
    cpu_devices[j % 2] for j in range(5)
  ]


def test_rho_zero_makes_each_worker_plain_sgd_on_its_own_batches(problem, cpu_devices):
  loss_fn, params, batches = problem
  workers, eta = 3, 0.1
  easgd = RoundRobinEASGD(
    loss_fn, num_workers=workers, learning_rate=eta, rho=0.0, available_devices=cpu_devices
  )
  state, _ = easgd.run(easgd.init(params), batches)
  for j in range(workers):
    sgd = SGD(loss_fn, learning_rate=eta, device=cpu_devices[j])
    sgd_state, _ = _run(sgd, params, batches[j::workers])
    jax.tree.map(assert_one_rounding, state.locals[j], sgd_state.params)
  # With rho = 0 nothing pulls the center: it stays at the initial weights.
  jax.tree.map(np.testing.assert_array_equal, state.center, params)


def assert_one_rounding(actual, desired):
  """Equal up to float32 rounding: with rho = 0 the elastic gate is a traced 0, so XLA cannot
  drop the term, and W + (u - 0 * d) rounds once more than SGD's fused W + u may."""
  np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=1e-8)


def test_one_worker_with_rho_zero_equals_sgd(problem, cpu_devices):
  loss_fn, params, batches = problem
  easgd = RoundRobinEASGD(
    loss_fn, num_workers=1, learning_rate=0.1, rho=0.0, available_devices=cpu_devices
  )
  easgd_state, _ = easgd.run(easgd.init(params), batches)
  sgd_state, _ = _run(SGD(loss_fn, learning_rate=0.1, device=cpu_devices[0]), params, batches)
  jax.tree.map(assert_one_rounding, easgd_state.locals[0], sgd_state.params)


def test_sgd_matches_numpy_reference(problem, cpu_devices):
  loss_fn, params, batches = problem
  state, _ = _run(SGD(loss_fn, learning_rate=0.1, device=cpu_devices[0]), params, batches)
  assert_params_close(state.params, reference.sgd(reference.to_layers(params), batches, 0.1))


def _run(algorithm, params, batches):
  state, losses = algorithm.init(params), []
  for batch in batches:
    state, loss = algorithm.step(state, batch)
    losses.append(loss)
  return state, losses
