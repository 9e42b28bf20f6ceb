"""The Ray engine's actors for a step-driven rule: a reducer, and one replica actor per worker.

`Replica` is worker j: the rule's replica state on its own devices (one, or a mesh of
--devices_per_worker D over which its batch is split, XLA then averaging the gradient over them;
with --model_parallel=M a (D / M data x M model) mesh, each layer split as partitioning.py says),
the dataset loaded on its own node, and the seeded streams of its S = D / M data shards
jS .. jS + S - 1 (the local engine's). It runs run steps with the rule's phases, each one jitted
call, whole. Their reductions across replicas (collectives.replica_mean / replica_sum) are traced
`deferred`: a host call (io_callback) that pushes the reduction's input to the reducer, keyed by
the run step, waits for the result, and hands it back to the phase, which goes on from there. So
no rule is split or changed for Ray, a phase may reduce any number of times, and any number of
phases works. The phases are compiled when the actor starts, so a round never waits for a compiler.

`Reducer` closes each reduction over a quorum Q: the members that pushed, once every member has
or --round_timeout_s after the first push. The result is (1/|Q|) sum_{i in Q} x_i for a mean (the
sum for a sum), added in worker order whatever the order of arrival, so a run is deterministic;
it goes into the object store once and every member fetches it from there. A member that missed
the round is out; its pushes, and any push for a round already closed (by run step) or from an
old generation of a worker, are dropped: the worker gets its own value back, with word that it
fell behind, and stops.
"""

import collections
import functools
import itertools
import statistics
import threading
import time

import jax
import numpy as np
import ray
from absl import logging
from jax.experimental import io_callback

from easgd_jax import collectives, data, devices, partitioning
from easgd_jax.engines.ray.actors import host, killed, where

KEPT_RESULTS = 4  # closed rounds whose results stay referenced (members fetch them)


class _Round:
  def __init__(self, mean):
    self.first, self.mean, self.values = time.monotonic(), mean, {}


@ray.remote
class Reducer:
  """The outer reduction; threaded, each push waiting in a thread of its own for its round."""

  def __init__(self, members, timeout_s):
    self.members = dict(members)  # worker -> its generation (each rejoin makes a new one)
    self.timeout_s = timeout_s
    self.open, self.results, self.closed = {}, {}, (-1, -1)
    self.record, self.dropped = [], []  # since the driver's last `status`
    self.changed = threading.Condition()

  def where(self):
    return where()

  def join(self, j, generation):
    with self.changed:
      self.members[j] = generation

  def leave(self, j):
    """Worker j is gone (dead, or left out by the driver): no round waits for it any more."""
    with self.changed:
      self.members.pop(j, None)
      self.changed.notify_all()

  def status(self):
    """(the members, the rounds closed and the pushes dropped since the last call)."""
    with self.changed:
      record, dropped, self.record, self.dropped = self.record, self.dropped, [], []
      return sorted(self.members), record, dropped

  def push(self, step, k, j, generation, mean, leaves):
    """Worker j's input to reduction k of run step `step`: ("ok", [the result's ref]) once its
    round closes, or ("dropped", None)."""
    key = (step, k)
    with self.changed:
      if self.members.get(j) != generation or key <= self.closed:
        self.dropped.append((step, k, j))
        return "dropped", None
      found = self.open.setdefault(key, _Round(mean))
      found.values[j] = leaves
      self.changed.notify_all()
      while key not in self.results:
        waited = time.monotonic() - found.first
        if set(self.members) <= set(found.values) or (self.timeout_s or np.inf) <= waited:
          self._close(key)
        else:
          self.changed.wait(None if self.timeout_s is None else self.timeout_s - waited)
      return "ok", self.results[key]

  def _close(self, key):
    found, start = self.open.pop(key), time.perf_counter()
    quorum = sorted(found.values)
    columns = zip(*(found.values[j] for j in quorum), strict=True)  # leaf by leaf
    total = [functools.reduce(np.add, xs) for xs in columns]
    if found.mean:
      total = [(x / len(quorum)).astype(x.dtype) for x in total]
    self.results[key] = [ray.put(total)]
    for old in sorted(self.results)[:-KEPT_RESULTS]:
      del self.results[old]
    left_out = sorted(set(self.members) - set(quorum))  # they missed it: out until they rejoin
    for j in left_out:
      del self.members[j]
    self.closed = key
    waited, spent = time.monotonic() - found.first, time.perf_counter() - start
    self.record.append((*key, quorum, left_out, waited, spent, time.time()))
    self.changed.notify_all()


