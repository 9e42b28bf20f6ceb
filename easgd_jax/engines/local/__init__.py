"""--engine=local: every algorithm as devices and threads in this process.

Read off the algorithm's facts: a step-driven rule runs on the host scheduler (steps.py) on one
device, one replica per device (pmap; several processes with --num_processes; a worker of
--devices_per_worker devices has its replica on each), a model-parallel mesh, or workers that
are data x model meshes (--devices_per_worker with --model_parallel); a worker/master
rule in Algorithm 1's order on the same scheduler; an asynchronous worker/master rule as one
thread per worker, at most one per core on CPU devices (threads.py).
"""

from easgd_jax import data, devices
from easgd_jax.algorithms.base import ROUND_ROBIN, STEP_DRIVEN
from easgd_jax.engines.local import steps, threads
from easgd_jax.engines.loop import StepEngine


def create(config, rule, dataset, params_host):
  if rule.kind == STEP_DRIVEN:
    return StepEngine(_placed(config, rule, dataset, params_host))
  if rule.schedule == ROUND_ROBIN:
    sampler = data.Sampler(dataset, seed=config.seed)  # Algorithm 1, line 8: the host draws
    worker_devices = devices.worker_devices(config.num_devices)
    return StepEngine(steps.RoundRobin(config, rule, sampler, params_host, worker_devices))
  return threads.ThreadEngine(config, rule, dataset, params_host)


def mesh_shape(config, rule):
  """(data, model) devices of a model-parallel run: (1, M) for a rule with one replica, (P / M, M)
  for a data-parallel one."""
  data_parallel = config.num_devices // config.model_parallel if rule.data_parallel else 1
  return data_parallel, config.model_parallel


def _placed(config, rule, dataset, params_host):
  if config.model_parallel > 1 and config.devices_per_worker > 1:
    sampler = data.sampler(dataset, config, config.num_devices // config.model_parallel)
    return steps.WorkerMeshes(config, rule, sampler, params_host)
  if config.model_parallel > 1:
    shape = mesh_shape(config, rule)
    sampler = data.sampler(dataset, config, shape[0] if rule.data_parallel else None)
    return steps.Mesh(config, rule, sampler, params_host, shape)
  if not rule.data_parallel:
    return steps.Single(config, rule, data.Sampler(dataset, seed=config.seed), params_host)
  replicas = devices.replica_devices(config.num_devices)
  sampler = data.sampler(dataset, config, len(replicas), devices.local_replica_ids(replicas))
  return steps.Replicas(config, rule, sampler, params_host, replicas, config.devices_per_worker)
