"""Experiment configuration: one frozen dataclass, the one declaration of every setting.

Each field is declared once, with its default and its help text (`field(default, help)`):
run.py's flags are generated from these fields (easgd_jax/cli.py), a notebook builds a Config
directly (`Config(algorithm="easgd", steps=300)`) or edits one with `dataclasses.replace`, and
an error names the flag to change. `validate` checks what needs no other module; what depends
on the algorithm or the engine is checked by `easgd_jax.algorithms.resolve` and
`easgd_jax.engines.check` (both called by `train.validate`).
"""

import dataclasses
import math
import types

from easgd_jax.errors import ConfigError

DATASETS = ("digits", "mnist5k", "mnist", "cifar10", "synthetic", "shakespeare")
MODELS = ("mlp", "lenet", "cifar_cnn", "transformer")
QUANTIZE = ("none", "bf16", "fp8", "int8", "fp4")  # easgd_jax/quantize.py's formats
# Upper bounds, so a typo fails here with a message instead of hanging or crashing later: the
# CPU backend creates 4096 emulated devices in a second, 16384 in 25 s, 100000 in many minutes.
MAX_DEVICES = 4096
MAX_SEED = 2**32 - 1  # jax.random.key keeps only 32 bits with x64 off: 2**32 would equal seed 0
MAX_TIMEOUT_S = 24 * 3600
# sigma of the simulated compute time's lognormal factor: at 3 the median step is already 1 %
# of the mean; far above, float64 rounds most steps to nothing.
MAX_JITTER = 3.0
INTRA_NODE = ("sim_intra_node_latency_us", "sim_intra_node_bandwidth_gbps")


