"""The step-wise loop (sgd, easgd, sync_sgd, sync_easgd, model parallel): dispatch, and wait
for the devices only at evaluation and checkpoint points.

It samples a host batch, hands it to the algorithm and keeps the loss (still on device). At an
evaluation point it pulls the losses, scores the center (or the single model) on the test set
and writes one metrics row; at a checkpoint it saves the whole state with the samplers.
"""

import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from easgd_jax import checkpoints, devices, reporting
from easgd_jax.failures import Preempted, check_losses, check_weights


def train(config, sampler, algorithm, params_host, record, log, checkpointer, stop):
  """The step-wise loop: dispatch steps, wait for the devices only at evaluation points.

  In a multi-process run every process runs this loop in step with the others: gathering the
  losses, agreeing on a stop, checking the weights, saving and restoring are collectives that
  all processes reach at the same steps.
  """
  max_in_flight = getattr(algorithm, "max_in_flight", None)
  shared = jax.process_count() > 1
  state = algorithm.init(params_host)
  start, train_seconds, pending = 0, 0.0, []  # pending: (step, loss) since the last metrics row
  measured = [0, 0.0]  # (steps, seconds) of training, each launch's compiling first step left out
  restored = checkpointer and checkpointer.restore_latest(
    _checkpoint_arrays(state, sampler, algorithm)
  )
  if restored:
    arrays, saved = restored
    if shared:  # this process's generators: its rows of the last array
      *arrays, generators = arrays
      sampler.set_state(checkpoints.decode_generators(checkpoints.local_rows(generators)))
    else:
      sampler.set_state(saved["sampler"])
    state = checkpoints.like(state, arrays)
    start, train_seconds = saved["step"], saved["train_seconds"]
    measured = list(saved.get("throughput", measured))
    pending = [(step, np.asarray(values, np.float32)) for step, values in saved["pending_losses"]]
    logging.info("resuming from the checkpoint at step %d of %d", start, config.steps)
  log.start(keep_until=start if restored else None)
  if restored and not log.workdir and checkpointer.shared:  # process 1+: for its summary
    log.rows = [r for r in reporting.read_metrics(checkpointer.workdir) if r["step"] <= start]
  clock = time.perf_counter()
  warm = None  # train_seconds when this launch's first step had been dispatched (compiled)
  for step in range(start + 1, config.steps + 1):
    batch = sampler.next(config.batch_size)
    if step == config.inject_nan:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    state, loss = algorithm.step(state, batch)
    pending.append((step, loss))
    if warm is None:
      warm = (step, train_seconds + time.perf_counter() - clock)
    if max_in_flight and step % max_in_flight == 0:
      jax.block_until_ready(loss)  # CPU collectives: keep the queue short (devices.max_in_flight)
    evaluate_now = step % config.eval_every == 0 or step == config.steps
    save_now = checkpointer is not None and (
      (config.checkpoint_every and step % config.checkpoint_every == 0)
      or step == config.steps
      or (stop.signum is not None and not shared)  # several processes agree on a stop below
    )
    if not (evaluate_now or save_now):
      continue
    pending = _host_losses(pending, algorithm)  # the loop's only wait
    signum = _agreed_signal(stop.signum) if shared and checkpointer else stop.signum
    save_now = save_now or signum is not None
    train_seconds += time.perf_counter() - clock  # evaluation and checkpoints are left out
    launch = [step - warm[0], train_seconds - warm[1]]
    check_losses(pending, algorithm, config, checkpointer)
    if evaluate_now:
      train_loss = float(np.mean(np.concatenate([v for _, v in pending])))
      record(step, algorithm.eval_params(state), train_loss, train_seconds)
      pending = []
    if save_now:
      arrays = _checkpoint_arrays(state, sampler, algorithm)
      check_weights(arrays, step, config, checkpointer)
      saved = {
        **({} if shared else {"sampler": sampler.state()}),  # shared: rows of `arrays`
        "train_seconds": train_seconds,
        "throughput": [measured[0] + launch[0], measured[1] + launch[1]],
        "pending_losses": [(s, v.tolist()) for s, v in pending],
      }
      checkpointer.save(step, arrays, saved)
    if signum is not None:
      raise Preempted(signum, step, checkpointer.workdir)
    clock = time.perf_counter()
  if warm is not None:
    measured = [measured[0] + launch[0], measured[1] + launch[1]]
  return algorithm.eval_params(state), state, {"throughput": measured}


def _checkpoint_arrays(state, sampler, algorithm):
  """The arrays a checkpoint holds: the state's on the host, or, multi-process, global ones.

  With several processes pmap hands each process only its own replicas' rows, and Orbax saves
  from arrays spanning every replica: the rows are assembled into those, and each process's
  sampler generators (one per local data shard) travel beside them as rows of one more array.
  """
  if jax.process_count() == 1:
    return checkpoints.to_host(state)

  def spanning(leaf):
    if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
      return devices.put_replicas(leaf, algorithm.devices)
    return leaf  # already global (the state as initialized or restored), or the step count

  generators = checkpoints.encode_generators(sampler.state())
  leaves = [spanning(leaf) for leaf in jax.tree.leaves(state)]
  return [*leaves, devices.put_replicas(generators, algorithm.devices)]


def _host_losses(pending, algorithm):
  """`pending` (step, loss) pairs with every loss on the host: one value, or one per replica.

  pmap hands each process the losses of its own replicas; with several processes they are
  gathered (a collective, at the same steps in every process), so `train_loss` is the mean over
  all devices and a NaN names its replica whichever process drives it.
  """
  if jax.process_count() == 1:
    return [(step, _host_values(loss)) for step, loss in pending]
  waiting = [i for i, (_, loss) in enumerate(pending) if not isinstance(loss, np.ndarray)]
  if not waiting:  # only losses restored from a checkpoint, gathered before it was saved
    return pending
  rows = np.stack([np.asarray(pending[i][1]).reshape(-1) for i in waiting], axis=1)
  spanning = devices.put_replicas(rows, algorithm.devices)  # (replicas, steps waiting)
  everyone = multihost_utils.process_allgather(spanning, tiled=True)
  pending = list(pending)
  for column, i in enumerate(waiting):
    pending[i] = (pending[i][0], everyone[:, column])
  return pending


def _host_values(loss):
  """A step's loss on the host, flat: one value, or one per device (one process's devices)."""
  if isinstance(loss, np.ndarray):
    return loss.reshape(-1)
  return np.concatenate([np.asarray(s.data).reshape(-1) for s in loss.addressable_shards])


def _agreed_signal(signum):
  """The stop signal any process got, or None (a collective, at the same steps everywhere)."""
  everyone = multihost_utils.process_allgather(np.array(signum or 0, np.int32))
  return int(everyone.max()) or None
