"""Every training algorithm on one contract (algorithms/base.py), registered by name.

`REGISTRY` is the only list of algorithms: flags, validation, studies and the trainer look an
algorithm's facts up here (`REGISTRY[name].driven_by`, `.data_parallel`, `.elastic`, ...), and
`create` builds one from a Config. To add an algorithm: one file with one class implementing the
contract, one line below, and its tests.
"""

from easgd_jax.algorithms.async_easgd import AsyncEASGD, HogwildEASGD
from easgd_jax.algorithms.async_sgd import AsyncSGD
from easgd_jax.algorithms.base import STEPS, WORKERS, Algorithm
from easgd_jax.algorithms.diloco import DiLoCo, DiLoCoState
from easgd_jax.algorithms.downpour import Downpour
from easgd_jax.algorithms.easgd import EASGDState, RoundRobinEASGD
from easgd_jax.algorithms.hogwild import Hogwild
from easgd_jax.algorithms.local_sgd import LocalSGD, LocalSGDState
from easgd_jax.algorithms.model_parallel import ModelParallelSGD, ModelParallelState
from easgd_jax.algorithms.sgd import SGD, SGDState
from easgd_jax.algorithms.sync_easgd import SyncEASGD, SyncEASGDState
from easgd_jax.algorithms.sync_sgd import SyncSGD, SyncSGDState

REGISTRY = {
  cls.name: cls
  for cls in (
    SGD,
    RoundRobinEASGD,
    SyncSGD,
    SyncEASGD,
    LocalSGD,
    DiLoCo,
    AsyncSGD,
    Hogwild,
    AsyncEASGD,
    HogwildEASGD,
    Downpour,
  )
}

__all__ = [
  "REGISTRY",
  "STEPS",
  "WORKERS",
  "Algorithm",
  "AsyncEASGD",
  "AsyncSGD",
  "DiLoCo",
  "DiLoCoState",
  "Downpour",
  "EASGDState",
  "Hogwild",
  "HogwildEASGD",
  "LocalSGD",
  "LocalSGDState",
  "ModelParallelSGD",
  "ModelParallelState",
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
  """The algorithm `config.algorithm`, with its settings from `config` (validated)."""
  return REGISTRY[config.algorithm].from_config(config, loss_fn, available_devices)
