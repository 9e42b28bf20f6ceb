"""train_and_evaluate(config, workdir): every algorithm's training run, with the same outputs.

Step-wise algorithms run in one loop that only dispatches work: it samples a host batch, hands it
to the algorithm and keeps the loss (still on device). It waits for the devices only at
evaluation points, where it pulls the losses, scores the center (or the single model) on the test
set and writes one metrics row. The asynchronous family trains in worker threads
(`easgd_jax.workers`) while this thread scores the master's snapshots as they arrive.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time

import jax
import numpy as np
from absl import logging

from easgd_jax import (
  algorithms,
  checkpoints,
  core,
  data,
  devices,
  models,
  partitioning,
  reporting,
  workers,
)
from easgd_jax.config import ASYNC_ALGORITHMS, EASGD_ALGORITHMS, SYNC_ALGORITHMS, ConfigError


class DivergenceError(RuntimeError):
  """Training produced a NaN or infinite loss or weight."""


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of the current step was saved."""

  def __init__(self, signum, step, workdir):
    self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    super().__init__(
      f"{signal.Signals(signum).name} at step {step}; checkpoint saved in "
      f"{os.path.join(workdir, checkpoints.FOLDER)}: run the same command to resume"
    )


def setup(config):
  """Data, model, loss and initial host parameters for `config` (also handy in notebooks)."""
  dataset = data.load(config)
  model = models.create(config.model, dataset.num_classes)
  loss_fn = core.make_loss_fn(model)
  params_host = models.init_params(model, dataset.image_shape, config.seed)
  return dataset, model, loss_fn, params_host


