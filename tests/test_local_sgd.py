"""Local SGD and DiLoCo: their special cases, a NumPy replay of DiLoCo, and digits end to end."""

import jax
import numpy as np
import optax
import pytest

from easgd_jax import optimizers, train
from easgd_jax.algorithms import DiLoCo, LocalSGD, SyncSGD
from easgd_jax.config import Config

import reference
from helpers import assert_params_close, random_batches, run_steps, stacked, stepper

REPLICAS = 4
PROBLEM_SEED = 7


def make_steps(num_steps, replicas=REPLICAS, seed=0):
  """A fixed list of steps, each a list of one batch per device."""
  return random_batches(num_steps, seed, replicas)


def replica(tree, index):
  """The copy held by the index-th device of a pmapped pytree, on the host."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[index].data[0]), tree)


def train_steps(algorithm, params, steps):
  """The replicas (one per device) taken through `steps`: the local engine's stepper."""
  return run_steps(algorithm, params, steps, num_devices=REPLICAS)


def assert_trees_close(actual, expected, rtol=1e-6, atol=1e-7):
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol),
    actual,
    expected,
  )


INNER = {  # the inner optimizers whose update is linear in the gradients and their own state
  "sgd": lambda eta: optax.sgd(eta),
  "momentum": lambda eta: optax.sgd(eta, momentum=0.9),
  "nesterov": lambda eta: optimizers.nesterov(eta, 0.9),
}


@pytest.mark.parametrize("inner", sorted(INNER))
def test_local_sgd_with_tau_1_is_sync_sgd(problem, inner):
  """Averaging the weights after every linear step = stepping with the averaged gradient."""
  loss_fn, params = problem
  eta, steps = 0.1, make_steps(6, seed=1)
  local = LocalSGD(loss_fn, tau=1, optimizer=INNER[inner](eta))
  sync = SyncSGD(loss_fn, optimizer=INNER[inner](eta))
  local_run, sync_run = train_steps(local, params, steps), train_steps(sync, params, steps)
  local_state = local_run.state
  expected = sync_run.eval_params()
  assert_trees_close(local_run.eval_params(), expected)
  for i in range(REPLICAS):
    assert_trees_close(replica(local_state.local, i), expected)
    assert_trees_close(replica(local_state.center, i), expected)
  # and the weights did move: the comparison is not between two copies of the initial weights
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), expected, params)
  assert min(jax.tree.leaves(moved)) > 1e-3


def test_local_sgd_with_learning_rate_is_sync_sgd(problem):
  """The learning_rate / momentum constructor arguments give the same default inner optimizer."""
  loss_fn, params = problem
  steps = make_steps(4, seed=2)
  local = LocalSGD(loss_fn, tau=1, learning_rate=0.1, momentum=0.9)
  sync = SyncSGD(loss_fn, learning_rate=0.1, momentum=0.9)
  assert_trees_close(
    train_steps(local, params, steps).eval_params(),
    train_steps(sync, params, steps).eval_params(),
  )


def test_local_sgd_averages_only_after_every_tau_th_step(problem):
  """Between averages the workers drift apart; after the tau-th step they all equal the mean."""
  loss_fn, params = problem
  tau, eta = 3, 0.1
  local = LocalSGD(loss_fn, tau=tau, learning_rate=eta)
  runner = stepper(local, params, num_devices=REPLICAS)
  expected = [reference.to_layers(params)] * REPLICAS
  for t, batches in enumerate(make_steps(2 * tau + 1, seed=3)):
    runner.step(t, stacked(batches))
    expected = [reference.sgd(w, [b], eta) for w, b in zip(expected, batches, strict=True)]
    if (t + 1) % tau == 0:
      expected = [reference.scale(1.0 / REPLICAS, reference.add(*expected))] * REPLICAS
      assert_params_close(runner.eval_params(), expected[0])
    for i in range(REPLICAS):
      assert_params_close(replica(runner.state.local, i), expected[i])
  state = runner.state
  assert not np.allclose(
    replica(state.local, 0)["Dense_0"]["kernel"], replica(state.local, 1)["Dense_0"]["kernel"]
  )


def test_diloco_with_outer_sgd_at_rate_1_is_local_sgd(problem):
  """W-bar <- W-bar - 1 * (W-bar - mean_i W^i) = mean_i W^i: DiLoCo without momentum at rate 1."""
  loss_fn, params = problem
  tau, steps = 3, make_steps(7, seed=4)  # two rounds and one step into the third
  adamw = optax.adamw(0.01, weight_decay=0.05)
  diloco = DiLoCo(
    loss_fn,
    tau=tau,
    optimizer=adamw,
    outer_learning_rate=1.0,
    outer_momentum=0.0,
  )
  local = LocalSGD(loss_fn, tau=tau, optimizer=adamw)
  diloco_run, local_run = train_steps(diloco, params, steps), train_steps(local, params, steps)
  assert_trees_close(diloco_run.eval_params(), local_run.eval_params(), rtol=1e-5)
  for i in range(REPLICAS):
    assert_trees_close(
      replica(diloco_run.state.local, i), replica(local_run.state.local, i), rtol=1e-5, atol=1e-6
    )


def test_diloco_matches_numpy_replay_of_adamw_inside_nesterov_outside(problem):
  loss_fn, params = problem
  tau, inner_lr, weight_decay, outer_lr, outer_momentum = 3, 0.01, 0.1, 0.7, 0.9
  steps = make_steps(2 * tau + 1, seed=5)  # two rounds, then one inner step of the third
  diloco = DiLoCo(
    loss_fn,
    tau=tau,
    optimizer=optax.adamw(inner_lr, weight_decay=weight_decay),
    outer_learning_rate=outer_lr,
    outer_momentum=outer_momentum,
  )
  runner = stepper(diloco, params, num_devices=REPLICAS)
  start = reference.to_layers(params)
  for t in range(len(steps)):
    runner.step(t, stacked(steps[t]))
    state = runner.state
    center, local = reference.diloco(
      start, steps[: t + 1], tau, inner_lr, weight_decay, outer_lr, outer_momentum
    )
    assert_params_close(runner.eval_params(), center)
    for i in range(REPLICAS):
      assert_params_close(replica(state.center, i), center)
      assert_params_close(replica(state.local, i), local[i])
  # The outer momentum mattered: without it (or without Nesterov) the second round ends elsewhere.
  plain, _ = reference.diloco(start, steps[: 2 * tau], tau, inner_lr, weight_decay, outer_lr, 0.0)
  nesterov, _ = reference.diloco(
    start, steps[: 2 * tau], tau, inner_lr, weight_decay, outer_lr, outer_momentum
  )
  gap = max(
    np.abs(a - b).max()
    for la, lb in zip(plain, nesterov, strict=True)
    for a, b in zip(la, lb, strict=True)
  )
  assert gap > 1e-3


@pytest.mark.slow
def test_diloco_reaches_95_percent_on_digits():
  summary = train.train_and_evaluate(
    Config(
      algorithm="diloco",
      dataset="digits",
      model="mlp",
      num_devices=4,
      tau=8,
      learning_rate=2e-3,
      steps=400,
      eval_every=100,
    )
  )
  assert summary["final"]["test_accuracy"] >= 0.95
