"""What every benchmark in experiments/ measures with, so that they all measure alike.

- `settle()`: wait (up to 5 minutes) until the machine is idle, the 1-minute load average below
  0.5, and say what it saw: a ratio taken under load can flip (a busy machine starves a
  process-based contender more than threads).
- `run(config)`: one run built and driven exactly as `train.train_and_evaluate` builds and
  drives it (train.build, the engine's events to --steps), without a workdir or evaluations
  between; its throughput leaves each launch's compiling first steps out, as summary.json's
  samples_per_s does. Every benchmark's samples/s is this one number.
"""

import os
import time

IDLE_LOAD = 0.5  # the 1-minute load average below which a cell is measured
SETTLE_LIMIT_S = 300


def load_average():
  return os.getloadavg()[0]


def settle(limit_s=SETTLE_LIMIT_S, quiet=IDLE_LOAD):
  """Wait until the 1-minute load average is below `quiet` (at most `limit_s`); returns it."""
  deadline = time.monotonic() + limit_s
  while load_average() >= quiet and time.monotonic() < deadline:
    time.sleep(5)
  return load_average()


def run(config, model=None):
  """(samples/s, the engine's summary) of one run of `config` (see the module docstring)."""
  from easgd_jax import engines, train
  from easgd_jax.engines.base import Plan

  config = train.validate(config)
  with engines.cluster(config):
    built = train.build(config, model)
    for _ in built.engine.run(Plan(built.config, checkpointing=False)):
      pass
  iterations, seconds = built.engine.throughput()
  samples = iterations * built.rule.samples_per_step(built.config)
  return samples / max(seconds, 1e-9), {**built.engine.summary(), "engine": built.engine}
