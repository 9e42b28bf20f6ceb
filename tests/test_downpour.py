"""DOWNPOUR and MDOWNPOUR (algorithms/downpour.py): real threads, replayed in NumPy from the log.

Each worker reads its own fixed list of batches (as in test_async.py), so the master's record
of pushes fixes the whole run: a worker's local steps between two pushes depend only on the x~
it pulled, so replaying the pushes in the order the master applied them reproduces it.
"""

import jax
import numpy as np
import optax
import pytest

from easgd_jax import train
from easgd_jax.algorithms import SGD, AsyncSGD, Downpour
from easgd_jax.config import Config
from easgd_jax.errors import ConfigError

import reference
from helpers import BATCH, IMAGE_SHAPE, NUM_CLASSES, assert_params_close, run_steps, run_threads

PROBLEM_SEED = 3


@pytest.fixture(scope="module")
def worker_batches():
  """Worker j's stream is worker_batches[j] (test_async.py's batches: the same numbers)."""
  rng = np.random.default_rng(1)
  return [
    [
      {
        "image": rng.standard_normal((BATCH, *IMAGE_SHAPE)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
      }
      for _ in range(100)
    ]
    for _ in range(8)
  ]


def applied(engine):
  """The master's applied-update record, in the order applied (what `algorithm.log` was)."""
  return list(engine.master.record.recent)


def params_of(engine):
  return engine.master.state["params"]


def mlp_step(layers, batch, eta):
  grad = reference.mlp_gradient(layers, batch["image"], batch["label"])
  return [(-eta * gw, -eta * gb) for gw, gb in grad]


def close(a, b):
  """To float32 rounding: x~ + v^i and SGD's fused W - eta * Delta W may round differently."""
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_with_tau_1_and_one_worker_it_equals_sgd(problem, worker_batches, cpu_devices):
  loss_fn, params = problem
  batches = worker_batches
  engine, _, _ = run_threads(Downpour(loss_fn, learning_rate=0.1), params, batches[:1], 20)
  sgd = run_steps(SGD(loss_fn, learning_rate=0.1), params, batches[0][:20], devices=cpu_devices)
  jax.tree.map(close, params_of(engine), sgd.state.params)
  # worker_step is now the 0-based index of the step the push came from (k; it was k + 1).
  assert [(p.worker_step, p.read_at, p.applied_as) for p in applied(engine)] == [
    (k, k, k + 1) for k in range(20)
  ]


def test_mdownpour_with_tau_1_and_one_worker_is_nesterov_on_the_master(problem, worker_batches):
  loss_fn, params = problem
  batches = worker_batches
  eta, delta = 0.05, 0.9
  mdownpour = Downpour(loss_fn, learning_rate=eta, momentum=delta)
  engine, _, _ = run_threads(mdownpour, params, batches[:1], steps=15)
  # Nesterov's momentum in the look-ahead form, written out: u <- delta u - eta g(x~),
  # x~ <- x~ + delta u - eta g(x~).
  center = reference.to_layers(params)
  u = reference.zeros_like(center)
  for batch in batches[0][:15]:
    step = mlp_step(center, batch, eta)
    u = reference.axpy(delta, u, step)
    center = reference.axpy(delta, u, reference.axpy(1.0, step, center))
  assert_params_close(params_of(engine), center, rtol=1e-4)
  # ... which is optax's Nesterov SGD run on one device.
  sgd = SGD(loss_fn, optimizer=optax.sgd(eta, momentum=delta, nesterov=True))
  state = run_steps(sgd, params, batches[0][:15]).state
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    params_of(engine),
    state.params,
  )


