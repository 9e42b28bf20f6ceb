"""The asynchronous loop (async_sgd, hogwild, async_easgd, hogwild_easgd): worker threads train
(`easgd_jax.workers`) while this thread scores the master's snapshots and writes checkpoints.
"""

import dataclasses
import json
import os

import numpy as np
from absl import logging

from easgd_jax import checkpoints, data, reporting, workers
from easgd_jax.failures import DivergenceError, Preempted, advice, check_weights


def train(config, dataset, algorithm, params_host, record, log, checkpointer, stop):
  """Worker threads train; this thread scores the master's snapshots and writes checkpoints."""
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
  offset, measured, pending = 0.0, [0, 0.0], []  # from the launches before this one
  if restored:
    arrays, saved = restored
    state = checkpoints.like(template, arrays)
    algorithm.load_master(state["master"])
    run.restore(
      saved["step"],
      saved["worker_steps"],
      state["workers"],
      saved["samplers"],
      applied=saved.get("applied", ()),
      staleness=saved.get("staleness"),
    )
    run.evaluations_skipped = saved.get("evaluations_skipped", 0)
    pending, offset = list(saved["pending_losses"]), saved["train_seconds"]
    measured = list(saved.get("throughput", measured))
    logging.info(
      "resuming from the checkpoint at step %d of %d (asynchronous: the continuation is not "
      "bitwise the uninterrupted run)",
      saved["step"],
      config.steps,
    )
  log.start(keep_until=saved["step"] if restored else None)
  skipped_logged = [0]

  def throughput():
    iterations, seconds = run.throughput()
    return [measured[0] + iterations, measured[1] + seconds]

  def on_snapshot(snapshot):
    losses = pending + snapshot.losses
    if snapshot.evaluate:
      staleness = workers.staleness_summary(snapshot.staleness)
      if snapshot.skipped and run.evaluations_skipped > skipped_logged[0]:
        logging.log_every_n_seconds(
          logging.INFO,
          "%d evaluation points skipped so far: the previous evaluation was still running "
          "(their losses go into the next row)",
          30,
          run.evaluations_skipped,
        )
        skipped_logged[0] = run.evaluations_skipped
      record(
        snapshot.step,
        snapshot.params,
        float(np.mean(losses)) if losses else float("nan"),
        offset + snapshot.wall_time_s,
        staleness_median=staleness and staleness["median"],
        staleness_max=staleness and staleness["max"],
        worker_steps=snapshot.worker_steps,
        evaluations_skipped=snapshot.skipped,
      )
      pending.clear()
    if snapshot.state is not None and checkpointer is not None:
      save(snapshot, [] if snapshot.evaluate else losses)

  def save(snapshot, pending_losses):
    state = snapshot.state
    arrays = checkpoints.to_host({k: state[k] for k in ("master", "workers")})
    check_weights(arrays, snapshot.step, config, checkpointer)
    saved = {
      "samplers": state["samplers"],
      "worker_steps": snapshot.worker_steps,
      "train_seconds": offset + snapshot.wall_time_s,
      "throughput": throughput(),
      "pending_losses": pending_losses,
      "applied": state["applied"],
      "staleness": state["staleness"],
      "evaluations_skipped": state["evaluations_skipped"],
    }
    checkpointer.save(snapshot.step, arrays, saved)
    write_applied(snapshot.step, state["applied"])

  def write_applied(step, pairs):
    """The log of applied iterations, as of checkpoint `step`, beside the checkpoints."""
    lines = ",\n".join(json.dumps(list(pair)) for pair in pairs)  # a pair a line
    text = f'{{"step": {step}, "applied": [\n{lines}\n]}}\n'
    reporting.write_text(os.path.join(checkpointer.workdir, reporting.APPLIED), text)

  if restored:  # the log of a later, unfinished checkpoint may be there: this one holds
    write_applied(saved["step"], run.applied)
  if restored and saved["step"] >= config.steps:  # finished: only the outputs are missing
    final = None
  else:
    final = run.run(params_host, on_snapshot, should_stop=lambda: stop.signum is not None)
  if run.diverged:
    j, own_step, iteration, loss = run.diverged
    raise DivergenceError(
      f"loss is {loss} at step {iteration} (worker {j}, its step {own_step}): the run diverged; "
      f"{advice(config, checkpointer)}"
    )
  if run.stopped:  # a prompt stop: save what there is, score it on the next launch
    save(final, pending + final.losses)
    raise Preempted(stop.signum, final.step, checkpointer.workdir)
  if final is not None:
    on_snapshot(final)
  for failure in run.failures:
    logging.warning("%s; the run went on with the other workers", failure.describe())
  extra = {
    "staleness": workers.staleness_summary(run.all_staleness),
    "worker_steps": list(run.worker_steps),
    "failed_workers": [dataclasses.asdict(f) for f in run.failures],
    "evaluations_skipped": run.evaluations_skipped,
    "throughput": throughput() if final is not None else measured,
  }
  return algorithm.snapshot(), algorithm, extra
