"""Engines decide who applies which update when; the one place where an engine is chosen.

Every engine interprets the facts an algorithm declares (algorithms/base.py) and nothing else,
and gives the trainer the face of engines/base.py. Here, and only here, `--engine` is read:

- local (local/): devices and threads in this process;
- ray (ray/): actors on a Ray cluster: the worker/master family, and the data-parallel
  step-driven rules as replica actors with a quorum per round;
- simulated (simulated/): G workers fused on one device under a virtual clock.
"""

import contextlib

import numpy as np

from easgd_jax.algorithms.base import ASYNCHRONOUS, WORKER_MASTER
from easgd_jax.errors import ConfigError

NAMES = ("local", "ray", "simulated")
# Flags that belong to one engine, refused on the others.
OWN_FLAGS = {
  "ray": (
    "ray_address",
    "ray_pipeline",
    "ray_worker_gpus",
    "max_worker_restarts",
    "round_timeout_s",
    "min_workers",
  ),
  "simulated": tuple(
    f"sim_{name}"
    for name in "compute_ms latency_us bandwidth_gbps service_us jitter stragglers "
    "straggler_slowdown shared_link node_size intra_node_latency_us "
    "intra_node_bandwidth_gbps".split()
  ),
}


QUORUM_FLAGS = ("round_timeout_s", "min_workers")  # the step-driven rules' rounds on Ray


def check(config, kind=None):
  """ConfigError naming the flag, when --engine cannot run this algorithm (the class `kind`)
  with these flags."""
  if config.engine not in NAMES:
    raise ConfigError(f"--engine={config.engine} is unknown; choose one of: {', '.join(NAMES)}")
  defaults = type(config)()
  for engine, flags in OWN_FLAGS.items():
    given = [f for f in flags if getattr(config, f) != getattr(defaults, f)]
    if given and config.engine != engine:
      raise ConfigError(f"--{given[0]} applies to --engine={engine} (got --engine={config.engine})")
  if config.engine == "ray" and config.num_processes > 1:
    raise ConfigError("--engine=ray runs one driver process; use --num_processes=1")
  given = [f for f in QUORUM_FLAGS if getattr(config, f) != getattr(defaults, f)]
  if given and kind and kind.kind == WORKER_MASTER:
    raise ConfigError(
      f"--{given[0]} applies to the step-driven algorithms' rounds on --engine=ray (got "
      f"--algorithm={config.algorithm})"
    )
  if config.engine == "simulated":
    if config.num_processes > 1 or config.model_parallel > 1:
      raise ConfigError(
        "--engine=simulated runs one process on one device; use --num_processes=1 and "
        "--model_parallel=1"
      )
    if config.inject_failure is not None:
      raise ConfigError("--inject_failure applies to --engine=local and ray, not simulated")
    asynchronous = kind and kind.kind == WORKER_MASTER and kind.schedule == ASYNCHRONOUS
    if config.sim_shared_link and kind and not asynchronous:
      raise ConfigError(
        f"--sim_shared_link queues messages to a master from workers at their own pace; "
        f"--algorithm={config.algorithm} never has two in flight at once: drop the flag"
      )


def runs(engine, rule):
  """Whether `engine` runs this kind of algorithm: Ray runs the worker/master family and the
  data-parallel step-driven rules (a replica per worker actor)."""
  return engine != "ray" or rule.kind == WORKER_MASTER or rule.data_parallel


def injects_failures(engine, rule):
  """Whether --inject_failure has a worker to fail: at its own pace, or any actor on Ray."""
  if engine == "ray":
    return runs(engine, rule)
  return rule.kind == WORKER_MASTER and rule.schedule == ASYNCHRONOUS


def devices_to_emulate(config):
  """CPU devices to emulate for this run: one for a simulated cluster (its G workers share
  it), else as many as this process drives."""
  return 1 if config.engine == "simulated" else config.local_devices


def dispatches_inline(config, kind):
  """Whether CPU computations should run on their caller's thread (devices.py) for this run:
  for the local engine's worker threads, which wait for each call's result at once, so that a
  queue adds only a hand-off between threads to every call (+30-45% samples/s, BENCHMARKS.md
  (g)). Loops of the step-driven and round-robin rules keep the queue: it overlaps the host's
  next batch with the step (a one-device step-driven loop ran at half its speed inline)."""
  return config.engine == "local" and kind.kind == WORKER_MASTER and kind.schedule == ASYNCHRONOUS


def prepare(config, loss_fn, params_host, dataset):
  """`config` with what the engine measures at the first launch (the simulated clock's costs)."""
  if config.engine != "simulated":
    return config
  from easgd_jax.engines import simulated

  sample = dataset.take(np.arange(config.batch_size))
  return simulated.measure_costs(config, loss_fn, params_host, sample)


def measured_fields(config):
  """The fields the engine measured at the first launch, which every relaunch reuses."""
  return ("sim_compute_ms", "sim_service_us") if config.engine == "simulated" else ()


def virtual_clock(config):
  """Whether the run's rows carry a virtual clock (the simulated cluster's)."""
  return config.engine == "simulated"


def same_checkpoints(old, new):
  """Whether a checkpoint written on --engine=old resumes on --engine=new (a simulated
  cluster's stacked state is its own)."""
  return old == new or "simulated" not in (old, new)


@contextlib.contextmanager
def cluster(config):
  """--engine=ray: join --ray_address or start a private Ray (stopped on the way out)."""
  if config.engine != "ray":
    yield
    return
  from easgd_jax.engines.ray import cluster as ray_cluster

  private = ray_cluster.connect(config)
  try:
    yield
  finally:
    ray_cluster.shutdown(private)


def create(config, rule, dataset, params_host):
  """The engine --engine names, for `rule`."""
  if config.engine == "ray":
    from easgd_jax.engines import ray

    return ray.create(config, rule, dataset, params_host)
  if config.engine == "simulated":
    from easgd_jax.engines import simulated

    return simulated.create(config, rule, dataset, params_host)
  from easgd_jax.engines import local

  return local.create(config, rule, dataset, params_host)
