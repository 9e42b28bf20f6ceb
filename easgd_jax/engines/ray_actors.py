"""The Ray engine's actors and its connection to a cluster.

`Server` is the parameter server: W (async_sgd, hogwild) or W-bar (async_easgd, hogwild_easgd)
on its node's JAX device, running the algorithm's master rule (`apply`, `write`, `exchange`,
`add`). For async_sgd and async_easgd it is a serial actor (`max_concurrency=1`): Ray runs one of
its calls at a time, and that is the lock. For hogwild and hogwild_easgd it is a threaded actor
(`max_concurrency=G`) whose calls write one shared NumPy buffer in place, with no lock.

`Worker` is worker j: its own JAX device, the dataset loaded on its own node (a TFDS
`--data_dir` must exist on every node), worker j's seeded batch stream (the local engine's
`workers.worker_seed`), and the algorithm's worker rules. Weights travel through Ray's object
store as NumPy arrays (zero-copy between processes of one node).

Both build the algorithm from the run's Config, so the arithmetic is the local engine's jitted
rules, not a second copy of them.
"""

import os
import time

import jax
import numpy as np
import ray

from easgd_jax import algorithms, core, data, devices, models, workers

SERVER_CPUS = 0.25  # what each actor asks Ray for: several fit on a small node
WORKER_CPUS = 0.25


def worker_options(config):
  """A worker actor's request: a fraction of a CPU (several share a node), `--ray_worker_gpus`,
  and spread over the cluster's nodes rather than packed onto the driver's."""
  return Worker.options(
    num_cpus=WORKER_CPUS, num_gpus=config.ray_worker_gpus, scheduling_strategy="SPREAD"
  )


def _algorithm(config, num_classes, image_shape):
  """The run's algorithm, every worker slot on this process's first device."""
  model = models.create(config.model, num_classes)
  device = jax.local_devices()[0]
  kind = algorithms.REGISTRY[config.algorithm]
  algorithm = kind.from_config(config, core.make_loss_fn(model), [device] * config.num_devices)
  return algorithm, models.init_params(model, image_shape, config.seed)


def where():
  """Node address, process id, device and Ray node id of the calling actor, for the log (the
  nodes of a cluster on one machine share an address)."""
  node = ray.get_runtime_context().get_node_id()
  return (
    f"node {ray.util.get_node_ip_address()} pid {os.getpid()} {jax.local_devices()[0]} ({node})"
  )


def host(tree):
  """Device arrays to NumPy (Python ints stay ints)."""
  return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)


def on_device(tree, device):
  """NumPy arrays to `device` (Python ints stay ints)."""
  return jax.tree.map(lambda x: devices.put(x, device) if isinstance(x, np.ndarray) else x, tree)


@ray.remote
class Server:
  """The parameter server; one per run, on the driver's node."""

  def __init__(self, config, num_classes, image_shape, master):
    self.algorithm, params_host = _algorithm(config, num_classes, image_shape)
    self.algorithm.init(params_host)
    if not hasattr(self.algorithm, "shared"):  # Hogwild's buffer stays in host memory
      master = on_device(master, self.device)
    self.algorithm.load_master(master)
    self.applied = []  # [worker, its step, read_at] of every update, in the order applied

  @property
  def device(self):
    return self.algorithm.devices[0]

  def where(self):
    return where()

  def ping(self):
    return True

  # async_sgd and hogwild: read W, write an update; hogwild_easgd: read W-bar, add an increment.

  def pull(self):
    """(weights, version): a host copy of W (or W-bar) and the updates (exchanges) done."""
    algorithm = self.algorithm
    if hasattr(algorithm, "shared"):  # Hogwild: the buffer as it is, mid-write or not
      return algorithm.shared.flat.copy(), _version(algorithm)
    params, version = algorithm.read()
    return host(params), version

  def push(self, j, worker_step, update, read_at, reply):
    """The master's rule for one update; returns (staleness, the next pull or None)."""
    algorithm, staleness = self.algorithm, None
    if algorithm.name == "async_sgd":
      staleness = algorithm.apply(j, devices.put(update, self.device), read_at)
    elif algorithm.name == "hogwild":
      staleness = algorithm.write(j, update, read_at)
    else:  # hogwild_easgd: the worker measured its own staleness
      algorithm.add(j, worker_step, update)
    self.applied.append([j, worker_step, read_at])
    return staleness, (self.pull() if reply else None)

  # async_easgd: Eq. (2) and the read of W-bar, one worker at a time.

  def exchange(self, j, worker_step, x):
    center, before = self.algorithm.exchange(j, worker_step, devices.put(x, self.device))
    self.applied.append([j, worker_step, before])
    return host(center), before

  def snapshot(self):
    return host(self.algorithm.snapshot())

  def master_state(self):
    return host(self.algorithm.master_state()), list(self.applied)


def _version(algorithm):
  return algorithm.exchanges if algorithm.elastic else algorithm.updates


