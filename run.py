"""Launch one experiment: flags in, `train.train_and_evaluate(config, workdir)` out.

  python run.py --algorithm=easgd --dataset=digits --model=lenet --num_devices=4 \
      --batch_size=32 --learning_rate=0.05 --rho=1.0 --tau=1 --steps=2000 --eval_every=100 \
      --seed=0 --workdir=runs/easgd
  python run.py --config=experiments/configs/easgd_cifar10.py --config.tau=16 --steps=500 \
      --workdir=runs/easgd_cifar10

Settings come from flags of Config's field names, or from a named experiment: `--config=FILE`,
an ml_collections config file whose `get_config()` returns Config's fields
(experiments/configs/). With `--config`, `--config.FIELD=VALUE` edits the file's field, and a
flat flag given on the command line (`--steps=500`) overrides it, logged as such; both ways end
in the same `Config(**values).validate()`.

This file is kept short on purpose: the logic lives in the `easgd_jax` library, which notebooks
and tests import directly. Exit codes: 0 done (also "complete at step N" for a finished run);
2 bad settings or a workdir in use (one line saying what to change, nothing written); 1
divergence or failed workers; 3 reserved for a lost parameter-server process; 143 / 130 stopped
by SIGTERM / SIGINT after saving a checkpoint (the same command resumes it).
"""

import dataclasses
import difflib
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from easgd_jax import config as config_lib
from easgd_jax import workdir

DEFAULTS = config_lib.Config()
FIELDS = tuple(field.name for field in dataclasses.fields(config_lib.Config))
FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
  "config",
  None,
  "A named experiment: an ml_collections config file (experiments/configs/*.py) whose "
  "get_config() returns Config's fields; edit one with --config.FIELD=VALUE. Flat flags given "
  "on the command line override its fields.",
)

