"""Checkpoints: the whole training state in the workdir, with Orbax, and the way back from one.

A checkpoint holds every array of the algorithm's state (center, each local or replica, optimizer
and momentum state; for the asynchronous family the master and every worker) as plain host
arrays, and a JSON record of everything else: the step, each data sampler's generator position,
the training seconds, the losses since the last metrics row, the run's config and its row at
that step. The samplers are the run's only randomness (no JAX keys: initialization happens once,
from `--seed`), so resuming replays the same batches.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a process
killed mid-save leaves the previous checkpoints as they were; a save that fails (a full disk)
removes its temporary folder and raises OSError(ENOSPC) naming the checkpoint. Arrays are stored
by tensorstore and the record as JSON: nothing is ever unpickled. A SHA-256 of every array and
of the record is stored with them, so bytes changed on disk are caught where the format parses.

Multi-process runs (`sync_sgd`, `sync_easgd` over JAX's distributed runtime) give every process
the same workdir, on storage they all share. Every process calls `save` and `restore_latest` at
the same points with global arrays (sharded across the processes): Orbax writes each process's
shards and process 0 finalizes the checkpoint. The JSON record is written by process 0 alone, so
what differs between processes travels as arrays that Orbax saves like the weights: the sampler
generators as one row per replica (`encode_generators`), and each process's SHA-256 of its own
shards as one row per process (a 1-process checkpoint keeps whole-array digests in its record).
A checkpoint any process cannot read or verify is set aside by all of them together.
"""

import hashlib
import json
import logging as std_logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from easgd_jax import devices, workdir
from easgd_jax.errors import ConfigError, OlderCheckpoint


class _QuietOrbax(std_logging.Filter):
  """Orbax reports every save at INFO, and a failed write (a full disk) in each thread that met
  it, with a traceback, before the save raises it: the run's one line (cli.py) says that."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    return record.levelno >= std_logging.WARNING and "raised an exception" not in record.msg


std_logging.getLogger("absl").addFilter(_QuietOrbax())

FOLDER = "checkpoints"
SET_ASIDE = "unreadable_checkpoints"  # corrupted checkpoints are moved here, not deleted


# 4: the record keeps its step's metrics row; 3: the one-rule redesign (a worker/master run
# stores {master, workers}, the record carries the run's config and the applied-update count);
# 2: arrays by path name; 1 (no "format"): position. Format 3 is read too (it lacks the row).
FORMAT = 4
READS = (3, 4)


def path_name(path):
  """A pytree path as a name: `center/Dense_0/kernel`, `locals/3/Dense_0/bias`."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def named(tree):
  """{path name: leaf} of every leaf of `tree`, in the tree's order."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def to_host(tree):
  """{path name: NumPy array} of `tree` (device arrays gathered, ints as 0-d arrays)."""
  return {name: np.asarray(leaf) for name, leaf in named(tree).items()}


def like(template, arrays):
  """`arrays` ({path name: array}) placed exactly like `template`'s leaves (same devices,
  same shardings), as `template`'s pytree."""
  names = named(template)
  missing = sorted(set(names) - set(arrays))
  if missing:
    raise ValueError(f"the checkpoint has no {missing[0]} ({len(missing)} arrays missing)")
  treedef = jax.tree.structure(template)
  placed = []
  for name, leaf in names.items():
    host = arrays[name]
    if isinstance(host, jax.Array):  # multi-process: Orbax restored it with the leaf's sharding
      placed.append(host)
    elif isinstance(leaf, jax.Array):
      placed.append(devices.put(np.asarray(host, dtype=leaf.dtype), leaf.sharding))
    elif isinstance(leaf, np.ndarray):
      placed.append(np.array(host, dtype=leaf.dtype))
    else:
      placed.append(type(leaf)(host))  # a Python int such as the step
  return jax.tree.unflatten(treedef, placed)


def _nest(flat):
  """{"a/b/c": x} -> {"a": {"b": {"c": x}}}: Orbax stores nested dicts under their names."""
  nested = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = nested
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return nested


def _unnest(nested, prefix=""):
  flat = {}
  for key, value in nested.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_unnest(value, f"{name}/"))
    else:
      flat[name] = value
  return flat


def _digest(array):
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _digests(arrays):
  return {name: _digest(a) for name, a in arrays.items()}


def _record_digest(record):
  """SHA-256 of the record's canonical JSON, itself left out: catches an edited or torn record."""
  content = {k: v for k, v in record.items() if k != "record_sha256"}
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def local_rows(array):
  """This process's rows of an array sharded on its leading axis, in row order, on the host."""
  if not isinstance(array, jax.Array):
    return np.asarray(array)
  if array.ndim == 0:
    return np.asarray(array.addressable_data(0))
  shards = sorted(array.addressable_shards, key=lambda s: [i.start or 0 for i in s.index])
  return np.concatenate([np.asarray(s.data) for s in shards])


