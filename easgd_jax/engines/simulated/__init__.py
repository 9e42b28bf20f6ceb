"""--engine=simulated: a cluster of G workers simulated on one device under a virtual clock.

The arithmetic of all G workers runs fused on one device (steppers.py): every state stacked on
a leading axis, the algorithm's own pure rules inside one `lax.scan` per chunk. When is the
clock's business (clock.py, events.py): a cost model (`Costs`: compute per step, link latency
and bandwidth, the master's service time, jitter, stragglers) gives every iteration its virtual
time and, for the asynchronous worker/master family, the order of the master's updates and every
read's staleness. Rows carry `virtual_time_s` and the communication share, link and master
utilization up to it; the summary adds the time to the target in virtual seconds.

Only the order depends on the costs, so a run is a pure function of its config and seed: the
compute and service times measured here when --sim_compute_ms / --sim_service_us are unset are
written to config.json at the first launch and reused by every relaunch. The checkpoint holds
the stacked state and the samplers; the clock is recomputed from the config (its stream does not
depend on --steps), so a resumed run is bitwise the uninterrupted one.
"""

import dataclasses
import statistics
import time

import jax
import numpy as np
import optax

from easgd_jax import core, data, devices
from easgd_jax.algorithms.base import ASYNCHRONOUS, ROUND_ROBIN, STEP_DRIVEN
from easgd_jax.engines.local.threads import worker_seed
from easgd_jax.engines.loop import StepEngine
from easgd_jax.engines.simulated import clock, steppers
from easgd_jax.errors import DataError

BYTES_PER_GBIT = 1e9 / 8
SCHEDULE_BYTES_PER_STEP = 400  # the event simulation's peak per iteration (measured: ~370)
SAFETY = 3  # the scan's carry, its new value and a checkpoint copy of the stacked state
SCHEDULE, STALENESS_PLOT = steppers.SCHEDULE, steppers.STALENESS_PLOT


def create(config, rule, dataset, params_host):
  check_memory(config, rule, params_host, dataset)
  num_bytes = _bytes(params_host)  # a message: the weights, a gradient or an update
  args = (config, rule, dataset, params_host, costs(config), num_bytes)
  if rule.kind == STEP_DRIVEN:
    shards = config.num_devices if rule.data_parallel else None
    return StepEngine(steppers.Replicas(*args, data.sampler(dataset, config, shards)))
  if rule.schedule == ROUND_ROBIN:
    samplers = [data.Sampler(dataset, seed=config.seed)]  # Algorithm 1: the host draws
  else:
    samplers = [
      data.Sampler(dataset, worker_seed(config.seed, j)) for j in range(config.num_devices)
    ]
  return StepEngine(steppers.Workers(*args, samplers))


def costs(config):
  """The virtual clock's Costs from the --sim_* flags (measured ones already in `config`)."""
  return clock.Costs(
    compute_s=config.sim_compute_ms / 1e3,
    latency_s=config.sim_latency_us / 1e6,
    bandwidth_bytes_s=config.sim_bandwidth_gbps * BYTES_PER_GBIT,
    service_s=config.sim_service_us / 1e6,
    jitter=config.sim_jitter,
    stragglers=config.sim_stragglers,
    straggler_slowdown=config.sim_straggler_slowdown,
  )


def measure_costs(config, loss_fn, params_host, sample):
  """`config` with --sim_compute_ms and --sim_service_us measured on this machine where unset:
  the median of timed gradient steps of one worker at --batch_size, and of the master adding an
  update to the weights."""
  if config.sim_compute_ms is not None and config.sim_service_us is not None:
    return config
  device = jax.devices()[0]
  params = devices.put(params_host, device)
  batch = devices.put(sample, device)
  descent = optax.scale(-config.learning_rate)  # W <- W - eta * Delta W
  sgd_step = jax.jit(core.make_sgd_step(loss_fn, descent))
  opt_state = descent.init(params)
  add = jax.jit(optax.apply_updates)
  compute = _median_seconds(lambda: sgd_step(params, opt_state, batch))
  service = _median_seconds(lambda: add(params, params))
  return dataclasses.replace(
    config,
    sim_compute_ms=config.sim_compute_ms or round(compute * 1e3, 4),
    sim_service_us=config.sim_service_us or round(max(service * 1e6, 0.1), 2),
  )


def _median_seconds(call, repeats=15):
  jax.block_until_ready(call())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def check_memory(config, rule, params_host, dataset):
  """DataError (one line, exit 2) before the G copies are allocated, when they would not fit:
  G times one worker's state (a replica's whole state for a step-driven rule: its center,
  weights, optimizer and outer states; a worker's state and last reply for a worker/master
  rule), the master, the dataset, and the asynchronous order's schedule (--steps long)."""
  schedule = 0
  if rule.kind == STEP_DRIVEN:  # one replica's state, which the engine repeats G times
    per_worker, fixed = _bytes(jax.eval_shape(rule.init, params_host)), 0
  else:
    master = jax.eval_shape(rule.master_init, params_host)
    per_worker, fixed = _bytes(jax.eval_shape(rule.worker_init, params_host)), _bytes(master)
    if not rule.opens_round:
      per_worker += _bytes(jax.eval_shape(rule.eval_params, master))  # the last reply
    if rule.schedule == ASYNCHRONOUS:  # computed ahead for the whole run
      schedule = SCHEDULE_BYTES_PER_STEP * config.steps
  replicas = config.num_workers if rule.kind == STEP_DRIVEN else config.num_devices
  states = SAFETY * (replicas * per_worker + fixed)
  needed = states + schedule + _bytes(dataset.device_arrays())
  flags = f"--engine=simulated with --num_devices={config.num_devices} and --model={config.model}"
  if schedule > states:
    flags = f"--engine=simulated with --steps={config.steps} (its event schedule, ~400 B a step)"
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  limit = stats and stats.get("bytes_limit")
  if limit and needed > limit:
    raise DataError(
      f"{flags} need about {needed / 2**30:,.1f} GiB of {device.platform} memory but the "
      f"device has {limit / 2**30:,.1f} GiB; lower them"
    )
  data.check_memory(needed, flags)


def _bytes(tree):
  return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
