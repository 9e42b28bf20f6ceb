"""Asynchronous DiLoCo (algorithms/async_diloco.py): the server's Delayed Nesterov step against a
float64 NumPy reference and optax, one worker against diloco, the dynamic local steps from given
speeds, and runs on the local and simulated engines (Ray's is in tests/test_ray.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from easgd_jax import algorithms, checkpoints, reporting, train
from easgd_jax.algorithms import AsyncDiLoCo, DiLoCo
from easgd_jax.config import Config
from easgd_jax.engines.local import masters
from easgd_jax.errors import ConfigError

from helpers import random_batches, run_steps, run_threads

PROBLEM_SEED = 3
EPS, BETA = 0.7, 0.9  # --outer_learning_rate, --outer_momentum
SIMULATED = dict(engine="simulated", sim_compute_ms=1.0, sim_service_us=50.0, sim_stragglers=1)


def pushes(template, count, seed, dtype):
  """`count` pseudo-gradients shaped like `template` (a pytree), of `dtype`."""
  rng = np.random.default_rng(seed)
  return [
    jax.tree.map(lambda x: (0.1 * rng.standard_normal(np.shape(x))).astype(dtype), template)
    for _ in range(count)
  ]


def delayed_nesterov(theta, deltas, n):
  """The issue's Delayed Nesterov in float64 NumPy, written out: theta after every push."""
  buf, m, after = np.zeros_like(theta), np.zeros_like(theta), []
  for t, delta in enumerate(deltas, start=1):
    buf = buf + delta
    theta = theta - EPS * delta / n  # every push
    if t % n == 0:  # every N-th: the momentum moves, and theta with it
      m = BETA * m + buf / n
      theta = theta - EPS * BETA * m
      buf = np.zeros_like(buf)
    after.append(theta)
  return after


@pytest.mark.parametrize("n", [1, 3])
def test_delayed_nesterov_equals_a_float64_numpy_reference(problem, n):
  loss_fn, params = problem
  with jax.enable_x64(True):
    theta = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    deltas = pushes(theta, 10, seed=n, dtype=np.float64)  # 10: ends between two momentum steps
    rule = AsyncDiLoCo(loss_fn, learning_rate=1e-3, outer_learning_rate=EPS, outer_delay=n)
    master, apply = rule.master_init(theta), jax.jit(rule.master_apply)
    found = []
    for delta in deltas:
      master, reply = apply(master, delta, 0)
      assert jax.tree.leaves(reply)[0].dtype == np.float64
      found.append(reply)
  for leaf in range(len(jax.tree.leaves(theta))):
    expected = delayed_nesterov(
      jax.tree.leaves(theta)[leaf], [jax.tree.leaves(d)[leaf] for d in deltas], n
    )
    for t, reply in enumerate(found):
      np.testing.assert_allclose(jax.tree.leaves(reply)[leaf], expected[t], rtol=0, atol=1e-6)
  assert int(master.pushes) == 10


def test_with_outer_delay_1_every_push_is_optax_nesterov(problem):
  """The naive baseline: N = 1 is one Nesterov SGD step on each push (bitwise today)."""
  loss_fn, params = problem
  rule = AsyncDiLoCo(loss_fn, learning_rate=1e-3, outer_learning_rate=EPS, outer_delay=1)
  master, apply = rule.master_init(params), jax.jit(rule.master_apply)
  nesterov = optax.sgd(EPS, momentum=BETA, nesterov=True)
  theta, state = params, nesterov.init(params)
  for delta in pushes(params, 6, seed=0, dtype=np.float32):
    master, reply = apply(master, delta, 0)
    updates, state = nesterov.update(delta, state, theta)
    theta = optax.apply_updates(theta, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), reply, theta)


def test_one_worker_with_outer_delay_1_is_diloco_with_one_worker(problem, cpu_devices):
  loss_fn, params = problem
  batches = random_batches(12, seed=5)  # 4 rounds of tau = 3
  rule = AsyncDiLoCo(loss_fn, tau=3, learning_rate=0.01, outer_learning_rate=0.7, outer_delay=1)
  engine, _, _ = run_threads(rule, params, [batches], steps=12)
  diloco = run_steps(DiLoCo(loss_fn, tau=3, learning_rate=0.01), params, [[b] for b in batches], 1)
  center = jax.tree.map(lambda x: x[0], diloco.state.center)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), center, params)
  assert max(jax.tree.leaves(moved)) > 0.05  # four outer steps did move the weights
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    engine.master.state.params,
    center,
  )
  assert [(u.worker_step, u.read_at, u.applied_as) for u in engine.master.record.recent] == [
    (2, 0, 1),
    (5, 1, 2),
    (8, 2, 3),
    (11, 3, 4),
  ]


