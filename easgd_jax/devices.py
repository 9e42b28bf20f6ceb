"""Device placement, in one place: which array lives where and how copies between devices are made.

Everything else asks this module for devices and never calls `jax.device_put` itself, so moving
from per-device placement to a mesh (`shard_map`) later touches this file only.

Workers and devices: the workers are the G replicas of an algorithm (EASGD's W^j, a data-parallel
replica), and `--num_devices` counts them. The devices are what they are placed on: the
accelerators, or on a CPU-only machine the CPU devices `emulate_cpu_devices` makes. Several
workers may share one device (`worker_devices`: worker j on device j mod D, with a warning), but
the data-parallel algorithms need one device per replica (their pmap runs one replica on each),
and a model-parallel mesh one per shard: with too few, `replica_devices` and `mesh` raise
ConfigError.
"""

import logging as std_logging
import math
import os

import jax
import numpy as np
from absl import logging

from easgd_jax import network
from easgd_jax.collectives import AXIS, INNER
from easgd_jax.errors import ConfigError


class _QuietTPUProbe(std_logging.Filter):
  """Drop jax's INFO line "Unable to initialize backend 'tpu'" (no libtpu: not a TPU host).

  With JAX_PLATFORMS unset jax tries every platform it knows, which is how it finds a GPU or a
  TPU when there is one, and logs that line on every machine without a TPU. Only it goes: a
  GPU that fails to initialize is still reported, a platform asked for in JAX_PLATFORMS still
  raises, and train.py's start-up line names the devices the run uses.
  """

  def filter(self, record):
    return not (
      record.levelno <= std_logging.INFO
      and record.getMessage().startswith("Unable to initialize backend 'tpu'")
    )


std_logging.getLogger("jax._src.xla_bridge").addFilter(_QuietTPUProbe())


def emulate_cpu_devices(count):
  """Make the CPU backend expose `count` devices; call before jax first touches a device.

  Harmless on accelerator machines (it only shapes the CPU backend). The count replaces any
  XLA_FLAGS=--xla_force_host_platform_device_count, smaller or larger. If the backend is already
  up (e.g. a notebook that ran jax first), this changes nothing and raises nothing: the devices
  stay as they are, and a shortfall shows later, where it matters: workers then share devices
  (`worker_devices` warns), and the algorithms that need one device per replica raise ConfigError
  (`replica_devices`, `mesh`).
  """
  try:
    jax.config.update("jax_num_cpu_devices", max(count, 1))
  except RuntimeError:
    pass  # backend already initialized: keep whatever it has (see the docstring)


def dispatch_cpu_calls_inline(inline):
  """Run each CPU computation on the thread that calls it (jax_cpu_enable_async_dispatch off)
  when `inline`, else queue it for XLA's threads; like `emulate_cpu_devices`, only before jax
  touches a device (later the backend keeps its way, and this changes nothing)."""
  from jax._src import xla_bridge  # jax has no public way to ask whether the backend is up

  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_cpu_enable_async_dispatch", not inline)


def dispatches_inline():
  """Whether this process's CPU computations run on their caller's thread."""
  return not jax.config.read("jax_cpu_enable_async_dispatch")


def check_platform():
  """ConfigError (one line) when jax has no backend for JAX_PLATFORMS (cuda on a machine with
  no GPU or no jax plugin for it), where jax raises a RuntimeError or a bare AssertionError."""
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as error:
    asked = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
    reason = str(error).splitlines()[0][:200] if str(error) else "jax has no backend for it here"
    raise ConfigError(
      f"JAX_PLATFORMS={asked}: {reason}; unset JAX_PLATFORMS, or install jax for that platform"
    ) from None


def worker_devices(num_workers, devices=None):
  """The device of each of `num_workers` workers: worker j runs on device j mod D.

  D counts `devices` (default: all of `jax.devices()`). With fewer devices than workers the
  workers share devices that way and this only logs a warning; it raises ConfigError only when
  there is no device at all.
  """
  devices = list(devices if devices is not None else jax.devices())
  if not devices:
    raise ConfigError("no JAX devices are visible; check the jax installation")
  if num_workers > len(devices):
    logging.warning(
      "%d workers share %d %s device(s): worker j runs on device j mod %d",
      num_workers,
      len(devices),
      devices[0].platform,
      len(devices),
    )
  return [devices[j % len(devices)] for j in range(num_workers)]


def host_threads(worker_devices, requested=0):
  """How many threads drive `worker_devices` from this process: `requested` (--worker_threads) up
  to one per device, else one per device, except that CPU devices get at most one per core this
  process may run on. More threads than cores made each thread wait for the GIL behind threads
  the OS had descheduled: 4 workers on 2 cores ran at 0.7-0.9x of 2 (the digits MLP,
  BENCHMARKS.md (g)); on 2 threads they run as fast as 2."""
  if requested:
    return min(requested, len(worker_devices))
  if any(device.platform != "cpu" for device in worker_devices):
    return len(worker_devices)
  return max(1, min(len(worker_devices), len(os.sched_getaffinity(0))))


def put(tree, device):
  """Copy a pytree to `device` (or to a sharding, or a pytree of them). Asynchronous."""
  return jax.device_put(tree, device)


