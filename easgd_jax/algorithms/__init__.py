"""Every training algorithm, registered by name; what each supports is checked here.

`REGISTRY` is the only list of algorithms: flags, validation, studies and the engines look an
algorithm's facts up here (`REGISTRY[name].kind`, `.data_parallel`, `.elastic`, ...), and
`create` builds one from a Config. To add an algorithm: one file with one class on the contract
of algorithms/base.py, one line below, and its tests; every engine then runs it.
"""

import dataclasses

from easgd_jax.algorithms.async_diloco import AsyncDiLoCo
from easgd_jax.algorithms.async_easgd import AsyncEASGD, HogwildEASGD
from easgd_jax.algorithms.async_sgd import AsyncSGD
from easgd_jax.algorithms.base import (
  ASYNCHRONOUS,
  ROUND_ROBIN,
  STEP_DRIVEN,
  WORKER_MASTER,
  StepRule,
  WorkerMasterRule,
)
from easgd_jax.algorithms.diloco import DiLoCo
from easgd_jax.algorithms.downpour import Downpour
from easgd_jax.algorithms.easgd import RoundRobinEASGD
from easgd_jax.algorithms.hogwild import Hogwild
from easgd_jax.algorithms.local_sgd import LocalSGD
from easgd_jax.algorithms.sgd import SGD
from easgd_jax.algorithms.streaming_diloco import StreamingDiLoCo
from easgd_jax.algorithms.sync_easgd import SyncEASGD
from easgd_jax.algorithms.sync_sgd import SyncSGD
from easgd_jax.config import OTHERWISE, STREAMING
from easgd_jax.errors import ConfigError
from easgd_jax.optimizers import OPTIMIZERS, SCHEDULES

REGISTRY = {
  cls.name: cls
  for cls in (
    SGD,
    RoundRobinEASGD,
    SyncSGD,
    SyncEASGD,
    LocalSGD,
    DiLoCo,
    StreamingDiLoCo,
    AsyncSGD,
    Hogwild,
    AsyncEASGD,
    HogwildEASGD,
    Downpour,
    AsyncDiLoCo,
  )
}


def create(config, loss_fn):
  """The algorithm `config.algorithm`, with its settings from `config`, those left unset
  resolved (see `resolve`)."""
  return REGISTRY[config.algorithm].from_config(resolve(config), loss_fn)


def resolve(config):
  """`config` with every setting left unset filled in, or ConfigError naming the flag to change.

  A setting the command line, the --config file or (on resume) the workdir's config.json left
  unset takes the algorithm's default for the model (its `defaults`), else config.OTHERWISE's;
  the optimizer, the algorithm's, else Nesterov with --momentum, else SGD; alpha, the
  algorithm's when neither --alpha nor --rho is given. The result goes into config.json, so a
  resume never depends on a default that changed since.
  """
  if config.algorithm not in REGISTRY:
    raise ConfigError(
      f"--algorithm={config.algorithm} is unknown; choose one of: {', '.join(REGISTRY)}"
    )
  kind = REGISTRY[config.algorithm]
  defaults = kind.defaults(config)
  unset = {
    n: defaults.get(n, v)
    for n, v in OTHERWISE.items()
    if getattr(config, n) is None and (kind.streams or n not in STREAMING)
  }
  if config.optimizer is None:
    unset["optimizer"] = defaults.get("optimizer") or ("nesterov" if config.momentum else "sgd")
  if config.alpha is None and config.rho is None and "alpha" in defaults:
    unset["alpha"] = defaults["alpha"]
  span = config.decay_steps or config.steps  # a default warm-up never outlasts its schedule
  if unset.get("warmup_steps", 0) >= span:
    unset["warmup_steps"] = span // 10
  config = dataclasses.replace(config, **unset).validate()
  _check_own_flags(config, kind)
  _check_optimizer(config, kind)
  _check_parallelism(config, kind)
  _check_streaming(config, kind)
  return config


def _check_own_flags(config, kind):
  """A flag that only some algorithms read, given to another one: refused, naming its users."""
  defaults = type(config)()
  for cls in REGISTRY.values():
    for flag in cls.own_flags:
      if getattr(config, flag) != getattr(defaults, flag) and flag not in kind.own_flags:
        users = [name for name, other in REGISTRY.items() if flag in other.own_flags]
        raise ConfigError(
          f"--{flag} applies to --algorithm={' or '.join(users)} (got --algorithm="
          f"{config.algorithm})"
        )


