"""Every training algorithm behind one small interface.

An algorithm has `init(params_host) -> state`, `step(state, batch_host) -> (state, loss)` and
`eval_params(state)`; `replicas` says how many per-device batches of `--batch_size` one step
consumes (1 for one-worker-per-iteration algorithms).
"""

from easgd_jax.algorithms.easgd import EASGDState, RoundRobinEASGD
from easgd_jax.algorithms.sgd import SGD, SGDState

__all__ = ["EASGDState", "RoundRobinEASGD", "SGD", "SGDState", "create"]


def create(config, loss_fn, available_devices=None):
  """The algorithm named by `config.algorithm`, with its settings from `config`."""
  if config.algorithm == "sgd":
    algorithm = SGD(loss_fn, learning_rate=config.learning_rate)
  elif config.algorithm == "easgd":
    algorithm = RoundRobinEASGD(
      loss_fn,
      num_workers=config.num_devices,
      learning_rate=config.learning_rate,
      rho=config.rho,
      tau=config.tau,
      available_devices=available_devices,
    )
  else:
    raise ValueError(f"unknown algorithm {config.algorithm}")  # Config.validate catches it first
  return algorithm