def _local_digest(array):
  """32 bytes of SHA-256 over this process's part of `array` (a host array: all of it)."""
  return hashlib.sha256(np.ascontiguousarray(local_rows(array)).tobytes()).digest()


_WORDS = 4  # uint32 words of a 128-bit PCG64 integer


def encode_generators(states):
  """numpy PCG64 generator states as rows of uint32 words: state, inc, has_uint32, uinteger.

  A multi-process checkpoint carries each process's sampler generators as rows of an array (the
  JSON record is process 0's alone); `decode_generators` turns the rows back, bit for bit.
  """
  rows = []
  for state in states:
    if state["bit_generator"] != "PCG64":
      raise ValueError(f"only PCG64 generators can be encoded, not {state['bit_generator']}")
    numbers = [state["state"]["state"], state["state"]["inc"]]
    words = [(n >> (32 * k)) & 0xFFFFFFFF for n in numbers for k in range(_WORDS)]
    rows.append([*words, state["has_uint32"], state["uinteger"]])
  return np.array(rows, dtype=np.uint32).reshape(len(rows), 2 * _WORDS + 2)


def decode_generators(rows):
  """The generator states `encode_generators` turned into `rows`, as numpy's state dicts."""

  def number(words):
    return sum(int(w) << (32 * k) for k, w in enumerate(words))

  return [
    {
      "bit_generator": "PCG64",
      "state": {"state": number(row[:_WORDS]), "inc": number(row[_WORDS : 2 * _WORDS])},
      "has_uint32": int(row[-2]),
      "uinteger": int(row[-1]),
    }
    for row in np.asarray(rows)
  ]


def _all_processes(flag):
  """Per process, its `flag` (a bool): a collective, every process calls it at the same point."""
  return [bool(f) for f in multihost_utils.process_allgather(np.array(flag)).reshape(-1)]


def check_shared_workdir(workdir):
  """ConfigError on every process unless all processes of the run got the same workdir.

  A collective (multi-process runs only): each process's checkpoint shards must land in the
  folder process 0 finalizes, so the processes must share it.
  """
  if jax.process_count() == 1:
    return
  path = os.path.abspath(workdir) if workdir else ""
  mine = np.frombuffer(hashlib.sha256(path.encode()).digest(), np.uint32)
  everyone = multihost_utils.process_allgather(mine)
  if not (everyone == everyone[0]).all():
    raise ConfigError(
      f"--workdir={workdir or '(unset)'} differs between the processes: every process of a "
      f"multi-process run needs the same --workdir, on storage all of them share"
    )


def saved_steps(workdir):
  """Steps of the checkpoints in `workdir`, read from the folder names (nothing is opened)."""
  folder = os.path.join(workdir, FOLDER)
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def newest_config(workdir):
  """The run's config the newest checkpoint whose record verifies carries, or None."""
  folder = os.path.abspath(os.path.join(workdir, FOLDER))
  for record in (_record(folder, step) for step in reversed(saved_steps(workdir))):
    if record and record.get("record_sha256") == _record_digest(record) and "config" in record:
      return record["config"]


def _record(directory, step):
  """The JSON record of checkpoint `step` in `directory`, unverified; None if unreadable."""
  try:
    record = ocp.JsonCheckpointHandler().restore(epath.Path(directory) / str(step) / "record")
  except Exception:  # unreadable: set aside when the run restores
    record = None
  return record if isinstance(record, dict) else None