def device_of(tree):
  """The single device every leaf of `tree` lives on (raises if they are spread out)."""
  found = {d for leaf in jax.tree.leaves(tree) for d in leaf.devices()}
  if len(found) != 1:
    raise ValueError(f"expected one device, found {sorted(map(str, found))}")
  return found.pop()


def mesh(shape, axis_names):
  """The first prod(shape) devices as a mesh of that shape: (data, model) for model parallelism,
  (workers, data, model) for workers that are data x model meshes."""
  from jax.sharding import Mesh

  available, needed = jax.devices(), math.prod(shape)
  if needed > len(available):
    raise ConfigError(
      f"a {' x '.join(f'{n} {a}' for n, a in zip(shape, axis_names, strict=True))} mesh needs "
      f"{needed} devices but only {len(available)} {available[0].platform} devices are visible; "
      f"lower --model_parallel or --num_devices"
    )
  return Mesh(np.array(available[:needed]).reshape(shape), axis_names)


def initialize_processes(config):
  """Join a multi-process run (JAX's distributed runtime; gloo collectives on CPU).

  Process 0's coordinator listens on the address the run names, not on every interface
  (network.bind_address); the others first check that a coordinator answers.
  """
  if config.num_processes == 1:
    return
  bind = None
  if config.process_id == 0:
    bind = network.bind_address(config.coordinator_address, config.coordinator_bind_address)
  else:
    network.wait_for_coordinator(config.coordinator_address, config.heartbeat_timeout_s)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    config.coordinator_address,
    num_processes=config.num_processes,
    process_id=config.process_id,
    # Processes that never all show up end the run as a silent one does, not after 300 s.
    initialization_timeout=config.heartbeat_timeout_s,
    heartbeat_timeout_seconds=config.heartbeat_timeout_s,
    # A process that fails must not wait minutes at the exit barrier for peers stuck in a
    # collective with it: give up on the barrier as soon as on a silent peer.
    shutdown_timeout_seconds=config.heartbeat_timeout_s,
    coordinator_bind_address=bind,
  )


# Replicated (pmap) placement: one copy of the state per device, stacked on a leading axis.
def replica_devices(count):
  """The first `count` devices of the run (all processes), for a pmap over them."""
  available = jax.devices()
  if count > len(available):
    raise ConfigError(
      f"--num_devices={count} but only {len(available)} {available[0].platform} devices are "
      f"visible across {jax.process_count()} process(es); lower --num_devices"
    )
  return available[:count]


def local_replica_ids(replicas):
  """Positions, in the replica list, of the devices this process drives."""
  return [i for i, d in enumerate(replicas) if d.process_index == jax.process_index()]


def pmap(fn, replicas, per_worker=1):
  """fn run on every replica device at once; its collectives (easgd_jax.collectives) name AXIS.

  With workers of `per_worker` devices (--devices_per_worker) the devices form a (workers,
  per_worker) mesh, AXIS across workers and INNER within one: fn runs on each device as under
  pmap (a shard_map over both axes; nested pmaps are no longer supported), the leading axis of
  every argument one entry per device, worker-major.
  """
  if per_worker == 1:
    return jax.pmap(fn, axis_name=AXIS, devices=replicas)
  sharding = _replica_sharding(replicas, per_worker)

  def each_device(*args):  # as under pmap: the device's own entry, without the leading axis
    found = fn(*jax.tree.map(lambda x: x[0], args))
    return jax.tree.map(lambda x: x[None], found)

  spec = sharding.spec
  return jax.jit(jax.shard_map(each_device, mesh=sharding.mesh, in_specs=spec, out_specs=spec))


def _replica_sharding(replicas, per_worker=1):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  if per_worker == 1:
    return NamedSharding(Mesh(np.array(replicas), (AXIS,)), PartitionSpec(AXIS))
  grid = np.array(replicas).reshape(-1, per_worker)
  return NamedSharding(Mesh(grid, (AXIS, INNER)), PartitionSpec((AXIS, INNER)))


def put_replicas(tree_local, replicas, per_worker=1):
  """Leading axis of each leaf = this process's replicas, one slice per local device."""
  sharding = _replica_sharding(replicas, per_worker)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree_local)


def replicate(tree_host, replicas, per_worker=1):
  """The same host pytree copied to each of this process's replica devices."""
  local = len(local_replica_ids(replicas))
  return put_replicas(
    jax.tree.map(lambda x: np.stack([np.asarray(x)] * local), tree_host), replicas, per_worker
  )


def first_replica(tree):
  """The copy on this process's first replica device, as a plain single-device array."""
  return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)


def local_replicas(tree):
  """This process's copies of a replicated (pmap) pytree, one single-device pytree each."""
  count = len(jax.tree.leaves(tree)[0].addressable_shards)
  return [jax.tree.map(lambda x, i=i: x.addressable_shards[i].data[0], tree) for i in range(count)]


def max_in_flight(replicas):
  """Steps the host may queue ahead of a pmap that runs a collective, or None for no limit.

  On CPU-emulated devices an all-reduce with many steps queued can miss its rendezvous and abort
  the process ("Termination timeout for all reduce"); waiting on a result every few steps keeps
  the queue short. Accelerators queue freely.
  """
  return 4 if replicas[0].platform == "cpu" else None
