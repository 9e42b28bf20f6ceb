"""Algorithm 1 with its workers as Ray actors: the driver is the host scheduler.

The driver keeps the master (on its own device) and the local engine's sampler, and drives
worker j = t mod G in order (over the live workers, when some have died): at an exchange that
opens the step it fetches the worker's message, applies master_apply, and sends the reply with
the batch's indices; the worker gathers the batch from its own copy of the dataset and steps.
The schedule and the arithmetic (the same jitted rules) are the local engine's, so the run
equals it, and a run can resume on the other engine.
"""

import collections

import jax
import numpy as np
import ray
from absl import logging

from easgd_jax import checkpoints, data, devices
from easgd_jax.engines.base import WorkerJoined, WorkerLost
from easgd_jax.engines.local import masters
from easgd_jax.engines.loop import StepEngine, Stepper
from easgd_jax.engines.ray import actors
from easgd_jax.engines.ray.asynchronous import IN_FLIGHT_PER_WORKER, answer, died
from easgd_jax.errors import WorkerFailure


class IndexSampler(data.Sampler):
  """The local engine's sampler, handing the indices along so a worker gathers the batch."""

  def next(self, batch_size):
    index = self.indices(batch_size)
    return dict(self.dataset.take(index), index=index)


class RoundRobinEngine(StepEngine):
  """The step loop over `RoundRobinActors`, its actors started for a launch and killed after."""

  def run(self, plan):
    if self.start >= plan.steps:
      return
    self.stepper.start(self.start)
    try:
      yield from super().run(plan)
    finally:
      self.stepper.stop()


