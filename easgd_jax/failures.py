"""How a run stops early: the signals it stops on, NaN/inf checks, and the advice it prints.

The exceptions themselves live in easgd_jax/errors.py and the exit codes in easgd_jax/cli.py.
"""

import contextlib
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from easgd_jax import checkpoints, core
from easgd_jax.algorithms import REGISTRY
from easgd_jax.errors import DivergenceError


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


def divergence_advice(config):
  """What to change after a NaN/inf loss, for the run's DivergenceError message.

  An elastic run whose coupling breaks its stability condition (core.elastic_stability: alpha < 1
  for one-at-a-time exchanges, alpha + beta < 2 for synchronous ones) is told that condition with
  its values; any other run is told to lower the learning rate.
  """
  kind = REGISTRY[config.algorithm]
  alpha = config.moving_rate
  if kind.elastic and alpha > 0:  # alpha = 0 is uncoupled, not unstable
    unstable = core.elastic_stability(alpha, config.num_devices, kind.all_at_once)
    if unstable:
      return f"{unstable} (now {config.elastic_flags})"
  return f"lower --learning_rate (now {config.learning_rate})"


def advice(config, checkpointer):
  latest = checkpointer and max(checkpointer.steps(), default=None)
  kept = f"; the last good checkpoint (step {latest}) is kept" if latest else ""
  return f"{divergence_advice(config)}{kept}"


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
