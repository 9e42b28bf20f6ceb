"""--engine=simulated: a cluster of G workers simulated on one device under a virtual clock.

The arithmetic of all G workers runs fused on one device (fused.py): their states stacked on a
leading axis, the training set on the device, and every iteration's batch gathered there by the
example numbers the local engine's host samplers draw (same seeds, same streams). Iterations
run as one jitted `lax.scan` per chunk of up to CHUNK, with the algorithms' own rules inside:

- round-robin `easgd` (Algorithm 1): worker t mod G's slice, `fused.round_robin`;
- `sgd` and the synchronous family (`sync_sgd`, `sync_easgd`, `local_sgd`, `diloco`): the
  algorithm's per-replica phases (`algorithm.phases`) vmapped over the G replicas, whose
  collectives (pmean, psum over devices.AXIS) then reduce over the vmapped axis;
- the asynchronous family (`async_sgd`, `hogwild`, `async_easgd`, `hogwild_easgd`, `downpour`):
  `algorithm.fused_iteration(master, worker, batch, exchange)`, one worker's iteration, in the
  order the virtual clock's parameter server applies them (`virtual_clock.events`).

When is the virtual clock's business (virtual_clock.py): a cost model (`Costs`: compute per step,
link latency and bandwidth, the master's service time, jitter, stragglers) gives every iteration
its virtual time, and for the asynchronous family the order of the master's updates and every
read's staleness. A run's rows carry `virtual_time_s` (when the row's iteration was applied on
the simulated cluster: its master update, or the end of its step) and the communication share,
link and master utilization up to it; the summary adds the time to the target accuracy in
virtual seconds and the staleness histogram.

Only the order depends on the costs, so a run is a pure function of its config and seed: the
compute and service times measured on this machine when `--sim_compute_ms` / `--sim_service_us`
are unset are written to config.json at the first launch and reused on every relaunch. The
checkpoint holds the stacked state and the samplers' generators; the clock is recomputed from the
config (its stream does not depend on --steps: `virtual_clock.events`), so a resumed run is
bitwise the uninterrupted one.
"""

import dataclasses
import os
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from easgd_jax import checkpoints, core, data, devices, reporting, workers
from easgd_jax.algorithms import WORKERS, RoundRobinEASGD
from easgd_jax.engines import Point, fused, virtual_clock

CHUNK = 100  # iterations per dispatch: one lax.scan each
MAX_LENGTHS = 4  # scan lengths compiled as they come; beyond, chunks are split in binary pieces
BYTES_PER_GBIT = 1e9 / 8
SCHEDULE = "schedule.npz"  # in the workdir: the asynchronous family's event order
STALENESS_PLOT = "staleness.png"
SCHEDULE_BYTES_PER_STEP = 400  # the event simulation's peak per iteration (measured: ~370)
SAFETY = 3  # the scan's carry, its new value and a checkpoint copy of the stacked state


def costs(config):
  """The virtual clock's Costs from the --sim_* flags (measured ones already in `config`)."""
  return virtual_clock.Costs(
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
  the median of timed SGD steps of one worker at --batch_size, and of the master adding an
  update to the weights."""
  if config.sim_compute_ms is not None and config.sim_service_us is not None:
    return config
  device = jax.devices()[0]
  params = devices.put(params_host, device)
  batch = devices.put(sample, device)
  sgd_step = jax.jit(core.make_sgd_step(loss_fn, optax.sgd(config.learning_rate)))
  opt_state = optax.sgd(config.learning_rate).init(params)
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


def check_memory(config, algorithm, params_host, dataset):
  """DataError (one line, exit 2) before the G copies are allocated, when they would not fit:
  G times one worker's state (a replica's whole state for the synchronous family: its center,
  weights, optimizer and outer states), the dataset, and the asynchronous family's schedule."""
  if algorithm.driven_by == WORKERS:
    master, worker = algorithm.fused_init(params_host)
    per_worker, fixed = _bytes(worker), _bytes(master)
    fixed += SCHEDULE_BYTES_PER_STEP * config.steps  # computed ahead for the whole run
  elif isinstance(algorithm, RoundRobinEASGD):
    per_worker = _bytes(params_host) + _bytes(jax.eval_shape(algorithm.optimizer.init, params_host))
    fixed = _bytes(params_host)  # the center
  else:  # one replica's state (fused: `init` holds one), which the engine repeats G times
    per_worker, fixed = _bytes(algorithm.init(params_host)._replace(step=None)), 0
  needed = SAFETY * (config.num_devices * per_worker + fixed) + _bytes(
    (dataset.train_images, dataset.train_labels)
  )
  flags = f"--engine=simulated with --num_devices={config.num_devices} and --model={config.model}"
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  limit = stats and stats.get("bytes_limit")
  if limit and needed > limit:
    raise data.DataError(
      f"{flags} need about {needed / 2**30:,.1f} GiB of {device.platform} memory but the "
      f"device has {limit / 2**30:,.1f} GiB; lower them"
    )
  data.check_memory(needed, flags)