class Tally:
  """The driver's account of the rounds: their quorums (for the rows), the reducer's times, the
  workers lost and rejoined, when, and how long the run took to close a round after a loss."""

  def __init__(self):
    self.quorums, self.since_row, self.last_quorum = collections.Counter(), [], None
    self.reduce_s, self.wait_s, self.join_s, self.recover_s, self.dropped = [], [], [], [], 0
    self.history, self.lost_at, self.last_round = [], {}, {}  # the last round each was in
    self.fetch_s = []  # a joiner taking a member's state

  def rounds(self, record, dropped):
    """The reducer's closed rounds and dropped pushes since it was last asked."""
    for step, k, quorum, left_out, waited, spent, closed in record:
      self.quorums[len(quorum)] += 1
      self.since_row.append(len(quorum))
      self.last_quorum = len(quorum)
      self.wait_s.append(waited)
      self.reduce_s.append(spent)
      self.last_round.update(dict.fromkeys(quorum, step))
      for j, at in list(self.lost_at.items()):
        if at[1] and closed > at[0]:  # the first round closed after worker j was lost
          self.recover_s.append(closed - at[0])
          self.lost_at[j] = (at[0], False)
      if left_out:
        logging.warning(f"ray: round of run step {step} (reduction {k}) closed without {left_out}")
    for step, _, j in dropped:
      self.dropped += 1
      logging.warning(
        f"ray: worker {j}'s push for run step {step} came after its round closed (or after it "
        f"was left out): dropped"
      )

  def lost(self, j, what):
    self.lost_at[j] = (time.time(), True)  # (when, the next round not yet seen)
    self.history.append(what)

  def joined(self, j, what):
    if j in self.lost_at:
      self.join_s.append(time.time() - self.lost_at.pop(j)[0])
    self.history.append(what)

  def row(self, alive):
    least = min(self.since_row) if self.since_row else self.last_quorum
    self.since_row = []
    return {"workers_alive": alive, "quorum": self.last_quorum, "quorum_min": least}

  def summary(self):
    median_ms = lambda xs: xs and round(statistics.median(xs) * 1e3, 3)  # noqa: E731
    return {
      "rounds": sum(self.quorums.values()),
      "quorum_sizes": {str(k): v for k, v in sorted(self.quorums.items())},
      "reduce_ms_median": median_ms(self.reduce_s),
      "round_wait_ms_median": median_ms(self.wait_s),
      "pushes_dropped": self.dropped,
      "lost_to_next_round_s": [round(s, 3) for s in self.recover_s],
      "lost_to_rejoined_s": [round(s, 3) for s in self.join_s],
      "join_fetch_ms": [round(s * 1e3, 3) for s in self.fetch_s],
      "workers_history": list(self.history),
    }