def test_dynamic_local_steps_from_given_speeds(problem):
  loss_fn, _ = problem
  rule = AsyncDiLoCo(loss_fn, tau=10, learning_rate=1e-3, dynamic_local_steps=True)
  # floor(v_w / max v * H): 10, 5, 2.5, 7.5, and a worker too slow for a whole step keeps one.
  assert rule.periods([4.0, 2.0, 1.0, 3.0, 0.01]) == [10, 5, 2, 7, 1]
  assert rule.periods([250.0, 250.0]) == [10, 10]
  assert AsyncDiLoCo(loss_fn, tau=6, learning_rate=1e-3, dynamic_local_steps=True).periods(
    [3.0, 1.0]  # 1/3 * 6 is 1.9999999999999998 in floating point: still 2
  ) == [6, 2]
  assert AsyncDiLoCo(loss_fn, tau=10, learning_rate=1e-3).periods([4.0, 1.0]) == [10, 10]


def test_its_defaults_are_diloco_s_with_half_the_outer_learning_rate():
  config = train.validate(Config(algorithm="async_diloco", num_devices=4))
  assert (config.optimizer, config.learning_rate, config.tau) == ("adamw", 2e-3, 10)
  assert (config.outer_learning_rate, config.outer_momentum, config.outer_delay) == (
    0.35,
    0.9,
    None,
  )
  assert train.validate(Config(algorithm="diloco")).outer_learning_rate == 0.7
  assert algorithms.create(config, None).outer_delay == 4  # N = G when unset


def test_on_the_simulated_engine_a_straggler_pushes_after_fewer_steps(tmp_path):
  config = Config(
    algorithm="async_diloco",
    model="mlp",
    batch_size=16,
    tau=4,
    steps=100,
    eval_every=100,
    dynamic_local_steps=True,
    **SIMULATED,  # the last of 4 workers 4x slower: its H_w = 4 / 4
  )
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["exchange_periods"] == [4, 4, 4, 1]
  _, workers, _ = summary["state"]  # the stacked states: each worker's own H_w is in its state
  assert np.asarray(workers.period).tolist() == [4, 4, 4, 1]
  record = reporting.read_applied(tmp_path)
  assert [made for *_, made in record] == list(range(1, len(record) + 1))
  for j, period in enumerate(summary["exchange_periods"]):  # every round of H_j steps pushed
    own = [d for w, d, _, _ in record if w == j]
    assert own == [period * (k + 1) - 1 for k in range(len(own))] and own, (j, own)
  assert summary["final"]["test_accuracy"] >= 0.7  # 0.82 (chance: 0.1)


def test_the_local_engine_trains_and_a_resume_keeps_the_measured_local_steps(
  tmp_path, cpu_devices, monkeypatch
):
  config = Config(
    algorithm="async_diloco",
    model="mlp",
    num_devices=2,
    tau=4,
    steps=120,
    eval_every=60,
    checkpoint_every=60,
    dynamic_local_steps=True,
    progress_every_s=0,
  )
  measure, timed = masters.Workers.speeds, []

  def measured(self, batches, threads=None):
    """The speeds measured (each worker's step timed on its device), then worker 1 made 3/4 as
    fast as worker 0: a measurement on a shared host is noise, and H_w = 3 does not divide 4."""
    speeds = measure(self, batches, threads)
    timed.append(self)
    assert len(speeds) == 2 and all(0 < v < float("inf") for v in speeds)
    return [speeds[0], 0.75 * speeds[0]]

  monkeypatch.setattr(masters.Workers, "speeds", measured)
  first = train.train_and_evaluate(dataclasses.replace(config, steps=60), str(tmp_path))
  periods = first["exchange_periods"]
  assert periods == [4, 3]
  assert [int(worker.period) for worker in timed[0].states] == periods  # the rule's rounds too
  record = ocp.JsonCheckpointHandler().restore(tmp_path / checkpoints.FOLDER / "60" / "record")
  assert record["periods"] == periods  # in the checkpoint, beside the states that hold them too

  def measured_again(*args):
    raise AssertionError("a resume measured the speeds again")

  monkeypatch.setattr(masters.Workers, "speeds", measured_again)
  resumed = train.train_and_evaluate(config, str(tmp_path))
  assert resumed["exchange_periods"] == periods
  assert [r["step"] for r in resumed["history"]] == [60, 120]
  applied = reporting.read_applied(tmp_path)  # both launches' pushes, each after H_w steps
  assert {j for j, *_ in applied} == {0, 1}
  assert all((own + 1) % periods[j] == 0 for j, own, _, _ in applied)
  assert sum(resumed["worker_steps"]) == 120
  assert resumed["final"]["test_accuracy"] >= 0.5  # 0.60 to 0.85 in 3 runs (chance: 0.1)


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(algorithm="async_diloco", outer_delay=0), "--outer_delay must be an integer >= 1"),
    (dict(algorithm="easgd", outer_delay=2), "--outer_delay applies to --algorithm=async_diloco"),
    (
      dict(algorithm="downpour", dynamic_local_steps=True),
      "--dynamic_local_steps applies to --algorithm=async_diloco (got --algorithm=downpour)",
    ),
  ],
)
def test_bad_flags_name_what_to_change(fields, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    train.validate(Config(**fields))
