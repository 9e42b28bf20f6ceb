"""Every training algorithm behind one small interface.

An algorithm has `init(params_host) -> state`, `step(state, batch_host) -> (state, loss)` and
`eval_params(state)`; `replicas` says how many per-device batches of `--batch_size` one step
consumes (1 for one-worker-per-iteration algorithms). Replicated (pmap) algorithms also have
`local_ids`, the data shards this process feeds, and `max_in_flight`, how many steps the host
may queue before it waits (None: no limit).
"""

from easgd_jax.algorithms.easgd import EASGDState, RoundRobinEASGD
from easgd_jax.algorithms.sgd import SGD, SGDState
from easgd_jax.algorithms.sync_easgd import SyncEASGD, SyncEASGDState
from easgd_jax.algorithms.sync_sgd import SyncSGD, SyncSGDState

__all__ = [
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


def create(config, loss_fn, available_devices=None):
  """The algorithm named by `config.algorithm`, with its settings from `config`."""
  eta, delta = config.learning_rate, config.momentum
  if config.algorithm == "sgd":
    return SGD(loss_fn, learning_rate=eta, momentum=delta)
  if config.algorithm == "easgd":
    return RoundRobinEASGD(
      loss_fn,
      num_workers=config.num_devices,
      learning_rate=eta,
      rho=config.rho,
      tau=config.tau,
      momentum=delta,
      available_devices=available_devices,
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
  raise ValueError(f"unknown algorithm {config.algorithm}")  # Config.validate catches it first
