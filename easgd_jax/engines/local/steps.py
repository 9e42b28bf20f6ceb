"""The local engine's host schedulers: one run step at a time, waiting for the devices only at
the trainer's points (engines/loop.py runs them).

Where the state lives, read off the algorithm's facts:

- `Single`: a step-driven rule with one replica, on one device.
- `Replicas`: a data-parallel rule, one replica per device, the phases pmapped over them (and
  over several processes: gathering the losses, agreeing on a stop and assembling the
  checkpoint arrays are collectives every process reaches at the same steps).
- `Mesh`: --model_parallel=M, one replica on a (data, model) mesh, each parameter placed by
  easgd_jax/partitioning.py and the phase compiled for it (GSPMD).
- `WorkerMeshes`: --devices_per_worker=D with --model_parallel=M, G workers that are each such
  a (D / M, M) mesh, the phases vmapped over the workers.
- `RoundRobin`: a worker/master rule in Algorithm 1's order: iteration t on worker t mod G,
  each worker's state on its own device and the master's on device 0, every transfer enqueued
  without waiting (the host never blocks between points).
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easgd_jax import checkpoints, collectives, devices, partitioning, schedule
from easgd_jax.engines.local import masters
from easgd_jax.engines.loop import Stepper, host_floats, host_values


class Single(Stepper):
  """One replica on one device: the step jitted as it is."""

  def __init__(self, config, rule, sampler, params_host, device=None):
    super().__init__(config, sampler)
    self.rule, self.device = rule, device or jax.devices()[0]
    self.devices = [self.device]
    self.state = devices.put(rule.init(params_host), self.device)
    self._phases = [jax.jit(fn) for fn in rule.phases]

  def step(self, t, batch_host):
    batch = devices.put(batch_host, self.device)
    self.state, loss = self._phases[self.rule.phase(t)](self.state, batch)
    return loss, None

  def eval_params(self):
    return self.rule.eval_params(self.state)

  def diagnostics(self):
    return host_floats(self.rule.diagnostics(self.state))

  def worker_points(self):
    point = self.rule.worker_point(self.state)
    return None if point is None else [point]


class Replicas(Stepper):
  """One replica per device, pmapped; `sampler` hands this process's batches, one per device.
  Workers of `per_worker` devices: each device holds its worker's replica, and the gradient is
  averaged over the worker's devices (collectives.worker_mean) before the replica's update."""

  def __init__(self, config, rule, sampler, params_host, replicas, per_worker=1):
    super().__init__(config, sampler)
    self.rule, self.devices, self.per_worker = rule, replicas, per_worker
    self.shared = jax.process_count() > 1
    self.max_in_flight = devices.max_in_flight(replicas)
    self.state = devices.replicate(rule.init(params_host), replicas, per_worker)
    self._pmapped = [devices.pmap(fn, replicas, per_worker) for fn in rule.phases]

  def step(self, t, batch_local):
    batch = devices.put_replicas(batch_local, self.devices, self.per_worker)
    self.state, loss = self._pmapped[self.rule.phase(t)](self.state, batch)
    return loss, None

  def eval_params(self):
    return self.rule.eval_params(devices.first_replica(self.state))

  def diagnostics(self):
    return host_floats(self.rule.diagnostics(devices.first_replica(self.state)))

  def worker_points(self):
    replicas = devices.local_replicas(self.state)[:: self.per_worker]  # one per worker
    found = [self.rule.worker_point(r) for r in replicas]
    return None if found[0] is None else found

  def host_losses(self, pending):
    """`pending` with every loss on the host: one value per replica (all processes).

    pmap hands each process the losses of its own replicas; with several processes they are
    gathered (a collective, at the same steps in every process), so `train_loss` is the mean
    over all devices and a NaN names its replica whichever process drives it.
    """
    if not self.shared:
      return super().host_losses(pending)
    waiting = [i for i, (_, loss, _) in enumerate(pending) if not isinstance(loss, np.ndarray)]
    if not waiting:  # only losses restored from a checkpoint, gathered before it was saved
      return pending
    rows = np.stack([host_values(pending[i][1]) for i in waiting], axis=1)
    spanning = devices.put_replicas(rows, self.devices)  # (replicas, steps waiting)
    everyone = multihost_utils.process_allgather(spanning, tiled=True)
    pending = list(pending)
    for column, i in enumerate(waiting):
      pending[i] = (pending[i][0], everyone[:, column], pending[i][2])
    return pending

  def agree(self, signum):
    """The stop signal any process got, or None (a collective, at the same steps everywhere)."""
    everyone = multihost_utils.process_allgather(np.array(signum or 0, np.int32))
    return int(everyone.max()) or None

  def checkpoint(self):
    """Multi-process, each process's sampler generators travel as rows of one more array."""
    if not self.shared:
      return super().checkpoint()
    return self.checkpoint_arrays(), {}

  def checkpoint_arrays(self):
    """The state's arrays by name; multi-process, global arrays plus the sampler generators.

    With several processes pmap hands each process only its own replicas' rows, and Orbax saves
    from arrays spanning every replica: the rows are assembled into those.
    """
    if not self.shared:
      return checkpoints.to_host(self.state)

    def spanning(leaf):
      if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
        return devices.put_replicas(leaf, self.devices)
      return leaf  # already global (the state as initialized or restored)

    arrays = {name: spanning(leaf) for name, leaf in checkpoints.named(self.state).items()}
    generators = checkpoints.encode_generators(self.sampler.state())
    arrays["sampler_generators"] = devices.put_replicas(generators, self.devices)
    return arrays

  def restore(self, arrays, record):
    if not self.shared:
      return super().restore(arrays, record)
    arrays = dict(arrays)
    generators = checkpoints.local_rows(arrays.pop("sampler_generators"))
    self.sampler.set_state(checkpoints.decode_generators(generators))
    self.state = checkpoints.like(self.state, arrays)


