"""The simulated cluster's two ways of stepping: every state stacked on one device, each chunk of
up to CHUNK run steps one jitted `lax.scan`, the batches gathered on the device by the example
numbers the local engine's host samplers draw (same seeds, same streams).

- `Replicas` (step-driven rules): the rule's per-replica phases vmapped over the G replicas,
  whose all-reduces (easgd_jax.collectives) then reduce over the vmapped axis.
- `Workers` (worker/master rules): one worker's iteration per scan step, in the order the
  clock gives: Algorithm 1's (ROUND_ROBIN) or the discrete-event parameter server's
  (events.py). An exchange that opens the step applies `worker_message` at the master and the
  step uses the reply; otherwise the step runs against the worker's last reply (stacked per
  worker) and, on an exchange, its message goes to the master after it. Its memory model for
  unlocked masters: each write is applied whole, on arrival (torn reads and lost elements are
  the threads' business).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from easgd_jax import checkpoints, collectives, devices, reporting, schedule
from easgd_jax.algorithms.base import ROUND_ROBIN
from easgd_jax.engines.loop import Stepper, host_floats
from easgd_jax.engines.simulated import clock, events

CHUNK = 100  # iterations per dispatch: one lax.scan each
MAX_LENGTHS = 4  # scan lengths compiled as they come; beyond, chunks are split in binary pieces
SCHEDULE = "schedule.npz"  # in the workdir: the asynchronous family's event order
SCHEDULE_COLUMNS = ("worker", "own_step", "exchange", "time", "compute_s", "staleness", "update")
TRANSFERS = "transfers.npz"  # in the workdir: a step-driven run's transfers (simulated.recost)
STALENESS_PLOT = "staleness.png"


class Fused(Stepper):
  """What both share: the training set on the device, chunked scans, host losses."""

  chunk = CHUNK

  def __init__(self, config, dataset, costs, num_bytes):
    super().__init__(config, None)
    self.costs, self.num_bytes, self.num_workers = costs, num_bytes, config.num_devices
    self.device = jax.devices()[0]
    self.dataset, self.arrays = dataset, devices.put(dataset.device_arrays(), self.device)
    self._compiled = set()  # the scan lengths compiled so far
    self.first = True

  def describe(self):
    return f"{self.num_workers} workers simulated on {self.device}"

  def batch(self, xs):
    batch = self.dataset.gather(self.arrays, xs["index"])
    if jnp.issubdtype(batch["image"].dtype, jnp.floating):  # --inject_nan: images only
      batch["image"] = jnp.where(xs["poison"], jnp.nan, batch["image"])
    return batch

  def advance(self, step, count):
    pending = []
    for piece in self._lengths(count):
      xs = self.inputs(step, piece)
      xs["poison"] = np.arange(step, step + piece) + 1 == (self.config.inject_nan or 0)
      self.state, losses = self._scan(self.state, devices.put(xs, self.device))
      pending.append((step, piece, losses))
      step += piece
    if self.first:  # the first chunk of a launch compiles: wait, so the warm-up ends after it
      jax.block_until_ready(losses)
      self.first = False
    return pending

  def _lengths(self, count):
    """`count` iterations as scan lengths: itself when compiled already or while few lengths
    are, else binary pieces: points at varied distances (--checkpoint_every=33 beside
    --eval_every=100) would otherwise compile a scan for every distance; the numbers are the
    same either way."""
    if count in self._compiled or len(self._compiled) < MAX_LENGTHS:
      self._compiled.add(count)
      return [count]
    pieces = [1 << k for k in range(CHUNK.bit_length() - 1, -1, -1) if count & (1 << k)]
    self._compiled.update(pieces)
    return pieces

  def host_losses(self, pending):
    """[(step, values, who)] of every iteration, on the host."""
    out = []
    for entry in pending:
      if len(entry) == 3 and not isinstance(entry[1], int):  # restored, or on the host already
        out.append(entry)
        continue
      first, count, losses = entry
      values = np.asarray(losses, np.float32).reshape(count, -1)
      for k, who in enumerate(self.who(first, count)):
        out.append((first + k + 1, values[k], who))
    return out

  def checkpoint_arrays(self):
    return checkpoints.to_host({"state": self.state})

  def restore(self, arrays, record):
    self.state = checkpoints.like({"state": self.state}, arrays)["state"]
    for sampler, state in zip(self.samplers, record["samplers"], strict=True):
      sampler.set_state(state)

  def checkpoint(self):
    return self.checkpoint_arrays(), {"samplers": [s.state() for s in self.samplers]}

  def summary(self):
    """The whole run's clock: virtual time, shares, the costs used, the message size (the
    model's, which a step-driven rule's transfers are declared for; a worker's message)."""
    found = {f"sim_{k}": v for k, v in self.extra(self.config.steps).items()}
    found["sim_costs"] = dict(vars(self.costs))
    found["sim_message_bytes"] = self.num_bytes
    return found


