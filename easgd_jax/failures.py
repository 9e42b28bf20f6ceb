"""How a run stops early: divergence, preemption by a signal, and the advice it prints.

Every loop (step-wise and asynchronous) raises these, and run.py maps them to exit codes: 1 for
DivergenceError, 3 for ServerLost (the Ray engine's parameter server died), 128 + the signal
for Preempted.
"""

import contextlib
import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from easgd_jax import checkpoints, core


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


class ServerLost(RuntimeError):
  """The Ray engine's parameter server died; the run stops (exit 3) and a relaunch resumes."""

  exit_code = 3


class StopRequest:
  """Signal handler that only notes the signal: the loop saves a checkpoint, then stops."""

  def __init__(self):
    self.signum = None

  def __call__(self, signum, frame):
    self.signum = signum


@contextlib.contextmanager
def stop_signals(enabled):
  request = StopRequest()
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield request
    return
  previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield request
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def advice(config, checkpointer):
  latest = checkpointer and max(checkpointer.steps(), default=None)
  kept = f"; the last good checkpoint (step {latest}) is kept" if latest else ""
  return f"{core.divergence_advice(config)}{kept}"


def check_losses(losses, config, checkpointer):
  """DivergenceError naming the first step, and its worker, whose loss is NaN/inf.

  `losses`: (step, values, who) with one value, or one per replica (replica i is worker i);
  `who` names the worker when the engine knows it.
  """
  for step, values, who in sorted(losses, key=lambda entry: entry[0]):
    values = np.ravel(values)
    bad = ~np.isfinite(values)
    if bad.any():
      if who is None:
        who = f"worker {int(np.argmax(bad))}" if len(values) > 1 else "the only worker"
      raise DivergenceError(
        f"loss is {values[bad][0]} at step {step} ({who}): the run diverged; "
        f"{advice(config, checkpointer)}"
      )


def check_weights(arrays, step, config, checkpointer):
  """DivergenceError when a weight is NaN/inf (multi-process: in any process's rows)."""
  parts = map(checkpoints.local_rows, arrays.values())
  finite = all(np.isfinite(part).all() for part in parts if part.dtype.kind == "f")
  if jax.process_count() > 1:  # the others hold other replicas: all stop, or none
    finite = bool(multihost_utils.process_allgather(np.array(finite)).all())
  if not finite:
    raise DivergenceError(
      f"weights are NaN/inf at step {step}: the run diverged; {advice(config, checkpointer)}"
    )
