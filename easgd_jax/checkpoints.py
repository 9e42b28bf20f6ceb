"""Checkpoints: the whole training state in the workdir, with Orbax, and the way back from one.

A checkpoint holds every array of the algorithm's state (center, each local or replica, optimizer
and momentum state; for the asynchronous family the master and every worker) as plain host
arrays, and a JSON record of everything else: the step (for the async family the master's count
of finished iterations), each data sampler's generator position, the training seconds so far and
the losses since the last metrics row. The samplers are the run's only randomness (there are no
JAX keys: initialization happens once, from `--seed`), so resuming replays the same batches.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a process
killed mid-save leaves the previous checkpoints as they were. Arrays are stored by tensorstore and
the record as JSON: nothing is ever unpickled. A SHA-256 of every array is stored with it, so a
checkpoint whose bytes changed on disk is caught even where the format would still parse.
"""

import hashlib
import logging as std_logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from easgd_jax import devices
from easgd_jax.config import ConfigError


class _QuietOrbax(std_logging.Filter):
  """Orbax reports every save at INFO; a run's progress lines should not drown in them."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


std_logging.getLogger("absl").addFilter(_QuietOrbax())

FOLDER = "checkpoints"
SET_ASIDE = "unreadable_checkpoints"  # corrupted checkpoints are moved here, not deleted
MEANING = ("algorithm", "dataset", "model", "num_devices", "model_parallel", "synthetic_shape")


def to_host(tree):
  """Every leaf of `tree` as a NumPy array (device arrays gathered, ints as 0-d arrays)."""
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def like(template, host_leaves):
  """`host_leaves` placed exactly like `template`'s leaves (same devices, same shardings)."""
  leaves, treedef = jax.tree.flatten(template)
  if len(leaves) != len(host_leaves):
    raise ValueError(f"checkpoint holds {len(host_leaves)} arrays, the state has {len(leaves)}")
  placed = []
  for leaf, host in zip(leaves, host_leaves, strict=True):
    if isinstance(leaf, jax.Array):
      placed.append(devices.put(np.asarray(host, dtype=leaf.dtype), leaf.sharding))
    elif isinstance(leaf, np.ndarray):
      placed.append(np.array(host, dtype=leaf.dtype))
    else:
      placed.append(type(leaf)(host))  # a Python int such as the step
  return jax.tree.unflatten(treedef, placed)


def _digest(array):
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class Checkpointer:
  """Saves and restores (arrays, record) pairs under workdir/checkpoints, newest last."""

  def __init__(self, workdir, keep):
    self.workdir = workdir
    self.directory = os.path.abspath(os.path.join(workdir, FOLDER))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self):
    return list(self.manager.all_steps())

  def save(self, step, arrays, record):
    """Write checkpoint `step`: `arrays` a list of host arrays, `record` JSON-able."""
    arrays = [np.asarray(a) for a in arrays]
    record = dict(record, step=step, sha256=[_digest(a) for a in arrays])
    tree = {f"array_{i:05d}": a for i, a in enumerate(arrays)}
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(tree), record=ocp.args.JsonSave(record)),
      force=True,
    )
    self.manager.wait_until_finished()

  def restore_latest(self, template_arrays):
    """(arrays, record) of the newest readable checkpoint, or None when there is none.

    An unreadable checkpoint (truncated, corrupted, or not matching `template_arrays`) is
    reported, moved to workdir/unreadable_checkpoints, and the one before it is tried.
    """
    template = {f"array_{i:05d}": np.asarray(a) for i, a in enumerate(template_arrays)}
    for step in sorted(self.steps(), reverse=True):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), record=ocp.args.JsonRestore()
          ),
        )
        arrays = [np.asarray(restored.state[key]) for key in sorted(template)]
        record = restored.record
        if record.get("sha256") != [_digest(a) for a in arrays] or record.get("step") != step:
          raise ValueError("its arrays do not match the checksums saved with them")
      except Exception as error:  # any failure to read means: not usable, try the previous one
        aside = os.path.join(self.workdir, SET_ASIDE, str(step))
        logging.warning(
          "checkpoint %d in %s is unreadable (%s: %s); moved to %s, trying the previous one",
          step,
          self.directory,
          type(error).__name__,
          str(error).splitlines()[0][:200] if str(error) else "",
          aside,
        )
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        shutil.move(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
        continue
      return arrays, record
    return None


def check_same_experiment(saved, config):
  """ConfigError when the workdir's run differs from `config` in a flag that changes its meaning."""
  for flag in MEANING:
    old, new = saved.get(flag), config.to_dict()[flag]
    if isinstance(new, tuple):
      old = tuple(old) if old is not None else None
    if old != new:
      raise ConfigError(
        f"the workdir holds a run with --{flag}={_flag_value(old)}, not {_flag_value(new)}: "
        f"use another --workdir, or the same --{flag} to resume it"
      )


def _flag_value(value):
  return ",".join(map(str, value)) if isinstance(value, tuple) else value