@ray.remote
class Replica:
  """Worker j of a step-driven rule; `state` its replica state on the host (a joiner's is a
  template until it joins), `streams` its shards' generator states."""

  def __init__(self, config, rule, j, reducer, state, streams, generation, restarted=False):
    per_worker, model, shards = (
      config.devices_per_worker,
      config.model_parallel,
      config.shards_per_worker,
    )
    devices.emulate_cpu_devices(per_worker)  # on a CPU node: D devices of its own
    self.config, self.rule, self.j, self.reducer = config, rule, j, reducer
    self.generation, self.behind = generation, False
    self.failure = None if restarted else config.failure_point  # fires once per run
    mesh = devices.mesh((shards, model), (partitioning.DATA, partitioning.MODEL))
    params = rule.eval_params(state)  # on the host: W's shapes, for the layout
    partitioning.check_divisible(params, model)
    placed = partitioning.shardings(params, mesh)
    whole = partitioning.replicated(mesh)
    self.placement = partitioning.state_shardings(rule.init, params, placed, whole)
    self.batch_placement = partitioning.batch_sharding(mesh)
    self.dataset = data.load(config)  # on this node
    ids = range(j * shards, (j + 1) * shards)
    self.sampler = data.ShardedSampler(self.dataset, config.num_devices // model, ids, config.seed)
    self.sampler.set_state(streams)
    self.state = devices.put(state, self.placement)
    self.reductions = [0] * len(rule.phases)  # counted as each phase is traced
    example = self._place(self.dataset.take(np.zeros((shards, config.batch_size), int)))
    self._phases = [
      jax.jit(self._deferred(p, fn), out_shardings=(self.placement, whole))
      .lower(self.state, example, np.int32(0))
      .compile()
      for p, fn in enumerate(rule.phases)
    ]

  def where(self):
    return where()

  def _deferred(self, p, phase):
    """`phase` with its reductions handed to the reducer (the module docstring)."""

    def deferred(state, batch, step):
      count = itertools.count()

      def reduce(tree, mean):
        leaves, treedef = jax.tree.flatten(tree)
        k = next(count)
        self.reductions[p] = k + 1
        call = functools.partial(self._reduce, k=k, mean=mean)
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        return jax.tree.unflatten(treedef, io_callback(call, shapes, step, *leaves, ordered=True))

      with collectives.deferred(reduce):
        return phase(state, batch)

    return deferred

  def _reduce(self, step, *leaves, k, mean):
    """On the host, in XLA's callback thread: push, wait for the round, hand its result back."""
    step = int(step)
    if self.behind:
      return leaves
    status, found = ray.get(
      self.reducer.push.remote(step, k, self.j, self.generation, mean, list(leaves))
    )
    if self.failure == (self.j, step):  # --inject_failure: dies in the reduction, its push in
      killed()
    if status != "ok":
      self.behind = True
      return leaves
    return ray.get(found[0])

  def _place(self, batch):
    """[D, b, ...] of its shards as one batch of D * b, split over its devices."""
    flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
    return devices.put(flat, self.batch_placement)

  def run(self, start, end):
    """Run steps start .. end - 1: (their losses, whether it fell behind and stopped)."""
    losses = []
    for t in range(start, end):
      phase = self.rule.phase(t)
      if self.failure == (self.j, t) and not self.reductions[phase]:
        killed()  # --inject_failure at a step with no reduction: dies as it starts
      batch = self.sampler.next(self.config.batch_size)
      if t + 1 == self.config.inject_nan:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      self.state, loss = self._phases[phase](self.state, self._place(batch), np.int32(t))
      losses.append(loss)
      if self.reductions[phase]:
        jax.block_until_ready(loss)  # its round answered: whether it fell behind is known
        if self.behind:
          break
    return np.asarray(jax.device_get(losses), np.float32).reshape(len(losses)), self.behind

  def join(self, state, generation, step):
    """Take a member's replica state at run step `step`, with a fresh stream of its own."""
    self.state, self.generation = devices.put(state, self.placement), generation
    self.behind, self.failure = False, None
    self.sampler.fresh(step)

  def state_now(self):
    return host(self.state)

  def checkpoint(self):
    return host(self.state), self.sampler.state()

  def params(self):
    """(the weights to evaluate, the rule's diagnostics), on the host."""
    found = self.rule.diagnostics(self.state)
    return host(self.rule.eval_params(self.state)), {k: float(v) for k, v in found.items()}

  def point(self):
    found = self.rule.worker_point(self.state)
    return None if found is None else host(found)
