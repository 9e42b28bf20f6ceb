"""Every training algorithm behind one small interface.

An algorithm has `init(params_host) -> state`, `step(state, batch_host) -> (state, loss)` and
`eval_params(state)`; `replicas` says how many per-device batches of `--batch_size` one step
consumes (1 for one-worker-per-iteration algorithms). Replicated (pmap) algorithms also have
`local_ids`, the data shards this process feeds, and `max_in_flight`, how many steps the host
may queue before it waits (None: no limit).

The asynchronous family (async_sgd, hogwild, async_easgd, hogwild_easgd) is driven by worker
threads instead (`easgd_jax.workers`): `init(params_host)` sets up the master, then each worker
calls `iterate(j, worker_state, batch)` at its own pace; `snapshot()` is the master's W now.
"""

from easgd_jax.algorithms.async_easgd import AsyncEASGD, HogwildEASGD
from easgd_jax.algorithms.async_sgd import AsyncSGD
from easgd_jax.algorithms.easgd import EASGDState, RoundRobinEASGD
from easgd_jax.algorithms.hogwild import Hogwild
from easgd_jax.algorithms.model_parallel import ModelParallelSGD, ModelParallelState
from easgd_jax.algorithms.sgd import SGD, SGDState
from easgd_jax.algorithms.sync_easgd import SyncEASGD, SyncEASGDState
from easgd_jax.algorithms.sync_sgd import SyncSGD, SyncSGDState

__all__ = [
  "AsyncEASGD",
  "AsyncSGD",
  "Hogwild",
  "HogwildEASGD",
  "ModelParallelSGD",
  "ModelParallelState",
  "EASGDState",
  "RoundRobinEASGD",
  "SGD",
  "SGDState",
  "SyncEASGD",
  "SyncEASGDState",
  "SyncSGD",
  "SyncSGDState",
  "create",
]


ELASTIC = {"easgd": RoundRobinEASGD, "async_easgd": AsyncEASGD, "hogwild_easgd": HogwildEASGD}


def create(config, loss_fn, available_devices=None):
  """The algorithm named by `config.algorithm`, with its settings from `config`."""
  eta, delta = config.learning_rate, config.momentum
  workers = dict(num_workers=config.num_devices, available_devices=available_devices)
  if config.model_parallel > 1:  # sgd or sync_sgd on a (data, model) mesh
    data, model = config.mesh_shape
    return ModelParallelSGD(
      loss_fn, data_parallel=data, model_parallel=model, learning_rate=eta, momentum=delta
    )
  if config.algorithm == "sgd":
    return SGD(loss_fn, learning_rate=eta, momentum=delta)
  if config.algorithm in ELASTIC:  # one worker per device, exchanging with a center on device 0
    return ELASTIC[config.algorithm](
      loss_fn, learning_rate=eta, rho=config.rho, tau=config.tau, momentum=delta, **workers
    )
  if config.algorithm == "sync_sgd":
    return SyncSGD(loss_fn, num_devices=config.num_devices, learning_rate=eta, momentum=delta)
  if config.algorithm == "sync_easgd":
    return SyncEASGD(
      loss_fn,
      num_devices=config.num_devices,
      learning_rate=eta,
      rho=config.rho,
      tau=config.tau,
      momentum=delta,
    )
  if config.algorithm == "async_sgd":
    return AsyncSGD(loss_fn, learning_rate=eta, momentum=delta, **workers)
  if config.algorithm == "hogwild":
    return Hogwild(loss_fn, learning_rate=eta, **workers)
  raise ValueError(f"unknown algorithm {config.algorithm}")  # Config.validate catches it first
