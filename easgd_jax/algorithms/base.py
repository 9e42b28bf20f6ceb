"""The one contract every algorithm implements, and the facts it declares about itself.

An algorithm is pure update rules plus a few declared facts; who applies an update when is the
engine's business (easgd_jax/engines), and the trainer (easgd_jax/trainer.py) is the one loop
around both. Adding an algorithm means one file with one class, one line in `REGISTRY`
(algorithms/__init__.py) and its tests.

How it is driven (`driven_by`):

- STEPS: the host scheduler calls `step(state, batch) -> (state, loss)` once per run step. The
  state is a pytree (a NamedTuple of parameter pytrees, optimizer states and the step count);
  the checkpoint holds that pytree, its arrays stored under their path names
  (`center/Dense_0/kernel`, `locals/3/Dense_0/bias`). Data-parallel algorithms take one batch per
  device (leading axis: this process's devices, `local_ids`) and may bound the steps the host
  queues (`max_in_flight`).
- WORKERS: G concurrent workers, one per device, each at its own pace: `init_worker(j, params)`,
  then `iterate(j, worker_state, batch) -> (worker_state, loss, staleness)`, one iteration
  including its exchange with the master; `snapshot()` is the master's weights now,
  `master_state()` / `load_master(state)` all the master holds. The checkpoint holds
  {"master": master_state(), "workers": [worker states]}.

`batches_per_step` batches of `--batch_size` make one run step (1 for an algorithm whose step is
one worker's iteration; G for the data-parallel ones), so `samples_per_step(config)` is what
studies budget in and what throughput counts.
"""

from typing import Any, ClassVar, Protocol

from easgd_jax import optimizers
from easgd_jax.optimizers import OPTIMIZERS, SCHEDULES

STEPS = "steps"  # the host scheduler calls step()
WORKERS = "workers"  # concurrent workers call iterate() (threads on one machine)


class Algorithm(Protocol):
  name: ClassVar[str]
  driven_by: ClassVar[str]  # STEPS or WORKERS
  data_parallel: ClassVar[bool]  # one batch per device per step from sharded samplers
  elastic: ClassVar[bool]  # exchanges with a center by Eq. (1)/(2): alpha, stability, gaps
  all_at_once: ClassVar[bool]  # every worker exchanges at the same moment (stability condition)
  model_parallel: ClassVar[bool]  # runs on a (data, model) mesh with --model_parallel > 1
  optimizers: ClassVar[tuple]  # the inner optimizers it accepts
  optimizers_why: ClassVar[str]  # why, when it accepts fewer than all
  schedules: ClassVar[tuple]  # the learning-rate schedules it accepts
  engines: ClassVar[tuple]  # the engines that run it (config.ENGINES)

  devices: list  # where its workers or replicas live
  batches_per_step: int

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None) -> "Algorithm": ...

  @classmethod
  def samples_per_step(cls, config) -> int: ...

  def init(self, params_host) -> Any: ...

  def eval_params(self, state) -> Any: ...

  def worker_points(self, state) -> list | None:
    """Each worker's point x^i beside `eval_params` (the center), for the gap diagnostic."""


class Defaults:
  """The facts most algorithms share; a class overrides what differs."""

  driven_by = STEPS
  data_parallel = False
  elastic = False
  all_at_once = False
  model_parallel = False
  optimizers = OPTIMIZERS
  optimizers_why = ""  # why an algorithm accepts fewer, for the error that refuses one
  schedules = SCHEDULES
  engines = ("local",)

  @classmethod
  def samples_per_step(cls, config):
    """Samples one run step consumes (studies budget in these; throughput counts them)."""
    if config.model_parallel > 1:
      return config.batch_size * config.mesh_shape[0]
    return config.batch_size * (config.num_devices if cls.data_parallel else 1)

  @classmethod
  def steps_per_count(cls, config):
    """Run steps per step of one worker's optimizer: G when a run step is one worker's."""
    one_at_a_time = cls.driven_by == WORKERS or (cls.elastic and not cls.data_parallel)
    return config.num_devices if one_at_a_time else 1

  @classmethod
  def inner_optimizer(cls, config):
    return optimizers.from_config(config, cls.steps_per_count(config))

  def worker_points(self, state):
    return None
