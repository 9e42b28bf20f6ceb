"""train_and_evaluate(config, workdir): the one training loop every step-wise algorithm runs in.

The loop only dispatches work: it samples a host batch, hands it to the algorithm and keeps the
loss (still on device). It waits for the devices only at evaluation points, where it pulls the
losses, scores the center (or the single model) on the test set and writes one metrics row.
"""

import math
import os
import time

import jax
import numpy as np
from absl import logging

from easgd_jax import algorithms, core, data, devices, models, reporting
from easgd_jax.config import SYNC_ALGORITHMS, ConfigError


class DivergenceError(RuntimeError):
  """Training produced a NaN or infinite loss."""


def setup(config):
  """Data, model, loss and initial host parameters for `config` (also handy in notebooks)."""
  dataset = data.load(config)
  model = models.create(config.model, dataset.num_classes)
  loss_fn = core.make_loss_fn(model)
  params_host = models.init_params(model, dataset.image_shape, config.seed)
  return dataset, model, loss_fn, params_host


def train_and_evaluate(config, workdir=None):
  """Train as `config` says; write results into `workdir` (if given); return the summary."""
  config = config.validate()
  dataset, _, loss_fn, params_host = setup(config)
  algorithm = algorithms.create(config, loss_fn)
  sampler = make_sampler(config, dataset, algorithm)
  workdir = workdir if jax.process_index() == 0 else None  # process 0 alone writes results
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    reporting.write_json(os.path.join(workdir, reporting.CONFIG), config.to_dict())
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

  evaluate = core.make_evaluate(loss_fn)
  eval_device = jax.local_devices()[0]  # on process 1+, global device 0 is elsewhere
  test_images = devices.put(dataset.test_images, eval_device)
  test_labels = devices.put(dataset.test_labels, eval_device)
  log = reporting.MetricsLog(workdir)
  samples_per_step = config.batch_size * algorithm.replicas
  max_in_flight = getattr(algorithm, "max_in_flight", None)

  state = algorithm.init(params_host)
  losses, train_seconds, clock = [], 0.0, time.perf_counter()
  try:
    for step in range(1, config.steps + 1):
      state, loss = algorithm.step(state, sampler.next(config.batch_size))
      losses.append(loss)
      if max_in_flight and step % max_in_flight == 0:
        jax.block_until_ready(loss)  # CPU collectives: keep the queue short (devices.max_in_flight)
      if step % config.eval_every and step != config.steps:
        continue
      train_loss = _local_mean(losses)  # the loop's only wait on the devices
      train_seconds += time.perf_counter() - clock
      losses = []
      test_loss, test_accuracy = evaluate(algorithm.eval_params(state), test_images, test_labels)
      if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
        raise DivergenceError(
          f"loss is {train_loss} (train) / {test_loss} (test) at step {step}: "
          f"the run diverged; lower --learning_rate (now {config.learning_rate})"
        )
      row = {
        "step": step,
        "samples": step * samples_per_step,
        "wall_time_s": round(train_seconds, 4),
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
      }
      log.append(row)
      logging.info(
        "step %d/%d  train_loss %.4f  test_loss %.4f  test_accuracy %.4f  %.1fs",
        step,
        config.steps,
        train_loss,
        test_loss,
        test_accuracy,
        train_seconds,
      )
      clock = time.perf_counter()
  finally:
    log.close()

  summary = reporting.summarize(log.rows, config.target_accuracy)
  summary["algorithm"] = config.algorithm
  if workdir:
    reporting.write_json(os.path.join(workdir, reporting.SUMMARY), summary)
    title = f"{config.algorithm} / {config.model} / {config.dataset}"
    reporting.plot_accuracy(log.rows, os.path.join(workdir, reporting.PLOT), title)
    reporting.save_params(os.path.join(workdir, reporting.PARAMS), algorithm.eval_params(state))
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


def _local_mean(losses):
  """Mean of the losses' parts held by this process (a scalar, or one value per local device)."""
  return float(
    np.mean([np.asarray(shard.data) for loss in losses for shard in loss.addressable_shards])
  )
