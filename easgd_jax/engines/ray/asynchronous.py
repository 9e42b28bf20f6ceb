"""The Ray engine for an asynchronous worker/master rule: a parameter server and worker actors.

The server (actors.Server) holds the master on the driver's node; G worker actors, placed by
Ray with fractional CPU requests, iterate against it, each at its own pace. This driver hands
out the iterations (--steps in total across workers, like the local engine's tickets), keeps
two in flight per worker, and acts at the trainer's points:

- evaluation: at each of the plan's evaluation points it asks the server for the weights (the
  server may have taken the updates of iterations still in flight by then, at most two per
  worker);
- checkpoint and stop: it stops handing out iterations, waits for those in flight and for every
  pushed update (`drain`), then takes the server's state, each worker's state and sampler and
  the server's new record entries from that one consistent instant.

Fault tolerance. A worker that dies (its process killed, its node gone) is reported in the log,
the metrics (`workers_alive`) and the summary (`failed_workers`); the run goes on with the
others. `--max_worker_restarts=N` starts a new actor in its place, N times per worker: it
rejoins from the master's current weights with a fresh worker state (its own steps count from
0 again, as a new worker's do) and a fresh batch stream. The server's death stops the run
(ServerLost, exit 3); relaunching resumes from the last checkpoint.
"""

import collections
import itertools

import numpy as np
import ray
from absl import logging

from easgd_jax import checkpoints, data
from easgd_jax.engines import base
from easgd_jax.engines.base import Progress, Snapshot, Stopwatch, WorkerJoined, WorkerLost
from easgd_jax.engines.ray import actors
from easgd_jax.errors import ServerLost, WorkerFailure

IN_FLIGHT_PER_WORKER = 2  # a worker never waits for the driver to hand out its next iteration
SERVER_TIMEOUT_S = 30  # a server that doesn't answer a ping in this long is taken for dead


def died(error):
  return isinstance(error, ray.exceptions.RayActorError | ray.exceptions.RayTaskError)


def answer(ref):
  """The call's result, or None if its actor died."""
  try:
    return ray.get(ref)
  except Exception as error:
    if not died(error):
      raise
    return None