class RoundRobinActors(Stepper):
  chunk = 1  # each step waits on actors anyway; a failure is then seen at the step it happened

  def __init__(self, config, rule, sampler, params_host):
    super().__init__(config, sampler)
    self.rule, self.num_workers = rule, config.num_devices
    self.devices = [jax.local_devices()[0]]
    compiled = masters.Compiled(rule)
    master = rule.master_init(params_host)
    self.master = masters.LockedMaster(compiled, master, self.devices[0], self.num_workers)
    self.workers = [rule.worker_init(params_host)] * self.num_workers  # as of the last gather
    self.own, self.reads = [0] * self.num_workers, [0] * self.num_workers
    self.actors, self.alive, self.restarts = None, set(), [0] * self.num_workers
    self.outstanding = collections.deque()  # _Loss of the steps not yet settled
    self.events = []  # WorkerLost / WorkerJoined not yet handed to the trainer
    self.cursor = 0

  def describe(self):
    return "the host scheduler on the driver, worker actors on Ray"

  def start(self, step):
    self.own = [(step - j + self.num_workers - 1) // self.num_workers for j in range(len(self.own))]
    self.actors = [self._worker(j) for j in range(self.num_workers)]
    for j, place in enumerate(ray.get([a.where.remote() for a in self.actors])):
      logging.info("ray: worker %d on %s", j, place)
    self.alive = set(range(self.num_workers))
    self.cursor = step % self.num_workers

  def stop(self):
    for actor in self.actors or ():
      ray.kill(actor)
    self.actors = None

  @property
  def state(self):
    return {"master": self.master.state, "workers": self.workers}

  def _worker(self, j, fresh=False):
    worker = self.workers[j]
    if fresh:  # a new worker in its place, from the master's weights
      worker = self.rule.worker_init(actors.host(self.eval_params()))
      self.own[j] = 0
    state = (actors.host(worker), None, self.reads[j], self.own[j], self.rule.tau)
    return actors.worker_options(self.config).remote(
      self.config, self.rule, j, None, state, None, self.config.seed, restarted=fresh
    )

  # --- the state's workers live in the actors: fetched for a checkpoint or the diagnostic ----

  def _gather(self):
    live = sorted(self.alive)
    fetched = dict(
      zip(live, map(answer, [self.actors[j].checkpoint.remote() for j in live]), strict=True)
    )
    weights = actors.host(self.eval_params())
    for j in range(self.num_workers):
      found = fetched.get(j)
      self.workers[j] = found[0] if found else self.rule.worker_init(weights)  # dead: fresh

  def checkpoint_arrays(self):
    if self.actors is not None:
      self._gather()
    return checkpoints.to_host(self.state)

  def checkpoint(self):
    record = {"samplers": self.sampler.state(), "version": self.master.version}
    return self.checkpoint_arrays(), {**record, "reads": list(self.reads)}

  def restore(self, arrays, record):
    state = checkpoints.like(self.state, arrays)
    self.master.load(state["master"], record["version"])
    self.workers, self.reads = list(state["workers"]), list(record["reads"])
    self.sampler.set_state(record["samplers"])

  # --- one step -------------------------------------------------------------------------------

  def step(self, t, batch):
    payload = batch["index"]
    if not np.all(np.isfinite(batch["image"])):  # --inject_nan: send the poisoned batch itself
      payload = {"image": batch["image"], "label": batch["label"]}
    while True:
      j = self._next_live()
      actor, own = self.actors[j], self.own[j]
      exchange = self.rule.sends(own)
      try:
        view = None
        if exchange:  # lines 9-13: x^j to the master, Eq. (2), the reply to worker j
          message = devices.put(ray.get(actor.message.remote()), self.devices[0])
          reply, self.reads[j] = self.master.apply(j, own, message, self.reads[j])
          view = actors.host(reply)
        ref = actor.rr_step.remote(payload, view)
      except Exception as error:
        if not died(error):
          raise
        for earlier in [o for o in self.outstanding if o.worker == j]:
          earlier.value()  # the step it died in, if it is one of these, is the one reported
        self._lost(j, error, t, own, actor)
        continue
      break
    loss = _Loss(ref, j, own, actor, self, t)
    self.own[j] += 1
    self.outstanding.append(loss)
    while len(self.outstanding) > IN_FLIGHT_PER_WORKER * max(len(self.alive), 1):
      self.outstanding.popleft().value()
    self.cursor = (j + 1) % self.num_workers
    return loss, f"worker {j}"

  def _next_live(self):
    if not self.alive:
      raise WorkerFailure(f"all {self.num_workers} workers died")
    j = self.cursor
    while j not in self.alive:
      j = (j + 1) % self.num_workers
    return j

  def _lost(self, j, error, step, own_step, actor):
    """Worker j's `actor` died in its step `own_step` (run step `step`): report it, restart it
    if allowed. Calls that fail after it on the same actor are lost with it, not reported."""
    if j not in self.alive or self.actors[j] is not actor:
      return
    self.alive.discard(j)
    why = type(error).__name__
    logging.warning(
      f"ray: worker {j} died at run step {step} (worker {j} failed at its step {own_step}: {why})"
    )
    self.events.append(WorkerLost(j, own_step, type(error).__name__, step))
    if self.restarts[j] < self.config.max_worker_restarts:
      self.restarts[j] += 1
      self.actors[j] = self._worker(j, fresh=True)
      self.alive.add(j)
      self.events.append(WorkerJoined(j, step))
      logging.warning(
        f"ray: worker {j} restarted ({self.restarts[j]} of {self.config.max_worker_restarts}): "
        "its local state is gone; it rejoins from the center"
      )
    else:
      logging.warning("ray: round-robin goes on over the %d live workers", len(self.alive))

  def host_losses(self, pending):
    return [(s, v if isinstance(v, np.ndarray) else v.value(), w) for s, v, w in pending]

  def applied(self):
    return self.master.record.take()

  def take_events(self):
    taken, self.events = self.events, []
    return taken

  def eval_params(self):
    return self.rule.eval_params(self.master.state)

  def worker_points(self):
    refs = [self.actors[j].point.remote() for j in sorted(self.alive)]
    found = [p for p in map(answer, refs) if p is not None]
    return found or None


class _Loss:
  """A worker's batch loss still in the object store; the loop reads it at its points. The
  step a worker died in has no loss (an empty array): its update is lost with the worker."""

  def __init__(self, ref, worker, own_step, actor, stepper, step):
    self.ref, self.worker, self.own_step, self.actor = ref, worker, own_step, actor
    self.stepper, self.step = stepper, step
    self._value = None

  def value(self):
    if self._value is None:
      try:
        self._value = np.array([ray.get(self.ref)[0]], np.float32)
      except Exception as error:
        if not died(error):
          raise
        self.stepper._lost(self.worker, error, self.step, self.own_step, self.actor)
        self._value = np.zeros(0, np.float32)
    return self._value
