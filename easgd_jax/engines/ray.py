"""The Ray engine (`--engine=ray`): the asynchronous family and round-robin EASGD across machines.

Asynchronous algorithms (`AsyncEngine`): a parameter server actor (ray_actors.Server) holds W
or W-bar on the driver's node; G worker actors, placed by Ray with fractional CPU requests,
iterate against it, each at its own pace. This driver hands out the iterations (`--steps` in
total across workers, like the local engine's tickets), keeps two in flight per worker, and
acts at the trainer's points:

- evaluation: every `eval_every` finished iterations it asks the server for W-bar (the server
  may have taken the updates of iterations still in flight by then, at most two per worker);
- checkpoint and stop: it stops handing out iterations, waits for those in flight and for every
  pushed update (`drain`), then takes the server's state, each worker's state and sampler and
  the server's log of applied updates from that one consistent instant.

Round-robin EASGD (`RoundRobinEngine`): the driver is Algorithm 1's host scheduler. It keeps
the center on its own device and the local engine's sampler, and drives worker j = t mod G in
order: at an exchange it fetches W^j, applies Eq. (2), and sends the center read with the batch's
indices; worker j gathers the batch from its own copy of the dataset and applies Eq. (1). The
schedule is the local engine's, so is the arithmetic (the same jitted rules).

Fault tolerance. A worker that dies (its process killed, its node gone) is reported in the log,
the metrics (`workers_alive`) and the summary (`failed_workers`); the run goes on with the others
(round-robin: over the live workers in order). `--max_worker_restarts=N` starts a new actor in
its place, N times per worker: it rejoins from the current center or shared weights, its own
local weights and optimizer state are gone, and it draws a fresh batch stream. The server's
death stops the run (`ServerLost`, exit 3); relaunching resumes from the last checkpoint.
"""

import collections
import itertools
import time

import numpy as np
import ray
from absl import logging

from easgd_jax import checkpoints, data, devices, workers
from easgd_jax.engines import Point, ray_actors
from easgd_jax.engines.steps import StepEngine
from easgd_jax.engines.threads import ThreadEngine
from easgd_jax.failures import ServerLost

IN_FLIGHT_PER_WORKER = 2  # a worker never waits for the driver to hand out its next iteration
SERVER_TIMEOUT_S = 30  # a server that doesn't answer a ping in this long is taken for dead


def _died(error):
  return isinstance(error, ray.exceptions.RayActorError | ray.exceptions.RayTaskError)


def _answer(ref):
  """The call's result, or None if its actor died."""
  try:
    return ray.get(ref)
  except Exception as error:
    if not _died(error):
      raise
    return None


