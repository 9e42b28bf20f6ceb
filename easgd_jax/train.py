"""train_and_evaluate(config, workdir): every algorithm's training run, with the same outputs.

This module owns the run's frame: the workdir (its lock, the resume rules, the finished-run
check), the data, model and algorithm, evaluation and the outputs. The training itself is one of
two loops: `train_steps` for the algorithms a host loop steps (dispatching without waiting, and
syncing with the devices only at evaluation and checkpoint points), `train_async` for the
asynchronous family, whose worker threads (`easgd_jax.workers`) train while the main thread
scores the master's snapshots. `failures` holds how a run stops early.
"""

import json
import math
import os

import jax
from absl import logging

from easgd_jax import (
  algorithms,
  checkpoints,
  core,
  data,
  devices,
  failures,
  models,
  partitioning,
  reporting,
  train_async,
  train_steps,
)
from easgd_jax import workdir as workdir_lib
from easgd_jax.config import ASYNC_ALGORITHMS, EASGD_ALGORITHMS, SYNC_ALGORITHMS, ConfigError
from easgd_jax.failures import DivergenceError, Preempted  # noqa: F401  (run.py, studies, tests)
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
    finished = _check_resume(config, workdir)
    if finished is not None and _outputs_complete(workdir):
      logging.info("complete at step %d; results in %s (raise --steps to train on)", *finished)
      return _finished_summary(workdir)
    summary = _train(config, writes, lock, finished, checkpoint_dir=workdir)
  finally:
    if lock is not None:
      lock.release()
  return summary


def _check_resume(config, workdir):
  """(step, workdir) when the workdir's run is finished at or past --steps, else None.

  Raises ConfigError (nothing written) for a config.json that can't be read or a flag that a
  resume can't honour, including a lower --steps on a run that is not finished.
  """
  path = workdir and os.path.join(workdir, reporting.CONFIG)
  if not path or not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as error:
    raise ConfigError(
      f"{path} is damaged ({type(error).__name__}: {str(error)[:80]}); move it away to start "
      f"over, or use another --workdir"
    ) from None
  checkpoints.check_same_experiment(saved, config)
  done = max([*checkpoints.saved_steps(workdir), _summary_step(workdir)])
  old_steps = saved.get("steps", config.steps)
  if done >= old_steps and config.steps <= done:
    return done, workdir
  if config.steps < old_steps:
    raise ConfigError(
      f"the workdir holds an unfinished run with --steps={old_steps}, not {config.steps}: "
      f"--steps may only rise on resume; use --steps={old_steps} (or more), or another --workdir"
    )
  return None


def _summary_step(workdir):
  try:
    with open(os.path.join(workdir, reporting.SUMMARY)) as f:
      return int(json.load(f)["steps"])
  except (OSError, ValueError, KeyError, TypeError):
    return 0


def _outputs_complete(workdir):
  names = (reporting.SUMMARY, reporting.PARAMS, reporting.METRICS)
  return all(os.path.exists(os.path.join(workdir, name)) for name in names) and _summary_step(
    workdir
  )


def _finished_summary(workdir):
  with open(os.path.join(workdir, reporting.SUMMARY)) as f:
    summary = json.load(f)
  summary.update(complete=True, history=reporting.read_metrics(workdir), state=None)
  return summary