class Mesh(Stepper):
  """--model_parallel: one replica on a (data, model) mesh; the batch split over `data`."""

  def __init__(self, config, rule, sampler, params_host, mesh_shape):
    super().__init__(config, sampler)
    self.rule = rule
    self._stacked = rule.data_parallel  # its sampler then stacks one batch per data shard
    data, model = mesh_shape
    self.mesh = devices.mesh((data, model), (partitioning.DATA, partitioning.MODEL))
    self.devices = list(self.mesh.devices.flat)
    self.max_in_flight = devices.max_in_flight(self.devices)
    self.eval_placement = partitioning.replicated(self.mesh)  # test set: whole on every device
    self._batch_sharding = partitioning.batch_sharding(self.mesh)
    partitioning.check_divisible(params_host, model)
    placed = partitioning.shardings(params_host, self.mesh)
    shardings = partitioning.state_shardings(rule.init, params_host, placed, self.eval_placement)
    params = devices.put(params_host, placed)
    self.state = jax.jit(rule.init, out_shardings=shardings)(params)
    self._phases = [
      jax.jit(fn, out_shardings=(shardings, self.eval_placement)) for fn in rule.phases
    ]

  def step(self, t, batch_host):
    """batch_host: [b, ...], or [data, b, ...] from the data-parallel sampler (flattened)."""
    if self._stacked:
      batch_host = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch_host)
    batch = devices.put(batch_host, self._batch_sharding)
    self.state, loss = self._phases[self.rule.phase(t)](self.state, batch)
    return loss, None

  def eval_params(self):
    return self.rule.eval_params(self.state)

  def diagnostics(self):
    return host_floats(self.rule.diagnostics(self.state))

  def worker_points(self):
    return None