def _stack(tree, count):
  return jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], count, axis=0), tree)


def _pick(tree, j):
  return jax.tree.map(lambda x: x[j], tree)


class Replicas(Fused):
  def __init__(self, config, rule, dataset, params_host, costs, num_bytes, sampler):
    super().__init__(config, dataset, costs, num_bytes)
    self.rule, self.samplers = rule, [sampler]
    # A worker of D devices (--devices_per_worker) is one replica stepping on its D shards'
    # batches together: the gradient of their mean loss is the mean of theirs, the worker's
    # inner all-reduce, which the clock costs on the node's fast links every step.
    self.replicas = config.num_workers if rule.data_parallel else 1
    self.state = devices.put(_stack(rule.init(params_host), self.replicas), self.device)
    phases = [jax.vmap(fn, axis_name=collectives.AXIS) for fn in rule.phases]

    def iteration(state, xs):
      return jax.lax.switch(xs["phase"], phases, state, self.batch(xs))

    self._scan = jax.jit(lambda state, xs: jax.lax.scan(iteration, state, xs))
    # The whole run's clock, once: its first n steps are the same whatever the total
    self.transfers = [rule.transfers(s, num_bytes) for s in range(config.steps)]
    # A worker of D devices all-reduces each step's gradient inside its node first
    self.inner_s = costs.intra_all_reduce_s(num_bytes, config.devices_per_worker)
    self.timing = clock.synchronous(costs, self.replicas, self.transfers, config.seed, self.inner_s)

  def summary(self):
    return {**super().summary(), "sim_inner_all_reduce_s": self.inner_s}

  def inputs(self, first, count):
    steps = range(first, first + count)
    index = np.stack([self.samplers[0].indices(self.config.batch_size) for _ in steps])
    index = index.reshape(count, self.replicas, -1)  # a worker's D shards, one after another
    return {"index": index, "phase": np.array([self.rule.phase(t) for t in steps], np.int32)}

  def who(self, first, count):
    return [None] * count

  def eval_params(self):
    return self.rule.eval_params(_pick(self.state, 0))

  def diagnostics(self):
    return host_floats(self.rule.diagnostics(_pick(self.state, 0)))

  def worker_points(self):
    found = [self.rule.worker_point(_pick(self.state, j)) for j in range(self.replicas)]
    return None if found[0] is None else found

  def extra(self, step):
    return self.timing.at(step)

  def write_outputs(self, workdir):
    """The transfers the clock costed, for re-costing the run on another network (recost)."""
    found = [(s, *transfer) for s, sent in enumerate(self.transfers) for transfer in sent]
    step, num_bytes, overlap = zip(*found, strict=True) if found else ((), (), ())
    columns = dict(step=step, num_bytes=num_bytes, overlap_steps=overlap, replicas=self.replicas)
    columns["gradient_bytes"] = self.num_bytes  # what a worker of D devices all-reduces inside
    arrays = {
      k: np.asarray(v, np.float64 if k.endswith("bytes") else np.int64) for k, v in columns.items()
    }
    reporting.save_arrays(os.path.join(workdir, TRANSFERS), arrays)


