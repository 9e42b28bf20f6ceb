"""--engine=simulated: a cluster of G workers simulated on one device under a virtual clock.

The arithmetic of all G workers runs fused on one device (steppers.py): every state stacked on
a leading axis, the algorithm's own pure rules inside one `lax.scan` per chunk. When is the
clock's business (clock.py, events.py): a cost model (`Costs`: compute per step, link latency
and bandwidth, the master's service time, jitter, stragglers) gives every iteration its virtual
time and, for the asynchronous worker/master family, the order of the master's updates and every
read's staleness. Rows carry `virtual_time_s` and the communication share, link and master
utilization, bytes sent and the peak bandwidth needed up to it; the summary adds the time to the
target in virtual seconds. The bytes are the real payload's: a step-driven rule's declared
transfers, a worker/master rule's message and reply pytrees (jax.eval_shape of its functions).

Only the order depends on the costs, so a run is a pure function of its config and seed: the
compute and service times measured here when --sim_compute_ms / --sim_service_us are unset are
written to config.json at the first launch and reused by every relaunch. The checkpoint holds
the stacked state and the samplers; the clock is recomputed from the config (its stream does not
depend on --steps), so a resumed run is bitwise the uninterrupted one. For the same reason a
finished step-driven run can be re-costed on another network without training again (`recost`).
"""

import dataclasses
import json
import os
import statistics
import time

import jax
import numpy as np
import optax

from easgd_jax import core, data, devices, reporting
from easgd_jax.algorithms.base import ASYNCHRONOUS, ROUND_ROBIN, STEP_DRIVEN
from easgd_jax.config import Config
from easgd_jax.engines.base import worker_seed
from easgd_jax.engines.loop import StepEngine
from easgd_jax.engines.simulated import clock, steppers
from easgd_jax.errors import ConfigError, DataError

BYTES_PER_GBIT = clock.BYTES_PER_GBIT
SCHEDULE_BYTES_PER_STEP = 400  # the event simulation's peak per iteration (measured: ~370)
SAFETY = 3  # the scan's carry, its new value and a checkpoint copy of the stacked state
SCHEDULE, STALENESS_PLOT = steppers.SCHEDULE, steppers.STALENESS_PLOT
TRANSFERS = steppers.TRANSFERS


def create(config, rule, dataset, params_host):
  check_memory(config, rule, params_host, dataset)
  if rule.kind == STEP_DRIVEN:  # its transfers are declared for the whole model's bytes
    args = (config, rule, dataset, params_host, costs(config), _bytes(params_host))
    shards = config.num_devices if rule.data_parallel else None
    return StepEngine(steppers.Replicas(*args, data.sampler(dataset, config, shards)))
  sample = dataset.take(np.arange(config.batch_size))
  payload = payload_bytes(rule, params_host, sample)
  args = (config, rule, dataset, params_host, costs(config), payload)
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
    node_size=config.sim_node_size,
    intra_latency_s=config.sim_intra_node_latency_us / 1e6,
    intra_bandwidth_bytes_s=config.sim_intra_node_bandwidth_gbps * BYTES_PER_GBIT,
    shared_link=config.sim_shared_link,
  )


def payload_bytes(rule, params_host, batch):
  """(message, reply) bytes of a worker/master rule's exchange, from the pytrees its functions
  return (shapes only, nothing computed): what its worker sends (worker_message when the
  exchange opens the step, else worker_step's message) and master_apply's reply."""
  master = jax.eval_shape(rule.master_init, params_host)
  worker = jax.eval_shape(rule.worker_init, params_host)
  if rule.opens_round:
    message = jax.eval_shape(rule.worker_message, worker)
  else:
    view = jax.eval_shape(rule.eval_params, master)
    message = jax.eval_shape(rule.worker_step, worker, view, batch)[1]
  who = jax.ShapeDtypeStruct((), np.int32)
  return _bytes(message), _bytes(jax.eval_shape(rule.master_apply, master, message, who)[1])


def recost(workdir, **changes):
  """A finished step-driven simulated run's metrics rows on another cluster, without training
  again: `changes` are --sim_* settings (sim_bandwidth_gbps=1.0, sim_node_size=8, ...). The
  arithmetic does not depend on them, only the clock, which is recomputed from config.json and
  the transfers the run declared (transfers.npz); the rows' clock columns are replaced.
  `reporting.summarize(rows, target_accuracy)` then gives the virtual seconds to a target."""
  given = [name for name in changes if not name.startswith("sim_")]
  if given:
    raise ConfigError(f"recost changes the clock only, the --sim_* settings; not --{given[0]}")
  path = os.path.join(workdir, TRANSFERS)
  if not os.path.exists(path):
    raise ConfigError(f"{workdir} holds no {TRANSFERS}: recost takes a finished step-driven run")
  with open(os.path.join(workdir, reporting.CONFIG)) as f:
    config = Config(**{**json.load(f), **changes}).validate()
  with np.load(path) as saved:
    found = [[] for _ in range(config.steps)]
    columns = (saved["step"], saved["num_bytes"], saved["overlap_steps"])
    for s, num_bytes, overlap in zip(*columns, strict=True):
      found[s].append((float(num_bytes), int(overlap)))
    replicas = int(saved["replicas"])
    # A run saved before the inner all-reduce was costed: its clock had none
    gradient_bytes = float(saved["gradient_bytes"]) if "gradient_bytes" in saved else 0.0
  found_costs = costs(config)
  inner_s = found_costs.intra_all_reduce_s(gradient_bytes, config.devices_per_worker)
  timing = clock.synchronous(found_costs, replicas, found, config.seed, inner_s)
  return [{**row, **timing.at(row["step"])} for row in reporting.read_metrics(workdir)]


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