class WorkerMeshes(Stepper):
  """--devices_per_worker=D with --model_parallel=M: G workers, each a (D / M data x M model)
  mesh of its own devices, on one (workers, data, model) mesh. The rule's phases are vmapped
  over the workers, so its replica reductions run across them (collectives.py); each worker's
  replica is placed on its devices by partitioning.py and its batch split over its data axis,
  XLA (GSPMD) inserting the model-parallel collectives and the all-reduce across workers."""

  def __init__(self, config, rule, sampler, params_host):
    super().__init__(config, sampler)
    self.rule, self.num_workers = rule, config.num_workers
    shape = (self.num_workers, config.shards_per_worker, config.model_parallel)
    names = (collectives.AXIS, partitioning.DATA, partitioning.MODEL)
    self.mesh = devices.mesh(shape, names)
    self.devices = list(self.mesh.devices.flat)
    self.max_in_flight = devices.max_in_flight(self.devices)
    self.eval_placement = partitioning.replicated(self.mesh)  # test set: whole on every device
    self._batch_sharding = NamedSharding(self.mesh, P(collectives.AXIS, partitioning.DATA))
    per_worker = NamedSharding(self.mesh, P(collectives.AXIS))
    partitioning.check_divisible(params_host, config.model_parallel)
    stacked = jax.tree.map(lambda x: np.stack([np.asarray(x)] * self.num_workers), params_host)
    placed = partitioning.shardings(params_host, self.mesh, collectives.AXIS)
    init = jax.vmap(rule.init)
    shardings = partitioning.state_shardings(init, stacked, placed, per_worker)
    self.state = jax.jit(init, out_shardings=shardings)(devices.put(stacked, placed))
    self._phases = [
      jax.jit(jax.vmap(fn, axis_name=collectives.AXIS), out_shardings=(shardings, per_worker))
      for fn in rule.phases
    ]
    self._worker = jax.jit(_pick, static_argnums=1, out_shardings=self.eval_placement)

  def step(self, t, batch_host):
    """batch_host: [G * D / M, b, ...], one batch per data shard, worker-major."""
    batch_host = jax.tree.map(lambda x: x.reshape(self.num_workers, -1, *x.shape[2:]), batch_host)
    batch = devices.put(batch_host, self._batch_sharding)
    self.state, loss = self._phases[self.rule.phase(t)](self.state, batch)
    return loss, None

  def eval_params(self):
    return self.rule.eval_params(self._worker(self.state, 0))

  def diagnostics(self):
    return host_floats(self.rule.diagnostics(self._worker(self.state, 0)))

  def worker_points(self):
    found = [self.rule.worker_point(self._worker(self.state, j)) for j in range(self.num_workers)]
    return None if found[0] is None else found


def _pick(tree, j):
  return jax.tree.map(lambda x: x[j], tree)


class RoundRobin(Stepper):
  """Algorithm 1's host scheduler over a worker/master rule: worker t mod G, in order."""

  def __init__(self, config, rule, sampler, params_host, worker_devices):
    super().__init__(config, sampler)
    self.rule, self.devices = rule, worker_devices
    self.num_workers = len(worker_devices)
    compiled = masters.Compiled(rule)
    master = rule.master_init(params_host)
    self.master = masters.LockedMaster(compiled, master, worker_devices[0], self.num_workers)
    # No wait for a transfer: the host never blocks between points. Master and worker on one
    # device: the exchange and the step as one call, not three.
    fused = len(set(worker_devices)) == 1
    worker = rule.worker_init(params_host)
    self.workers = masters.Workers(compiled, self.master, worker, worker_devices, False, fused)

  @property
  def state(self):
    return {"master": self.master.state, "workers": list(self.workers.states)}

  def who(self, t):
    return schedule.round_robin(t, self.num_workers)

  def step(self, t, batch_host):
    j, own = self.who(t)
    self.workers.own[j] = own  # t // G: a resumed run's too
    loss, _ = self.workers.iterate(j, devices.put(batch_host, self.devices[j]))
    return loss, f"worker {j}"

  def eval_params(self):
    return self.rule.eval_params(self.master.state)

  def worker_points(self):
    return self.workers.points()

  def applied(self):
    return self.master.record.take()

  def checkpoint_arrays(self):
    return checkpoints.to_host(self.state)

  def checkpoint(self):
    record = {"samplers": self.sampler.state(), "version": self.master.version}
    return self.checkpoint_arrays(), {**record, "reads": list(self.workers.reads)}

  def restore(self, arrays, record):
    state = checkpoints.like(self.state, arrays)
    self.master.load(state["master"], record["version"])
    self.workers.states, self.workers.reads = state["workers"], list(record["reads"])
    self.sampler.set_state(record["samplers"])
    self.workers.fresh_views()  # a rule whose step reads the master reads it afresh
