"""train_and_evaluate(config, workdir): every algorithm's training run, with the same outputs.

This module owns the run's frame: the settings (`validate`), the workdir (its lock, the resume
rules, the finished-run check), the data, model, algorithm and engine, and the outputs. The
training itself is the one loop in trainer.py, around the engine --engine names (engines/).
"""

import os
from typing import Any, NamedTuple

import jax
from absl import logging

from easgd_jax import (
  algorithms,
  checkpoints,
  core,
  data,
  devices,
  engines,
  failures,
  models,
  reporting,
  resume,
)
from easgd_jax import workdir as workdir_lib
from easgd_jax.errors import ConfigError, Interrupted, StoppedWhenComplete
from easgd_jax.trainer import Trainer


def validate(config, workdir=None):
  """`config` checked and with every setting left unset resolved (on resume as the workdir's
  run resolved it, else the algorithm's default for the model), or ConfigError naming the flag
  to change."""
  if workdir == "":
    raise ConfigError("--workdir= is empty: name a folder, or leave --workdir out to keep no files")
  config = algorithms.resolve(resume.fix_unset(config.validate(), workdir))
  kind, known = algorithms.REGISTRY[config.algorithm], algorithms.REGISTRY.items()
  if not engines.runs(config.engine, kind):
    runs = [name for name, other in known if engines.runs(config.engine, other)]
    raise ConfigError(
      f"--engine={config.engine} runs {', '.join(runs)}; --algorithm={config.algorithm} runs on "
      f"--engine=local or simulated"
    )
  if config.inject_failure is not None and not engines.injects_failures(config.engine, kind):
    at_own_pace = [n for n, k in known if engines.injects_failures("local", k)]
    on_ray = [n for n, k in known if engines.injects_failures("ray", k)]
    raise ConfigError(
      f"--inject_failure applies to the asynchronous algorithms ({', '.join(at_own_pace)}), and "
      f"to {', '.join(n for n in on_ray if n not in at_own_pace)} with --engine=ray"
    )
  engines.check(config, kind)
  return config


def setup(config, model=None):
  """Data, model, loss and initial host parameters for `config` (also handy in notebooks);
  `model`: a flax module in place of config.model's (benchmarks of other widths)."""
  dataset = data.load(config)
  model = model or models.from_config(config, dataset.num_classes)
  loss_fn = core.make_loss_fn(model)
  shape, dtype = dataset.image_shape, dataset.input_dtype
  params_host = models.init_params(model, shape, config.seed, dtype)
  return dataset, model, loss_fn, params_host


class Run(NamedTuple):
  """What one run is built from; `build` makes it, `_train` and the benchmarks use it."""

  config: Any  # validated, with what the engine measured at its first launch
  dataset: Any
  loss_fn: Any
  params_host: Any
  rule: Any  # the algorithm
  engine: Any


def build(config, model=None):
  """The run `config` (validated) describes: data, initial weights, algorithm and engine; an
  engine that cannot be placed (devices, memory) raises ConfigError before anything is written."""
  dataset, _, loss_fn, params_host = setup(config, model)
  config = engines.prepare(config, loss_fn, params_host, dataset)  # measured once, then kept
  rule = algorithms.create(config, loss_fn)
  engine = engines.create(config, rule, dataset, params_host)
  return Run(config, dataset, loss_fn, params_host, rule, engine)


def train_and_evaluate(config, workdir=None):
  """Train as `config` says; write results into `workdir` (if given); return the summary.

  With a workdir the run holds the workdir's lock, checkpoints itself and, relaunched with the
  same workdir, resumes from its newest readable checkpoint; a finished run stays finished.
  The resume order: (1) check the flags against the workdir's config.json (nothing written yet);
  (2) a finished run with its outputs returns them untouched; (3) otherwise build the run,
  restore the newest readable checkpoint and train from there to --steps; a checkpoint at or past
  --steps only (re)writes the final outputs.
  """
  config = validate(config, workdir)
  devices.check_platform()
  checkpoints.check_shared_workdir(workdir)  # multi-process: all save their shards in one folder
  writes = workdir if workdir and jax.process_index() == 0 else None  # process 0 writes results
  lock = workdir_lib.Lock(workdir) if writes else None
  try:
    if writes and os.path.isdir(writes):
      # Before reading anything, so a live run's files are never mixed with ours; shared until
      # there is something to write, so that a finished run relaunched writes nothing.
      lock.acquire(shared=True)
    # Every process of a multi-process run reads the shared workdir and so takes the same way:
    # until they all meet in the Checkpointer, nothing in it changes but config.json (atomically).
    config, finished = resume.prepare(config, workdir)
    if finished is not None and resume.outputs_complete(workdir):
      logging.info("complete at step %d; results in %s (raise --steps to train on)", *finished)
      return resume.finished_summary(workdir)
    with engines.cluster(config):  # Ray: joined (or started) before anything is written
      summary = _train(config, writes, lock, finished, checkpoint_dir=workdir)
  finally:
    if lock is not None:
      lock.release()
  return summary


