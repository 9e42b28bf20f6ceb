"""train_and_evaluate(config, workdir): every algorithm's training run, with the same outputs.

This module owns the run's frame: the workdir (its lock, the resume rules, the finished-run
check), the data, model, algorithm and engine, and the outputs. The training itself is the one
loop in `trainer.py`, around the engine the algorithm declares (`engines/steps.py`, the host
scheduler; `engines/threads.py`, worker threads). `failures` holds how a run stops early.
"""

import os

import jax
from absl import logging

from easgd_jax import (
  algorithms,
  checkpoints,
  core,
  data,
  engines,
  failures,
  models,
  partitioning,
  reporting,
  resume,
)
from easgd_jax import workdir as workdir_lib
from easgd_jax.algorithms import STEPS, WORKERS
from easgd_jax.config import ConfigError
from easgd_jax.failures import DivergenceError, Preempted  # noqa: F401  (run.py, studies, tests)
from easgd_jax.trainer import Trainer
from easgd_jax.workers import WorkerFailure  # noqa: F401  (run.py, studies)


def setup(config):
  """Data, model, loss and initial host parameters for `config` (also handy in notebooks)."""
  dataset = data.load(config)
  model = models.create(config.model, dataset.num_classes)
  loss_fn = core.make_loss_fn(model)
  params_host = models.init_params(model, dataset.image_shape, config.seed)
  return dataset, model, loss_fn, params_host


def train_and_evaluate(config, workdir=None):
  """Train as `config` says; write results into `workdir` (if given); return the summary.

  With a workdir the run holds the workdir's lock, checkpoints itself and, relaunched with the
  same workdir, resumes from its newest readable checkpoint; a finished run stays finished.
  The resume order: (1) check the flags against the workdir's config.json (nothing written yet);
  (2) a finished run with its outputs returns them untouched; (3) otherwise build the run,
  restore the newest readable checkpoint and train from there to --steps; a checkpoint at or past
  --steps only (re)writes the final outputs.
  """
  config = config.validate()
  checkpoints.check_shared_workdir(workdir)  # multi-process: all save their shards in one folder
  writes = workdir if workdir and jax.process_index() == 0 else None  # process 0 writes results
  lock = workdir_lib.Lock(workdir) if writes else None
  try:
    if writes and os.path.isdir(writes):
      lock.acquire()  # before reading anything, so a live run's files are never mixed with ours
    # Every process of a multi-process run reads the shared workdir and so takes the same way:
    # until they all meet in the Checkpointer, nothing in it changes but config.json (atomically).
    config = resume.fix_decay_steps(config, workdir)
    config = resume.fix_measured_costs(config, workdir)
    finished = resume.check(config, workdir)
    if finished is not None and resume.outputs_complete(workdir):
      logging.info("complete at step %d; results in %s (raise --steps to train on)", *finished)
      return resume.finished_summary(workdir)
    with engines.cluster(config):  # Ray: joined (or started) before anything is written
      summary = _train(config, writes, lock, finished, checkpoint_dir=workdir)
  finally:
    if lock is not None:
      lock.release()
  return summary


def _train(config, workdir, lock, finished, checkpoint_dir=None):
  """Build the run, resume or start it, train to --steps and write the outputs.

  `workdir` is where results go (process 0's only); `checkpoint_dir` the workdir every process
  of the run checkpoints into.
  """
  dataset, _, loss_fn, params_host = setup(config)
  if config.engine == "simulated":  # measured once, saved in config.json below, reused after
    from easgd_jax.engines import simulated

    sample = {
      "image": dataset.train_images[: config.batch_size],
      "label": dataset.train_labels[: config.batch_size],
    }
    config = simulated.measure_costs(config, loss_fn, params_host, sample)
    # Every worker on the one device (a list as long as the workers: no "sharing" warning).
    algorithm = algorithms.create(config, loss_fn, [jax.devices()[0]] * config.num_devices)
    simulated.check_memory(config, algorithm, params_host, dataset)  # before anything is written
  else:
    algorithm = algorithms.create(config, loss_fn)
  if config.model_parallel > 1:  # a layer that does not split evenly: say so before any output
    partitioning.check_divisible(params_host, config.model_parallel)
  kind = type(algorithm)
  sampler = make_sampler(config, dataset, algorithm) if algorithm.driven_by == STEPS else None
  checkpointer = None
  if workdir:
    if lock._file is None:
      lock.acquire()
    if finished is None:  # a finished run's config.json stays as it was
      reporting.write_json(os.path.join(workdir, reporting.CONFIG), config.to_dict())
  if checkpoint_dir:  # every process of a multi-process run: each saves its own shards
    checkpointer = checkpoints.Checkpointer(checkpoint_dir, config.keep_checkpoints)
  logging.info(
    "%s (inner optimizer %s, %s schedule) on %s (%s, %d train / %d test), model %s, devices: %s",
    config.algorithm,
    config.inner_optimizer,
    config.lr_schedule,
    config.dataset,
    "x".join(map(str, dataset.image_shape)),
    len(dataset.train_labels),
    len(dataset.test_labels),
    config.model,
    ", ".join(map(str, algorithm.devices)),
  )
  if kind.elastic:
    warning = core.elastic_stability(config.moving_rate, config.num_devices, kind.all_at_once)
    if warning:
      logging.warning("EASGD stability: %s", warning)

  log = reporting.MetricsLog(workdir)
  trainer = Trainer(config, algorithm, dataset, loss_fn, log, checkpointer)
  if algorithm.driven_by == WORKERS:  # compile the evaluation now, or the first one would lag
    trainer.compile_evaluation(params_host)
  try:
    engine = engines.create(config, algorithm, dataset, params_host, sampler)
    with failures.stop_signals(enabled=checkpointer is not None) as stop:
      iterations, seconds = trainer.fit(engine, stop)
  finally:
    log.close()

  summary = reporting.summarize(log.rows, config.target_accuracy)
  summary["algorithm"] = config.algorithm
  # Training time only: compilation (each launch's first step) and pauses left out. A run too
  # short to have steps after its warm-up keeps summarize's samples / wall time.
  if iterations > 0 and seconds > 0:
    summary["samples_per_s"] = iterations * trainer.samples_per_step / seconds
  if hasattr(engine, "summary"):
    summary.update(engine.summary())
  final_params = engine.final_params()
  if workdir:
    title = f"{config.algorithm} / {config.model} / {config.dataset}"
    reporting.plot_accuracy(log.rows, os.path.join(workdir, reporting.PLOT), title)
    reporting.save_params(os.path.join(workdir, reporting.PARAMS), final_params)
    if hasattr(engine, "write_outputs"):
      engine.write_outputs(workdir)
    reporting.write_json(os.path.join(workdir, reporting.SUMMARY), summary)  # last: "complete"
  summary["history"] = log.rows
  summary["state"] = engine.state
  return summary


def make_sampler(config, dataset, algorithm):
  """One sampler over the whole training set, or one per data shard for data parallelism."""
  images, labels = dataset.train_images, dataset.train_labels
  if not algorithms.REGISTRY[config.algorithm].data_parallel:  # (also with a model axis)
    return data.Sampler(images, labels, seed=config.seed)
  shard_size = len(labels) // algorithm.batches_per_step
  if config.batch_size > shard_size:
    raise ConfigError(
      f"--batch_size={config.batch_size} is larger than a device's part of the training set "
      f"({shard_size} = {len(labels)} / {algorithm.batches_per_step} devices); lower "
      f"--batch_size or --num_devices"
    )
  return data.ShardedSampler(
    images, labels, algorithm.batches_per_step, algorithm.local_ids, config.seed
  )