def field(default, help, otherwise=None):  # noqa: A002 (the flag's help text)
  """A setting: its default and help; `otherwise` for a setting an algorithm may default for a
  model (unset, None, until `easgd_jax.algorithms.resolve`: a flag given, then the --config
  file's value, then the workdir's config.json on resume, then the algorithm's default for the
  model, then `otherwise`)."""
  metadata = {"help": help} if otherwise is None else {"help": help, "otherwise": otherwise}
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config:
  algorithm: str = field("easgd", "A name in easgd_jax.algorithms.REGISTRY (README's table).")
  dataset: str = field("digits", f"One of {', '.join(DATASETS)}; digits, mnist5k are offline.")
  data_dir: str | None = field(None, "tensorflow-datasets folder for mnist/cifar10.")
  model: str = field("lenet", f"One of {', '.join(MODELS)}.")
  num_layers: int = field(4, "transformer: blocks.")
  num_heads: int = field(4, "transformer: attention heads per block.")
  width: int = field(128, "transformer: embedding width.")
  context: int = field(64, "transformer: characters per window (and positions).")
  num_devices: int = field(4, "Workers G, one per device (shared j mod D if fewer devices).")
  batch_size: int | None = field(None, "b, per worker per iteration (a P-device step: P*b).", 32)
  learning_rate: float | None = field(None, "Learning rate eta (> 0).", 0.05)
  rho: float | None = field(None, "Elastic coefficient rho (1.0 unset): alpha = eta * rho.")
  alpha: float | None = field(None, "The moving rate alpha of Eq. (1)/(2) itself, not --rho.")
  tau: int | None = field(None, "Communication period: exchange (or average) every tau-th step.", 1)
  momentum: float = field(0.0, "delta in [0, 1): alone, Nesterov momentum (EAMSGD).")
  optimizer: str | None = field(
    None, "sgd, momentum, nesterov or adamw (unset: the algorithm's, else nesterov or sgd)."
  )
  lr_schedule: str | None = field(None, "constant, cosine or warmup_cosine.", "constant")
  decay_steps: int | None = field(None, "Steps the schedule spans (unset: the first --steps).")
  warmup_steps: int | None = field(None, "warmup_cosine: warm-up steps.", 0)
  min_learning_rate: float | None = field(None, "The cosine schedules' floor.", 0.0)
  weight_decay: float | None = field(None, "adamw: decoupled weight decay.", 1e-4)
  beta2: float | None = field(None, "adamw: the second moment's decay.", 0.999)
  grad_clip: float | None = field(None, "Clip the gradient to this global norm (0: no).", 0.0)
  outer_learning_rate: float | None = field(
    None, "diloco: the outer Nesterov SGD's learning rate (unset: 0.7; async_diloco: 0.35).", 0.7
  )
  outer_momentum: float = field(0.9, "diloco: the outer momentum.")
  outer_delay: int | None = field(
    None, "async_diloco: N, the outer momentum moves every N-th push (unset: --num_devices)."
  )
  dynamic_local_steps: bool = field(
    False, "async_diloco: worker w's inner steps max(1, floor(v_w / max v * tau)), v: speeds."
  )
  fragments: int | None = field(None, "streaming_diloco: P, layer l in fragment l mod P.", 1)
  overlap_steps: int = field(0, "streaming_diloco: inner steps a fragment's sync overlaps.")
  merge_alpha: float = field(0.0, "streaming_diloco: the local share kept as the global lands.")
  quantize: str = field("none", f"streaming_diloco's outer gradient: {', '.join(QUANTIZE)}.")
  steps: int = field(2000, "Iterations T (a worker/master step: one worker's iteration).")
  eval_every: int = field(100, "Iterations between evaluations of the center on the test set.")
  seed: int = field(0, "Seed of the parameter initialization and the batch sampling.")
  target_accuracy: float | None = field(None, "Report steps/seconds to this test accuracy.")
  target_loss: float | None = field(None, "Report steps/tokens/seconds to this test loss.")
  synthetic_shape: tuple = field((16, 16, 3), "H,W,C of the synthetic dataset's images.")
  synthetic_train_size: int = field(4096, "Examples in the synthetic training split.")
  max_chars: int | None = field(None, "shakespeare: each split's first N characters (tests).")
  coordinator_address: str | None = field(None, "Multi-process runs: HOST:PORT of process 0.")
  coordinator_bind_address: str | None = field(
    None, "Process 0: HOST:PORT its coordinator listens on (unset: --coordinator_address's)."
  )
  num_processes: int = field(1, "Multi-process runs: processes taking part.")
  process_id: int = field(0, "Multi-process runs: this process's rank.")
  heartbeat_timeout_s: int = field(60, "A process silent (or absent at start) this long: stop.")
  checkpoint_every: int = field(500, "Iterations between checkpoints (0: at the end only).")
  keep_checkpoints: int = field(3, "How many of the newest checkpoints are kept.")
  inject_nan: int | None = field(None, "Fault injection: this iteration's batch is all NaN.")
  model_parallel: int = field(1, "M: every layer split across M devices (sgd, sync_sgd, meshes).")
  devices_per_worker: int = field(1, "D: workers of D devices, data parallel inside (G = N / D).")
  fail_fast: bool = field(False, "Stop when a worker fails (default: go on with the rest).")
  worker_threads: int = field(0, "Worker threads (0: one per worker, at most one per CPU core).")
  inject_failure: str | None = field(None, "WORKER:STEP: that worker fails at its own step.")
  progress_every_s: int = field(30, "Seconds between progress lines on stderr (0: none).")
  engine: str = field("local", "local (devices, threads), ray (actors) or simulated (one device).")
  ray_address: str | None = field(None, "ray: join this cluster (auto or HOST:PORT; unset: own).")
  ray_pipeline: bool = field(False, "ray: one push/pull in flight while computing the next step.")
  ray_worker_gpus: float = field(0.0, "ray: GPUs each worker actor asks for (0: CPU workers).")
  max_worker_restarts: int = field(0, "ray: times a dead worker is started again (0: never).")
  round_timeout_s: float | None = field(None, "ray: a round goes on without a worker this late.")
  min_workers: int = field(1, "ray: stop (a checkpoint, exit 1) when fewer workers are left.")
  # The simulated cluster's costs (--engine=simulated); the default network is one PCIe node.
  sim_compute_ms: float | None = field(None, "simulated: one worker's step (unset: measured).")
  sim_latency_us: float = field(10.0, "simulated: one message's latency, one way (us).")
  sim_bandwidth_gbps: float = field(
    96.0, "simulated: one link, one way (96: PCIe 3 x16, 10: 10GbE)."
  )
  sim_service_us: float | None = field(None, "simulated: the master's update (unset: measured).")
  sim_jitter: float = field(0.0, "simulated: sigma of a lognormal factor on every step's time.")
  sim_stragglers: int = field(0, "simulated: this many workers (the last ones) compute slower.")
  sim_straggler_slowdown: float = field(4.0, "simulated: ... by this factor.")
  sim_shared_link: bool = field(
    False, "simulated: the parameter server's messages queue on one link into (and out of) it."
  )
  sim_node_size: int = field(
    1, "simulated: workers per node; the latency/bandwidth above are the links between nodes."
  )
  sim_intra_node_latency_us: float = field(2.0, "simulated: one message inside a node (us).")
  sim_intra_node_bandwidth_gbps: float = field(
    2400.0, "simulated: a link inside a node, one way (2400: NVLink 3)."
  )

  def validate(self) -> "Config":
    """Returns self, or raises ConfigError naming the first bad flag."""
    for f in dataclasses.fields(self):  # a config file's True is not a 1, nor "32" a 32
      _of_type(f.name, getattr(self, f.name), f.type)
    _one_of("dataset", self.dataset, DATASETS)
    _one_of("model", self.model, MODELS)
    _in_range("num_devices", self.num_devices, 1, MAX_DEVICES)
    # Settings left unset (None) are checked once `algorithms.resolve` has filled them in.
    if self.batch_size is not None:  # data.load checks it against the training set
      _at_least("batch_size", self.batch_size, 1)
    if self.tau is not None:
      _at_least("tau", self.tau, 1)
    if self.outer_delay is not None:
      _at_least("outer_delay", self.outer_delay, 1)
    for name in ("num_layers", "num_heads", "width", "context", "steps", "eval_every"):
      _at_least(name, getattr(self, name), 1)
    if self.width % self.num_heads:
      raise ConfigError(f"--width={self.width} must be a multiple of --num_heads={self.num_heads}")
    _at_least("synthetic_train_size", self.synthetic_train_size, 2)
    _in_range("seed", self.seed, 0, MAX_SEED)
    if self.learning_rate is not None:
      _positive("learning_rate", self.learning_rate)
    if not (_is_number(self.momentum) and 0 <= self.momentum < 1):
      raise ConfigError(f"--momentum must be in [0, 1) (got {self.momentum})")
    self._validate_elastic()
    self._validate_schedule()
    self._validate_streaming()
    self._validate_processes()
    _in_range("model_parallel", self.model_parallel, 1, MAX_DEVICES)
    self._validate_workers()
    _at_least("checkpoint_every", self.checkpoint_every, 0)
    _at_least("keep_checkpoints", self.keep_checkpoints, 1)
    _in_range("progress_every_s", self.progress_every_s, 0, MAX_TIMEOUT_S)
    _in_range("worker_threads", self.worker_threads, 0, MAX_DEVICES)
    _in_range("max_worker_restarts", self.max_worker_restarts, 0, 1000)
    if not (_is_number(self.ray_worker_gpus) and self.ray_worker_gpus >= 0):
      raise ConfigError(f"--ray_worker_gpus must be a number >= 0 (got {self.ray_worker_gpus})")
    if self.ray_address is not None and self.ray_address != "auto":
      _address("ray_address", self.ray_address, "auto or HOST:PORT, e.g. 127.0.0.1:6379")
    self._validate_costs()
    if self.inject_nan is not None:
      _at_least("inject_nan", self.inject_nan, 1)
      if self.dataset == "shakespeare":
        raise ConfigError("--inject_nan poisons image batches; text has no NaN to inject")
    if self.max_chars is not None:
      _at_least("max_chars", self.max_chars, 1)
    if self.inject_failure is not None:
      worker, step = self.failure_point or (-1, -1)
      if not (0 <= worker < self.num_devices and step >= 0):
        raise ConfigError(
          f"--inject_failure must be WORKER:STEP with 0 <= WORKER < --num_devices="
          f"{self.num_devices} and STEP >= 0 (got {self.inject_failure})"
        )
    if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
      raise ConfigError(f"--target_accuracy must be in (0, 1] (got {self.target_accuracy})")
    if self.target_loss is not None:
      _positive("target_loss", self.target_loss)
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

  def _validate_schedule(self):
    if self.decay_steps is not None:
      _at_least("decay_steps", self.decay_steps, 1)
    if self.warmup_steps is not None:
      _at_least("warmup_steps", self.warmup_steps, 0)
    if self.lr_schedule == "warmup_cosine" and (self.warmup_steps or 0) >= (
      self.decay_steps or self.steps
    ):
      raise ConfigError(
        f"--warmup_steps={self.warmup_steps} must be below --decay_steps (or --steps) "
        f"{self.decay_steps or self.steps}"
      )
    for name in ("weight_decay", "grad_clip", "min_learning_rate"):
      value = getattr(self, name)
      if value is not None and not (_is_number(value) and value >= 0):
        raise ConfigError(f"--{name} must be a finite number >= 0 (got {value})")
    if self.beta2 is not None and not (_is_number(self.beta2) and 0 <= self.beta2 < 1):
      raise ConfigError(f"--beta2 must be in [0, 1) (got {self.beta2})")
    if self.outer_learning_rate is not None:
      _positive("outer_learning_rate", self.outer_learning_rate)
    if not (_is_number(self.outer_momentum) and 0 <= self.outer_momentum < 1):
      raise ConfigError(f"--outer_momentum must be in [0, 1) (got {self.outer_momentum})")

  def _validate_streaming(self):
    if self.fragments is not None:
      _at_least("fragments", self.fragments, 1)
    _at_least("overlap_steps", self.overlap_steps, 0)
    if not (_is_number(self.merge_alpha) and 0 <= self.merge_alpha <= 1):
      raise ConfigError(f"--merge_alpha must be in [0, 1] (got {self.merge_alpha})")
    _one_of("quantize", self.quantize, QUANTIZE)

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
    _address("coordinator_address", self.coordinator_address, "HOST:PORT, e.g. 127.0.0.1:12345")
    if self.coordinator_bind_address is not None:
      _address("coordinator_bind_address", self.coordinator_bind_address, "IP:PORT of process 0")
    if self.num_devices % self.num_processes:
      raise ConfigError(
        f"--num_devices={self.num_devices} must be a multiple of --num_processes="
        f"{self.num_processes} (each process drives the same number of devices)"
      )
    if self.model_parallel > 1:
      raise ConfigError("--model_parallel > 1 runs in one process; use --num_processes=1")

  def _validate_workers(self):
    _in_range("devices_per_worker", self.devices_per_worker, 1, MAX_DEVICES)
    if self.num_devices % self.devices_per_worker:
      raise ConfigError(
        f"--devices_per_worker={self.devices_per_worker} must divide --num_devices="
        f"{self.num_devices} (G = num_devices / devices_per_worker workers)"
      )
    _at_least("min_workers", self.min_workers, 1)
    if self.min_workers > self.num_workers:
      raise ConfigError(
        f"--min_workers={self.min_workers} is more than the G = {self.num_workers} workers "
        f"(--num_devices / --devices_per_worker); lower it"
      )
    timeout = self.round_timeout_s
    if timeout is not None and not (_is_number(timeout) and 0 < timeout <= MAX_TIMEOUT_S):
      raise ConfigError(f"--round_timeout_s must be in (0, {MAX_TIMEOUT_S}] (got {timeout})")

  def _validate_costs(self):
    links = ("sim_latency_us", "sim_bandwidth_gbps") + INTRA_NODE
    for flag in ("sim_compute_ms", "sim_service_us", *links):
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
    _in_range("sim_node_size", self.sim_node_size, 1, self.num_devices)
    if self.num_devices % self.sim_node_size:
      raise ConfigError(
        f"--sim_node_size={self.sim_node_size} must divide --num_devices={self.num_devices} "
        f"(every node holds as many workers)"
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
  def failure_point(self):
    """(worker, its own step) of --inject_failure, or None."""
    try:
      worker, step = (int(part) for part in str(self.inject_failure).split(":"))
    except ValueError:
      return None
    return worker, step

  @property
  def num_workers(self) -> int:
    """G: the workers, each of --devices_per_worker devices."""
    return self.num_devices // self.devices_per_worker

  @property
  def shards_per_worker(self) -> int:  # a worker's data shards: D devices, M per layer split
    return self.devices_per_worker // self.model_parallel

  @property
  def local_devices(self) -> int:
    """Devices this process drives."""
    return max(self.num_devices // self.num_processes, self.model_parallel)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(Config))
# The settings an algorithm may default for a model, and their defaults when it does not.
OTHERWISE = {
  f.name: f.metadata["otherwise"] for f in dataclasses.fields(Config) if "otherwise" in f.metadata
}

# An outer gradient's streaming settings (algorithms that declare `streams`), and their values
# everywhere else (--fragments stays unset there).
STREAMING = {"fragments": None, "overlap_steps": 0, "merge_alpha": 0.0, "quantize": "none"}


def _of_type(flag, value, kind):
  if value is None and isinstance(kind, types.UnionType):  # X | None: unset
    return
  kind = next(k for k in getattr(kind, "__args__", (kind,)) if k is not type(None))
  if kind is tuple:
    fits = isinstance(value, tuple | list)
  elif kind is float:
    fits = isinstance(value, int | float) and not isinstance(value, bool)
  else:
    fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
  if not fits:
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise ConfigError(f"--{flag} must be {name.get(kind, 'a list')} (got {value!r})")


def _one_of(flag, value, choices):
  if value not in choices:
    raise ConfigError(f"--{flag}={value} is unknown; choose one of: {', '.join(choices)}")


def _at_least(flag, value, minimum):
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ConfigError(f"--{flag} must be an integer >= {minimum} (got {value})")


def _in_range(flag, value, minimum, maximum):
  if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
    raise ConfigError(f"--{flag} must be an integer in {minimum}..{maximum} (got {value})")


def _positive(flag, value):
  if not (_is_number(value) and value > 0):
    raise ConfigError(f"--{flag} must be a finite number > 0 (got {value})")


def _address(flag, value, example):
  host, _, port = value.rpartition(":")
  if not (host and port.isdigit() and 1 <= int(port) <= 65535):
    raise ConfigError(f"--{flag} must be {example} (got {value})")


def _is_number(value):
  """A finite real number (not inf, not NaN, not a bool or a string)."""
  try:
    return not isinstance(value, bool) and math.isfinite(value)
  except TypeError:
    return False