@pytest.mark.parametrize("tau, momentum", [(1, 0.0), (3, 0.0), (3, 0.5)])
def test_the_master_equals_a_numpy_replay_of_the_push_order(problem, worker_batches, tau, momentum):
  loss_fn, params = problem
  batches = worker_batches
  eta, num_workers, steps = 0.05, 6, 60
  downpour = Downpour(loss_fn, learning_rate=eta, tau=tau, momentum=momentum)
  # Compiled first (each worker compiles its step for its own device): run cold, the first
  # worker to finish compiling could take nearly every iteration before the others start.
  run_threads(downpour, params, batches[:num_workers], steps=steps)
  run, _, _ = run_threads(downpour, params, batches[:num_workers], steps=steps)
  log = applied(run)
  assert [p.applied_as for p in log] == list(range(1, len(log) + 1))
  assert len({p.worker for p in log}) > 1
  for before, after in zip(log, log[1:], strict=False):
    assert before.end <= after.start  # one push at a time
  # Every finished round of tau steps was pushed, nothing twice; a worker's read_at is the
  # update number its previous push got (0 before any).
  assert [sum(p.worker == j for p in log) for j in range(num_workers)] == [
    n // tau for n in run.worker_steps
  ]
  last = [0] * num_workers
  for p in log:
    # worker_step is now the 0-based index of the round's last step (tau - 1, 2 tau - 1, ...;
    # it was the steps done, tau, 2 tau, ...): a push closes a round of tau steps.
    assert (p.worker_step + 1) % tau == 0 and p.read_at == last[p.worker]
    last[p.worker] = p.applied_as
  assert max(p.applied_as - 1 - p.read_at for p in log) >= 1  # the workers did overlap

  center = reference.to_layers(params)
  velocity = reference.zeros_like(center)
  local = [center] * num_workers
  done = [0] * num_workers
  for p in log:
    j = p.worker
    accumulated = reference.zeros_like(center)
    while done[j] <= p.worker_step:  # x^i and v^i both move by -eta g(x^i) (steps 0..worker_step)
      step = mlp_step(local[j], batches[j][done[j]], eta)
      local[j] = reference.axpy(1.0, step, local[j])
      accumulated = reference.axpy(1.0, step, accumulated)
      done[j] += 1
    velocity = reference.axpy(momentum, velocity, accumulated)  # 0 and unused without momentum
    push = reference.axpy(momentum, velocity, accumulated) if momentum else accumulated
    center = reference.axpy(1.0, push, center)  # x~ <- x~ + v^i (MDOWNPOUR: + delta u)
    local[j] = center  # x^i <- x~, v^i <- 0
  assert_params_close(params_of(run), center, rtol=1e-4)


def test_with_tau_1_it_is_async_sgd(problem, worker_batches):
  """One worker at tau = 1: DOWNPOUR's pushes are async_sgd's gradient steps."""
  loss_fn, params = problem
  batches = worker_batches
  downpour, async_sgd = Downpour(loss_fn, learning_rate=0.1), AsyncSGD(loss_fn, learning_rate=0.1)
  downpour_run, _, _ = run_threads(downpour, params, batches[:1], steps=12)
  async_run, _, _ = run_threads(async_sgd, params, batches[:1], steps=12)
  jax.tree.map(close, params_of(downpour_run), params_of(async_run))


@pytest.mark.slow
def test_four_workers_at_tau_4_reach_90_percent_on_digits(cpu_devices):
  summary = train.train_and_evaluate(
    Config(algorithm="downpour", num_devices=4, tau=4, steps=1500, eval_every=500)
  )
  assert summary["final"]["test_accuracy"] >= 0.90
  assert sum(summary["worker_steps"]) == 1500 and min(summary["worker_steps"]) > 0
  assert summary["history"][-1]["staleness_max"] >= 1


@pytest.mark.parametrize(
  "fields, says",
  [
    (dict(optimizer="adamw"), "--algorithm=downpour accepts --optimizer=sgd or nesterov"),
    (dict(optimizer="momentum", momentum=0.9), "Nesterov on the master"),
    (dict(tau=0), "--tau"),
  ],
)
def test_bad_settings_are_refused_with_what_to_change(fields, says):
  with pytest.raises(ConfigError, match=says):
    train.validate(Config(algorithm="downpour", **fields))