flags.DEFINE_string(
  "algorithm",
  DEFAULTS.algorithm,
  "sgd, easgd, sync_sgd, sync_easgd, local_sgd, diloco, async_sgd, hogwild, async_easgd, "
  "hogwild_easgd or downpour (easgd_jax.algorithms.REGISTRY).",
)
flags.DEFINE_string(
  "dataset", DEFAULTS.dataset, f"One of {config_lib.DATASETS}; digits is offline."
)
flags.DEFINE_string("data_dir", None, "tensorflow-datasets folder for mnist/cifar10.")
flags.DEFINE_string("model", DEFAULTS.model, f"One of {config_lib.MODELS}.")
flags.DEFINE_integer(
  "num_devices",
  DEFAULTS.num_devices,
  "Workers G, one per device (emulated on CPU; shared j mod D if fewer accelerators).",
)
flags.DEFINE_integer(
  "batch_size",
  DEFAULTS.batch_size,
  "Samples per worker per iteration (b); per device for sync_sgd / sync_easgd, so a step of "
  "P devices uses P*b samples.",
)
flags.DEFINE_float("learning_rate", DEFAULTS.learning_rate, "Learning rate eta (> 0).")
flags.DEFINE_float(
  "rho", None, "Elastic coefficient rho (>= 0; 1.0 when unset): alpha = eta*rho is the moving rate."
)
flags.DEFINE_float("alpha", None, "The moving rate alpha of Eq. (1)/(2) itself, instead of --rho.")
flags.DEFINE_integer(
  "tau",
  DEFAULTS.tau,
  "Communication period: exchange (EASGD) or average (local_sgd, diloco) every tau-th step.",
)
flags.DEFINE_float(
  "momentum", DEFAULTS.momentum, "delta in [0, 1): alone, Nesterov momentum (EAMSGD)."
)
flags.DEFINE_string(
  "optimizer",
  None,
  "Inner optimizer: sgd, momentum, nesterov or adamw (default: nesterov with --momentum, else "
  "sgd; adamw for diloco).",
)
flags.DEFINE_string("lr_schedule", DEFAULTS.lr_schedule, "constant, cosine or warmup_cosine.")
flags.DEFINE_integer(
  "decay_steps", None, "Steps the schedule spans (default: the first launch's --steps)."
)
flags.DEFINE_integer("warmup_steps", DEFAULTS.warmup_steps, "warmup_cosine: warm-up steps.")
flags.DEFINE_float("weight_decay", DEFAULTS.weight_decay, "adamw: decoupled weight decay.")
flags.DEFINE_float(
  "outer_learning_rate", DEFAULTS.outer_learning_rate, "diloco: outer Nesterov SGD learning rate."
)
flags.DEFINE_float("outer_momentum", DEFAULTS.outer_momentum, "diloco: outer momentum.")
flags.DEFINE_integer(
  "progress_every_s", DEFAULTS.progress_every_s, "Seconds between progress lines (0: none)."
)
flags.DEFINE_integer("steps", DEFAULTS.steps, "Iterations T.")
flags.DEFINE_integer("eval_every", DEFAULTS.eval_every, "Iterations between test evaluations.")
flags.DEFINE_integer("seed", DEFAULTS.seed, "Seed for initialization and batch sampling.")
flags.DEFINE_float("target_accuracy", None, "Report steps/seconds to reach this test accuracy.")
flags.DEFINE_list(
  "synthetic_shape", list(map(str, DEFAULTS.synthetic_shape)), "H,W,C of synthetic."
)
flags.DEFINE_integer("synthetic_train_size", DEFAULTS.synthetic_train_size, "Synthetic examples.")
flags.DEFINE_string("workdir", None, "Folder for config.json, metrics.jsonl, summary.json, plot.")
flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-process runs: HOST:PORT of process 0 (JAX's distributed runtime; gloo on CPU).",
)
flags.DEFINE_integer("num_processes", 1, "Multi-process runs: processes taking part.")
flags.DEFINE_integer("process_id", 0, "Multi-process runs: this process's rank.")
flags.DEFINE_integer(
  "heartbeat_timeout_s",
  DEFAULTS.heartbeat_timeout_s,
  "A process silent this long, or missing this long at start-up, ends the run.",
)
flags.DEFINE_integer(
  "checkpoint_every",
  DEFAULTS.checkpoint_every,
  "Iterations between checkpoints in --workdir (0: only at the end and on SIGTERM/SIGINT).",
)
flags.DEFINE_integer("keep_checkpoints", DEFAULTS.keep_checkpoints, "Newest checkpoints kept.")
flags.DEFINE_integer(
  "inject_nan", None, "Fault injection: the batch of this iteration is all NaN (tests exit 1)."
)
flags.DEFINE_integer(
  "model_parallel",
  DEFAULTS.model_parallel,
  "M: split every layer across M devices (sgd: a 1 x M mesh; sync_sgd: num_devices/M x M).",
)
flags.DEFINE_bool(
  "fail_fast", False, "Async family: stop when a worker fails (default: go on with the rest)."
)
flags.DEFINE_string(
  "inject_failure",
  None,
  "Async family: WORKER:STEP makes that worker raise at its own step (--engine=ray: its process "
  "dies).",
)
flags.DEFINE_string(
  "engine",
  DEFAULTS.engine,
  "local: devices and threads in this process; ray: parameter server and worker actors "
  "(async_sgd, hogwild, async_easgd, hogwild_easgd, easgd); simulated: G workers on one device "
  "under a virtual clock (every algorithm).",
)
flags.DEFINE_string(
  "ray_address",
  None,
  "--engine=ray: join this Ray cluster (auto, or HOST:PORT of the head); unset: an embedded "
  "local Ray on 127.0.0.1.",
)
flags.DEFINE_bool(
  "ray_pipeline", False, "--engine=ray: keep one push/pull in flight (one more step of staleness)."
)
flags.DEFINE_float("ray_worker_gpus", 0.0, "--engine=ray: GPUs each worker actor asks Ray for.")
flags.DEFINE_integer(
  "max_worker_restarts", 0, "--engine=ray: times a dead worker is started again (0: never)."
)
flags.DEFINE_float(
  "sim_compute_ms",
  None,
  "--engine=simulated: one worker's step, in virtual ms (unset: measured here at the first launch, "
  "saved in config.json).",
)
flags.DEFINE_float(
  "sim_latency_us", DEFAULTS.sim_latency_us, "--engine=simulated: one message's latency (us)."
)
flags.DEFINE_float(
  "sim_bandwidth_gbps",
  DEFAULTS.sim_bandwidth_gbps,
  "--engine=simulated: one link's bandwidth (Gbit/s; 96: PCIe 3 x16, 10: 10 GbE).",
)
flags.DEFINE_float(
  "sim_service_us",
  None,
  "--engine=simulated: the master applying one update (us; unset: measured, saved in config.json).",
)
flags.DEFINE_float(
  "sim_jitter", DEFAULTS.sim_jitter, "--engine=simulated: sigma of a lognormal compute-time factor."
)
flags.DEFINE_integer(
  "sim_stragglers", DEFAULTS.sim_stragglers, "--engine=simulated: workers that compute slower."
)
flags.DEFINE_float(
  "sim_straggler_slowdown",
  DEFAULTS.sim_straggler_slowdown,
  "--engine=simulated: how much slower the stragglers are.",
)