def _train(config, workdir, lock, finished, checkpoint_dir=None):
  """Build the run, resume or start it, train to --steps and write the outputs.

  `workdir` is where results go (process 0's only); `checkpoint_dir` the workdir every process
  of the run checkpoints into.
  """
  dataset, _, loss_fn, params_host = setup(config)
  algorithm = algorithms.create(config, loss_fn)
  if config.model_parallel > 1:  # a layer that does not split evenly: say so before any output
    partitioning.check_divisible(params_host, config.model_parallel)
  is_async = config.algorithm in ASYNC_ALGORITHMS
  sampler = None if is_async else make_sampler(config, dataset, algorithm)  # checks --batch_size
  checkpointer = None
  if workdir:
    if lock._file is None:
      lock.acquire()
    if finished is None:  # a finished run's config.json stays as it was
      reporting.write_json(os.path.join(workdir, reporting.CONFIG), config.to_dict())
  if checkpoint_dir:  # every process of a multi-process run: each saves its own shards
    checkpointer = checkpoints.Checkpointer(checkpoint_dir, config.keep_checkpoints)
  logging.info(
    "%s on %s (%s, %d train / %d test), model %s, devices: %s",
    config.algorithm,
    config.dataset,
    "x".join(map(str, dataset.image_shape)),
    len(dataset.train_labels),
    len(dataset.test_labels),
    config.model,
    ", ".join(map(str, algorithm.devices)),
  )
  if config.algorithm in EASGD_ALGORITHMS:
    warning = core.elastic_stability(
      config.learning_rate, config.rho, config.num_devices, config.algorithm == "sync_easgd"
    )
    if warning:
      logging.warning("EASGD stability: %s", warning)

  evaluate = core.make_evaluate(loss_fn)
  # On process 1+, global device 0 is elsewhere; a model-parallel run scores on its whole mesh.
  eval_placement = getattr(algorithm, "eval_placement", None) or jax.local_devices()[0]
  test_images = devices.put(dataset.test_images, eval_placement)
  test_labels = devices.put(dataset.test_labels, eval_placement)
  log = reporting.MetricsLog(workdir)
  samples_per_step = config.batch_size * getattr(algorithm, "replicas", 1)

  def record(step, params, train_loss, wall_time_s, **extra):
    """Score `params` on the test set, stop on divergence, write one metrics row."""
    test_loss, test_accuracy = evaluate(params, test_images, test_labels)
    if not math.isfinite(test_loss):
      raise failures.DivergenceError(
        f"test loss is {test_loss} at step {step}: the weights diverged; "
        f"{failures.advice(config, checkpointer)}"
      )
    row = {
      "step": step,
      "samples": step * samples_per_step,
      "wall_time_s": round(wall_time_s, 4),
      "train_loss": train_loss,
      "test_loss": test_loss,
      "test_accuracy": test_accuracy,
      **extra,
    }
    log.append(row)
    logging.info(
      "step %d/%d  train_loss %.4f  test_loss %.4f  test_accuracy %.4f  %.1fs",
      step,
      config.steps,
      train_loss,
      test_loss,
      test_accuracy,
      wall_time_s,
    )

  if is_async:  # compile the evaluation now, or the first one would lag the workers by far
    evaluate(params_host, test_images, test_labels)

  try:
    with failures.stop_signals(enabled=checkpointer is not None) as stop:
      train = train_async.train if is_async else train_steps.train
      source = dataset if is_async else sampler
      final_params, state, extra = train(
        config, source, algorithm, params_host, record, log, checkpointer, stop
      )
  finally:
    log.close()

  summary = reporting.summarize(log.rows, config.target_accuracy)
  summary["algorithm"] = config.algorithm
  iterations, seconds = extra.pop("throughput")
  # Training time only: compilation (each launch's first step) and pauses left out. A run too
  # short to have steps after its warm-up keeps summarize's samples / wall time.
  if iterations > 0 and seconds > 0:
    summary["samples_per_s"] = iterations * samples_per_step / seconds
  summary.update(extra)
  if workdir:
    title = f"{config.algorithm} / {config.model} / {config.dataset}"
    reporting.plot_accuracy(log.rows, os.path.join(workdir, reporting.PLOT), title)
    reporting.save_params(os.path.join(workdir, reporting.PARAMS), final_params)
    reporting.write_json(os.path.join(workdir, reporting.SUMMARY), summary)  # last: "complete"
  summary["history"] = log.rows
  summary["state"] = state
  return summary


def make_sampler(config, dataset, algorithm):
  """One sampler over the whole training set, or one per data shard for data parallelism."""
  images, labels = dataset.train_images, dataset.train_labels
  if config.algorithm not in SYNC_ALGORITHMS:
    return data.Sampler(images, labels, seed=config.seed)
  shard_size = len(labels) // algorithm.replicas
  if config.batch_size > shard_size:
    raise ConfigError(
      f"--batch_size={config.batch_size} is larger than a device's part of the training set "
      f"({shard_size} = {len(labels)} / {algorithm.replicas} devices); lower --batch_size or "
      f"--num_devices"
    )
  return data.ShardedSampler(images, labels, algorithm.replicas, algorithm.local_ids, config.seed)