def _bytes(tree):
  return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


class SimulatedEngine:
  """The engine face (engines/__init__.py) over a fused, clocked run."""

  def __init__(self, config, algorithm, dataset, params_host, sampler=None):
    """`sampler`: the local engine's host sampler of a step-driven algorithm (train.make_sampler:
    one stream, or one per data shard), whose example numbers the fused run gathers."""
    self.config, self.algorithm = config, algorithm
    self.checkpointing, self.workdir = False, None
    self.costs = costs(config)
    self.num_workers = config.num_devices
    self.num_bytes = _bytes(params_host)  # a message: the weights, a gradient or an update
    self.device = jax.devices()[0]
    images, labels = dataset.train_images, dataset.train_labels
    if isinstance(algorithm, RoundRobinEASGD):
      self.kind = "round_robin"
    else:
      self.kind = "workers" if algorithm.driven_by == WORKERS else "replicas"
    check_memory(config, algorithm, params_host, dataset)
    self.images, self.labels = devices.put((images, labels), self.device)
    build = {"round_robin": self._round_robin, "replicas": self._replicas, "workers": self._workers}
    self.samplers = [sampler]  # the asynchronous family: one per worker, made below
    build[self.kind](params_host, images, labels)
    self.start, self.pending, self._launch = 0, [], (0, 0.0)
    self._compiled = set()  # the scan lengths compiled so far

  @property
  def state(self):
    """The stacked state now (round robin: fused.Stacked; replicas: the algorithm's state with
    a leading axis of replicas; workers: (master, stacked workers))."""
    return self.stacked

  # --- the three kinds of run -------------------------------------------------------------

  def _round_robin(self, params_host, images, labels):
    algorithm = self.algorithm
    self.stacked = fused.stack(algorithm.init(params_host), self.device)
    scan = fused.round_robin(algorithm, self.images, self.labels)
    self._scan = lambda state, xs: scan(state, xs["index"], xs["poison"])
    self.tau = algorithm.tau

  def _replicas(self, params_host, images, labels):
    algorithm = self.algorithm
    data_parallel = algorithm.data_parallel
    self.replicas = self.num_workers if data_parallel else 1
    first = jax.tree.map(np.asarray, algorithm.init(params_host)._replace(step=None))
    if not data_parallel:  # sgd: one replica, given its leading axis
      first = jax.tree.map(lambda x: x[None], first)
    self.stacked = devices.put(
      jax.tree.map(lambda x: np.repeat(x, self.replicas, axis=0), first), self.device
    )
    phases = [jax.vmap(fn, axis_name=devices.AXIS) for fn in algorithm.phases]
    gather_images, gather_labels = self.images, self.labels

    def iteration(state, xs):
      batch = {
        "image": _poisoned(gather_images[xs["index"]], xs),
        "label": gather_labels[xs["index"]],
      }
      return jax.lax.switch(xs["phase"], phases, state, batch)

    self._scan = jax.jit(lambda state, xs: jax.lax.scan(iteration, state, xs))
    self.tau = getattr(algorithm, "tau", 1)

  def _workers(self, params_host, images, labels):
    algorithm, config, count = self.algorithm, self.config, self.num_workers
    master, worker = algorithm.fused_init(params_host)
    stacked_workers = jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], count, axis=0), worker)
    self.stacked = devices.put((master, stacked_workers), self.device)
    self.samplers = [
      data.Sampler(images, labels, workers.worker_seed(config.seed, j)) for j in range(count)
    ]
    gather_images, gather_labels = self.images, self.labels

    def iteration(carry, xs):
      master, stacked = carry
      w = xs["worker"]
      worker = jax.tree.map(lambda x: x[w], stacked)
      batch = {
        "image": _poisoned(gather_images[xs["index"]], xs),
        "label": gather_labels[xs["index"]],
      }
      master, worker, loss = algorithm.fused_iteration(master, worker, batch, xs["exchange"])
      stacked = jax.tree.map(lambda s, x: s.at[w].set(x), stacked, worker)
      return (master, stacked), loss

    self._scan = jax.jit(lambda state, xs: jax.lax.scan(iteration, state, xs))
    self.tau = getattr(algorithm, "tau", 1)
    self.events = self._events(config.steps)

  def _events(self, steps):
    return virtual_clock.events(
      self.costs,
      self.num_workers,
      steps,
      self.num_bytes,
      tau=self.tau,
      seed=self.config.seed,
      opens_round=self.algorithm.opens_round,
      locked=self.algorithm.locked,
    )

  # --- one chunk ------------------------------------------------------------------------------

  def _inputs(self, first, count):
    """The scan's inputs for iterations first .. first + count - 1 (0-based): the batches'
    example numbers, drawn from the host samplers in the local engine's order."""
    b, xs = self.config.batch_size, {}
    steps = np.arange(first, first + count)
    if self.kind == "workers":
      who = self.events.worker[first : first + count]
      xs["worker"] = who.astype(np.int32)
      xs["exchange"] = self.events.exchange[first : first + count]
      xs["index"] = np.stack([self.samplers[w].indices(b) for w in who])
    else:
      xs["index"] = np.stack([self.samplers[0].indices(b) for _ in steps])
      if self.kind == "replicas":
        xs["phase"] = np.array([self.algorithm.phase(int(t)) for t in steps], np.int32)
        if not self.algorithm.data_parallel:
          xs["index"] = xs["index"][:, None]
    xs["poison"] = steps + 1 == (self.config.inject_nan or 0)
    return devices.put(xs, self.device)

  def _who(self, first, count):
    if self.kind == "workers":
      return [f"worker {w}" for w in self.events.worker[first : first + count]]
    if self.kind == "round_robin":
      return [f"worker {t % self.num_workers}" for t in range(first, first + count)]
    return [None] * count

  # --- the engine face --------------------------------------------------------------------------

  def checkpoint_arrays(self):
    return checkpoints.to_host({"state": self.stacked})

  def _record(self):
    return {"samplers": [s.state() for s in self.samplers]}

  def restore(self, arrays, record):
    self.stacked = checkpoints.like({"state": self.stacked}, arrays)["state"]
    for sampler, state in zip(self.samplers, record["samplers"], strict=True):
      sampler.set_state(state)
    self.start = record["step"]
    self.pending = [(s, np.asarray(v, np.float32), None) for s, v in record["pending_losses"]]

  def run(self, at_point, tick, should_stop):
    config = self.config
    clock = time.perf_counter()
    seconds, warm, pending = 0.0, None, list(self.pending)
    step = self.start
    while step < config.steps:
      count = min(CHUNK, config.steps - step, _to_next_point(step, config))
      for piece in self._lengths(count):
        xs = self._inputs(step, piece)
        self.stacked, losses = self._scan(self.stacked, xs)
        pending.append(_Chunk(step, piece, losses))
        step += piece
      if warm is None:  # the first chunk of a launch compiles: leave it out of the throughput
        jax.block_until_ready(losses)
        warm = (step, seconds + time.perf_counter() - clock)
      tick(step)
      evaluate = step % config.eval_every == 0 or step == config.steps
      stopping = should_stop()
      save = self.checkpointing and (
        (config.checkpoint_every and step % config.checkpoint_every == 0)
        or step == config.steps
        or stopping
      )
      if not (evaluate or save):
        continue
      pending = self._host_losses(pending)
      seconds += time.perf_counter() - clock
      self._launch = (step - warm[0], seconds - warm[1])
      point = Point(step, seconds, pending, stopped=stopping, extra=self.clock_metrics(step))
      if evaluate:
        point.params = self._eval_params()
        point.points = self._worker_points()
      if save:
        point.checkpoint = (self.checkpoint_arrays(), self._record())
      at_point(point)
      if evaluate:
        pending = []
      if stopping:
        return
      clock = time.perf_counter()

  def _lengths(self, count):
    """`count` iterations as scan lengths: itself when compiled already or while few lengths
    are, else binary pieces: points at varied distances (--checkpoint_every=33 beside
    --eval_every=100) would otherwise compile a scan for every distance; the numbers are the
    same either way."""
    if count in self._compiled or len(self._compiled) < MAX_LENGTHS:
      self._compiled.add(count)
      return [count]
    pieces = _pieces(count)
    self._compiled.update(pieces)
    return pieces

  def _host_losses(self, pending):
    """[(step, values, who)] of every iteration, on the host."""
    out = []
    for entry in pending:
      if not isinstance(entry, _Chunk):  # restored from a checkpoint, or already on the host
        out.append(entry)
        continue
      first, count, losses = entry
      values = np.asarray(losses, np.float32).reshape(count, -1)
      for k, who in enumerate(self._who(first, count)):
        out.append((first + k + 1, values[k], who))
    return out

  def clock_metrics(self, step):
    """Virtual time and the shares of the first `step` iterations (the row's extra columns)."""
    if self.kind == "workers":
      found = virtual_clock.metrics(self.events, step)
      found.pop("mean_staleness", None)
      return found
    if self.kind == "round_robin":
      timing = virtual_clock.round_robin(
        self.costs, self.num_workers, step, self.num_bytes, self.tau, self.config.seed
      )
    else:
      timing = virtual_clock.synchronous(
        self.costs, self.replicas, step, self.num_bytes, self.tau, self.config.seed
      )
    return {
      "virtual_time_s": timing.makespan,
      "compute_share": timing.compute_share,
      "communication_share": timing.communication_share,
      "link_busy_share": timing.link_busy_share,
    }

  def _eval_params(self):
    if self.kind == "round_robin":
      return self.stacked.center
    if self.kind == "workers":
      return self.algorithm.fused_eval(self.stacked[0])
    first = jax.tree.map(lambda x: x[0], self.stacked)
    return first.center if hasattr(first, "center") else first.params

  def _worker_points(self):
    """Each worker's x^i beside the center, for the gap diagnostic (elastic families)."""
    count = self.num_workers
    pick = lambda tree, j: jax.tree.map(lambda x: x[j], tree)  # noqa: E731
    if self.kind == "round_robin":
      return self.algorithm.worker_points(fused.unstack(self.stacked, count))
    if self.kind == "workers":
      point = getattr(self.algorithm, "fused_point", None)
      return [point(pick(self.stacked[1], j)) for j in range(count)] if point else None
    if not hasattr(self.stacked, "locals"):
      return None
    state = self.stacked
    opt = getattr(state, "opt_states", None)
    if self.algorithm.elastic:
      from easgd_jax import elastic

      return [elastic.point(pick(state.locals, j), pick(opt, j)) for j in range(count)]
    return [pick(state.locals, j) for j in range(count)]

  def throughput(self):
    return self._launch

  def final_params(self):
    return self._eval_params()

  def write_outputs(self, workdir):
    """The schedule (asynchronous family) and the staleness histogram's plot, in the workdir."""
    if self.kind != "workers":
      return
    steps = self.config.steps
    write_schedule(os.path.join(workdir, SCHEDULE), self.events, steps)
    values, counts = virtual_clock.staleness_histogram(self.events, steps)
    reporting.plot_histogram(
      values,
      counts,
      os.path.join(workdir, STALENESS_PLOT),
      xlabel="staleness (master updates since the worker's read)",
      title=f"{self.config.algorithm}, G = {self.num_workers}, simulated",
    )

  def summary(self):
    """The whole run's clock: virtual time, shares, staleness histogram, the costs used."""
    found = {f"sim_{k}": v for k, v in self.clock_metrics(self.config.steps).items()}
    if self.kind == "workers":
      values, counts = virtual_clock.staleness_histogram(self.events, self.config.steps)
      found["sim_staleness_histogram"] = {
        int(v): int(c) for v, c in zip(values, counts, strict=True)
      }
    found["sim_costs"] = dataclasses.asdict(self.costs)
    found["sim_message_bytes"] = self.num_bytes
    return found


