"""Engines decide who applies which update when; the one place where an engine is chosen.

Every engine interprets the facts an algorithm declares (algorithms/base.py) and nothing else,
and gives the trainer the face of engines/base.py. Here, and only here, `--engine` is read:

- local (local/): devices and threads in this process;
- ray (ray/): actors on a Ray cluster, for the worker/master family;
- simulated (simulated/): G workers fused on one device under a virtual clock.
"""

import contextlib

import numpy as np

from easgd_jax.algorithms.base import ASYNCHRONOUS, WORKER_MASTER
from easgd_jax.errors import ConfigError

NAMES = ("local", "ray", "simulated")
# Flags that belong to one engine, refused on the others.
OWN_FLAGS = {
  "ray": ("ray_address", "ray_pipeline", "ray_worker_gpus", "max_worker_restarts"),
  "simulated": tuple(
    f"sim_{name}"
    for name in "compute_ms latency_us bandwidth_gbps service_us jitter stragglers "
    "straggler_slowdown shared_link node_size intra_node_latency_us "
    "intra_node_bandwidth_gbps".split()
  ),
}


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
  """Whether `engine` runs this kind of algorithm: Ray runs the worker/master family."""
  return engine != "ray" or rule.kind == WORKER_MASTER


def injects_failures(engine, rule):
  """Whether --inject_failure has a worker to fail: at its own pace, or any actor on Ray."""
  return rule.kind == WORKER_MASTER and (engine == "ray" or rule.schedule == ASYNCHRONOUS)


def devices_to_emulate(config):
  """CPU devices to emulate for this run: one for a simulated cluster (its G workers share
  it), else as many as this process drives."""
  return 1 if config.engine == "simulated" else config.local_devices


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
  """--engine=ray: join --ray_address or start an embedded Ray (shut down on the way out)."""
  if config.engine != "ray":
    yield
    return
  from easgd_jax.engines.ray import cluster as ray_cluster

  started = ray_cluster.connect(config)
  try:
    yield
  finally:
    ray_cluster.shutdown(started)


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
