"""Synchronous family: data-parallel SGD, Sync EASGD, EAMSGD momentum, multi-process runs."""

import contextlib
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from easgd_jax import devices, optimizers, reporting
from easgd_jax.algorithms import SGD, RoundRobinEASGD, SyncEASGD, SyncSGD

import reference
from helpers import (
  REPO,
  assert_params_close,
  bad_input_runs,
  child_env,
  child_process,
  concatenated,
  random_batches,
  run_steps,
  stepper,
  two_process_command,
)

PROBLEM_SEED = 5


def make_steps(num_steps, replicas, seed=0):
  """A fixed list of steps, each a list of one batch per device."""
  return random_batches(num_steps, seed, replicas)


def replica(tree, index):
  """The copy held by the index-th device of a replicated (pmap) pytree."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[index].data[0]), tree)


@pytest.mark.parametrize("replicas", [2, 4, 8])
def test_sync_sgd_on_p_devices_equals_sgd_on_the_p_times_larger_batch(problem, replicas):
  loss_fn, params = problem
  steps = make_steps(5, replicas)
  state = run_steps(SyncSGD(loss_fn, learning_rate=0.2), params, steps, num_devices=replicas).state
  sgd_steps = [concatenated(batches) for batches in steps]
  sgd_state = run_steps(SGD(loss_fn, learning_rate=0.2), params, sgd_steps).state
  for r in range(replicas):  # every replica holds the same weights
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      replica(state.params, r),
      sgd_state.params,
    )


@pytest.mark.parametrize("tau", [1, 3])
@pytest.mark.parametrize("delta", [0.0, 0.9])
def test_sync_easgd_matches_numpy_reference(problem, tau, delta):
  """Sync EASGD (delta = 0) and Sync EAMSGD (Algorithm 2, the force on x) against NumPy."""
  loss_fn, params = problem
  eta, rho, replicas = 0.1, 0.6, 4
  steps = make_steps(7, replicas, seed=1)
  sync = SyncEASGD(loss_fn, learning_rate=eta, rho=rho, tau=tau, momentum=delta)
  runner = run_steps(sync, params, steps, num_devices=replicas)
  state = runner.state
  center, local = reference.sync_easgd(reference.to_layers(params), steps, eta, rho, tau, delta)
  assert_params_close(runner.eval_params(), center)
  for i in range(replicas):
    assert_params_close(replica(state.local, i), local[i])
    assert_params_close(replica(state.center, i), center)  # every device's copy is the same


@pytest.mark.parametrize("delta", [0.0, 0.5, 0.9])
def test_round_robin_eamsgd_matches_numpy_nesterov_reference(problem, cpu_devices, delta):
  loss_fn, params = problem
  batches = [b[0] for b in make_steps(12, 1, seed=2)]
  easgd = RoundRobinEASGD(loss_fn, learning_rate=0.1, rho=0.7, tau=2, momentum=delta)
  state = run_steps(easgd, params, batches, num_devices=3, devices=cpu_devices).state
  center, local = reference.round_robin_easgd(
    reference.to_layers(params), batches, 3, 0.1, 0.7, 2, delta
  )
  assert_params_close(state["master"], center)
  for j in range(3):
    assert_params_close(state["workers"][j].local, local[j])


def test_eamsgd_with_delta_zero_is_easgd_exactly(problem, cpu_devices):
  """The momentum path (Nesterov's v in the optimizer state, the force on x = W - delta v) with
  delta = 0 is plain EASGD, synchronous and round-robin.

  Exactly up to rounding: the two programs compute the same numbers, but XLA's CPU backend
  contracts a * b + c into a fused multiply-add wherever its fusion puts one, and the two graphs
  get their FMAs in different places (Eq. (1)'s -eta * g - alpha * (x - W-bar) can round either
  product once), so an element may differ by an ulp or two after an exchange.
  """
  loss_fn, params = problem
  steps = make_steps(6, 4, seed=3)
  kwargs = dict(learning_rate=0.1, rho=0.5, tau=2)

  def train_sync_easgd(optimizer):
    sync = SyncEASGD(loss_fn, optimizer=optimizer, **kwargs)
    state = run_steps(sync, params, steps, num_devices=4).state
    return jax.device_get((state.center, state.local)), state.opt_state

  def train_round_robin(optimizer):
    easgd = RoundRobinEASGD(loss_fn, optimizer=optimizer, **kwargs)
    batches = [b for batches in steps for b in batches]
    state = run_steps(easgd, params, batches, num_devices=3, devices=cpu_devices).state
    locals_ = [worker.local for worker in state["workers"]]
    return jax.device_get((state["master"], locals_)), state["workers"][0].opt_state

  for train_ in (train_sync_easgd, train_round_robin):
    plain, plain_state = train_(optax.sgd(0.1))
    eamsgd, eamsgd_state = train_(optimizers.nesterov(0.1, 0.0))
    # Only the second run went through the momentum path: it kept a velocity, and it moved.
    assert optimizers.lookahead_shift(plain_state.inner) is None
    velocity = eamsgd_state.inner.velocity
    assert any(np.abs(np.asarray(v)).max() > 0 for v in jax.tree.leaves(velocity))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), eamsgd, plain)


def test_replicated_state_lives_on_every_device(problem, cpu_devices):
  loss_fn, params = problem
  sync = SyncEASGD(loss_fn, learning_rate=0.1, rho=0.5)
  runner = run_steps(sync, params, make_steps(1, 4), num_devices=4)
  state = runner.state
  for tree in (state.center, state.local):
    for leaf in jax.tree.leaves(tree):
      assert [s.device for s in leaf.addressable_shards] == cpu_devices[:4]
  assert devices.device_of(runner.eval_params()) == cpu_devices[0]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(process_id, port, workdir, *flags):
  """One of the processes of a multi-process run.py (a context manager: helpers.child_process)."""
  return child_process(
    two_process_command(process_id, port, workdir, *flags),
    cwd=REPO,
    env=child_env(PYTHONUNBUFFERED="1"),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "algorithm, extra",
  [("sync_sgd", []), ("sync_easgd", []), ("diloco", ["--learning_rate=0.002"])],  # AdamW inner
)
def test_two_processes_end_with_the_weights_and_the_train_loss_of_one(tmp_path, algorithm, extra):
  flags = [
    *extra,
    f"--algorithm={algorithm}",
    "--model=mlp",  # the collectives are the model's leaves whatever the layers: the small one
    "--num_devices=4",
    "--steps=30",
    "--eval_every=10",
    "--tau=2",
  ]
  port = free_port()
  single_log = tmp_path / "one.log"
  # The single-process run goes on beside the pair (its own workdir, its log in a file).
  with (
    open(single_log, "w") as log,
    child_process(
      [sys.executable, os.path.join(REPO, "run.py"), *flags, f"--workdir={tmp_path / 'one'}"],
      cwd=REPO,
      env=child_env(),
      stderr=log,
    ) as single,
    contextlib.ExitStack() as stack,
  ):
    procs = [stack.enter_context(launch(i, port, tmp_path / "two", *flags)) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert single.wait(timeout=300) == 0, single_log.read_text()[-2000:]
  for p, (_, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
  one = reporting.load_params(tmp_path / "one" / reporting.PARAMS)
  two = reporting.load_params(tmp_path / "two" / reporting.PARAMS)
  assert one.keys() == two.keys()
  # AdamW divides by sqrt(v): the all-reduce's summation order (gloo across processes, one
  # process in memory) then moves a weight by up to ~2e-6 instead of ~1e-7.
  atol = 1e-5 if algorithm == "diloco" else 1e-6
  for key in one:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=atol)
  if algorithm == "sync_sgd":
    # The train loss is the mean over the devices of every process: process 1's devices see
    # other data parts than process 0's, so a mean over process 0's alone would differ.
    rows_one, rows_two = (
      reporting.read_metrics(tmp_path / "one"),
      reporting.read_metrics(tmp_path / "two"),
    )
    assert [r["step"] for r in rows_two] == [10, 20, 30]
    for row_one, row_two in zip(rows_one, rows_two, strict=True):
      np.testing.assert_allclose(row_two["train_loss"], row_one["train_loss"], rtol=1e-6)


BAD_SYNC_INPUT = [
  (["--algorithm=sync_sgd", "--batch_size=1000"], "--batch_size"),
  (["--algorithm=sync_sgd", "--num_processes=2"], "--coordinator_address"),
  (
    [
      "--algorithm=sync_sgd",
      "--num_processes=2",
      "--process_id=2",
      "--coordinator_address=127.0.0.1:1",
    ],
    "--process_id",
  ),
  (
    [
      "--algorithm=sync_sgd",
      "--num_processes=3",
      "--num_devices=4",
      "--coordinator_address=127.0.0.1:1",
    ],
    "--num_devices",
  ),
  (
    ["--algorithm=easgd", "--num_processes=2", "--coordinator_address=127.0.0.1:1"],
    "--algorithm",
  ),
  (["--momentum=1.0"], "--momentum"),
]


@pytest.fixture(scope="module")
def bad_sync_input(tmp_path_factory):
  """Every BAD_SYNC_INPUT run.py, started together (helpers.run_at_once)."""
  return bad_input_runs(tmp_path_factory, os.path.join(REPO, "run.py"), BAD_SYNC_INPUT, "w")


@pytest.mark.parametrize("flags, named", BAD_SYNC_INPUT)
def test_bad_sync_and_multiprocess_input_is_one_line_exit_2(bad_sync_input, flags, named):
  result, workdir = bad_sync_input[tuple(flags)]
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and named in lines[0], result.stderr
  assert not workdir.exists()


def test_more_devices_than_visible_is_a_clear_error(problem):
  loss_fn, params = problem
  with pytest.raises(Exception, match="--num_devices=64 but only 8"):
    stepper(SyncSGD(loss_fn, learning_rate=0.1), params, devices=devices.replica_devices(64))
