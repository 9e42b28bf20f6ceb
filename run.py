"""Launch one experiment: flags in, `train.train_and_evaluate(config, workdir)` out.

  python run.py --algorithm=easgd --dataset=digits --model=lenet --num_devices=4 \
      --batch_size=32 --learning_rate=0.05 --rho=1.0 --tau=1 --steps=2000 --eval_every=100 \
      --seed=0 --workdir=runs/easgd

This file is kept short on purpose: the logic lives in the `easgd_jax` library, which notebooks
and tests import directly. Exit codes: 0 done (also "complete at step N" for a finished run);
2 bad settings or a workdir in use (one line saying what to change, nothing written); 1
divergence or failed workers; 3 reserved for a lost parameter-server process; 143 / 130 stopped
by SIGTERM / SIGINT after saving a checkpoint (the same command resumes it).
"""

import dataclasses
import sys

from absl import app, flags, logging

from easgd_jax import config as config_lib
from easgd_jax import workdir

DEFAULTS = config_lib.Config()
FLAGS = flags.FLAGS

flags.DEFINE_string("algorithm", DEFAULTS.algorithm, f"One of {config_lib.ALGORITHMS}.")
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
  "rho", DEFAULTS.rho, "Elastic coefficient rho (>= 0); eta*rho is the moving rate."
)
flags.DEFINE_integer(
  "tau", DEFAULTS.tau, "Communication period: exchange every tau-th worker step."
)
flags.DEFINE_float("momentum", DEFAULTS.momentum, "Nesterov momentum delta in [0, 1) (EAMSGD).")
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
  "inject_failure", None, "Async family: WORKER:STEP makes that worker raise at its own step."
)


def config_from_flags():
  names = {f.name for f in dataclasses.fields(config_lib.Config)}
  values = {name: FLAGS[name].value for name in names}
  try:
    values["synthetic_shape"] = tuple(int(v) for v in values["synthetic_shape"])
  except ValueError:
    raise config_lib.ConfigError(
      f"--synthetic_shape must be three integers H,W,C (got {','.join(FLAGS.synthetic_shape)})"
    ) from None
  return config_lib.Config(**values).validate()


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

    devices.emulate_cpu_devices(config.local_devices)
    devices.initialize_processes(config)
    summary = train.train_and_evaluate(config, FLAGS.workdir)
  except config_lib.ConfigError as error:
    config_lib.exit_bad_input(error)
  except KeyboardInterrupt:  # before the clauses below: `train` may not be imported yet
    print("interrupted: every worker stopped", file=sys.stderr)
    sys.exit(130)
  except (train.DivergenceError, train.WorkerFailure) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  except train.Preempted as stop:
    print(f"stopped: {stop}", file=sys.stderr)
    sys.exit(stop.exit_code)
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
  app.run(main, flags_parser=config_lib.parse_flags)
