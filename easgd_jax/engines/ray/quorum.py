"""The Ray engine for a step-driven rule: replica actors, a reducer, and a quorum per round.

Each of the G workers is an actor (replicas.Replica) running the rule's phases on its own devices;
their reductions across replicas go to a reducer actor (replicas.Reducer), which closes each over
the quorum Q of the members that delivered. A phase is not split at its collective: traced under
collectives.deferred, replica_mean / replica_sum become a host call inside the jitted step that
pushes to the reducer and waits for the result (replicas.py says why), so every rule runs unchanged,
whatever its number of phases and reductions. A round ends after each run step the rule declares a
transfer after (StepRule.transfers). The driver hands every member the same stretch of run steps (to
the trainer's next point, CHUNK at most, to a round's end when one waits to join) and waits for
them.

- A worker that dies (process killed, node gone): Ray fails its call; the driver tells the
  reducer, whose open round then closes over the others, and reports it (WorkerLost). With
  --max_worker_restarts=N a new actor is started in its place, N times per worker (one lost
  before it started, its node gone under it, is placed again and is not counted).
- A worker that misses a round by --round_timeout_s (a hang, a SIGSTOP) is left out of it and of
  the run: its pushes, then or when it wakes, are dropped by run step and generation. A stretch
  with no round leaves out a worker that ends it --round_timeout_s after the first did. Without
  --round_timeout_s a round waits for every live member, as an all-reduce would.
- A worker joins (a restarted actor once started, or a left-out one that answered again) at the
  next round boundary: it takes a live member's whole replica state at that step (weights, the
  outer optimizer's state and that member's inner one) through the object store from the
  member's node, a new generation from the driver and the reducer, and a fresh batch stream
  seeded by (seed, its shards, the step). It never restores from a checkpoint.
- Fewer than --min_workers members left, or any loss with --fail_fast: a checkpoint of the
  members at the stretch's end, then one line naming the lost workers (WorkerFailure, exit 1).
- The reducer dies: ServerLost (exit 3); the driver's death ends the run. The same command
  resumes from the last checkpoint.

Rows carry `workers_alive`, `quorum` (the last round's |Q|) and `quorum_min` (the least since the
row before). The checkpoint has the local engine's layout (the replicas' states stacked one per
device, one stream per data shard): a run may move between the two engines.
"""

import time

import jax
import numpy as np
import ray
from absl import logging

from easgd_jax import checkpoints, data
from easgd_jax.engines.base import Progress, Snapshot, Stopwatch, WorkerJoined, WorkerLost
from easgd_jax.engines.ray import actors, replicas
from easgd_jax.engines.ray.asynchronous import SERVER_TIMEOUT_S, died
from easgd_jax.errors import ServerLost, WorkerFailure

CHUNK = 100  # run steps per stretch at most: progress, stop signals and joins come between
PLACEMENTS = 3  # a new actor lost before it started (its node died) is placed again so often
POLL_S = 0.2  # how often the driver asks the reducer whom it left out, while it waits


