"""The data-parallel algorithms' per-replica phases: pmapped over devices (`step`) or vmapped over
replicas stacked on one device (what --engine=simulated runs), the same numbers."""

import jax
import numpy as np
import pytest
from test_easgd import BATCH, IMAGE_SHAPE, NUM_CLASSES

from easgd_jax import core, devices, models
from easgd_jax.algorithms import REGISTRY, SGD, DiLoCo, LocalSGD, SyncEASGD, SyncSGD
from easgd_jax.config import Config, ConfigError

REPLICAS, STEPS = 4, 5

# name -> (constructor, the phase each of steps 0..4 runs)
ALGORITHMS = {
  "sync_sgd": (lambda f, **kw: SyncSGD(f, learning_rate=0.2, **kw), [0, 0, 0, 0, 0]),
  # exchanges on steps 0, tau, 2 tau, ...
  "sync_easgd": (lambda f, **kw: SyncEASGD(f, learning_rate=0.2, tau=2, **kw), [1, 0, 1, 0, 1]),
  # averages after the tau-th inner step of a round: steps tau - 1, 2 tau - 1, ...
  "local_sgd": (lambda f, **kw: LocalSGD(f, learning_rate=0.2, tau=2, **kw), [0, 1, 0, 1, 0]),
  "diloco": (lambda f, **kw: DiLoCo(f, learning_rate=0.01, tau=2, **kw), [0, 1, 0, 1, 0]),
}


@pytest.fixture(scope="module")
def problem():
  model = models.create("mlp", NUM_CLASSES, hidden=(7,))
  params = models.init_params(model, IMAGE_SHAPE, seed=3)
  return core.make_loss_fn(model), params


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


def run_vmapped(algorithm, params, batches, replicas):
  """What the simulated engine does: `init`'s one replica repeated, the phases vmapped."""
  first = jax.tree.map(np.asarray, algorithm.init(params)._replace(step=None))
  if not algorithm.data_parallel:  # sgd: one replica, given its leading axis
    first = jax.tree.map(lambda x: x[None], first)
  state = devices.put(
    jax.tree.map(lambda x: np.repeat(x, replicas // len(x), axis=0), first), algorithm.devices[0]
  )
  phases = [jax.jit(jax.vmap(fn, axis_name=devices.AXIS)) for fn in algorithm.phases]
  for t, batch in enumerate(batches):
    state, _ = phases[algorithm.phase(t)](state, batch)
  return state


def assert_trees_close(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-7),
    actual,
    expected,
  )


@pytest.mark.parametrize("name", ALGORITHMS)
def test_phases_vmapped_on_one_device_equal_the_pmapped_step(problem, cpu_devices, name):
  loss_fn, params = problem
  make, schedule = ALGORITHMS[name]
  batches = make_batches(REPLICAS)
  pmapped = make(loss_fn, num_devices=REPLICAS)
  fused = make(loss_fn, num_devices=REPLICAS, fused=True)
  assert len(pmapped.phases) == len(fused.phases) == max(schedule) + 1
  assert [fused.phase(t) for t in range(STEPS)] == schedule
  assert [pmapped.phase(t) for t in range(STEPS)] == schedule

  state = pmapped.init(params)
  for batch in batches:
    state, _ = pmapped.step(state, batch)
  assert state.step == STEPS
  vmapped = run_vmapped(fused, params, batches, REPLICAS)
  assert {d for x in jax.tree.leaves(vmapped) for d in x.devices()} == {cpu_devices[0]}
  assert_trees_close(vmapped, state._replace(step=None))  # every field, every replica


def test_sgds_phase_vmapped_over_one_replica_equals_its_step(problem):
  loss_fn, params = problem
  sgd = SGD(loss_fn, learning_rate=0.2)
  assert len(sgd.phases) == 1
  assert [sgd.phase(t) for t in range(STEPS)] == [0] * STEPS
  batches = make_batches(1)
  state = sgd.init(params)
  for batch in batches:
    state, _ = sgd.step(state, jax.tree.map(lambda x: x[0], batch))
  assert state.step == STEPS
  vmapped = run_vmapped(sgd, params, batches, 1)
  assert_trees_close(jax.tree.map(lambda x: x[0], vmapped), state._replace(step=None))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_fused_places_more_replicas_than_there_are_devices(problem, cpu_devices, name):
  loss_fn, params = problem
  make, schedule = ALGORITHMS[name]
  replicas = 64
  assert replicas > len(cpu_devices)
  with pytest.raises(ConfigError, match="--num_devices=64"):
    make(loss_fn, num_devices=replicas)  # one device per replica: too few
  algorithm = make(loss_fn, num_devices=replicas, fused=True)
  assert algorithm.devices == [cpu_devices[0]]
  assert algorithm.local_ids == list(range(replicas))
  assert algorithm.batches_per_step == replicas
  assert algorithm.max_in_flight is None
  assert len(algorithm.phases) == max(schedule) + 1
  if name == "sync_easgd":  # one step of all 64, its exchange's psum over the vmapped axis
    state = run_vmapped(algorithm, params, make_batches(replicas)[:1], replicas)
    assert jax.tree.leaves(state.center)[0].shape[0] == replicas


@pytest.mark.parametrize("engine, fused", [("local", False), ("simulated", True)])
def test_from_config_fuses_for_the_simulated_engine(problem, cpu_devices, engine, fused):
  loss_fn, _ = problem
  for name in ALGORITHMS:
    config = Config(algorithm=name, engine=engine, num_devices=4, tau=2)
    algorithm = REGISTRY[name].from_config(config, loss_fn)
    assert len(algorithm.devices) == (1 if fused else 4)
    assert algorithm.local_ids == [0, 1, 2, 3]
