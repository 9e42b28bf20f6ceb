"""Fused execution (easgd_jax/engines/fused.py): G workers stacked on one device, the iterations
as one lax.scan per chunk, against the local engine's host scheduler on G devices."""

import jax
import numpy as np
import pytest

from easgd_jax import core, data, devices, models
from easgd_jax.algorithms import RoundRobinEASGD
from easgd_jax.config import Config
from easgd_jax.engines import fused

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
  algorithm = RoundRobinEASGD(
    loss_fn,
    num_workers=G,
    learning_rate=0.05,
    rho=1.0,
    tau=tau,
    momentum=momentum,
    available_devices=cpu_devices[:G],
  )
  sampler = data.Sampler(dataset.train_images, dataset.train_labels, seed=0)
  indices = np.stack([sampler.indices(BATCH) for _ in range(ITERATIONS)])
  batches = [sampler.take(index) for index in indices]  # what the local engine's sampler hands
  expected, expected_losses = algorithm.run(algorithm.init(params), batches)

  device = cpu_devices[0]
  run = fused.round_robin(
    algorithm,
    devices.put(dataset.train_images, device),
    devices.put(dataset.train_labels, device),
  )
  stacked, losses = fused.stack(algorithm.init(params), device), []
  for chunk in np.split(indices, 3):  # three dispatches of 20 iterations
    stacked, chunk_losses = run(stacked, chunk)
    losses.extend(np.asarray(chunk_losses))
  assert {leaf.device for leaf in jax.tree.leaves(stacked)} == {device}
  found = fused.unstack(stacked, G)
  assert found.step == ITERATIONS
  close = lambda a, b: np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6, atol=1e-7)  # noqa: E731
  jax.tree.map(close, found.center, expected.center)
  jax.tree.map(close, found.locals, expected.locals)
  jax.tree.map(close, found.opt_states, expected.opt_states)
  np.testing.assert_allclose(losses, np.asarray(expected_losses), rtol=1e-6)


def test_stacking_and_unstacking_keeps_every_array(digits, cpu_devices):
  _, loss_fn, params = digits
  algorithm = RoundRobinEASGD(
    loss_fn, num_workers=3, learning_rate=0.05, momentum=0.9, available_devices=cpu_devices[:3]
  )
  state = algorithm.init(params)
  state = state._replace(
    locals=tuple(jax.tree.map(lambda x, k=k: x + k, w) for k, w in enumerate(state.locals))
  )
  back = fused.unstack(fused.stack(state, cpu_devices[5]), 3)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, state))
