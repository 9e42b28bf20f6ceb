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
`threads.ThreadEngine` (one thread per worker, for those driven by WORKERS). The Ray engine
(`--engine=ray`, ray.py): `ray.AsyncEngine` (a parameter server actor and worker actors) and
`ray.RoundRobinEngine` (Algorithm 1's scheduler driving worker actors). `create` picks the one
the algorithm declares, on the engine `--engine` names, inside `cluster(config)`. The simulated
engine (`--engine=simulated`, simulated.py) runs every algorithm: G workers fused on one device
under a virtual clock.
"""

import contextlib
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


@contextlib.contextmanager
def cluster(config):
  """--engine=ray: join --ray_address or start an embedded Ray (shut down on the way out)."""
  if config.engine != "ray":
    yield
    return
  from easgd_jax.engines import ray_cluster

  started = ray_cluster.connect(config)
  try:
    yield
  finally:
    ray_cluster.shutdown(started)


def create(config, algorithm, dataset, params_host, sampler=None):
  """The engine for `algorithm` on --engine: the host scheduler, worker threads, or Ray."""
  from easgd_jax.algorithms import STEPS
  from easgd_jax.engines import steps, threads

  if config.engine == "ray":
    from easgd_jax.engines import ray

    if algorithm.driven_by == STEPS:  # round-robin EASGD: the local engine's sampler, indexed
      indexed = ray.IndexSampler(dataset.train_images, dataset.train_labels, config.seed)
      engine = ray.RoundRobinEngine(config, algorithm, indexed, params_host, dataset)
    else:
      engine = ray.AsyncEngine(config, algorithm, dataset, params_host)
    return engine
  if config.engine == "simulated":
    from easgd_jax.engines import simulated

    return simulated.SimulatedEngine(config, algorithm, dataset, params_host, sampler)
  if algorithm.driven_by == STEPS:
    return steps.StepEngine(config, algorithm, sampler, params_host)
  return threads.ThreadEngine(config, algorithm, dataset, params_host)