class QuorumEngine:
  eval_placement = None

  def __init__(self, config, rule, dataset, params_host):
    self.config, self.rule = config, rule
    self.workers, self.per_worker = config.num_workers, config.devices_per_worker
    self.shards = config.shards_per_worker  # a worker's data shards, one stream each
    # Its copies in the stacked state, as the local engine holds them: one per device, or one
    # per worker that is a data x model mesh (steps.WorkerMeshes).
    self.copies = 1 if config.model_parallel > 1 else self.per_worker
    self.states = [rule.init(params_host)] * self.workers  # on the host, as of the last gather
    self.streams = data.sampler(
      dataset, config, config.num_devices // config.model_parallel
    ).state()
    self.done, self.pending, self.stopwatch, self.final = 0, [], None, None
    self.restarts, self.generation = [0] * self.workers, [0] * self.workers
    self.placements = [0] * self.workers  # a restart's actors lost before they started
    self.reducer, self.actors, self.members = None, [None] * self.workers, set()
    self.joining = {}  # worker -> (its actor, the ref that answers once it has started)
    self.stragglers = {}  # a left-out worker's call still running -> the worker
    self.tally = replicas.Tally()  # the rounds, losses and joins, for the rows and the summary
    self.events, self.gone, self.failing = [], {}, None

  @property
  def state(self):
    """The replicas' states stacked as the local engine stacks them, one per device."""
    per = self.copies
    return jax.tree.map(
      lambda *xs: np.stack([np.asarray(x) for x in xs for _ in range(per)]), *self.states
    )

  def describe(self):
    return f"{self.workers} replica actors of {self.per_worker} device(s) each and a reducer on Ray"

  def checkpoint_arrays(self):
    return checkpoints.to_host(self.state)

  def restore(self, arrays, record):
    stacked = checkpoints.like(self.state, arrays)
    self.states = [
      jax.tree.map(lambda x, j=j: x[j * self.copies], stacked) for j in range(self.workers)
    ]
    self.streams, self.done = list(record["samplers"]), record["step"]
    self.pending = [(s, np.asarray(v, np.float32), None) for s, v in record["losses"]]

  # --- actors ---------------------------------------------------------------------------------

  def _replica(self, j, generation, restarted=False):
    streams = self.streams[j * self.shards : (j + 1) * self.shards]
    args = (self.config, self.rule, j, self.reducer, self.states[j], streams, generation)
    options = dict(num_cpus=actors.WORKER_CPUS, num_gpus=self.config.ray_worker_gpus)
    return replicas.Replica.options(**options, scheduling_strategy="SPREAD").remote(
      *args, restarted
    )

  def _start(self):
    here = ray.get_runtime_context().get_node_id()
    self.reducer = replicas.Reducer.options(
      num_cpus=actors.SERVER_CPUS,
      max_concurrency=self.workers + 4,  # every member's push waiting, and the driver's calls
      scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
        here, soft=True
      ),
    ).remote(dict.fromkeys(range(self.workers), 0), self.config.round_timeout_s)
    self.generation = [0] * self.workers
    self.actors = [self._replica(j, 0) for j in range(self.workers)]
    reducer, *places = ray.get([a.where.remote() for a in [self.reducer, *self.actors]])
    logging.info("ray: reducer on %s", reducer)
    for j, place in enumerate(places):
      logging.info("ray: worker %d on %s", j, place)
    self.members = set(range(self.workers))

  def _stop(self):
    joiners = [actor for actor, _ in self.joining.values()]
    for actor in {*self.actors, *joiners, self.reducer} - {None}:
      ray.kill(actor)

  def _ask_reducer(self, call):
    try:
      return ray.get(call, timeout=SERVER_TIMEOUT_S)
    except (ray.exceptions.RayError, TimeoutError) as error:
      raise ServerLost(
        f"the reducer died ({type(error).__name__}); the run stops: relaunch the same command "
        f"to resume from the last checkpoint"
      ) from None

  # --- the loop -------------------------------------------------------------------------------

  def run(self, plan):
    if self.done >= plan.steps:
      return
    self._start()
    try:
      yield from self._loop(plan)
    finally:
      self._stop()
      if self.tally.history:  # who was lost and who rejoined, when
        logging.warning("ray: %s", "; ".join(self.tally.history))

  def _loop(self, plan):
    step, losses = self.done, list(self.pending)
    self.stopwatch = watch = Stopwatch(step)
    watch.warm(step)  # the actors compiled their phases as they started: no step compiles
    while True:
      stop = plan.stopping
      if step < plan.steps and stop is None and self.failing is None:
        target = self._target(step, plan)
        losses += self._stretch(step, target)
        step = watch.reached = target
        yield Progress(step)
        self._join(step)
        yield from self._events()
      if self.failing and not self.members:
        raise WorkerFailure(self.failing)
      evaluate, save = plan.evaluates(step), plan.checkpoints(step)
      if not (evaluate or save or stop or self.failing):
        continue
      snapshot = Snapshot(step, watch.seconds(), losses, stopped=stop)
      if evaluate:
        snapshot.params, snapshot.points, diagnostics = self._evaluate(step)
        snapshot.extra = {**self.tally.row(len(self.members)), **diagnostics}
      if plan.checkpointing and (save or stop or self.failing):
        snapshot.state = self._checkpoint(step)
      elif step >= plan.steps:
        self._checkpoint(step)  # the final states, for `state`
      yield from self._events()
      with watch.paused():
        yield snapshot
      if evaluate:
        losses = []
      if self.failing:
        saved = (
          f"checkpoint saved at step {step}" if snapshot.state else "no workdir, no checkpoint"
        )
        raise WorkerFailure(f"{self.failing}; the run stops ({saved})")
      if stop is not None or step >= plan.steps:
        self.done, self.final = step, snapshot.params
        return

  def _target(self, step, plan):
    target = min(plan.next_point(step), step + CHUNK)
    if self._ready():  # a joiner waits: this stretch ends at a round boundary
      t = step
      while t + 1 < target and not self.rule.transfers(t, 0):
        t += 1
      target = t + 1
    return target

  def _stretch(self, start, end):
    """Run steps start .. end - 1 on every member; the losses of those that kept up."""
    calls = {self.actors[j].run.remote(start, end): j for j in sorted(self.members)}
    results, first, polled = {}, None, time.monotonic()
    timeout = self.config.round_timeout_s
    while calls:
      ready, _ = ray.wait(list(calls), num_returns=1, timeout=POLL_S)
      for ref in ready:
        j = calls.pop(ref)
        try:
          found, behind = ray.get(ref)
        except Exception as error:
          if not died(error):
            raise
          self._status()  # the reducer's death is the run's (ServerLost); its rounds, the step
          self._lost(j, error, start)
          continue
        if behind:  # a push of its came after its round had closed
          self._left_out(j, start, "its push came after its round closed")
          self.joining[j] = (self.actors[j], None)
          continue
        results[j], first = found, first or time.monotonic()
      if time.monotonic() - polled >= POLL_S:
        polled = time.monotonic()
        members = self._status()
        for ref, j in list(calls.items()):
          if j not in members:  # the reducer closed a round without it
            self._left_out(j, start, f"it missed a round by --round_timeout_s={timeout:g}")
            self.stragglers[ref] = calls.pop(ref)
      if timeout and first and time.monotonic() - first > timeout:
        for ref, j in list(calls.items()):
          self._left_out(j, start, f"it ended a stretch {timeout:g} s after the first")
          self.stragglers[ref] = calls.pop(ref)
    self._status()
    self._check_stragglers()
    kept = sorted(results)
    return [
      (t + 1, np.array([results[j][t - start] for j in kept], np.float32), None)
      for t in range(start, end)
    ]

  def _status(self):
    """The reducer's members now; takes its closed rounds and dropped pushes."""
    members, record, dropped = self._ask_reducer(self.reducer.status.remote())
    self.tally.rounds(record, dropped)
    return set(members)

  def _check_stragglers(self):
    """Left-out workers whose stale call has ended: they may join again (or are dead)."""
    for ref, j in list(self.stragglers.items()):
      if not ray.wait([ref], timeout=0)[0]:
        continue
      del self.stragglers[ref]
      try:
        ray.get(ref)
        self.joining[j] = (self.actors[j], None)
      except Exception as error:
        if not died(error):
          raise
        self._restart(j)

  def _lost(self, j, error, start):
    why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
    self._left_out(j, start, why, died_=True)
    self._restart(j)

  def _left_out(self, j, start, why, died_=False):
    self.members.discard(j)
    self._ask_reducer(self.reducer.leave.remote(j))
    own = max(self.tally.last_round.get(j, start - 1) + 1, start)
    self.gone[j] = f"worker {j} {'died' if died_ else 'left out'} at run step {own}"
    self.tally.lost(j, self.gone[j])
    logging.warning(f"ray: {self.gone[j]}: {why}")
    self.events.append(WorkerLost(j, own, why, start))
    lost = [self.gone[w] for w in sorted(set(range(self.workers)) - self.members)]
    if (self.config.fail_fast and lost) or len(self.members) < self.config.min_workers:
      rule = "--fail_fast" if self.config.fail_fast else f"--min_workers={self.config.min_workers}"
      left = f"{len(self.members)} of {self.workers} workers left ({rule})"
      self.failing = f"{left}; lost: {', '.join(lost)}"

  def _restart(self, j, unstarted=None):
    """A new actor in worker j's place. One lost before it ever answered (`unstarted`: how), not
    by its own __init__ (its node died under it, say), is placed again without spending one of
    --max_worker_restarts, PLACEMENTS times in a row at most."""
    again = unstarted is not None and not getattr(unstarted, "actor_init_failed", True)
    if again and self.placements[j] < PLACEMENTS:
      self.placements[j] += 1
      logging.warning(f"ray: worker {j}'s new actor was lost before it started; placed again")
    elif self.restarts[j] >= self.config.max_worker_restarts:
      logging.warning("ray: worker %d stays out; %d workers go on", j, len(self.members))
      return
    else:
      self.restarts[j] += 1
      self.generation[j] += 1
      logging.warning(
        f"ray: worker {j} restarted ({self.restarts[j]} of {self.config.max_worker_restarts}); "
        "it joins at the next round boundary"
      )
    actor = self._replica(j, self.generation[j], restarted=True)
    self.joining[j] = (actor, actor.where.remote())

  def _ready(self):
    return [
      j for j, (_, ref) in self.joining.items() if ref is None or ray.wait([ref], timeout=0)[0]
    ]

  def _join(self, step):
    """The joiners that are ready, at a round boundary (`step` just after a round's last)."""
    if not (self.members and self.rule.transfers(step - 1, 0)):
      return
    for j in self._ready():
      actor, ref = self.joining.pop(j)
      donor = min(self.members)
      self.generation[j] += 1
      place = None
      try:
        place = ref and ray.get(ref)  # a new actor: where it started
        self._ask_reducer(self.reducer.join.remote(j, self.generation[j]))
        fetch = time.perf_counter()
        ray.get(actor.join.remote(self.actors[donor].state_now.remote(), self.generation[j], step))
        self.tally.fetch_s.append(time.perf_counter() - fetch)
      except Exception as error:
        if not died(error):
          raise
        self._ask_reducer(self.reducer.leave.remote(j))
        self._restart(j, error if ref is not None and place is None else None)
        continue
      self.actors[j], self.placements[j] = actor, 0
      self.members.add(j)
      if place:
        logging.info("ray: worker %d on %s", j, place)
      self.tally.joined(j, f"worker {j} rejoined at run step {step}")
      logging.warning(f"ray: worker {j} joined at run step {step} from worker {donor}'s state")
      self.events.append(WorkerJoined(j, step))

  def _events(self):
    taken, self.events = self.events, []
    yield from taken

  # --- the trainer's points -------------------------------------------------------------------

  def _ask_members(self, method, step):
    """{member: its answer}; a member found dead on the way is lost, one that does not answer in
    SERVER_TIMEOUT_S or --round_timeout_s if longer (a hang, a SIGSTOP) is left out: an answer
    may first compile, which a loaded machine can make take longer than a round's deadline."""
    refs = {getattr(self.actors[j], method).remote(): j for j in sorted(self.members)}
    timeout = max(self.config.round_timeout_s or 0, SERVER_TIMEOUT_S)
    # Finished, not fetched: fetching as it waited, it saw no answer while one member hung.
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout, fetch_local=False)
    found = {}
    for ref in ready:
      try:
        found[refs[ref]] = ray.get(ref)
      except Exception as error:
        if not died(error):
          raise
        self._lost(refs[ref], error, step)
    for ref in late:
      self._left_out(refs[ref], step, f"it did not answer `{method}` in {timeout:g} s")
      self.stragglers[ref] = refs[ref]
    return found

  def _evaluate(self, step):
    """(the weights to evaluate, the members' points, the rule's diagnostics), of the first
    member that answers; none when none is left."""
    found = self._ask_members("point", step)
    if not found:
      return None, None, {}
    params, diagnostics = ray.get(self.actors[min(found)].params.remote())
    return params, [p for p in found.values() if p is not None] or None, diagnostics

  def _checkpoint(self, step):
    saved = self._ask_members("checkpoint", step)
    if saved:
      donor = saved[min(saved)][0]
      for j in range(self.workers):
        state, streams = saved.get(j, (donor, None))
        self.states[j] = state
        if streams is not None:
          self.streams[j * self.shards : (j + 1) * self.shards] = streams
    return checkpoints.to_host(self.state), {"samplers": list(self.streams)}

  # --- the end --------------------------------------------------------------------------------

  def throughput(self):
    return self.stopwatch.throughput() if self.stopwatch else (0, 0.0)

  def final_params(self):
    return self.final if self.final is not None else self.rule.eval_params(self.states[0])

  def summary(self):
    return self.tally.summary()

  def write_outputs(self, workdir):
    pass