class _Chunk(NamedTuple):
  """A dispatched chunk's losses, still on the device."""

  first: int  # iterations done before it
  count: int
  losses: jax.Array  # [count] or [count, replicas]


def write_schedule(path, events, steps):
  """The asynchronous run's schedule, first `steps` iterations, as columns of a .npz (atomic):
  what a replay through the local engine's rules needs (tests/test_simulated.py does one)."""
  reporting.save_arrays(
    path, {name: np.asarray(getattr(events, name))[:steps] for name in SCHEDULE_COLUMNS}
  )


SCHEDULE_COLUMNS = ("worker", "own_step", "exchange", "time", "compute_s", "staleness", "update")


def _poisoned(images, xs):
  """--inject_nan: that iteration's batch all NaN (the trainer's divergence handling)."""
  return jnp.where(xs["poison"], jnp.nan, images)


def _pieces(count):
  """`count` (at most CHUNK) as scan lengths 64, 32, ..., 1, largest first."""
  return [1 << k for k in range(CHUNK.bit_length() - 1, -1, -1) if count & (1 << k)]


def _to_next_point(step, config):
  """Iterations from `step` to the next evaluation or checkpoint."""
  points = [config.eval_every - step % config.eval_every]
  if config.checkpoint_every:
    points.append(config.checkpoint_every - step % config.checkpoint_every)
  return min(points)
