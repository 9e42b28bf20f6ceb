"""Fused execution, now the simulated engine's round robin (engines/simulated/steppers.Workers,
which replaced engines/fused.py): G workers stacked on one device, the iterations as one
lax.scan per chunk, against the local engine's host scheduler on G devices."""

import jax
import numpy as np
import pytest

from easgd_jax import core, data, models
from easgd_jax.algorithms import RoundRobinEASGD
from easgd_jax.config import Config
from easgd_jax.engines import simulated
from easgd_jax.engines.simulated import steppers

from helpers import stepper

G, BATCH, ITERATIONS = 4, 16, 60


@pytest.fixture(scope="module")
def digits():
  dataset = data.load(Config(dataset="digits"))
  model = models.create("mlp", dataset.num_classes)
  params = models.init_params(model, dataset.image_shape, seed=0)
  return dataset, core.make_loss_fn(model), params


@pytest.mark.parametrize("tau, momentum", [(1, 0.0), (3, 0.0), (2, 0.9)])
def test_round_robin_fused_on_one_device_equals_the_host_scheduler(
  digits, cpu_devices, tau, momentum
):
  dataset, loss_fn, params = digits
  rule = RoundRobinEASGD(loss_fn, learning_rate=0.05, rho=1.0, tau=tau, momentum=momentum)
  sampler = data.Sampler(dataset, seed=0)  # what the local engine's sampler hands
  host = stepper(rule, params, num_devices=G, devices=cpu_devices)
  expected_losses = [host.step(t, sampler.next(BATCH))[0] for t in range(ITERATIONS)]

  config = Config(
    algorithm="easgd",
    engine="simulated",
    num_devices=G,
    batch_size=BATCH,
    steps=ITERATIONS,
    tau=tau,
    sim_compute_ms=1.0,
    sim_service_us=50.0,
  )
  run = steppers.Workers(
    config, rule, dataset, params, simulated.costs(config), (1, 1), [data.Sampler(dataset, seed=0)]
  )
  pending = []
  for step in range(0, ITERATIONS, ITERATIONS // 3):  # three dispatches of 20 iterations
    pending += run.advance(step, ITERATIONS // 3)
  losses = [values for _, values, _ in run.host_losses(pending)]
  assert {leaf.device for leaf in jax.tree.leaves(run.state)} == {cpu_devices[0]}
  assert run.reached == ITERATIONS
  center, workers, _ = run.state
  close = lambda a, b: np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6, atol=1e-7)  # noqa: E731
  jax.tree.map(close, center, host.state["master"])
  for j in range(G):  # each worker's local weights and optimizer state, unstacked
    jax.tree.map(lambda x, e, j=j: close(x[j], e), workers, host.state["workers"][j])
  np.testing.assert_allclose(np.ravel(losses), np.asarray(expected_losses), rtol=1e-6)
