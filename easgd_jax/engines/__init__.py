"""Engines decide who applies which update when; the trainer (easgd_jax/trainer.py) is the loop
around them, and the algorithms (easgd_jax/algorithms) say what an update is.

Every engine has the same face towards the trainer:

- `checkpoint_arrays()`: {path name: array} of the state now (the template a restore fills);
- `restore(arrays, record)`: continue from a checkpoint (the record is the JSON saved with it);
- `run(at_point, tick, should_stop)`: train to `--steps`, calling `at_point(Point)` at every
  evaluation and checkpoint point and on a stop, and `tick(step)` often (for progress lines);
  `should_stop()` is the stop signal that arrived (SIGTERM/SIGINT), or None;
- `throughput()`: (iterations, seconds) of this launch, compilation and pauses left out;
- `final_params()` and `state`: the evaluated weights and the whole state at the end.

The local engines: `steps.StepEngine` (the host scheduler, for algorithms driven by STEPS) and
`threads.ThreadEngine` (one thread per worker, for those driven by WORKERS). `create` picks the
one the algorithm declares.
"""

import dataclasses


@dataclasses.dataclass
class Point:
  """A moment the trainer acts on: evaluate, checkpoint, or stop."""

  step: int  # run steps done
  wall_time_s: float  # training seconds of this launch so far (pauses left out)
  losses: list  # [(step, values, who)] since the previous evaluation, on the host
  params: object = None  # the weights to evaluate (the center), or None: no evaluation here
  points: list | None = None  # each worker's x^i beside the center, for the gap diagnostic
  checkpoint: tuple | None = None  # (arrays, engine record) of this instant, to be saved
  stopped: int | None = None  # the stop signal that arrived: save the checkpoint, then stop
  extra: dict = dataclasses.field(default_factory=dict)  # per-algorithm metrics of the row


def create(config, algorithm, dataset, params_host, sampler=None):
  """The local engine for `algorithm`: the host scheduler, or worker threads."""
  from easgd_jax.algorithms import STEPS
  from easgd_jax.engines import steps, threads

  if algorithm.driven_by == STEPS:
    return steps.StepEngine(config, algorithm, sampler, params_host)
  return threads.ThreadEngine(config, algorithm, dataset, params_host)
