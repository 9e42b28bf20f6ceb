"""Device placement, in one place: which array lives where and how copies between devices are made.

Everything else asks this module for devices and never calls `jax.device_put` itself, so moving
from per-device placement to a mesh (`shard_map`) later touches this file only.
"""

import jax
from absl import logging

from easgd_jax.config import ConfigError


def emulate_cpu_devices(count):
  """Make the CPU backend expose `count` devices; call before jax first touches a device.

  Harmless on accelerator machines (it only shapes the CPU backend). If the backend is already
  up with fewer devices (e.g. a notebook that ran jax first), the caller gets a clear error.
  """
  try:
    jax.config.update("jax_num_cpu_devices", max(count, 1))
  except RuntimeError:
    pass  # backend already initialized: keep whatever it has; worker_devices reports shortfalls
  # XLA_FLAGS=--xla_force_host_platform_device_count (set by the tests) wins if it asks for more.


def worker_devices(num_workers, devices=None):
  """Worker j runs on device j mod D; returns the list, logging when workers must share."""
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


def put(tree, device):
  """Copy a pytree to `device`. Asynchronous for device arrays: the host does not wait."""
  return jax.device_put(tree, device)


def device_of(tree):
  """The single device every leaf of `tree` lives on (raises if they are spread out)."""
  found = {d for leaf in jax.tree.leaves(tree) for d in leaf.devices()}
  if len(found) != 1:
    raise ValueError(f"expected one device, found {sorted(map(str, found))}")
  return found.pop()