def config_from_flags():
  """The run's Config: the flat flags, or with --config its file's fields under explicit flags."""
  overrides = None
  if FLAGS["config"].present:
    values, overrides = values_from_config_file()
  else:
    values = {name: FLAGS[name].value for name in FIELDS}
    values["synthetic_shape"] = _shape(values["synthetic_shape"])
  config = config_lib.Config(**values).validate()
  if overrides:  # once the settings are known to be good: a bad one is the only line on stderr
    logging.info("%s", overrides)
  return config


def values_from_config_file():
  """(Config's fields, a line naming the flat flags that override the file's fields, or None).

  The fields are --config's ConfigDict's, each flat flag given explicitly overriding one.

  A flat flag is written into the ConfigDict, so that a field computed from it follows (alpha =
  0.9 / num_devices in easgd_cifar10.py). The moving rate has two spellings and a run takes one:
  a flat --rho replaces the file's alpha, a flat --alpha the file's rho.
  """
  path = config_flags.get_config_filename(FLAGS["config"])
  config = FLAGS.config
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    try:  # ml_collections defers an error met while loading the file to the first use
      config.lock()
    except Exception as error:
      raise config_lib.ConfigError(f"--config={path}: {_last_line(error)}") from None
    raise config_lib.ConfigError(
      f"--config={path}: get_config() must return an ml_collections.ConfigDict (got "
      f"{type(config).__name__})"
    )
  for name in config:
    if name not in FIELDS:
      raise config_lib.ConfigError(f"--config={path}: {_unknown_field(name)}")
  flat = {name: FLAGS[name].value for name in FIELDS if FLAGS[name].present}
  if "synthetic_shape" in flat:
    flat["synthetic_shape"] = _shape(flat["synthetic_shape"])
  before = {name: config.get(name, getattr(DEFAULTS, name)) for name in FIELDS}
  notes, replaced = [], set()
  for given, other in (("rho", "alpha"), ("alpha", "rho")):
    if given in flat and other not in flat and before[other] is not None:
      notes.append(f"; --{given} replaces the file's {other}={_show(before[other])}")
      replaced.add(other)
      if other in config:
        config[other] = None
  for name, value in flat.items():
    if name in config:
      try:
        config[name] = value
      except (TypeError, ValueError) as error:
        raise config_lib.ConfigError(f"--{name}={value}: {_last_line(error)}") from None
  values = {name: config.get(name, getattr(DEFAULTS, name)) for name in FIELDS}
  values.update({name: value for name, value in flat.items() if name not in config})
  values["synthetic_shape"] = _shape(values["synthetic_shape"])
  if not flat:
    return values, None
  changes = ", ".join(f"{name}={_show(before[name])} -> {_show(v)}" for name, v in flat.items())
  for name in FIELDS:  # fields the file computes from an overridden one
    if name not in flat and name not in replaced and values[name] != before[name]:
      notes.append(f"; {name}={_show(before[name])} -> {_show(values[name])} follows")
  return values, f"flags given on the command line override {path}: {changes}{''.join(notes)}"


def _unknown_field(name):
  close = difflib.get_close_matches(name, FIELDS, n=1)
  return (
    f"unknown field '{name}'"
    + (f" (did you mean '{close[0]}'?)" if close else "")
    + "; a config's fields are Config's, the flags of run.py --help"
  )


def _shape(value):
  """synthetic_shape as a tuple of ints, from the flag's strings or a config file's ints."""
  try:
    if any(isinstance(v, bool) or not isinstance(v, int | str) for v in value):
      raise ValueError
    return tuple(int(v) for v in value)
  except (TypeError, ValueError):
    shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else value
    raise config_lib.ConfigError(
      f"--synthetic_shape must be three integers H,W,C (got {shown})"
    ) from None


