"""Studies: many runs side by side, the comparison tables and plots the EASGD papers make.

A study is a list of `Arm`s (an algorithm with its settings, or one point of a sweep), each run
for every seed on the same data, model and budget (runs.py); its table (tables.py) and plots
(plots.py) are written when every run has finished. `main` is the command line every
experiments/*.py study file calls.
"""

import dataclasses

from easgd_jax import cli
from easgd_jax.config import MAX_SEED, Config
from easgd_jax.errors import ConfigError
from easgd_jax.study.plots import curves, plot_curves, plot_sweep
from easgd_jax.study.runs import (
  DIVERGED,
  LOSS_TOKENS_PLOT,
  LOSS_VIRTUAL_TIME_PLOT,
  SAMPLES_PLOT,
  SWEEP_PLOT,
  TIME_PLOT,
  VIRTUAL_TIME_PLOT,
  Arm,
  Study,
  load,
  report,
  run,
  run_dir,
)
from easgd_jax.study.tables import markdown, rows, to_csv


def main(make_study, finish=None, dataset="digits", model=None):
  """The absl entry point every experiments/*.py study file calls; `finish(study, workdir,
  table)`, if given, runs after the study's own report (a study's extra tables and plots);
  `dataset` and `model` are the defaults of --dataset and --model."""
  from absl import flags

  flags.DEFINE_string("workdir", None, "Folder for the study (each run in runs/ARM/seed_S).")
  flags.DEFINE_string(
    "dataset", dataset, "digits, mnist5k (offline), mnist, cifar10, shakespeare, synthetic."
  )
  flags.DEFINE_string("data_dir", None, "tensorflow-datasets folder for mnist/cifar10.")
  flags.DEFINE_string(
    "model", model, "mlp, lenet, cifar_cnn or transformer (default lenet; cifar10: cifar_cnn)."
  )
  flags.DEFINE_list("seeds", None, "Seeds, e.g. 0,1,2 (default: the study's); one run each.")
  flags.DEFINE_integer("samples", None, "Budget: training samples per run (default: the study's).")
  flags.DEFINE_float("target_accuracy", None, "Accuracy whose time/samples the table reports.")
  flags.DEFINE_float("target_loss", None, "A text study's: validation loss the table times.")
  flags.mark_flag_as_required("workdir")
  FLAGS = flags.FLAGS

  def settings():
    from easgd_jax.workdir import check_workdir

    model = FLAGS.model or ("cifar_cnn" if FLAGS.dataset == "cifar10" else "lenet")
    base = Config(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model=model).validate()
    study = make_study(base)
    changes = {}
    if FLAGS.seeds:
      if not all(s.strip().isdigit() and int(s) <= MAX_SEED for s in FLAGS.seeds):
        raise ConfigError(
          f"--seeds must be integers in 0..{MAX_SEED} like 0,1,2 (got {','.join(FLAGS.seeds)})"
        )
      changes["seeds"] = tuple(int(s) for s in FLAGS.seeds)
    if FLAGS.samples is not None:  # --samples=0 is refused, not taken for "the default"
      if FLAGS.samples < 1:
        raise ConfigError(f"--samples must be an integer >= 1 (got {FLAGS.samples})")
      changes["samples"] = FLAGS.samples
    if FLAGS.target_accuracy is not None:
      changes["target_accuracy"] = FLAGS.target_accuracy
    if FLAGS.target_loss is not None:
      if study.target_loss is None:
        raise ConfigError("--target_loss is for a text study (one judged by validation loss)")
      changes["target_loss"] = FLAGS.target_loss
    study = dataclasses.replace(study, **changes)
    for arm in study.arms:  # every run's settings are checked before the first one starts
      for seed in study.seeds:
        study.config(arm, seed)
    check_workdir(FLAGS.workdir)
    return study

  def _main(argv):
    if len(argv) > 1:
      cli.exit_bad_input(f"unexpected arguments {argv[1:]}: every setting is a --flag")
    study = cli.run(settings)
    from easgd_jax import devices

    devices.emulate_cpu_devices(study.devices_needed())

    def study_and_report():
      table = run(study, FLAGS.workdir)
      if finish:
        finish(study, FLAGS.workdir, table)

    cli.run(study_and_report)

  cli.start(_main)