def _check_optimizer(config, kind):
  if config.optimizer not in OPTIMIZERS:
    raise ConfigError(
      f"--optimizer={config.optimizer} is unknown; choose one of: {', '.join(OPTIMIZERS)}"
    )
  if config.optimizer not in kind.optimizers:
    raise ConfigError(
      f"--algorithm={config.algorithm} accepts --optimizer={' or '.join(kind.optimizers)} (got "
      f"{config.optimizer}): {kind.optimizers_why}"
    )
  if config.optimizer in ("momentum", "nesterov") and not config.momentum:
    raise ConfigError(f"--optimizer={config.optimizer} needs --momentum in (0, 1), e.g. 0.9")
  if config.lr_schedule not in SCHEDULES:
    raise ConfigError(
      f"--lr_schedule={config.lr_schedule} is unknown; choose one of: {', '.join(SCHEDULES)}"
    )
  if config.lr_schedule not in kind.schedules:
    raise ConfigError(
      f"--algorithm={config.algorithm} accepts --lr_schedule={' or '.join(kind.schedules)} (got "
      f"{config.lr_schedule}): its unlocked writes keep no step count"
    )


def _check_parallelism(config, kind):
  if config.num_processes > 1 and not kind.data_parallel:
    supported = [name for name, cls in REGISTRY.items() if cls.data_parallel]
    raise ConfigError(
      f"--algorithm={config.algorithm} runs in one process; multi-process runs support "
      f"{', '.join(supported)}"
    )
  if config.devices_per_worker > 1:
    if not (kind.data_parallel and kind.kind == STEP_DRIVEN):
      supported = [n for n, c in REGISTRY.items() if c.data_parallel and c.kind == STEP_DRIVEN]
      raise ConfigError(
        f"--devices_per_worker={config.devices_per_worker} makes each replica of "
        f"{', '.join(supported)} a mesh (got --algorithm={config.algorithm}); use 1"
      )
    if config.num_processes > 1:
      raise ConfigError(
        "--devices_per_worker > 1 runs in one process (or on --engine=ray); use --num_processes=1"
      )
    if config.devices_per_worker % config.model_parallel:
      raise ConfigError(
        f"--model_parallel={config.model_parallel} must divide --devices_per_worker="
        f"{config.devices_per_worker} (each worker is a data x model mesh of its devices)"
      )
  if config.model_parallel == 1:
    return
  if not (kind.model_parallel or config.devices_per_worker > 1):
    supported = [name for name, cls in REGISTRY.items() if cls.model_parallel]
    raise ConfigError(
      f"--model_parallel={config.model_parallel} supports --algorithm="
      f"{' or '.join(supported)} (got {config.algorithm}), or any rule whose workers are meshes "
      f"(--devices_per_worker a multiple of it); use --model_parallel=1"
    )
  if kind.data_parallel and config.num_devices % config.model_parallel:
    raise ConfigError(
      f"--num_devices={config.num_devices} must be a multiple of --model_parallel="
      f"{config.model_parallel} (the mesh is num_devices / model_parallel data x model_parallel)"
    )


def _check_streaming(config, kind):
  """config.STREAMING's flags: on an algorithm that streams an outer gradient, fragments that
  divide --tau and an overlap that ends before the next fragment syncs; refused elsewhere."""
  if not kind.streams:
    given = [n for n, value in STREAMING.items() if getattr(config, n) != value]
    if given:
      takers = " or ".join(name for name, cls in REGISTRY.items() if cls.streams)
      raise ConfigError(
        f"--{given[0]}={getattr(config, given[0])} applies to --algorithm={takers}, whose outer "
        f"gradient streams (got --algorithm={config.algorithm})"
      )
    return
  tau, count, overlap = config.tau, config.fragments, config.overlap_steps
  if tau % count:
    raise ConfigError(
      f"--tau={tau} must be a multiple of --fragments={count}: each fragment syncs every tau "
      f"steps, tau / fragments after the one before"
    )
  if overlap >= tau // count:
    raise ConfigError(
      f"--overlap_steps={overlap} must be below --tau / --fragments = {tau // count}: a "
      f"fragment's outer step lands before the next fragment syncs"
    )
