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


def not_learning(rows, config, initial_loss=None):
  """A warning when the run's third evaluation has not moved its test loss 10 % below the loss
  at the initial weights (when that is not known: not below the first evaluation's), naming the
  flags most likely at fault and values to try; None while it learns (or is too young to tell).

  Against the initial loss, not the first evaluation: an unstable run's first evaluation can be
  a spike far above where it started (7.5 nats on digits), and a run that learned before its
  first evaluation may wander a little after it (0.46, 0.40, 0.49) while learning well."""
  if len(rows) < 3:
    return None
  bar = rows[0]["test_loss"] if initial_loss is None else 0.9 * initial_loss
  if rows[2]["test_loss"] < bar:
    return None
  kind = REGISTRY[config.algorithm]
  third = rows[2]["test_loss"]
  if initial_loss is None:
    before = f"{rows[0]['test_loss']:.4f} at step {rows[0]['step']}"
  else:
    before = f"{initial_loss:.4f} at the initial weights"
  tries = [f"--learning_rate={config.learning_rate / 10:g} (now {config.learning_rate:g})"]
  if config.tau > 1:  # an exchange period set longer than one step
    tries.append(f"--tau={max(1, config.tau // 4)} (now {config.tau})")
  if kind.elastic:
    tries.append(f"a larger --alpha (now {config.moving_rate:g})")
  return (
    f"not learning: test_loss {before}, {third:.4f} at step {rows[2]['step']}; try "
    f"{' or '.join(tries)}"
  )