class Workers(Fused):
  def __init__(self, config, rule, dataset, params_host, costs, num_bytes, samplers):
    """`num_bytes`: (a message's, a reply's); `samplers`: Algorithm 1's one host stream
    (ROUND_ROBIN), or one per worker."""
    super().__init__(config, dataset, costs, num_bytes[0])
    self.reply_bytes = num_bytes[1]
    self.rule, self.samplers, count = rule, samplers, self.num_workers
    self.round_robin = rule.schedule == ROUND_ROBIN
    master = rule.master_init(params_host)
    views = () if rule.opens_round else _stack(rule.eval_params(master), count)
    # Each worker's exchange period from its clock speed, stragglers slower (a rule's own fact).
    self.periods = [int(p) for p in rule.periods(list(1 / costs.mean_step_s(count)))]
    worker = rule.worker_init(params_host)
    workers = [rule.with_period(worker, period) for period in self.periods]
    workers = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *workers)
    self.state = devices.put((master, workers, views), self.device)
    args = (costs, count, config.steps, self.num_bytes, rule.tau, config.seed)
    self.events = self.timing = None
    if self.round_robin:  # the whole run's clock, once (the prefix property)
      self.timing = clock.round_robin(*args, rule.opens_round, self.reply_bytes)
    else:
      self.events = events.events(
        *args[:4],
        self.periods,  # each worker's own tau
        config.seed,
        opens_round=rule.opens_round,
        locked=rule.locked,
        reply_bytes=self.reply_bytes,
      )
    self.recorded = self.reached = 0  # steps whose exchanges are in the applied record; done
    self.version, self.reads = 0, [0] * count  # the record's bookkeeping (round robin)

    def iteration(carry, xs):
      master, workers, views = carry
      w, exchange = xs["worker"], xs["exchange"]
      worker, batch = _pick(workers, w), self.batch(xs)
      if rule.opens_round:  # no exchange: the step reads the master, as a silent one may
        master, view = jax.lax.cond(
          exchange,
          lambda: rule.master_apply(master, rule.worker_message(worker), w),
          lambda: (master, rule.eval_params(master)),
        )
        worker, _, loss = rule.worker_step(worker, view, batch)
      else:
        view = _pick(views, w)
        worker, message, loss = rule.worker_step(worker, view, batch)
        master, view = jax.lax.cond(
          exchange, lambda: rule.master_apply(master, message, w), lambda: (master, view)
        )
        views = jax.tree.map(lambda s, x: s.at[w].set(x), views, view)
      workers = jax.tree.map(lambda s, x: s.at[w].set(x), workers, worker)
      return (master, workers, views), loss

    self._scan = jax.jit(lambda state, xs: jax.lax.scan(iteration, state, xs))

  def order(self, first, count):
    """(worker, its own step) of iterations first .. first + count - 1."""
    if self.round_robin:
      return schedule.round_robin(np.arange(first, first + count), self.num_workers)
    return self.events.worker[first : first + count], self.events.own_step[first : first + count]

  def inputs(self, first, count):
    b = self.config.batch_size
    who, own = self.order(first, count)
    if self.round_robin:
      index = np.stack([self.samplers[0].indices(b) for _ in range(count)])
      exchange = np.asarray(self.rule.sends(own))
    else:
      index = np.stack([self.samplers[w].indices(b) for w in who])
      exchange = self.events.exchange[first : first + count]
    return {"worker": np.asarray(who, np.int32), "exchange": exchange, "index": index}

  def who(self, first, count):
    return [f"worker {w}" for w in self.order(first, count)[0]]

  def eval_params(self):
    return self.rule.eval_params(self.state[0])

  def worker_points(self):
    _, workers, views = self.state
    found = [
      self.rule.worker_point(_pick(workers, j), None if self.rule.opens_round else _pick(views, j))
      for j in range(self.num_workers)
    ]
    return None if found[0] is None else found

  def advance(self, step, count):
    self.reached = step + count
    return super().advance(step, count)

  def applied(self):
    """The exchanges among the steps since the last call, in the order applied."""
    first, last, rule = self.recorded, self.reached, self.rule
    self.recorded = last
    if not self.round_robin:
      e = self.events
      picked = np.flatnonzero(e.exchange[first:last]) + first
      update = e.update[picked]
      columns = (e.worker[picked], e.own_step[picked], update - e.staleness[picked], update + 1)
      return np.stack(columns, axis=1).tolist()
    entries = []
    who, own = self.order(first, last - first)
    for j, d in zip(who.tolist(), own.tolist(), strict=True):
      if rule.sends(d):
        self.version += 1
        entries.append([j, d, self.reads[j], self.version])
        self.reads[j] = self.version
    return entries

  def checkpoint(self):
    arrays, record = super().checkpoint()
    versions = {"version": self.version, "reads": list(self.reads)}
    return arrays, {**record, **versions, "periods": list(self.periods)}

  def restore(self, arrays, record):
    super().restore(arrays, record)
    self.recorded = self.reached = record["step"]
    self.version, self.reads = record["version"], list(record["reads"])

  def extra(self, step):
    if self.round_robin:
      return self.timing.at(step)
    found = events.metrics(self.events, step)
    found.pop("mean_staleness", None)
    return found

  def summary(self):
    found = {**super().summary(), "sim_reply_bytes": self.reply_bytes}
    if self.rule.periods_from_speeds:
      found["exchange_periods"] = list(self.periods)
    if not self.round_robin:
      values, counts = events.staleness_histogram(self.events, self.config.steps)
      found["sim_staleness_histogram"] = {
        int(v): int(c) for v, c in zip(values, counts, strict=True)
      }
    return found

  def write_outputs(self, workdir):
    """The schedule (asynchronous order) and the staleness histogram's plot, in the workdir."""
    if self.round_robin:
      return
    steps = self.config.steps
    columns = {name: np.asarray(getattr(self.events, name))[:steps] for name in SCHEDULE_COLUMNS}
    reporting.save_arrays(os.path.join(workdir, SCHEDULE), columns)
    values, counts = events.staleness_histogram(self.events, steps)
    reporting.plot_histogram(
      values,
      counts,
      os.path.join(workdir, STALENESS_PLOT),
      xlabel="staleness (master updates since the worker's read)",
      title=f"{self.config.algorithm}, G = {self.num_workers}, simulated",
    )