class Checkpointer:
  """Saves and restores (arrays, record) pairs under workdir/checkpoints, newest last.

  In a multi-process run every process builds one on the same workdir and calls `save` and
  `restore_latest` at the same points (see the module docstring).
  """

  def __init__(self, workdir, keep):
    self.workdir = workdir
    self.directory = os.path.abspath(os.path.join(workdir, FOLDER))
    self.shared = jax.process_count() > 1  # every process writes its own shards
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self):
    return list(self.manager.all_steps())

  def save(self, step, arrays, record):
    """Write checkpoint `step`: `arrays` {path name: array}, `record` JSON-able.

    One process: host arrays. Several: global jax.Arrays sharded across the processes, or host
    arrays every process holds alike (process 0 writes those, and the record).
    """
    if self.shared:
      arrays = {k: a if isinstance(a, jax.Array) else np.asarray(a) for k, a in arrays.items()}
      record = dict(record, step=step, format=FORMAT)
    else:
      arrays = {k: np.asarray(a) for k, a in arrays.items()}
      record = dict(record, step=step, format=FORMAT, sha256=_digests(arrays))
    record = json.loads(json.dumps(record))  # what JsonSave writes, so the digest matches it
    record["record_sha256"] = _record_digest(record)
    tree = {"arrays": _nest(arrays)}
    if self.shared:
      tree["sha256"] = self._process_digests(list(arrays.values()))
    args = ocp.args.Composite(state=ocp.args.StandardSave(tree), record=ocp.args.JsonSave(record))
    with workdir.writing(os.path.join(self.directory, str(step)), ".orbax-checkpoint-tmp"):
      self.manager.save(step, args=args, force=True)
      self.manager.wait_until_finished()

  def _process_digests(self, arrays):
    """A (processes, arrays, 8) uint32 array: row p holds process p's SHA-256 of its shards."""
    rows = np.frombuffer(b"".join(_local_digest(a) for a in arrays), np.uint32)
    first_devices = {}
    for device in jax.devices():
      first_devices.setdefault(device.process_index, device)
    heads = [first_devices[p] for p in sorted(first_devices)]  # one device per process
    return devices.put_replicas(rows.reshape(1, len(arrays), 8), heads)

  def restore_latest(self, template_arrays):
    """(arrays, record) of the newest readable checkpoint, or None when there is none.

    `template_arrays` is {path name: array}, like `arrays`. A checkpoint written by an older
    version raises OlderCheckpoint (one line). An unreadable one (truncated, corrupted, its
    record edited, not matching `template_arrays`) is reported, moved to
    workdir/unreadable_checkpoints, and the one before it is tried; with several processes only
    if every process read and verified its part is a checkpoint used."""
    for step in sorted(self.steps(), reverse=True):
      self._check_format(step)
      try:
        arrays, record = self._read(step, template_arrays)
        error = None
      except Exception as caught:  # any failure to read means: not usable, try the previous one
        arrays, record, error = None, None, caught
      failed = _all_processes(error is not None) if self.shared else [error is not None]
      if not any(failed):
        return arrays, record
      self._set_aside(step, error, [p for p, bad in enumerate(failed) if bad])
    return None

  def _check_format(self, step):
    record = _record(self.directory, step) or {}  # unreadable: _read sets it aside
    damaged = record.get("record_sha256", _record_digest(record)) != _record_digest(record)
    if "step" in record and record.get("format") not in READS and not damaged:  # damage: not age
      raise OlderCheckpoint(
        f"checkpoint {step} in {self.directory} was written by an older easgd_jax (format "
        f"{record.get('format', 1)}; this version reads formats 3 and 4): resume it with the "
        f"version that wrote it, or use another --workdir"
      )

  def _read(self, step, template_arrays):
    """The arrays and record of checkpoint `step`, verified; raises when they can't be used.

    Orbax's item handlers are called directly, not CheckpointManager.restore: the manager ends a
    restore with a barrier, which a process that failed to read would never reach.
    """
    template = {"arrays": _nest({k: _template(a) for k, a in template_arrays.items()})}
    if self.shared:
      template["sha256"] = self._process_digests(list(template_arrays.values()))
    folder = self.manager.directory / str(step)
    restored = ocp.StandardCheckpointHandler().restore(
      folder / "state", args=ocp.args.StandardRestore(template)
    )
    record = ocp.JsonCheckpointHandler().restore(folder / "record")
    arrays = _unnest(restored["arrays"])
    arrays = {name: arrays[name] for name in template_arrays}  # the template's order
    if self.shared:
      saved = local_rows(restored["sha256"]).tobytes()
      if saved != b"".join(_local_digest(a) for a in arrays.values()):
        raise ValueError("its arrays do not match the checksums saved with them")
    else:
      arrays = {k: np.asarray(a) for k, a in arrays.items()}
      if record.get("sha256") != _digests(arrays):
        raise ValueError("its arrays do not match the checksums saved with them")
    if record.get("step") != step:
      raise ValueError(f"its record is for step {record.get('step')}")
    if record.get("record_sha256") != _record_digest(record):
      raise ValueError("its record (samplers, workers, counters) does not match its checksum")
    return arrays, record

  def _set_aside(self, step, error, failed):
    """Report checkpoint `step` and move it to workdir/unreadable_checkpoints (process 0 moves)."""
    aside = os.path.join(self.workdir, SET_ASIDE, str(step))
    if error is not None:
      reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    else:
      reason = f"process(es) {', '.join(map(str, failed))} could not read or verify their part"
    logging.warning(
      "checkpoint %d in %s is unreadable (%s); moved to %s, trying the previous one",
      step,
      self.directory,
      reason,
      aside,
    )
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      shutil.rmtree(aside, ignore_errors=True)
      shutil.move(os.path.join(self.directory, str(step)), aside)
    if self.shared:  # nobody lists the folder before process 0 has moved it
      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.manager.reload()


def _template(array):
  """What Orbax restores into: global arrays keep their sharding, the rest become host arrays."""
  return (
    array if isinstance(array, jax.Array) and not array.is_fully_addressable else np.asarray(array)
  )
