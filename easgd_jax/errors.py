"""How a run can end early, as exceptions; a leaf module that everything may import.

Each carries the exit code the entry points give it (easgd_jax/cli.py maps them, once for every
entry point): 2 for bad input (nothing written), 1 for a run that failed, 3 for a lost parameter
server (the same command resumes), 128 + the signal for a stop by SIGTERM / SIGINT.
"""

import os
import signal

BAD_INPUT = 2


class ConfigError(ValueError):
  """A setting the run cannot use; the message is one line naming the flag to change."""

  exit_code = BAD_INPUT


class DataError(ConfigError):
  """The dataset can't be had as asked; the message says how to get it."""


class OlderCheckpoint(ConfigError):
  """A checkpoint written by an older version, which this one cannot resume."""


class DivergenceError(RuntimeError):
  """Training produced a NaN or infinite loss or weight."""

  exit_code = 1


class WorkerFailure(RuntimeError):
  """A worker raised and the run cannot go on (no workers left, or --fail_fast)."""

  exit_code = 1


class InjectedFailure(RuntimeError):
  """The device failure `--inject_failure=J:S` raises in worker J at its own step S."""


class ServerLost(RuntimeError):
  """The Ray engine's parameter server died; the run stops and a relaunch resumes."""

  exit_code = 3


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of the current step was saved."""

  def __init__(self, signum, step, checkpoint_folder):
    self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    super().__init__(
      f"{signal.Signals(signum).name} at step {step}; checkpoint saved in "
      f"{os.path.abspath(checkpoint_folder)}: run the same command to resume"
    )


class Interrupted(KeyboardInterrupt):
  """SIGTERM or SIGINT arrived in a run with no workdir: every worker stopped, nothing was saved.

  A KeyboardInterrupt, so that a notebook's interrupt ends the way it always does; the loop, not
  the signal, raises it, once every worker has finished the iteration it was in (a
  KeyboardInterrupt raised wherever the main thread happens to be can leave a lock held that the
  workers wait on)."""

  def __init__(self, signum, step):
    self.exit_code = 128 + signum
    super().__init__(
      f"{signal.Signals(signum).name} at step {step}; every worker stopped (no --workdir: nothing "
      f"saved)"
    )


class StoppedWhenComplete(Preempted):
  """SIGTERM or SIGINT arrived after the loop's last look at it: the run finished and wrote its
  outputs, and still stops its caller (a study, a script) with 128 + the signal."""

  def __init__(self, signum, workdir):
    self.exit_code = 128 + signum
    Exception.__init__(
      self,
      f"{signal.Signals(signum).name} in the last steps; the run is complete in "
      f"{os.path.abspath(workdir)}: the same command reports it (a study: goes on to its next run)",
    )