class AsyncEngine:
  eval_placement = None

  def __init__(self, config, rule, dataset, params_host):
    self.config, self.rule, count = config, rule, config.num_devices
    self.master_host, self.version = rule.master_init(params_host), 0
    worker_host = rule.worker_init(params_host)
    self.workers = [worker_host] * count  # host states, as of the last checkpoint
    self.samplers = [
      data.Sampler(dataset, base.worker_seed(config.seed, j)).state() for j in range(count)
    ]
    self.worker_steps = [0] * count  # iterations each worker slot finished, in all
    self.own = [0] * count  # its current actor's own steps (a restarted one counts from 0)
    self.reads = [0] * count
    self.histogram, self.restarts = collections.Counter(), [0] * count
    self.done, self.pending, self.stopwatch = 0, [], None
    self.server, self.actors, self.alive = None, [], set()
    self.final = None
    self.periods = None if rule.periods_from_speeds else [int(rule.tau)] * count  # else measured

  state = property(lambda self: self.master_host)

  def describe(self):
    return "a parameter server and worker actors on Ray"

  # --- checkpoints ----------------------------------------------------------------------------

  def checkpoint_arrays(self):
    return checkpoints.to_host({"master": self.master_host, "workers": self.workers})

  def restore(self, arrays, record):
    state = checkpoints.like({"master": self.master_host, "workers": self.workers}, arrays)
    self.master_host, self.workers = state["master"], state["workers"]
    self.version, self.done = record["version"], record["step"]
    self.worker_steps, self.own = list(record["worker_steps"]), list(record["own_steps"])
    self.reads, self.samplers = list(record["reads"]), list(record["samplers"])
    self.histogram = collections.Counter({int(s): c for s, c in record["staleness"].items()})
    self.pending = [(s, np.asarray(v, np.float64).reshape(-1), None) for s, v in record["losses"]]
    self.periods = record.get("periods", self.periods)

  # --- actors ---------------------------------------------------------------------------------

  def _start(self):
    here = ray.get_runtime_context().get_node_id()
    self.server = actors.Server.options(
      num_cpus=actors.SERVER_CPUS,
      max_concurrency=self.config.num_devices + 2 if actors.shared(self.rule) else 1,
      scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
        here, soft=True
      ),
    ).remote(self.rule, self.master_host, self.version)
    self.actors = [self._worker(j, self.workers[j], self.samplers[j]) for j in self.slots]
    server, *places = ray.get([a.where.remote() for a in [self.server, *self.actors]])
    logging.info("ray: parameter server on %s", server)
    for j, place in enumerate(places):
      logging.info("ray: worker %d on %s", j, place)
    self.alive = set(self.slots)
    if self.periods is None:  # the rule's periods from its workers' speeds, once, all at once
      speeds = ray.get([actor.speed.remote() for actor in self.actors])
      self.periods = [int(p) for p in self.rule.periods(speeds)]
      ray.get([a.set_period.remote(p) for a, p in zip(self.actors, self.periods, strict=True)])
      logging.info("ray: worker speeds %s steps/s: periods %s", np.round(speeds, 1), self.periods)

  @property
  def slots(self):
    return range(self.config.num_devices)

  def _view(self):
    """What a worker starts from: the master's weights (a closing rule steps against them)."""
    if self.rule.opens_round or actors.shared(self.rule):
      return None
    return self.rule.eval_params(self.master_host)

  def _worker(self, j, worker, sampler_state, stream=None):
    period = self.rule.tau if self.periods is None else self.periods[j]
    state = (worker, self._view(), self.reads[j], self.own[j], period)
    seed = stream or base.worker_seed(self.config.seed, j)
    template = self.master_host if actors.shared(self.rule) else None
    return actors.worker_options(self.config).remote(
      self.config,
      self.rule,
      j,
      self.server,
      state,
      sampler_state,
      seed,
      template,
      stream is not None,
    )

  def _ask_server(self, call):
    """The server's answer to `call`, or ServerLost if it died."""
    try:
      return ray.get(call)
    except ray.exceptions.RayActorError:
      self._check_server()
      raise

  def _check_server(self):
    try:
      ray.get(self.server.ping.remote(), timeout=SERVER_TIMEOUT_S)
    except (ray.exceptions.RayError, TimeoutError) as error:
      raise ServerLost(
        f"the parameter server died ({type(error).__name__}); the run stops: relaunch the "
        f"same command to resume from the last checkpoint"
      ) from None

  def _lost(self, j, error, done):
    """Worker j died: report it, restart it if allowed; returns the events."""
    self.alive.discard(j)
    why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
    own = self.own[j]
    logging.warning(
      f"ray: worker {j} died at run step {done} (worker {j} failed at its step {own}: {why})"
    )
    events = [WorkerLost(j, own, why, done)]
    if self.restarts[j] >= self.config.max_worker_restarts:
      logging.warning("ray: the run goes on with %d workers", len(self.alive))
      return events
    self.restarts[j] += 1
    weights, self.reads[j] = self._ask_server(self.server.checkpoint.remote())
    self.own[j], self.master_host = 0, weights
    stream = [self.config.seed, j, self.restarts[j]]  # not a replay of batches it already drew
    fresh = self.rule.worker_init(self.rule.eval_params(weights))
    self.actors[j] = self._worker(j, fresh, None, stream)
    ray.get(self.actors[j].where.remote())
    self.alive.add(j)
    logging.warning(
      f"ray: worker {j} restarted ({self.restarts[j]} of {self.config.max_worker_restarts}): "
      "its local state is gone; it rejoins from the master's weights"
    )
    return [*events, WorkerJoined(j, done)]

  # --- the loop -------------------------------------------------------------------------------

  def run(self, plan):
    if self.done >= plan.steps:
      return
    self._start()
    try:
      yield from self._loop(plan)
    finally:
      for actor in [*self.actors, self.server]:
        ray.kill(actor)

  def _loop(self, plan):
    done = issued = self.done
    in_flight = {}  # ref -> (worker, issue order): a dead worker's calls settle in order
    order = itertools.count()
    losses, staleness, seen = list(self.pending), [], set()
    self.stopwatch = watch = Stopwatch(done)
    stop, barrier = None, plan.next_checkpoint(done)
    while True:
      stop = stop or plan.stopping
      for j in sorted(self.alive):  # hand out iterations up to the barrier
        while (
          stop is None
          and issued < barrier
          and sum(1 for w, _ in in_flight.values() if w == j) < IN_FLIGHT_PER_WORKER
        ):
          in_flight[self.actors[j].iterate.remote()] = (j, next(order))
          issued += 1
      if not in_flight:
        if not self.alive:
          raise WorkerFailure(
            f"all {self.config.num_devices} workers died after {done} of {plan.steps} iterations"
          )
        final = done >= plan.steps
        snapshot = self._snapshot(done, watch, losses, staleness, evaluate=final)
        losses, staleness = [], []
        if plan.checkpointing:
          yield from self._checkpoint(done, snapshot)
        snapshot.stopped = stop
        if final:
          self.final = snapshot.params
        self.done = done
        with watch.paused():
          yield snapshot
        if final or stop is not None:
          return
        barrier = plan.next_checkpoint(barrier)
        continue
      ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.1)
      yield Progress(done)
      for ref in ready:
        if ref not in in_flight:  # settled already, with its worker's death
          continue
        j, _ = in_flight[ref]
        try:
          results, death = [ray.get(ref)], None
          del in_flight[ref]
        except Exception as error:
          if not died(error):
            raise
          results, death = self._settle(j, in_flight)
          self.alive.discard(j)  # not asked for its point if these results reach an evaluation
        for loss, stale in results:
          done += 1
          watch.reached = done
          losses.append((done, np.array([loss]), f"worker {j}, its step {self.own[j]}"))
          self.worker_steps[j] += 1
          self.own[j] += 1
          if stale is not None:
            staleness.append(stale)
            self.histogram[stale] += 1
          seen.add(j)
          if seen >= self.alive:
            watch.warm(done)
          if plan.evaluates(done) and done < plan.steps:
            snapshot = self._snapshot(done, watch, losses, staleness, evaluate=True)
            losses, staleness = [], []
            with watch.paused():
              yield snapshot
        if death is not None:
          error, lost = death
          self._check_server()
          issued -= lost
          yield from self._lost(j, error, done)

  def _settle(self, j, in_flight):
    """Worker j died: its calls in flight, in the order they were issued (an actor runs them
    in that order), are settled. The ones it finished before dying count; the rest are lost.
    Returns (their results, (the error, how many calls were lost))."""
    calls = sorted((n, ref) for ref, (w, n) in in_flight.items() if w == j)
    results, error, lost = [], None, 0
    for _, ref in calls:
      del in_flight[ref]
      if error is None:
        try:
          results.append(ray.get(ref, timeout=SERVER_TIMEOUT_S))
          continue
        except Exception as raised:
          if not (died(raised) or isinstance(raised, ray.exceptions.GetTimeoutError)):
            raise
          error = raised
      lost += 1
    return results, (error, lost)

  def _snapshot(self, done, watch, losses, staleness, evaluate):
    snapshot = Snapshot(done, watch.seconds(), list(losses))
    snapshot.applied = self._ask_server(self.server.take_record.remote())
    if evaluate:
      snapshot.params = self._ask_server(self.server.snapshot.remote())
      refs = [self.actors[j].point.remote() for j in sorted(self.alive)]
      points = [p for p in map(answer, refs) if p is not None]  # a dead one is left out
      snapshot.points = points or None
      summary = base.staleness_summary(staleness)
      snapshot.extra = {
        "staleness_median": summary and summary["median"],
        "staleness_max": summary and summary["max"],
        "worker_steps": list(self.worker_steps),
        "evaluations_skipped": 0,
        "workers_alive": len(self.alive),
      }
    return snapshot

  def _ask_workers(self, method, done):
    """({j: live worker j's answer to `method`}, the events of any found dead), with nothing in
    flight: a worker found dead is reported and, if allowed, restarted, and the new one answers
    in its place."""
    answers, events = {}, []
    while asking := [j for j in sorted(self.alive) if j not in answers]:
      refs = {j: getattr(self.actors[j], method).remote() for j in asking}
      for j, ref in refs.items():
        try:
          answers[j] = ray.get(ref)
        except Exception as error:
          if not died(error):
            raise
          events += self._lost(j, error, done)
    return answers, events

  def _checkpoint(self, done, snapshot):
    """The consistent instant: nothing in flight, every pushed update applied. Yields the
    events of workers found dead on the way; fills `snapshot.state`."""
    drained, events = self._ask_workers("drain", done)
    yield from events
    for stale in drained.values():
      if stale is not None:
        self.histogram[stale] += 1
    self.master_host, self.version = self._ask_server(self.server.checkpoint.remote())
    snapshot.applied += self._ask_server(self.server.take_record.remote())
    saved, events = self._ask_workers("checkpoint", done)
    yield from events
    for j, (worker, sampler, own, read_at) in saved.items():
      self.workers[j], self.samplers[j], self.own[j], self.reads[j] = worker, sampler, own, read_at
    for j in set(self.slots) - self.alive:  # a dead worker's slot: a fresh worker
      fresh = self.rule.worker_init(self.rule.eval_params(self.master_host))
      self.workers[j] = self.rule.with_period(fresh, self.periods[j])
    arrays = checkpoints.to_host({"master": self.master_host, "workers": self.workers})
    record = {
      "version": self.version,
      "worker_steps": list(self.worker_steps),
      "own_steps": list(self.own),
      "reads": list(self.reads),
      "samplers": list(self.samplers),
      "staleness": {str(s): c for s, c in sorted(self.histogram.items())},
      "evaluations_skipped": 0,
      "periods": self.periods,
    }
    snapshot.state = (arrays, record)

  def throughput(self):
    return self.stopwatch.throughput() if self.stopwatch else (0, 0.0)

  def final_params(self):
    return self.final if self.final is not None else self.rule.eval_params(self.master_host)

  def summary(self):
    found = {
      "staleness": base.staleness_summary(self.histogram),
      "worker_steps": list(self.worker_steps),
      "evaluations_skipped": 0,
    }
    if self.rule.periods_from_speeds:
      found["exchange_periods"] = self.periods
    return found

  def write_outputs(self, workdir):
    pass