def _show(value):
  return ",".join(map(str, value)) if isinstance(value, tuple) else f"{value}"


def _last_line(error):
  """The line that says what went wrong: a traceback's last line, or the message itself."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def parse_flags(argv):
  """config_lib.parse_flags's one `error:` line and exit 2, also for a --config file that fails.

  ml_collections loads the file while absl parses: a missing file, one without get_config(), a
  get_config() that raises, or an override of a field the file lacks (--config.tua=4) would
  otherwise end in a traceback or a several-line message.
  """
  path = _config_argument(argv)
  if path is not None:
    file = path.split(":", 1)[0]  # config_flags passes what follows a colon to get_config
    if not os.path.isfile(file):
      config_lib.exit_bad_input(f"--config={path}: no such file")
    for name in _config_overrides(argv):
      if name not in FIELDS:
        config_lib.exit_bad_input(f"--config.{name}: {_unknown_field(name)}")
  try:
    return FLAGS(argv)
  except flags.Error as error:
    message = str(error)
    if "Error whilst parsing config file" in message:  # get_config raised: keep its last line
      message = f"--config={path}: get_config() raised {_last_line(error)}"
    config_lib.exit_bad_input(message)
  except Exception as error:  # the file's own code failed to load, or has no get_config
    if isinstance(error, AttributeError) and "get_config" in str(error):
      config_lib.exit_bad_input(f"--config={path}: the file defines no get_config()")
    if isinstance(error, AttributeError):  # --config.FIELD of a Config field the file lacks
      config_lib.exit_bad_input(
        f"--config={path}: a --config.FIELD override names a field the file does not set "
        f"({_last_line(error)}); use the flat flag --FIELD instead"
      )
    config_lib.exit_bad_input(
      f"--config={path}: loading it raised {type(error).__name__}: {_last_line(error)}"
    )


def _config_argument(argv):
  """The value of --config in argv (`--config=FILE` or `--config FILE`), or None."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_overrides(argv):
  """The field names of every --config.FIELD[=VALUE] (or --noconfig.FIELD) in argv."""
  for arg in argv[1:]:
    if arg == "--":
      break
    name = arg.lstrip("-").split("=", 1)[0]
    for prefix in ("config.", "noconfig."):
      if arg.startswith("-") and name.startswith(prefix):
        yield name[len(prefix) :]


def main(argv):
  if len(argv) > 1:
    config_lib.exit_bad_input(
      f"unexpected arguments {argv[1:]}: every setting is a --flag (see --help)"
    )
  try:
    config = config_from_flags()
    if FLAGS.workdir and config.process_id == 0:  # process 0 alone writes the workdir
      workdir.check_workdir(FLAGS.workdir)
    # Emulated CPU devices must be requested before jax touches a device.
    from easgd_jax import devices, train

    # The simulated cluster's G workers share one device: none to emulate for them.
    devices.emulate_cpu_devices(1 if config.engine == "simulated" else config.local_devices)
    devices.initialize_processes(config)
    summary = train.train_and_evaluate(config, FLAGS.workdir)
  except config_lib.ConfigError as error:
    config_lib.exit_bad_input(error)
  except KeyboardInterrupt:
    print("interrupted: every worker stopped", file=sys.stderr)
    sys.exit(130)
  except Exception as error:  # how a run stops early; `train` may not even be imported yet
    from easgd_jax import failures, workers

    if isinstance(error, failures.DivergenceError | workers.WorkerFailure):
      print(f"error: {error}", file=sys.stderr)
      sys.exit(1)
    if isinstance(error, failures.ServerLost):
      print(f"error: {error}", file=sys.stderr)
      sys.exit(error.exit_code)
    if isinstance(error, failures.Preempted):
      print(f"stopped: {error}", file=sys.stderr)
      sys.exit(error.exit_code)
    raise
  if summary.get("complete"):  # a finished run, relaunched: train.py said so, nothing was written
    return
  final = summary["final"]
  logging.info(
    "done: test_accuracy %.4f after %d steps (%.1fs)%s",
    final["test_accuracy"],
    final["step"],
    final["wall_time_s"],
    f"; results in {FLAGS.workdir}" if FLAGS.workdir and config.process_id == 0 else "",
  )


if __name__ == "__main__":
  flags.FLAGS.set_default("logtostderr", True)
  app.run(main, flags_parser=parse_flags)
