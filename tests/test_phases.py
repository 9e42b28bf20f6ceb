"""The data-parallel algorithms' per-replica phases: pmapped over devices (the local engine's
replicas) or vmapped over replicas stacked on one device (what --engine=simulated runs), the same
numbers."""

import dataclasses

import jax
import numpy as np
import pytest

from easgd_jax import collectives, data, devices, engines, train
from easgd_jax.algorithms import (
  REGISTRY,
  SGD,
  DiLoCo,
  LocalSGD,
  StreamingDiLoCo,
  SyncEASGD,
  SyncSGD,
)
from easgd_jax.config import Config
from easgd_jax.errors import ConfigError

from helpers import BATCH, IMAGE_SHAPE, NUM_CLASSES, run_steps

PROBLEM_SEED = 3
REPLICAS, STEPS = 4, 5
SIMULATED_COSTS = dict(sim_compute_ms=1.0, sim_service_us=50.0)  # not measured: nothing runs

# name -> (constructor, the phase each of steps 0..4 runs)
ALGORITHMS = {
  "sync_sgd": (lambda f: SyncSGD(f, learning_rate=0.2), [0, 0, 0, 0, 0]),
  # exchanges on steps 0, tau, 2 tau, ...
  "sync_easgd": (lambda f: SyncEASGD(f, learning_rate=0.2, tau=2), [1, 0, 1, 0, 1]),
  # averages after the tau-th inner step of a round: steps tau - 1, 2 tau - 1, ...
  "local_sgd": (lambda f: LocalSGD(f, learning_rate=0.2, tau=2), [0, 1, 0, 1, 0]),
  "diloco": (lambda f: DiLoCo(f, learning_rate=0.01, tau=2), [0, 1, 0, 1, 0]),
  # fragment 0 syncs after step 1 and lands after step 2, fragment 1 after steps 3 and 4
  "streaming_diloco": (
    lambda f: StreamingDiLoCo(f, learning_rate=0.01, tau=4, fragments=2, overlap_steps=1),
    [0, 1, 3, 2, 4],
  ),
}


@pytest.fixture(scope="module")
def dataset():
  """A training set for the engines' placements (their samplers); nothing here trains on it."""
  return data.load(Config(batch_size=BATCH))


def make_batches(replicas, seed=0):
  """STEPS batches, each stacked on a leading axis of `replicas`."""
  rng = np.random.default_rng(seed)
  return [
    {
      "image": rng.standard_normal((replicas, BATCH, *IMAGE_SHAPE)).astype(np.float32),
      "label": rng.integers(0, NUM_CLASSES, (replicas, BATCH)).astype(np.int32),
    }
    for _ in range(STEPS)
  ]


def run_vmapped(rule, params, batches, replicas):
  """What the simulated engine does: `init`'s one replica repeated, the phases vmapped."""
  first = jax.tree.map(lambda x: np.asarray(x)[None], rule.init(params))  # its leading axis
  state = devices.put(
    jax.tree.map(lambda x: np.repeat(x, replicas, axis=0), first), jax.devices()[0]
  )
  phases = [jax.jit(jax.vmap(fn, axis_name=collectives.AXIS)) for fn in rule.phases]
  for t, batch in enumerate(batches):
    state, _ = phases[rule.phase(t)](state, batch)
  return state


def assert_trees_close(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-7),
    actual,
    expected,
  )


def placement(config, rule, dataset, params):
  """The stepper the engine `config.engine` places `rule` with."""
  return engines.create(config, rule, dataset, params).stepper


def state_devices(state):
  return {d for leaf in jax.tree.leaves(state) for d in leaf.devices()}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_phases_vmapped_on_one_device_equal_the_pmapped_step(problem, cpu_devices, name):
  loss_fn, params = problem
  make, schedule = ALGORITHMS[name]
  batches = make_batches(REPLICAS)
  rule = make(loss_fn)
  assert len(rule.phases) == max(schedule) + 1
  assert [rule.phase(t) for t in range(STEPS)] == schedule

  state = run_steps(rule, params, batches, num_devices=REPLICAS).state
  vmapped = run_vmapped(rule, params, batches, REPLICAS)
  assert state_devices(vmapped) == {cpu_devices[0]}
  assert_trees_close(vmapped, state)  # every field, every replica


def test_sgds_phase_vmapped_over_one_replica_equals_its_step(problem):
  loss_fn, params = problem
  sgd = SGD(loss_fn, learning_rate=0.2)
  assert len(sgd.phases) == 1
  assert [sgd.phase(t) for t in range(STEPS)] == [0] * STEPS
  batches = make_batches(1)
  state = run_steps(sgd, params, [jax.tree.map(lambda x: x[0], b) for b in batches]).state
  vmapped = run_vmapped(sgd, params, batches, 1)
  assert_trees_close(jax.tree.map(lambda x: x[0], vmapped), state)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_fused_places_more_replicas_than_there_are_devices(problem, cpu_devices, dataset, name):
  loss_fn, params = problem
  make, schedule = ALGORITHMS[name]
  replicas = 64
  assert replicas > len(cpu_devices)
  rule = make(loss_fn)
  config = Config(algorithm=name, num_devices=replicas, tau=2, batch_size=BATCH)
  with pytest.raises(ConfigError, match="--num_devices=64"):
    placement(config, rule, dataset, params)  # the local engine: one device per replica, too few
  simulated = dataclasses.replace(config, engine="simulated", **SIMULATED_COSTS)
  placed = placement(simulated, rule, dataset, params)
  assert placed.device == cpu_devices[0]
  assert state_devices(placed.state) == {cpu_devices[0]}
  assert placed.replicas == replicas  # every replica this process's, stacked
  assert all(leaf.shape[0] == replicas for leaf in jax.tree.leaves(placed.state))
  assert placed.inputs(0, 1)["index"].shape == (1, replicas, BATCH)  # a batch per replica a step
  assert placed.max_in_flight is None
  assert len(rule.phases) == max(schedule) + 1
  if name == "sync_easgd":  # one step of all 64, its exchange's psum over the vmapped axis
    state = run_vmapped(rule, params, make_batches(replicas)[:1], replicas)
    assert jax.tree.leaves(state.center)[0].shape[0] == replicas


@pytest.mark.parametrize("engine, fused", [("local", False), ("simulated", True)])
def test_from_config_fuses_for_the_simulated_engine(problem, cpu_devices, dataset, engine, fused):
  loss_fn, params = problem
  costs = SIMULATED_COSTS if fused else {}
  for name in ALGORITHMS:
    config = Config(algorithm=name, engine=engine, num_devices=4, tau=2, batch_size=BATCH, **costs)
    config = train.validate(config)
    placed = placement(config, REGISTRY[name].from_config(config, loss_fn), dataset, params)
    assert len(state_devices(placed.state)) == (1 if fused else 4)
    # replicas 0, 1, 2, 3, all of this process's
    assert all(leaf.shape[0] == 4 for leaf in jax.tree.leaves(placed.state))
    if not fused:
      assert devices.local_replica_ids(placed.devices) == [0, 1, 2, 3]
