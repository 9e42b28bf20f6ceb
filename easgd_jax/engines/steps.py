"""The host scheduler: one `algorithm.step` per run step, waiting for the devices only at points.

It samples a host batch, hands it to the algorithm and keeps the loss (still on device). At an
evaluation or checkpoint point it pulls the losses and hands the trainer a Point. In a
multi-process run every process runs this loop in step with the others: gathering the losses,
agreeing on a stop and assembling the checkpoint arrays are collectives all processes reach at
the same steps.
"""

import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from easgd_jax import checkpoints, devices
from easgd_jax.engines import Point


class StepEngine:
  def __init__(self, config, algorithm, sampler, params_host):
    self.config, self.algorithm, self.sampler = config, algorithm, sampler
    self.state = algorithm.init(params_host)
    self.start, self.pending = 0, []  # pending: (step, loss) since the last evaluation
    self.shared = jax.process_count() > 1
    self._launch = (0, 0.0)  # (steps, seconds) of this launch after its compiling first step
    self.checkpointing = False  # the trainer sets it when the run has a workdir

  # --- checkpoints ----------------------------------------------------------------------------

  def checkpoint_arrays(self):
    """The state's arrays by name; multi-process, global arrays plus the sampler generators.

    With several processes pmap hands each process only its own replicas' rows, and Orbax saves
    from arrays spanning every replica: the rows are assembled into those, and each process's
    sampler generators (one per local data shard) travel beside them as rows of one more array.
    """
    tree = self.state._asdict()
    if not self.shared:
      return checkpoints.to_host(tree)

    def spanning(leaf):
      if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
        return devices.put_replicas(leaf, self.algorithm.devices)
      return leaf  # already global (the state as initialized or restored), or the step count

    generators = checkpoints.encode_generators(self.sampler.state())
    arrays = {name: spanning(leaf) for name, leaf in checkpoints.named(tree).items()}
    arrays["sampler_generators"] = devices.put_replicas(generators, self.algorithm.devices)
    return arrays

  def _record(self):
    return {} if self.shared else {"samplers": self.sampler.state()}  # shared: in the arrays

  def restore(self, arrays, record):
    if self.shared:  # this process's generators: its rows of their array
      arrays = dict(arrays)
      generators = checkpoints.local_rows(arrays.pop("sampler_generators"))
      self.sampler.set_state(checkpoints.decode_generators(generators))
    else:
      self.sampler.set_state(record["samplers"])
    fields = checkpoints.like(self.state._asdict(), arrays)
    self.state = type(self.state)(**fields)
    self.start = record["step"]
    self.pending = [(s, np.asarray(v, np.float32), None) for s, v in record["pending_losses"]]

  # --- the loop -------------------------------------------------------------------------------

  def run(self, at_point, tick, should_stop):
    config, algorithm = self.config, self.algorithm
    max_in_flight = getattr(algorithm, "max_in_flight", None)
    checkpointing = self.checkpointing
    clock = time.perf_counter()
    seconds = 0.0  # training seconds of this launch, evaluation and checkpoints left out
    warm = None  # (step, seconds) when this launch's first (compiling) step was dispatched
    pending = list(self.pending)
    for step in range(self.start + 1, config.steps + 1):
      batch = self.sampler.next(config.batch_size)
      if step == config.inject_nan:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      self.state, loss = algorithm.step(self.state, batch)
      pending.append((step, loss, self._who(step)))
      if warm is None:
        warm = (step, seconds + time.perf_counter() - clock)
      if max_in_flight and step % max_in_flight == 0:
        jax.block_until_ready(loss)  # CPU collectives: keep the queue short (devices.max_in_flight)
      tick(step)
      evaluate = step % config.eval_every == 0 or step == config.steps
      stopping = should_stop() if not self.shared else None
      save = checkpointing and (
        (config.checkpoint_every and step % config.checkpoint_every == 0)
        or step == config.steps
        or stopping
      )
      if not (evaluate or save):
        continue
      pending = self._host_losses(pending)  # the loop's only wait
      if self.shared and checkpointing:  # several processes agree on a stop here
        stopping = _agreed(should_stop())
        save = save or stopping
      seconds += time.perf_counter() - clock
      self._launch = (step - warm[0], seconds - warm[1])
      point = Point(step, seconds, pending, stopped=stopping)
      if evaluate:
        point.params = algorithm.eval_params(self.state)
        point.points = algorithm.worker_points(self.state)
      if save:
        point.checkpoint = (self.checkpoint_arrays(), self._record())
      at_point(point)
      if evaluate:
        pending = []
      if stopping:
        return
      clock = time.perf_counter()

  def _who(self, step):
    worker = getattr(self.algorithm, "worker", None)  # round-robin: iteration t's worker
    return f"worker {worker(step - 1)[0]}" if worker else None

  def throughput(self):
    return self._launch

  def final_params(self):
    return self.algorithm.eval_params(self.state)

  def _host_losses(self, pending):
    """`pending` with every loss on the host: one value, or one per replica (all processes).

    pmap hands each process the losses of its own replicas; with several processes they are
    gathered (a collective, at the same steps in every process), so `train_loss` is the mean
    over all devices and a NaN names its replica whichever process drives it.
    """
    if not self.shared:
      return [(s, _host_values(loss), who) for s, loss, who in pending]
    waiting = [i for i, (_, loss, _) in enumerate(pending) if not isinstance(loss, np.ndarray)]
    if not waiting:  # only losses restored from a checkpoint, gathered before it was saved
      return pending
    rows = np.stack([np.asarray(pending[i][1]).reshape(-1) for i in waiting], axis=1)
    spanning = devices.put_replicas(rows, self.algorithm.devices)  # (replicas, steps waiting)
    everyone = multihost_utils.process_allgather(spanning, tiled=True)
    pending = list(pending)
    for column, i in enumerate(waiting):
      pending[i] = (pending[i][0], everyone[:, column], pending[i][2])
    return pending


def _host_values(loss):
  """A step's loss on the host, flat: one value, or one per device (one process's devices)."""
  if isinstance(loss, np.ndarray):
    return loss.reshape(-1)
  return np.concatenate([np.asarray(s.data).reshape(-1) for s in loss.addressable_shards])


def _agreed(signum):
  """The stop signal any process got, or None (a collective, at the same steps everywhere)."""
  everyone = multihost_utils.process_allgather(np.array(signum or 0, np.int32))
  return int(everyone.max()) or None