@ray.remote(concurrency_groups={"query": 1})
class Worker:
  """Worker j of an asynchronous run, or of round-robin EASGD (driven step by step)."""

  def __init__(
    self, config, j, server, worker_state, sampler_state, own_step, stream=None, restarted=False
  ):
    self.config, self.j, self.server = config, j, server
    dataset = data.load(config)  # on this node
    self.images, self.labels = dataset.train_images, dataset.train_labels
    self.algorithm, params_host = _algorithm(config, dataset.num_classes, dataset.image_shape)
    self.device = self.algorithm.devices[0]
    seed = stream or workers.worker_seed(config.seed, j)
    self.sampler = data.Sampler(self.images, self.labels, seed)
    if sampler_state is not None:
      self.sampler.set_state(sampler_state)
    self.step = own_step
    self.pipeline = config.ray_pipeline
    self.failure = None if restarted else config.failure_point  # injected once per run
    if config.algorithm in ("hogwild", "hogwild_easgd"):
      self.algorithm.init(params_host)  # lays out the flat buffer the exchange steps read
    self.state = None if worker_state is None else on_device(worker_state, self.device)
    self.read = None  # (weights, version) the next gradient is computed at (SGD family)
    self.in_flight = None  # the push (or exchange) not yet waited for, with --ray_pipeline

  def where(self):
    return where()

  def iterate(self):
    """One iteration against the server; returns (loss, staleness or None)."""
    if self.failure == (self.j, self.step):
      _die()
    batch = self.sampler.next(self.config.batch_size)
    name = self.algorithm.name
    if name in ("async_sgd", "hogwild"):
      loss, staleness = self._sgd_iteration(batch)
    else:
      loss, staleness = self._elastic_iteration(batch)
    self.step += 1
    return float(loss), staleness

  def _sgd_iteration(self, batch):
    if self.read is None:
      self.read = ray.get(self.server.pull.remote())
    weights, version = self.read
    if self.algorithm.name == "hogwild":
      update, loss = self.algorithm.worker_update(0, weights, batch)
    else:
      grads, loss = self.algorithm.gradient(devices.put(weights, self.device), batch)
      update = host(grads)
    push = self.server.push.remote(self.j, self.step, update, version, True)
    if not self.pipeline:  # the next gradient starts from W right after this update
      staleness, self.read = ray.get(push)
      return loss, staleness
    # One push in flight while the next gradient is computed: at the previous push's reply.
    previous, self.in_flight = self.in_flight, push
    if previous is None:
      return loss, None
    staleness, self.read = ray.get(previous)
    return loss, staleness

  def _elastic_iteration(self, batch):
    algorithm, worker = self.algorithm, self.state
    if not algorithm.exchanges_now(worker):
      worker, loss = algorithm.local_step(worker, batch)
      self.state = worker
      return loss, None
    if algorithm.name == "async_easgd":
      x = host(algorithm.point_of(worker))
      exchange = self.server.exchange.remote(self.j, worker.step, x)
      if not self.pipeline:
        center, before = ray.get(exchange)
      else:  # Eq. (1) with the previous exchange's read; this one's reply serves the next
        previous, self.in_flight = self.in_flight, exchange
        if previous is None:  # nothing read yet: its own point stands in (no elastic move)
          self.state, loss, _ = algorithm.exchange_step(worker, x, worker.last_seen, batch)
          self.state = self.state._replace(last_seen=worker.last_seen)
          return loss, None
        center, before = ray.get(previous)
      self.state, loss, staleness = algorithm.exchange_step(
        worker, devices.put(center, self.device), before, batch
      )
      return loss, staleness
    center, before = ray.get(self.server.pull.remote())  # hogwild_easgd: an unlocked read
    step = worker.step
    self.state, loss, staleness, increment = algorithm.hogwild_exchange_step(
      0, worker, center, before, batch
    )
    push = self.server.push.remote(self.j, step, increment, before, False)
    if self.pipeline:
      previous, self.in_flight = self.in_flight, push
      if previous is not None:
        ray.get(previous)
    else:
      ray.get(push)
    return loss, staleness

  def drain(self):
    """Wait for the push in flight (--ray_pipeline): the server then holds every update.
    Returns that push's staleness (SGD family), or None. A pending exchange reply of
    async_easgd is dropped: its next exchange starts the pipeline afresh."""
    previous, self.in_flight = self.in_flight, None
    if previous is None:
      return None
    reply = ray.get(previous)
    if self.algorithm.name in ("async_sgd", "hogwild"):
      staleness, self.read = reply
      return staleness
    return None

  def checkpoint(self):
    """(worker state, sampler state, own step) on the host: after `drain`, consistent."""
    state = None if self.state is None else host(self.state)
    return state, self.sampler.state(), self.step

  @ray.method(concurrency_group="query")  # answered while an iteration runs
  def point(self):
    """x^j now (the gap diagnostic), or None for the SGD family."""
    if self.state is None:
      return None
    return host(self.algorithm.point_of(self.state))

  # Round-robin EASGD: the driver sends the batch's indices and, at an exchange, the center.

  def weights(self):
    """(W^j, its optimizer state) on the host, for Eq. (2) on the driver."""
    return host((self.state.local, self.state.opt_state))

  def rr_step(self, batch, center):
    if self.failure == (self.j, self.step):
      _die()
    if not isinstance(batch, dict):  # the indices of the driver's sampler
      batch = {"image": self.images[batch], "label": self.labels[batch]}
    local, opt_state = self.state.local, self.state.opt_state
    center = None if center is None else devices.put(center, self.device)
    local, opt_state, loss = self.algorithm.worker_step(local, opt_state, center, batch)
    self.state = self.state._replace(local=local, opt_state=opt_state)
    self.step += 1
    return float(loss)


def _die():
  """--inject_failure on Ray: this worker's process ends, as a killed one or a lost node would.
  It waits a moment first: the reply of the step it finished just before is sent after that
  step returns, and a process killed then takes the reply with it (the driver counts that step
  as lost, although its update may have reached the server). The injected death is exact."""
  time.sleep(1)
  os._exit(1)