def train_and_evaluate(config, workdir=None):
  """Train as `config` says; write results into `workdir` (if given); return the summary.

  With a workdir the run checkpoints itself and, relaunched with the same workdir, resumes from
  its newest readable checkpoint.
  """
  config = config.validate()
  dataset, _, loss_fn, params_host = setup(config)
  algorithm = algorithms.create(config, loss_fn)
  if config.model_parallel > 1:  # a layer that does not split evenly: say so before any output
    partitioning.check_divisible(params_host, config.model_parallel)
  is_async = config.algorithm in ASYNC_ALGORITHMS
  sampler = None if is_async else make_sampler(config, dataset, algorithm)  # checks --batch_size
  workdir = workdir if jax.process_index() == 0 else None  # process 0 alone writes results
  checkpointer = _prepare_workdir(config, workdir)
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
      raise DivergenceError(
        f"test loss is {test_loss} at step {step}: the weights diverged; "
        f"{_advice(config, checkpointer)}"
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

  try:
    with _stop_signals(enabled=checkpointer is not None) as stop:
      if is_async:
        final_params, state, extra = _train_async(
          config, dataset, algorithm, params_host, record, log, checkpointer, stop
        )
      else:
        final_params, state, extra = _train_steps(
          config, sampler, algorithm, params_host, record, log, checkpointer, stop
        )
  finally:
    log.close()

  summary = reporting.summarize(log.rows, config.target_accuracy)
  summary["algorithm"] = config.algorithm
  summary.update(extra)
  if workdir:
    reporting.write_json(os.path.join(workdir, reporting.SUMMARY), summary)
    title = f"{config.algorithm} / {config.model} / {config.dataset}"
    reporting.plot_accuracy(log.rows, os.path.join(workdir, reporting.PLOT), title)
    reporting.save_params(os.path.join(workdir, reporting.PARAMS), final_params)
  summary["history"] = log.rows
  summary["state"] = state
  return summary


def _prepare_workdir(config, workdir):
  """Check that `workdir` holds this experiment (or none), write config.json, open checkpoints."""
  if not workdir:
    return None
  config_path = os.path.join(workdir, reporting.CONFIG)
  if os.path.exists(config_path):
    with open(config_path) as f:
      checkpoints.check_same_experiment(json.load(f), config)  # before anything is written
  os.makedirs(workdir, exist_ok=True)
  reporting.write_json(config_path, config.to_dict())
  if config.num_processes > 1:
    logging.warning("multi-process runs write no checkpoints; a relaunch starts from step 0")
    return None
  return checkpoints.Checkpointer(workdir, config.keep_checkpoints)


class _StopRequest:
  """Signal handler that only notes the signal: the loop saves a checkpoint, then stops."""

  def __init__(self):
    self.signum = None

  def __call__(self, signum, frame):
    self.signum = signum


@contextlib.contextmanager
def _stop_signals(enabled):
  request = _StopRequest()
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield request
    return
  previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield request
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def _advice(config, checkpointer):
  latest = checkpointer and max(checkpointer.steps(), default=None)
  kept = f"; the last good checkpoint (step {latest}) is kept" if latest else ""
  return f"lower --learning_rate (now {config.learning_rate}){kept}"


def _train_steps(config, sampler, algorithm, params_host, record, log, checkpointer, stop):
  """The step-wise loop: dispatch steps, wait for the devices only at evaluation points."""
  max_in_flight = getattr(algorithm, "max_in_flight", None)
  state = algorithm.init(params_host)
  start, train_seconds, pending = 0, 0.0, []  # pending: (step, loss) since the last metrics row
  restored = checkpointer and checkpointer.restore_latest(checkpoints.to_host(state))
  if restored:
    arrays, saved = restored
    state = checkpoints.like(state, arrays)
    sampler.set_state(saved["sampler"])
    start, train_seconds = saved["step"], saved["train_seconds"]
    pending = [(step, np.asarray(values, np.float32)) for step, values in saved["pending_losses"]]
    logging.info("resuming from the checkpoint at step %d of %d", start, config.steps)
  log.start(keep_until=start if restored else None)
  clock = time.perf_counter()
  for step in range(start + 1, config.steps + 1):
    batch = sampler.next(config.batch_size)
    if step == config.inject_nan:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    state, loss = algorithm.step(state, batch)
    pending.append((step, loss))
    if max_in_flight and step % max_in_flight == 0:
      jax.block_until_ready(loss)  # CPU collectives: keep the queue short (devices.max_in_flight)
    evaluate_now = step % config.eval_every == 0 or step == config.steps
    save_now = checkpointer is not None and (
      (config.checkpoint_every and step % config.checkpoint_every == 0)
      or step == config.steps
      or stop.signum is not None
    )
    if not (evaluate_now or save_now):
      continue
    pending = [(s, _host_values(loss)) for s, loss in pending]  # the loop's only wait
    train_seconds += time.perf_counter() - clock  # evaluation and checkpoints are left out
    _check_losses(pending, algorithm, config, checkpointer)
    if evaluate_now:
      train_loss = float(np.mean(np.concatenate([v for _, v in pending])))
      record(step, algorithm.eval_params(state), train_loss, train_seconds)
      pending = []
    if save_now:
      arrays = checkpoints.to_host(state)
      _check_weights(arrays, step, config, checkpointer)
      saved = {
        "sampler": sampler.state(),
        "train_seconds": train_seconds,
        "pending_losses": [(s, v.tolist()) for s, v in pending],
      }
      checkpointer.save(step, arrays, saved)
    if stop.signum is not None:
      raise Preempted(stop.signum, step, checkpointer.workdir)
    clock = time.perf_counter()
  return algorithm.eval_params(state), state, {}


def _host_values(loss):
  """This process's part of a step's loss, flat: one value, or one per local device."""
  if isinstance(loss, np.ndarray):
    return loss.reshape(-1)
  return np.concatenate([np.asarray(s.data).reshape(-1) for s in loss.addressable_shards])


def _check_losses(pending, algorithm, config, checkpointer):
  """DivergenceError naming the first step, and its worker, whose loss is NaN/inf."""
  for step, values in pending:
    bad = ~np.isfinite(values)
    if bad.any():
      if len(values) > 1:  # one loss per replica: replica i is worker i
        who = f"worker {int(np.argmax(bad))}"
      elif hasattr(algorithm, "worker"):
        who = f"worker {algorithm.worker(step - 1)[0]}"
      else:
        who = "the only worker"
      raise DivergenceError(
        f"loss is {values[bad][0]} at step {step} ({who}): the run diverged; "
        f"{_advice(config, checkpointer)}"
      )


def _check_weights(arrays, step, config, checkpointer):
  for array in arrays:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
      raise DivergenceError(
        f"weights are NaN/inf at step {step}: the run diverged; {_advice(config, checkpointer)}"
      )


def _train_async(config, dataset, algorithm, params_host, record, log, checkpointer, stop):
  """Worker threads train; this thread evaluates the master's snapshots as they come."""
  samplers = [
    data.Sampler(dataset.train_images, dataset.train_labels, workers.worker_seed(config.seed, j))
    for j in range(config.num_devices)
  ]
  run = workers.Run(
    algorithm,
    samplers,
    steps=config.steps,
    eval_every=config.eval_every,
    batch_size=config.batch_size,
    fail_fast=config.fail_fast,
    failure=config.failure_point,
    checkpoint_every=config.checkpoint_every,
    nan_at=config.inject_nan,
    save_state=checkpointer is not None,
  )
  algorithm.init(params_host)
  template = {
    "master": algorithm.master_state(),
    "workers": [algorithm.init_worker(j, params_host) for j in range(config.num_devices)],
  }
  restored = checkpointer and checkpointer.restore_latest(checkpoints.to_host(template))
  offset = 0.0  # training seconds before this launch
  if restored:
    arrays, saved = restored
    state = checkpoints.like(template, arrays)
    algorithm.load_master(state["master"])
    run.restore(saved["step"], saved["worker_steps"], state["workers"], saved["samplers"])
    run.losses, offset = saved["pending_losses"], saved["train_seconds"]
    logging.info(
      "resuming from the checkpoint at step %d of %d (asynchronous: the continuation is not "
      "bitwise the uninterrupted run)",
      saved["step"],
      config.steps,
    )
  log.start(keep_until=saved["step"] if restored else None)

  def on_snapshot(snapshot):
    if snapshot.evaluate:
      staleness = workers.staleness_summary(snapshot.staleness)
      train_loss = float(np.mean(snapshot.losses)) if snapshot.losses else float("nan")
      record(
        snapshot.step,
        snapshot.params,
        train_loss,
        offset + snapshot.wall_time_s,
        staleness_median=staleness and staleness["median"],
        staleness_max=staleness and staleness["max"],
        worker_steps=snapshot.worker_steps,
      )
    if snapshot.state is not None and checkpointer is not None:
      arrays = checkpoints.to_host({k: snapshot.state[k] for k in ("master", "workers")})
      _check_weights(arrays, snapshot.step, config, checkpointer)
      saved = {
        "samplers": snapshot.state["samplers"],
        "worker_steps": snapshot.worker_steps,
        "train_seconds": offset + snapshot.wall_time_s,
        "pending_losses": [] if snapshot.evaluate else list(snapshot.losses),
      }
      checkpointer.save(snapshot.step, arrays, saved)

  final = run.run(params_host, on_snapshot, should_stop=lambda: stop.signum is not None)
  if run.diverged:
    j, own_step, iteration, loss = run.diverged
    raise DivergenceError(
      f"loss is {loss} at step {iteration} (worker {j}, its step {own_step}): the run diverged; "
      f"{_advice(config, checkpointer)}"
    )
  on_snapshot(final)
  if run.stopped:
    raise Preempted(stop.signum, final.step, checkpointer.workdir)
  for failure in run.failures:
    logging.warning("%s; the run went on with the other workers", failure.describe())
  extra = {
    "staleness": workers.staleness_summary(run.all_staleness),
    "worker_steps": final.worker_steps,
    "failed_workers": [dataclasses.asdict(f) for f in run.failures],
  }
  return final.params, algorithm, extra


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
