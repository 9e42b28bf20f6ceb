"""The one training loop, for every algorithm and engine: evaluation, metrics and diagnostics,
checkpoints, resume, the applied-update record, NaN handling, signals and progress.

The engine yields events (engines/base.py) at the points of the trainer's Plan; here each
Snapshot becomes a metrics row (scored on the test set, with the diagnostics below), a
checkpoint, a DivergenceError or a Preempted. Every row has the same core keys:

  step, samples, wall_time_s, train_loss, test_loss, test_accuracy,
  param_norm   ||W|| of the evaluated weights (the center, for elastic algorithms),
  grad_norm    ||Delta W|| of the training loss at those weights, on a fixed probe batch,
  gap_mean, gap_max   over the workers of ||x^i - W-bar|| / ||W-bar|| (algorithms with
                      workers beside a center: the EASGD family, local SGD, DiLoCo, DOWNPOUR),

plus the engine's columns (staleness for asynchronous runs, the virtual clock when simulated)
and a step-driven rule's own diagnostics (`StepRule.diagnostics`: a quantization error).
"""

import contextlib
import dataclasses
import math
import sys
import time

import jax
import numpy as np
import optax
from absl import logging

from easgd_jax import core, devices, failures, reporting
from easgd_jax.engines.base import Plan, Progress, Snapshot, WorkerJoined, WorkerLost
from easgd_jax.errors import DivergenceError, Interrupted, Preempted

PROBE_SIZE = 256  # training examples the gradient-norm diagnostic is measured on


_param_norm = jax.jit(optax.tree.norm)  # one program, not one per leaf and operation


class ProgressLine:
  """A progress line on stderr every `every_s` seconds: steps/s, samples/s, ETA."""

  def __init__(self, total, start, samples_per_step, every_s):
    self.total, self.samples_per_step, self.every_s = total, samples_per_step, every_s
    self.last_time, self.last_step = time.perf_counter(), start

  def tick(self, step):
    now = time.perf_counter()
    if not self.every_s or now - self.last_time < self.every_s:
      return
    rate = (step - self.last_step) / (now - self.last_time)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    print(
      f"progress: step {step}/{self.total} ({100 * step / self.total:.0f}%)  "
      f"{rate:.1f} steps/s  {rate * self.samples_per_step:.0f} samples/s  ETA {_duration(eta)}",
      file=sys.stderr,
      flush=True,
    )
    self.last_time, self.last_step = now, step


