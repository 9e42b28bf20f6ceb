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
  queues (`max_in_flight`); they are `DataParallel`, their step one of a few per-replica phases.
- WORKERS: G concurrent workers, one per device, each at its own pace: `init_worker(j, params)`,
  then `iterate(j, worker_state, batch) -> (worker_state, loss, staleness)`, one iteration
  including its exchange with the master; `snapshot()` is the master's weights now,
  `master_state()` / `load_master(state)` all the master holds. The checkpoint holds
  {"master": master_state(), "workers": [worker states]}.

`batches_per_step` batches of `--batch_size` make one run step (1 for an algorithm whose step is
one worker's iteration; G for the data-parallel ones), so `samples_per_step(config)` is what
studies budget in and what throughput counts.
"""

import functools
from typing import Any, ClassVar, Protocol

import jax

from easgd_jax import devices, optimizers
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
  engines = ("local", "simulated")

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


class DataParallel(Defaults):
  """G replicas stepping together, the step one of a few per-replica phases.

  A subclass sets `phases`, functions fn(replica_state, batch) -> (replica_state, loss) for one
  replica, whose collectives are `replica_sum` and `replica_mean` (devices.psum and pmean over
  devices.AXIS), and `phase(step)`, the index of the one run step `step` uses (`step`: the
  steps done before it). A replica state is
  the algorithm's state with `step=None`: None is an empty pytree, so pmap, vmap and scan pass
  it through, and which phase runs is decided on the host, never traced.

  Placed one replica per device (`fused=False`), `step` pmaps the phases over G devices. Fused
  (the simulated engine, engines/simulated.py), everything lives on one device, `init` holds one
  replica (leading axis 1, for the engine to repeat G times) and the engine runs
  jax.vmap(phase, axis_name=devices.AXIS) over the G replicas stacked there, where the same
  collectives reduce over the vmapped axis (as a matrix product: devices.psum says why); G may
  then exceed the devices there are.
  """

  data_parallel = True
  phases: tuple  # the per-replica functions, set by the subclass's __init__

  @staticmethod
  def placement(config, available_devices=None):
    """The constructor's placement arguments for a run: fused for --engine=simulated."""
    return {"fused": config.engine == "simulated", "available_devices": available_devices}

  def _place(self, num_devices, fused=False, available_devices=None):
    """One device per replica (this process's: `local_ids`), or all of them fused on one."""
    self.batches_per_step = num_devices  # per-replica batches per step, across all processes
    self.fused = fused
    if fused:
      self.devices = [(available_devices or jax.devices())[0]]
      self.local_ids = list(range(num_devices))  # every replica's batch comes to this process
      self.max_in_flight = None  # no cross-device collective to miss its rendezvous
    else:
      self.devices = devices.replica_devices(num_devices)
      self.local_ids = devices.local_replica_ids(self.devices)
      self.max_in_flight = devices.max_in_flight(self.devices)

  def replica_sum(self, tree):
    """The all-reduce of a phase: the sum over the replicas (devices.psum)."""
    return devices.psum(tree, self.fused)

  def replica_mean(self, tree):
    return devices.pmean(tree, self.fused)

  def phase(self, step):
    """The index in `phases` of the function run step `step` uses: one phase unless overridden."""
    return 0

  @functools.cached_property
  def _pmapped(self):
    # Built on the first step, not in __init__: a fused instance never pmaps.
    return tuple(devices.pmap(fn, self.devices) for fn in self.phases)

  def step(self, state, batch_local):
    """batch_local: this process's batches, leading axis one per local device."""
    batch = devices.put_replicas(batch_local, self.devices)
    new, loss = self._pmapped[self.phase(state.step)](state._replace(step=None), batch)
    return new._replace(step=state.step + 1), loss
