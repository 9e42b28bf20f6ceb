"""Worker threads on one machine, for the algorithms driven by WORKERS (the asynchronous family).

`easgd_jax.workers.Run` runs one thread per worker, each at its own pace; this engine turns its
snapshots (evaluation points, checkpoint barriers, the final state) into the trainer's Points.
Worker j draws from its own sampler (`workers.worker_seed`), so worker 0 sees the batches
single-device SGD would.
"""

import dataclasses
import json
import os

import numpy as np
from absl import logging

from easgd_jax import checkpoints, data, reporting, workers
from easgd_jax.engines import Point


class ThreadEngine:
  def __init__(self, config, algorithm, dataset, params_host):
    self.config, self.algorithm, self.params_host = config, algorithm, params_host
    self.checkpointing, self.workdir = False, None  # the trainer sets both for a workdir
    self.samplers = [
      data.Sampler(dataset.train_images, dataset.train_labels, workers.worker_seed(config.seed, j))
      for j in range(config.num_devices)
    ]
    algorithm.init(params_host)
    self.workers = [algorithm.init_worker(j, params_host) for j in range(config.num_devices)]
    self.pending = []  # losses restored from a checkpoint, for the next row
    self.done = 0
    self.run_ = None
    self.state = algorithm

  def _new_run(self):
    config = self.config
    return workers.Run(
      self.algorithm,
      self.samplers,
      steps=config.steps,
      eval_every=config.eval_every,
      batch_size=config.batch_size,
      fail_fast=config.fail_fast,
      failure=config.failure_point,
      checkpoint_every=config.checkpoint_every,
      nan_at=config.inject_nan,
      save_state=self.checkpointing,
    )

  def checkpoint_arrays(self):
    return checkpoints.to_host({"master": self.algorithm.master_state(), "workers": self.workers})

  def restore(self, arrays, record):
    template = {"master": self.algorithm.master_state(), "workers": self.workers}
    state = checkpoints.like(template, arrays)
    self.algorithm.load_master(state["master"])
    self.workers, self.done = state["workers"], record["step"]
    self.restored = record
    self.pending = [
      (s, np.asarray(v, np.float64).reshape(-1), None) for s, v in record["pending_losses"]
    ]
    logging.info(
      "asynchronous: the continuation is not bitwise the uninterrupted run (arrival order)"
    )

  def run(self, at_point, tick, should_stop):
    self.run_ = run = self._new_run()
    if self.done:
      saved = self.restored
      run.restore(
        saved["step"],
        saved["worker_steps"],
        self.workers,
        saved["samplers"],
        applied=saved.get("applied", ()),
        staleness=saved.get("staleness"),
      )
      run.evaluations_skipped = saved.get("evaluations_skipped", 0)
      self.write_applied(saved["step"], run.applied)  # a later, unfinished log may be there
    if self.done >= self.config.steps:  # finished: only the outputs are missing
      return
    final = run.run(self.params_host, lambda s: at_point(self._point(s)), should_stop, tick)
    at_point(self._point(final, stopped=should_stop() if run.stopped else None))
    for failure in run.failures:
      logging.warning("%s; the run went on with the other workers", failure.describe())

  def _point(self, snapshot, stopped=None):
    losses = self.pending + snapshot.losses
    point = Point(snapshot.step, snapshot.wall_time_s, losses, stopped=stopped)
    state = snapshot.state
    if snapshot.evaluate and not stopped:
      self.pending = []
      staleness = workers.staleness_summary(snapshot.staleness)
      if snapshot.skipped:
        logging.log_every_n_seconds(
          logging.INFO,
          "%d evaluation points skipped so far: the previous evaluation was still running "
          "(their losses go into the next row)",
          30,
          self.run_.evaluations_skipped,
        )
      point.params = snapshot.params
      point.points = self.algorithm.worker_points({"workers": snapshot.workers})
      point.extra = {
        "staleness_median": staleness and staleness["median"],
        "staleness_max": staleness and staleness["max"],
        "worker_steps": snapshot.worker_steps,
        "evaluations_skipped": snapshot.skipped,
      }
    if state is not None and self.checkpointing:
      arrays = checkpoints.to_host({k: state[k] for k in ("master", "workers")})
      record = {
        "samplers": state["samplers"],
        "worker_steps": snapshot.worker_steps,
        "applied": state["applied"],
        "staleness": state["staleness"],
        "evaluations_skipped": state["evaluations_skipped"],
      }
      point.checkpoint = (arrays, record)
    return point

  def saved(self, step, record):
    """After the trainer saved checkpoint `step`: the applied-iteration log beside it."""
    self.write_applied(step, record["applied"])

  def write_applied(self, step, pairs):
    """The log of applied iterations, as of checkpoint `step`, in WORKDIR/applied_updates.json."""
    lines = ",\n".join(json.dumps(list(pair)) for pair in pairs)  # a pair a line
    text = f'{{"step": {step}, "applied": [\n{lines}\n]}}\n'
    reporting.write_text(os.path.join(self.workdir, reporting.APPLIED), text)

  def throughput(self):
    return self.run_.throughput() if self.run_ and self.run_.start_time else (0, 0.0)

  def final_params(self):
    return self.algorithm.snapshot()

  def summary(self):
    run = self.run_
    return {
      "staleness": workers.staleness_summary(run.all_staleness),
      "worker_steps": list(run.worker_steps),
      "failed_workers": [dataclasses.asdict(f) for f in run.failures],
      "evaluations_skipped": run.evaluations_skipped,
    }