def _duration(seconds):
  if not math.isfinite(seconds):
    return "?"
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Trainer:
  """Scores, logs and checkpoints one run; `fit(engine, stop)` drives the engine to --steps."""

  def __init__(self, config, rule, dataset, loss_fn, log, checkpointer, placement=None):
    """`placement`: where the engine's weights are scored (a device or a sharding)."""
    self.config, self.rule, self.log, self.checkpointer = config, rule, log, checkpointer
    self.samples_per_step = type(rule).samples_per_step(config)
    self.tokens_per_sample = dataset.tokens_per_example  # > 1: text, scored per character
    self.evaluate = core.make_evaluate(loss_fn)
    # On process 1+, global device 0 is elsewhere; a model-parallel run scores on its mesh.
    placement = placement or jax.local_devices()[0]
    probe = dataset.take(np.arange(min(PROBE_SIZE, dataset.num_train)))
    test = (dataset.test_images, dataset.test_labels, probe)
    self.test_images, self.test_labels, self.probe = devices.put(test, placement)
    gradient = core.make_gradient(loss_fn)
    self._grad_norm = jax.jit(lambda params, batch: optax.tree.norm(gradient(params, batch)[0]))
    self.offset, self.measured = 0.0, [0, 0.0]  # seconds and throughput of earlier launches
    self.applied = reporting.AppliedLog(log.workdir)
    self.lost, self.joined = [], []  # (worker, run step, why) as the engine reported them
    self.initial_loss = None  # the test loss at the initial weights, once compile_evaluation ran

  def compile_evaluation(self, params_host):
    """Score once now: with concurrent workers the first evaluation would otherwise lag far."""
    params = devices.put(params_host, self.test_images.sharding)
    self.initial_loss = self.evaluate(params, self.test_images, self.test_labels)[0]
    self._grad_norm(params, self.probe)

  def row(self, step, params, train_loss, wall_time_s, points=None, **extra):
    """Score `params` on the test set, stop on divergence, write one metrics row."""
    test_loss, test_accuracy = self.evaluate(params, self.test_images, self.test_labels)
    if not math.isfinite(test_loss):
      raise DivergenceError(
        f"test loss is {test_loss} at step {step}: the weights diverged; "
        f"{failures.advice(self.config, self.checkpointer)}"
      )
    row = {
      "step": step,
      "samples": step * self.samples_per_step,
      **self.text_columns(step, test_loss),
      "wall_time_s": round(wall_time_s, 4),
      "train_loss": train_loss,
      "test_loss": test_loss,
      "test_accuracy": test_accuracy,
      **self.diagnostics(params, points),
      **extra,
    }
    self.log.append(row)
    logging.info(
      f"step {step}/{self.config.steps}  train_loss {train_loss:.4f}  test_loss "
      f"{test_loss:.4f}  test_accuracy {test_accuracy:.4f}  {wall_time_s:.1f}s"
    )
    if len(self.log.rows) == 3:  # once: at the run's third evaluation
      warning = failures.not_learning(self.log.rows, self.config, self.initial_loss)
      if warning:
        logging.warning("%s", warning)

  def text_columns(self, step, test_loss):
    """A text's tokens seen and its loss in bits per character (test_loss is in nats)."""
    if self.tokens_per_sample == 1:
      return {}
    tokens = step * self.samples_per_step * self.tokens_per_sample
    return {"tokens": tokens, "test_bits_per_char": test_loss / math.log(2)}

  def diagnostics(self, params, points):
    params = devices.put(params, self.test_images.sharding)
    found = {
      "param_norm": float(_param_norm(params)),
      "grad_norm": float(self._grad_norm(params, self.probe)),
    }
    if points:  # on the host: the workers' weights live on different devices
      center = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
      norm = math.sqrt(sum(float(np.sum(c * c)) for c in center)) or 1.0
      gaps = []
      for point in points:
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(point)]
        gaps.append(
          math.sqrt(sum(float(np.sum((x - c) ** 2)) for x, c in zip(leaves, center, strict=True)))
        )
      found.update(gap_mean=float(np.mean(gaps)) / norm, gap_max=float(np.max(gaps)) / norm)
    return found

  def fit(self, engine, stop):
    """Resume the engine from the newest checkpoint, if any, and train it to --steps; returns
    the throughput of every launch together, [iterations, seconds]."""
    config, checkpointer = self.config, self.checkpointer
    start = 0
    restored = checkpointer and checkpointer.restore_latest(engine.checkpoint_arrays())
    if restored:
      arrays, saved = restored
      engine.restore(arrays, saved)
      start, self.offset = saved["step"], saved["train_seconds"]
      self.measured = list(saved["throughput"])
      self.applied.start(keep=saved["applied"])
      self.lost, self.joined = saved["lost"], saved["joined"]
      logging.info("resuming from the checkpoint at step %d of %d", start, config.steps)
    else:
      self.applied.start(keep=0)
    self.log.start(keep_until=start if restored else None, kept=restored and saved.get("row"))
    if restored and not self.log.workdir and checkpointer.shared:  # process 1+: for its summary
      self.log.rows = [
        r for r in reporting.read_metrics(checkpointer.workdir) if r["step"] <= start
      ]
    progress = ProgressLine(config.steps, start, self.samples_per_step, config.progress_every_s)
    plan = Plan(config, checkpointer is not None, stop)
    with contextlib.closing(engine.run(plan)) as events:  # closing: the engine stops its workers
      for event in events:
        if isinstance(event, Progress):
          progress.tick(event.step)
        elif isinstance(event, Snapshot):
          self._at(event, engine)
        elif isinstance(event, WorkerLost):
          self.lost.append(dataclasses.asdict(event))
        elif isinstance(event, WorkerJoined):
          self.joined.append(dataclasses.asdict(event))
    self.applied.close()
    return self.throughput(engine)

  def throughput(self, engine):
    iterations, seconds = engine.throughput()
    return [self.measured[0] + iterations, self.measured[1] + seconds]

  def _at(self, snapshot, engine):
    failures.check_losses(snapshot.losses, self.config, self.checkpointer)
    self.applied.append(snapshot.applied)
    wall_time_s = self.offset + snapshot.wall_time_s
    # A stop that comes just after a point gives a second snapshot at that step (or at the
    # step a launch resumed from): its row and its checkpoint are there already.
    if self.log.rows and self.log.rows[-1]["step"] == snapshot.step:
      snapshot = dataclasses.replace(snapshot, params=None)
    saving = snapshot.state is not None and self.checkpointer is not None
    if saving and snapshot.step in self.checkpointer.steps():  # listed only when saving
      snapshot = dataclasses.replace(snapshot, state=None)
    if snapshot.params is not None:
      values = [v for _, vs, _ in snapshot.losses for v in np.ravel(vs)]
      train_loss = float(np.mean(values)) if values else float("nan")
      points, extra = snapshot.points, snapshot.extra
      self.row(snapshot.step, snapshot.params, train_loss, wall_time_s, points, **extra)
    if snapshot.state is not None and self.checkpointer is not None:
      arrays, record = snapshot.state
      failures.check_weights(arrays, snapshot.step, self.config, self.checkpointer)
      pending = [] if snapshot.params is not None else snapshot.losses
      row = reporting.plain(self.log.rows[-1]) if snapshot.params is not None else None
      record = {
        **record,
        "config": self.config.to_dict(),
        "train_seconds": wall_time_s,
        "throughput": self.throughput(engine),
        "losses": [(int(s), np.ravel(v).tolist()) for s, v, _ in pending],
        "applied": self.applied.count,
        "lost": self.lost,
        "joined": self.joined,
        "row": row,  # this step's row, if any (a resume restores it if torn from the file)
      }
      self.applied.flush()  # the records the checkpoint counts are on disk before it
      self.log.sync()
      self.checkpointer.save(snapshot.step, arrays, record)
    if snapshot.stopped and self.checkpointer is None:
      raise Interrupted(snapshot.stopped, snapshot.step)
    if snapshot.stopped:
      raise Preempted(snapshot.stopped, snapshot.step, self.checkpointer.directory)

  def summary(self):
    """The workers the engine lost and took back over the whole run, every launch's."""
    restarted = {}
    for joined in self.joined:
      restarted[str(joined["worker"])] = restarted.get(str(joined["worker"]), 0) + 1
    return {"failed_workers": self.lost, "restarted_workers": restarted}