def settings_in_force(config, rule):
  """The training settings the run uses, whether given or resolved from a default."""
  names = ["optimizer", "learning_rate", "lr_schedule", "batch_size", "tau"]
  if config.lr_schedule != "constant":
    names += ["warmup_steps", "min_learning_rate"]
  if config.optimizer == "adamw":
    names += ["weight_decay", "beta2"]
  if config.momentum:
    names.append("momentum")
  if config.grad_clip:
    names.append("grad_clip")
  found = [f"{name}={getattr(config, name)}" for name in names]
  if rule.elastic:
    found.append(f"alpha={config.moving_rate:g}")
  return ", ".join(found)


def _train(config, workdir, lock, finished, checkpoint_dir=None):
  """Build the run, resume or start it, train to --steps and write the outputs.

  `workdir` is where results go (process 0's only); `checkpoint_dir` the workdir every process
  of the run checkpoints into.
  """
  config, dataset, loss_fn, params_host, rule, engine = build(config)
  checkpointer = None
  if workdir:
    lock.acquire()  # exclusive now
    if finished is None:  # a finished run's config.json stays as it was
      reporting.write_json(os.path.join(workdir, reporting.CONFIG), config.to_dict())
  if checkpoint_dir:  # every process of a multi-process run: each saves its own shards
    checkpointer = checkpoints.Checkpointer(checkpoint_dir, config.keep_checkpoints)
  shape = "x".join(map(str, dataset.image_shape))
  logging.info(
    f"{config.algorithm} on {config.dataset} ({shape}, {dataset.num_train} train / "
    f"{len(dataset.test_labels)} test), model {config.model}, {engine.describe()}; "
    f"in force: {settings_in_force(config, rule)}"
  )
  if rule.elastic:
    warning = core.elastic_stability(config.moving_rate, config.num_devices, rule.all_at_once)
    if warning:
      logging.warning("EASGD stability: %s", warning)

  log = reporting.MetricsLog(workdir)
  trainer = Trainer(config, rule, dataset, loss_fn, log, checkpointer, engine.eval_placement)
  trainer.compile_evaluation(params_host)  # with concurrent workers the first row would lag
  # The handler stays on until the outputs are written: a signal in the last steps (after the
  # loop's last look) or while writing must neither tear the outputs nor be lost, or a study
  # stopped by SIGTERM would go on with its next run.
  # With no workdir the signal still stops the loop, which then raises errors.Interrupted once
  # every worker is done; only a multi-process run without one, whose processes could not agree
  # on the step to stop at, keeps the default handlers.
  handled = checkpointer is not None or config.num_processes == 1
  with failures.stop_signals(enabled=handled) as stop:
    try:
      iterations, seconds = trainer.fit(engine, stop)
    finally:
      log.close()
    summary = _write_outputs(config, workdir, log.rows, trainer, engine, iterations, seconds)
  if stop.signum is not None and checkpointer is None:
    raise Interrupted(stop.signum, config.steps)
  if stop.signum is not None:
    raise StoppedWhenComplete(stop.signum, checkpoint_dir)
  summary["history"] = log.rows
  summary["state"] = engine.state
  return summary


def _write_outputs(config, workdir, rows, trainer, engine, iterations, seconds):
  """The run's summary; with a workdir also its plot, final weights and summary.json (last)."""
  summary = reporting.summarize(rows, config.target_accuracy, config.target_loss)
  summary["algorithm"] = config.algorithm
  summary["engine"] = config.engine
  # Training time only: compilation (each launch's first step) and pauses left out. A run too
  # short to have steps after its warm-up keeps summarize's samples / wall time.
  if iterations > 0 and seconds > 0:
    summary["samples_per_s"] = iterations * trainer.samples_per_step / seconds
  summary.update(engine.summary())
  summary.update(trainer.summary())
  final_params = engine.final_params()
  if workdir:
    title = f"{config.algorithm} / {config.model} / {config.dataset}"
    reporting.plot_accuracy(rows, os.path.join(workdir, reporting.PLOT), title)
    reporting.save_params(os.path.join(workdir, reporting.PARAMS), final_params)
    engine.write_outputs(workdir)
    reporting.write_json(os.path.join(workdir, reporting.SUMMARY), summary)  # last: "complete"
  return summary