class AsyncEngine(ThreadEngine):
  """Parameter server and worker actors for async_sgd, hogwild, async_easgd, hogwild_easgd.

  Checkpoints hold what the local engine's do ({"master", "workers"}, sampler states, worker
  steps, the applied log), so a run can move between the engines.
  """

  def __init__(self, config, algorithm, dataset, params_host):
    super().__init__(config, algorithm, dataset, params_host)
    self.shape = (dataset.num_classes, dataset.image_shape)
    self.samplers_state = [s.state() for s in self.samplers]
    self.worker_steps = [0] * config.num_devices
    self.applied, self.histogram = [], collections.Counter()
    self.failures, self.restarts, self.alive = [], [0] * config.num_devices, set()
    self.final, self.server = None, None
    self._launch = (0, 0.0)

  def restore(self, arrays, record):
    super().restore(arrays, record)
    self.samplers_state = record["samplers"]
    self.worker_steps = list(record["worker_steps"])
    self.applied = [list(entry) for entry in record.get("applied", ())]
    self.histogram = collections.Counter({int(s): c for s, c in record["staleness"].items()})

  # --- actors ---------------------------------------------------------------------------------

  def _start(self):
    config = self.config
    concurrency = config.num_devices + 2 if hasattr(self.algorithm, "shared") else 1
    here = ray.get_runtime_context().get_node_id()
    self.server = ray_actors.Server.options(
      num_cpus=ray_actors.SERVER_CPUS,
      max_concurrency=concurrency,  # 1: Ray's serial execution is async_sgd's lock
      scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
        here, soft=True
      ),
    ).remote(config, *self.shape, ray_actors.host(self.algorithm.master_state()))
    self.actors = [  # they start beside the server: each process imports JAX and loads data
      self._worker(j, ray_actors.host(self.workers[j]), self.samplers_state[j])
      for j in range(config.num_devices)
    ]
    server, *places = ray.get([a.where.remote() for a in [self.server, *self.actors]])
    logging.info("ray: parameter server on %s", server)
    for j, place in enumerate(places):
      logging.info("ray: worker %d on %s", j, place)
    self.alive = set(range(config.num_devices))

  def _worker(self, j, state, sampler_state, stream=None):
    return ray_actors.worker_options(self.config).remote(
      self.config,
      j,
      self.server,
      state,
      sampler_state,
      self.worker_steps[j],
      stream,
      restarted=stream is not None,
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
    """Worker j died: report it, restart it if allowed; returns True if it is back."""
    self.alive.discard(j)
    first_line = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    failure = workers.Failure(j, self.worker_steps[j], f"{type(error).__name__}: {first_line}")
    self.failures.append(failure)
    logging.warning("ray: worker %d died at run step %d (%s)", j, done, failure.describe())
    if self.restarts[j] >= self.config.max_worker_restarts:
      logging.warning("ray: the run goes on with %d workers", len(self.alive))
      return False
    self.restarts[j] += 1
    state = self._fresh_worker_state(j)
    stream = [self.config.seed, j, self.restarts[j]]  # not a replay of batches it already drew
    self.actors[j] = self._worker(j, state, None, stream)
    ray.get(self.actors[j].where.remote())
    self.alive.add(j)
    logging.warning(
      "ray: worker %d restarted (%d of %d): its local state is gone; it rejoins from the %s",
      j,
      self.restarts[j],
      self.config.max_worker_restarts,
      "center" if self.algorithm.elastic else "shared weights",
    )
    return True

  def _ask_workers(self, method, done):
    """{j: live worker j's answer to `method`}, with nothing in flight: a worker found dead is
    reported and, if allowed, restarted, and the new one answers in its place."""
    answers = {}
    while asking := [j for j in sorted(self.alive) if j not in answers]:
      refs = {j: getattr(self.actors[j], method).remote() for j in asking}
      for j, ref in refs.items():
        try:
          answers[j] = ray.get(ref)
        except Exception as error:
          if not _died(error):
            raise
          self._lost(j, error, done)
    return answers

  def _fresh_worker_state(self, j):
    if not self.algorithm.elastic:
      return None  # the SGD family reads W from the server at its first iteration
    center = self._ask_server(self.server.snapshot.remote())
    state = self.algorithm.init_worker(j, center)
    exchanges = self._ask_server(self.server.master_state.remote())[0]["exchanges"]
    return ray_actors.host(state._replace(step=self.worker_steps[j], last_seen=exchanges))

  # --- the loop -------------------------------------------------------------------------------

  def run(self, at_point, tick, should_stop):
    config = self.config
    if self.done >= config.steps:
      return
    self._start()
    try:
      self._loop(at_point, tick, should_stop)
    finally:
      for actor in [*self.actors, self.server]:
        ray.kill(actor)

  def _loop(self, at_point, tick, should_stop):
    config = self.config
    every = config.checkpoint_every if self.checkpointing else 0

    def barrier():  # tickets are handed out up to the next checkpoint step
      return min((done // every + 1) * every, config.steps) if every else config.steps

    done = issued = self.done
    in_flight = {}  # ref -> (worker, issue order): a dead worker's calls settle in order
    order = itertools.count()
    losses, staleness, seen = [], [], set()
    clock, paused, warm = time.perf_counter(), 0.0, None
    stop = None
    next_barrier = barrier()
    while True:
      if stop is None and should_stop():
        stop = should_stop()
      for j in sorted(self.alive):  # hand out iterations up to the barrier
        while (
          stop is None
          and issued < next_barrier
          and sum(1 for w, _ in in_flight.values() if w == j) < IN_FLIGHT_PER_WORKER
        ):
          in_flight[self.actors[j].iterate.remote()] = (j, next(order))
          issued += 1
      if not in_flight:
        if not self.alive:
          raise workers.WorkerFailure(
            f"all {config.num_devices} workers died after {done} of {config.steps} iterations; "
            f"first: {self.failures[0].describe()}"
          )
        pause = time.perf_counter()
        final = done >= config.steps
        # A checkpoint or a stop: the losses stay for the next row (and go into the record).
        point = self._point_now(done, clock, paused, losses, staleness, evaluate=final)
        if final:
          losses, staleness = [], []
          self.final = point.params
        if self.checkpointing:
          point.checkpoint = self._checkpoint(done)
        point.stopped = stop
        self._launch = self._measure(done, clock, paused, warm)
        at_point(point)
        if final or stop is not None:
          return
        paused += time.perf_counter() - pause
        next_barrier = barrier()
        continue
      ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.1)
      tick(done)
      for ref in ready:
        if ref not in in_flight:  # settled already, with its worker's death
          continue
        j, _ = in_flight[ref]
        try:
          results, death = [ray.get(ref)], None
          del in_flight[ref]
        except Exception as error:
          if not _died(error):
            raise
          results, death = self._settle(j, in_flight)
          self.alive.discard(j)  # not asked for its point if these results reach an evaluation
        for loss, stale in results:
          done += 1
          losses.append((done, np.array([loss]), f"worker {j}, its step {self.worker_steps[j]}"))
          self.worker_steps[j] += 1
          if stale is not None:
            staleness.append(stale)
            self.histogram[stale] += 1
          seen.add(j)
          if warm is None and seen >= self.alive:
            warm = (done, time.perf_counter() - clock - paused)
          if done % config.eval_every == 0 and done < config.steps:
            pause = time.perf_counter()
            point = self._point_now(done, clock, paused, losses, staleness, evaluate=True)
            losses, staleness = [], []
            at_point(point)
            paused += time.perf_counter() - pause
        if death is not None:
          error, lost = death
          self._check_server()
          issued -= lost
          self._lost(j, error, done)

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
          if not (_died(raised) or isinstance(raised, ray.exceptions.GetTimeoutError)):
            raise
          error = raised
      lost += 1
    return results, (error, lost)

  def _point_now(self, done, clock, paused, losses, staleness, evaluate):
    seconds = time.perf_counter() - clock - paused
    point = Point(done, seconds, self.pending + list(losses))
    if evaluate:
      self.pending = []
      point.params = self._ask_server(self.server.snapshot.remote())
      if self.algorithm.elastic:  # a worker that died since is left out (the loop reports it)
        refs = [self.actors[j].point.remote() for j in sorted(self.alive)]
        point.points = [p for p in map(_answer, refs) if p is not None]
      summary = workers.staleness_summary(staleness)
      point.extra = {
        "staleness_median": summary and summary["median"],
        "staleness_max": summary and summary["max"],
        "worker_steps": list(self.worker_steps),
        "evaluations_skipped": 0,
        "workers_alive": len(self.alive),
      }
    return point

  def _checkpoint(self, done):
    """The consistent instant: nothing in flight, every pushed update applied."""
    for stale in self._ask_workers("drain", done).values():
      if stale is not None:
        self.histogram[stale] += 1
    master, applied = self._ask_server(self.server.master_state.remote())
    self.applied, self.state = applied, master
    for j, (state, sampler, _) in self._ask_workers("checkpoint", done).items():
      self.workers[j], self.samplers_state[j] = state, sampler
    for j in set(range(self.config.num_devices)) - self.alive:  # a dead worker's slot
      self.workers[j] = self._fresh_worker_state(j) if self.algorithm.elastic else None
    arrays = {"master": master, "workers": self.workers}
    record = {
      "samplers": self.samplers_state,
      "worker_steps": list(self.worker_steps),
      "applied": applied,
      "staleness": {str(s): c for s, c in sorted(self.histogram.items())},
      "evaluations_skipped": 0,
    }
    return checkpoints.to_host(arrays), record

  def _measure(self, done, clock, paused, warm):
    seconds = time.perf_counter() - clock - paused
    if warm is None:
      return done - self.done, seconds
    return done - warm[0], seconds - warm[1]

  def throughput(self):
    return self._launch

  def final_params(self):
    return self.final

  def summary(self):
    return {
      "engine": "ray",
      "staleness": workers.staleness_summary(self.histogram),
      "worker_steps": list(self.worker_steps),
      "failed_workers": [vars(f) for f in self.failures],
      "restarted_workers": {str(j): n for j, n in enumerate(self.restarts) if n},
      "evaluations_skipped": 0,
    }


class RoundRobinEngine(StepEngine):
  """Algorithm 1 with the workers as actors; the driver keeps the center and the schedule."""

  def __init__(self, config, algorithm, sampler, params_host, dataset):
    super().__init__(config, algorithm, sampler, params_host)
    self.rule = algorithm  # self.algorithm is the _Scheduler while the run goes
    self.shape = (dataset.num_classes, dataset.image_shape)
    self.failures, self.restarts = [], [0] * config.num_devices
    self.actors, self.alive = None, set()

  # The state's locals live in the actors: fetched for a checkpoint or the gap diagnostic.
  def _gather(self):
    live = sorted(self.alive)
    refs = [self.actors[j].weights.remote() for j in live]
    fetched = dict(zip(live, map(_answer, refs), strict=True))  # None: died, not yet reported
    locals_, opt_states = list(self.state.locals), list(self.state.opt_states)
    for j in range(self.config.num_devices):
      local, opt_state = fetched.get(j) or (None, None)
      if local is None:  # a dead worker's slot holds the center and a fresh optimizer state
        local, opt_state = self.state.center, self.rule.optimizer.init(self.state.center)
      locals_[j], opt_states[j] = local, opt_state
    self.state = self.state._replace(locals=tuple(locals_), opt_states=tuple(opt_states))

  def checkpoint_arrays(self):
    if self.actors is not None:
      self._gather()
    return super().checkpoint_arrays()

  def run(self, at_point, tick, should_stop):
    if self.start >= self.config.steps:
      return
    self._start()
    scheduler = _Scheduler(self)
    algorithm = self.algorithm
    self.algorithm = scheduler  # StepEngine's loop calls step / eval_params / worker_points
    try:
      super().run(at_point, tick, should_stop)
    finally:
      self.algorithm = algorithm
      for actor in self.actors:
        ray.kill(actor)

  def _start(self):
    state = self.state
    self.own_steps = [
      (state.step - j + self.config.num_devices - 1) // self.config.num_devices
      for j in range(self.config.num_devices)
    ]
    self.actors = [self._worker(j) for j in range(self.config.num_devices)]
    for j, place in enumerate(ray.get([a.where.remote() for a in self.actors])):
      logging.info("ray: worker %d on %s", j, place)
    self.alive = set(range(self.config.num_devices))
    self.cursor = state.step % self.config.num_devices  # the next worker in order

  def _worker(self, j, fresh=False):
    state = self.state
    local, opt_state = (state.center, None) if fresh else (state.locals[j], state.opt_states[j])
    if opt_state is None:
      opt_state = self.rule.optimizer.init(local)
    from easgd_jax.algorithms.async_easgd import WorkerState

    worker_state = ray_actors.host(WorkerState(local, opt_state, self.own_steps[j], 0))
    return ray_actors.worker_options(self.config).remote(
      self.config, j, None, worker_state, None, self.own_steps[j], restarted=fresh
    )

  def _host_losses(self, pending):
    return [(s, v if isinstance(v, np.ndarray) else v.value(), w) for s, v, w in pending]

  def summary(self):
    return {
      "engine": "ray",
      "failed_workers": [vars(f) for f in self.failures],
      "restarted_workers": {str(j): n for j, n in enumerate(self.restarts) if n},
    }


class _Scheduler:
  """Stands in for RoundRobinEASGD inside StepEngine's loop: each step goes to an actor."""

  def __init__(self, engine):
    self.engine, self.rule = engine, engine.algorithm
    self.devices, self.max_in_flight = self.rule.devices, None
    self.outstanding = collections.deque()  # _Loss of the steps not yet settled
    self.last_worker = None

  def worker(self, step):  # StepEngine names the worker of the step just taken
    return self.last_worker, None

  def step(self, state, batch):
    engine, rule = self.engine, self.rule
    payload = batch["index"]
    if not np.all(np.isfinite(batch["image"])):  # --inject_nan: send the poisoned batch itself
      payload = {"image": batch["image"], "label": batch["label"]}
    while True:
      j = self._next_live()
      actor, exchange = engine.actors[j], engine.own_steps[j] % rule.tau == 0
      try:
        center, sent = state.center, None
        if exchange:  # lines 9-13: W^j to the center, Eq. (2), the center read to worker j
          local, opt_state = ray.get(actor.weights.remote())
          target = rule.center_device
          center = rule.center_step(state.center, *devices.put((local, opt_state), target))
          sent = ray_actors.host(state.center)
        ref = actor.rr_step.remote(payload, sent)
      except Exception as error:
        if not _died(error):
          raise
        for earlier in [o for o in self.outstanding if o.worker == j]:
          earlier.value()  # the step it died in, if it is one of these, is the one reported
        self._lost(j, error, state.step, engine.own_steps[j], actor)
        continue
      break
    loss = _Loss(ref, j, engine.own_steps[j], actor, self)
    engine.own_steps[j] += 1
    self.outstanding.append(loss)
    while len(self.outstanding) > IN_FLIGHT_PER_WORKER * max(len(engine.alive), 1):
      self.outstanding.popleft().value()
    engine.cursor, self.last_worker = (j + 1) % engine.config.num_devices, j
    return state._replace(center=center, step=state.step + 1), loss

  def _next_live(self):
    engine = self.engine
    if not engine.alive:
      raise workers.WorkerFailure(f"all {engine.config.num_devices} workers died")
    j = engine.cursor
    while j not in engine.alive:
      j = (j + 1) % engine.config.num_devices
    return j

  def _lost(self, j, error, step, own_step, actor):
    """Worker j's `actor` died in its step `own_step` (run step `step`): report it, restart it
    if allowed. Calls that fail after it on the same actor are lost with it, not reported."""
    engine = self.engine
    if j not in engine.alive or engine.actors[j] is not actor:
      return
    engine.alive.discard(j)
    failure = workers.Failure(j, own_step, type(error).__name__)
    engine.failures.append(failure)
    logging.warning("ray: worker %d died at run step %d (%s)", j, step, failure.describe())
    if engine.restarts[j] < engine.config.max_worker_restarts:
      engine.restarts[j] += 1
      engine.actors[j] = engine._worker(j, fresh=True)
      engine.alive.add(j)
      logging.warning(
        "ray: worker %d restarted (%d of %d): its local state is gone; it rejoins from the center",
        j,
        engine.restarts[j],
        engine.config.max_worker_restarts,
      )
    else:
      logging.warning("ray: round-robin goes on over the %d live workers", len(engine.alive))

  def eval_params(self, state):
    return state.center

  def worker_points(self, state):
    self.engine._gather()
    return self.rule.worker_points(self.engine.state)


class _Loss:
  """A worker's batch loss still in the object store; StepEngine reads it at its points. The
  step a worker died in has no loss (an empty array): its update is lost with the worker."""

  def __init__(self, ref, worker, own_step, actor, scheduler):
    self.ref, self.worker, self.own_step, self.actor = ref, worker, own_step, actor
    self.scheduler = scheduler
    self._value = None

  def value(self):
    if self._value is None:
      try:
        self._value = np.array([ray.get(self.ref)], np.float32)
      except Exception as error:
        if not _died(error):
          raise
        step = self.scheduler.engine.state.step
        self.scheduler._lost(self.worker, error, step, self.own_step, self.actor)
        self._value = np.zeros(0, np.float32)
    return self._value


class IndexSampler(data.Sampler):
  """The local engine's sampler, handing the indices along so a worker gathers the batch."""

  def next(self, batch_size):
    index = self.indices(batch_size)
    return dict(self.take(index), index=index)
