"""Launch one experiment: flags in, `train.train_and_evaluate(config, workdir)` out.

  python run.py --algorithm=easgd --dataset=digits --model=lenet --num_devices=4 \
      --batch_size=32 --learning_rate=0.05 --rho=1.0 --tau=1 --steps=2000 --eval_every=100 \
      --seed=0 --workdir=runs/easgd
  python run.py --config=experiments/configs/easgd_cifar10.py --config.tau=16 --steps=500 \
      --workdir=runs/easgd_cifar10

Every flag is a field of easgd_jax.config.Config, with its help text there (`--help` lists
them); `--config=FILE` names an experiment file (experiments/configs/). This file is kept short
on purpose: the logic lives in the `easgd_jax` library, which notebooks and tests import
directly, and easgd_jax/cli.py maps how a run ends to its exit code (README, "Exit codes").
"""

from absl import flags, logging

from easgd_jax import cli, workdir

cli.define_flags()
flags.DEFINE_string("workdir", None, "Folder for config.json, metrics, checkpoints, summary.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    cli.exit_bad_input(f"unexpected arguments {argv[1:]}: every setting is a --flag (see --help)")

  def launch():
    config = cli.config_from_flags()
    if FLAGS.workdir is not None and config.process_id == 0:  # process 0 alone writes it
      workdir.check_workdir(FLAGS.workdir)
    # Emulated CPU devices and the CPU's dispatch must be set before jax touches a device.
    from easgd_jax import algorithms, devices, engines, train

    config = train.validate(config, FLAGS.workdir)
    devices.emulate_cpu_devices(engines.devices_to_emulate(config))
    kind = algorithms.REGISTRY[config.algorithm]
    devices.dispatch_cpu_calls_inline(engines.dispatches_inline(config, kind))
    devices.initialize_processes(config)
    return config, train.train_and_evaluate(config, FLAGS.workdir)

  config, summary = cli.run(launch)
  if summary.get("complete"):  # a finished run, relaunched: train.py said so, nothing written
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
  cli.start(main)
