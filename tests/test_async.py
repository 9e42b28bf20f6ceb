"""The asynchronous family: real threads, checked against their equations by replaying the logs.

Each worker here reads its own fixed list of batches, so once the master's record says in which
order the updates happened, the whole run can be replayed in NumPy (tests/reference.py).
"""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from easgd_jax import algorithms, devices, engines, train
from easgd_jax.algorithms import (
  SGD,
  AsyncEASGD,
  AsyncSGD,
  Hogwild,
  HogwildEASGD,
  RoundRobinEASGD,
)
from easgd_jax.config import Config
from easgd_jax.engines.local import masters, threads
from easgd_jax.errors import ConfigError, WorkerFailure

import reference
from helpers import (
  BATCH,
  IMAGE_SHAPE,
  NUM_CLASSES,
  REPO,
  assert_params_close,
  child_env,
  child_process,
  run_cli,
  run_steps,
  run_threads,
)

PROBLEM_SEED = 3


@pytest.fixture(scope="module")
def worker_batches():
  rng = np.random.default_rng(1)
  return [
    [
      {
        "image": rng.standard_normal((BATCH, *IMAGE_SHAPE)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
      }
      for _ in range(100)
    ]
    for _ in range(8)
  ]  # worker_batches[j] is worker j's stream


def applied(engine):
  """The master's applied-update record, in the order applied (what `algorithm.log` was)."""
  return list(engine.master.record.recent)


def test_async_sgd_with_one_worker_equals_sgd_exactly(problem, worker_batches, cpu_devices):
  loss_fn, params = problem
  engine, _, _ = run_threads(AsyncSGD(loss_fn, learning_rate=0.1), params, worker_batches[:1], 20)
  sgd_rule = SGD(loss_fn, learning_rate=0.1)
  sgd = run_steps(sgd_rule, params, worker_batches[0][:20], devices=cpu_devices)
  jax.tree.map(np.testing.assert_array_equal, engine.master.state["params"], sgd.state.params)
  assert [u.read_at for u in applied(engine)] == list(range(20))  # one worker: never stale


def test_async_sgd_applies_every_gradient_once_one_at_a_time(problem, worker_batches):
  loss_fn, params = problem
  eta, steps = 0.1, 64
  engine, _, _ = run_threads(AsyncSGD(loss_fn, learning_rate=eta), params, worker_batches, steps)
  log = applied(engine)
  # Exactly `steps` updates, numbered 1..steps in the order applied, and each worker's count of
  # applied gradients equals the iterations it finished (nothing dropped, nothing twice).
  assert [u.applied_as for u in log] == list(range(1, steps + 1))
  assert [sum(u.worker == j for u in log) for j in range(8)] == engine.worker_steps
  assert sum(engine.worker_steps) == steps and sum(1 for n in engine.worker_steps if n) >= 2
  # Never two at once: the critical sections, in time order, do not overlap.
  for before, after in zip(log, log[1:], strict=False):
    assert before.end <= after.start
  # Replay: the k-th update of worker j is its k-th batch's gradient at the W it read.
  history, taken = [reference.to_layers(params)], [0] * 8
  for u in log:
    j = u.worker
    batch = worker_batches[j][taken[j]]
    taken[j] += 1
    grad = reference.mlp_gradient(history[u.read_at], batch["image"], batch["label"])
    history.append(reference.axpy(-eta, grad, history[-1]))
  assert_params_close(engine.master.state["params"], history[-1])
  assert max(u.applied_as - 1 - u.read_at for u in log) >= 1  # the workers did run concurrently


def test_no_worker_takes_a_second_iteration_until_every_worker_has_done_its_first(
  problem, worker_batches, monkeypatch
):
  """Worker 2's first iteration is slow (as when its device compiles last): the others wait for
  it after their first, so a short run is not taken by whoever compiled first."""
  iterate = masters.Workers.iterate

  def slow_first(self, j, batch):
    if j == 2 and self.own[j] == 0:
      time.sleep(0.5)  # ~100x the others' iteration
    return iterate(self, j, batch)

  monkeypatch.setattr(masters.Workers, "iterate", slow_first)
  loss_fn, params = problem
  engine, _, _ = run_threads(AsyncSGD(loss_fn, learning_rate=0.1), params, worker_batches[:3], 30)
  assert sorted(u.worker for u in applied(engine)[:3]) == [0, 1, 2]
  assert sum(engine.worker_steps) == 30


class Device:  # what devices.host_threads reads of a jax device
  def __init__(self, platform):
    self.platform = platform


def test_cpu_devices_get_at_most_one_thread_per_core(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
  assert devices.host_threads([Device("cpu")] * 4) == 2
  assert devices.host_threads([Device("cpu")] * 1) == 1
  assert devices.host_threads([Device("gpu")] * 4) == 4  # each accelerator has its thread
  assert devices.host_threads([Device("cpu")] * 4, requested=4) == 4  # --worker_threads=4
  assert devices.host_threads([Device("cpu")] * 4, requested=8) == 4  # at most one per worker


def test_worker_threads_from_the_command_line_decide_the_engines_threads(problem, monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
  loss_fn, params = problem
  rule = Hogwild(loss_fn, learning_rate=0.1)
  for requested, found, said in [(0, 2, "4 workers taking turns on 2 threads"), (4, 4, "one ")]:
    config = Config(num_devices=4, batch_size=BATCH, worker_threads=requested)
    engine = threads.ThreadEngine(config, rule, None, params, samplers=[None] * 4)
    assert engine.num_threads == found and engine.describe().startswith(said)


def test_workers_beyond_the_cores_take_turns_on_a_thread_per_core(
  problem, worker_batches, monkeypatch
):
  """4 workers on 2 cores: 2 threads, thread t running workers t and t + 2 in turn; never more
  than 2 iterations at once; every worker does its share."""
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
  iterate, lock, running, seen = masters.Workers.iterate, threading.Lock(), [0], []

  def watched(self, j, batch):
    with lock:
      running[0] += 1
      seen.append((threading.get_ident(), j, running[0]))
    time.sleep(0.002)  # long enough for a third thread, if there were one, to start an iteration
    try:
      return iterate(self, j, batch)
    finally:
      with lock:
        running[0] -= 1

  monkeypatch.setattr(masters.Workers, "iterate", watched)
  loss_fn, params = problem
  engine, _, _ = run_threads(Hogwild(loss_fn, learning_rate=0.1), params, worker_batches[:4], 40)
  assert max(at_once for _, _, at_once in seen) <= 2
  turns = {}
  for thread, j, _ in seen:
    turns.setdefault(thread, []).append(j)
  assert sorted(sorted(set(js)) for js in turns.values()) == [[0, 2], [1, 3]]
  for js in turns.values():  # in turn: never the same worker twice in a row
    assert all(a != b for a, b in zip(js, js[1:], strict=False)), js
  assert sum(engine.worker_steps) == 40 and min(engine.worker_steps) >= 2


def test_a_failed_worker_leaves_its_threads_turn_and_the_other_goes_on(
  problem, worker_batches, monkeypatch
):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
  loss_fn, params = problem
  rule = AsyncSGD(loss_fn, learning_rate=0.1)
  engine, _, _ = run_threads(rule, params, worker_batches[:4], 40, failure=(0, 1))
  assert [f.worker for f in engine.failures] == [0] and engine.worker_steps[0] == 1
  # worker 2 shares worker 0's thread: it goes on after worker 0 fails at its second iteration
  assert engine.worker_steps[2] >= 2 and sum(engine.worker_steps) == 40


def test_async_easgd_with_one_worker_equals_round_robin_easgd_exactly(
  problem, worker_batches, cpu_devices
):
  loss_fn, params = problem
  kwargs = dict(learning_rate=0.1, rho=0.7, tau=1)
  engine, final, _ = run_threads(AsyncEASGD(loss_fn, **kwargs), params, worker_batches[:1], 20)
  easgd_rule = RoundRobinEASGD(loss_fn, **kwargs)
  easgd = run_steps(easgd_rule, params, worker_batches[0][:20], num_devices=1, devices=cpu_devices)
  center = easgd.state["master"]
  jax.tree.map(np.testing.assert_array_equal, engine.master.state, center)
  jax.tree.map(np.testing.assert_array_equal, final.params, center)


@pytest.mark.parametrize("name", ["async_sgd", "async_easgd"])
def test_a_locked_master_in_host_memory_equals_one_on_a_master_device(
  problem, worker_batches, cpu_devices, name
):
  """On CPU devices the threads' locked master lies in host memory and each update runs on the
  device of the worker that sends it (HostLockedMaster: W is copied neither way); the master on
  device 0 with a copy each way (LockedMaster, as on an accelerator) makes the same weights."""
  loss_fn, params = problem
  rule = {
    "async_sgd": lambda: AsyncSGD(loss_fn, learning_rate=0.1),
    "async_easgd": lambda: AsyncEASGD(loss_fn, learning_rate=0.1, rho=0.7, tau=2, momentum=0.5),
  }[name]()
  compiled, pair = masters.Compiled(rule), cpu_devices[1:3]
  made = []
  for master in (
    masters.HostLockedMaster(compiled, rule.master_init(params), pair),
    masters.LockedMaster(compiled, rule.master_init(params), cpu_devices[0], 2),
  ):
    workers = masters.Workers(compiled, master, rule.worker_init(params), pair)
    for t in range(12):  # 0, 1, 1, 0, 0, 1, ...: each worker twice in a row, stale reads
      j = (t + 1) // 2 % 2
      workers.iterate(j, worker_batches[j][t])
    made.append((master.checkpoint(), workers.states, workers.views))
  (host, host_version), *host_workers = made[0]
  (device, device_version), *device_workers = made[1]
  assert host_version == device_version == (12 if name == "async_sgd" else 6)
  jax.tree.map(np.testing.assert_array_equal, host, device)
  jax.tree.map(np.testing.assert_array_equal, host_workers, device_workers)
  if name == "async_sgd":  # a reply is made on its worker's device
    assert {leaf.devices().pop() for leaf in jax.tree.leaves(made[0][2][1])} == {pair[1]}
  engine, _, _ = run_threads(rule, params, worker_batches[:2], 4)
  assert isinstance(engine.master, masters.HostLockedMaster)


@pytest.mark.parametrize("tau, momentum", [(1, 0.0), (3, 0.0)])  # EAMSGD: test_eamsgd.py
def test_async_easgd_center_equals_numpy_replay_of_the_exchange_order(
  problem, worker_batches, tau, momentum
):
  loss_fn, params = problem
  eta, rho, num_workers, steps = 0.05, 0.5, 6, 60
  rule = AsyncEASGD(loss_fn, learning_rate=eta, rho=rho, tau=tau, momentum=momentum)
  engine, _, _ = run_threads(rule, params, worker_batches[:num_workers], steps)
  order = [(e.worker, e.worker_step) for e in applied(engine)]
  assert len(set(w for w, _ in order)) > 1
  # Replay: before each recorded exchange, the worker takes its local steps since the last one;
  # the exchange applies Eq. (2) to the center and Eq. (1) with the center read.
  center = reference.to_layers(params)
  local = [center] * num_workers
  velocity = [reference.zeros_like(center)] * num_workers
  done = [0] * num_workers

  def local_step(j, pull_to=None):
    batch = worker_batches[j][done[j]]
    grad = reference.mlp_gradient(local[j], batch["image"], batch["label"])
    new, velocity[j] = reference.local_step(local[j], velocity[j], grad, eta, momentum)
    if pull_to is not None:
      new = reference.axpy(-eta * rho, reference.axpy(-1.0, pull_to, local[j]), new)
    local[j] = new
    done[j] += 1

  for j, worker_step in order:
    while done[j] < worker_step:
      local_step(j)
    assert worker_step % tau == 0
    read = center
    center = reference.axpy(eta * rho, reference.axpy(-1.0, read, local[j]), center)  # Eq. (2)
    local_step(j, pull_to=read)  # Eq. (1)
  assert_params_close(engine.master.state, center, rtol=1e-4)
  assert sum(engine.worker_steps) == steps


@pytest.mark.parametrize("name", ["hogwild", "hogwild_easgd"])
def test_the_unlocked_pair_with_one_worker_equals_its_rule_in_order(
  problem, worker_batches, cpu_devices, name
):
  """One Hogwild worker is SGD, one Hogwild EASGD worker is EASGD with G = 1: the unlocked
  in-place write adds the rule's own update, Eq. (1)'s pull included (rtol 1e-6)."""
  loss_fn, params = problem
  if name == "hogwild":
    rule, kwargs = Hogwild(loss_fn, learning_rate=0.1), dict(devices=cpu_devices)
    expected = run_steps(SGD(loss_fn, learning_rate=0.1), params, worker_batches[0][:20], **kwargs)
    expected = expected.state.params
  else:
    settings = dict(learning_rate=0.1, rho=0.7, tau=1)
    rule = HogwildEASGD(loss_fn, **settings)
    easgd = RoundRobinEASGD(loss_fn, **settings)
    expected = run_steps(easgd, params, worker_batches[0][:20], num_devices=1, devices=cpu_devices)
    expected = expected.state["master"]
  engine, _, _ = run_threads(rule, params, worker_batches[:1], 20)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    engine.master.snapshot(),
    expected,
  )


def test_unlocked_writes_serialized_add_up_to_the_logged_increments(
  problem, worker_batches, monkeypatch
):
  """Hogwild's master is W0 plus every increment the workers wrote, once each: with the writes
  serialized (a lock around them, in a test only) the final W is that sum, bit for bit."""
  loss_fn, params = problem
  lock, logged, add = threading.Lock(), [], masters.SharedMaster.add

  def serialized(self, j, worker_step, increment, read_at):
    with lock:
      logged.append(np.array(increment))
      return add(self, j, worker_step, increment, read_at)

  monkeypatch.setattr(masters.SharedMaster, "add", serialized)
  engine, _, _ = run_threads(Hogwild(loss_fn, learning_rate=0.1), params, worker_batches[:4], 40)
  w = masters.SharedBuffer(params).flat.copy()
  for increment in logged:
    np.add(w, increment, out=w)
  np.testing.assert_array_equal(engine.master.buffer.flat, w)
  assert len(logged) == engine.master.version == 40


def test_hogwild_workers_write_concurrently_and_still_learn_digits(cpu_devices, monkeypatch):
  """The first two in-place writes each wait, inside the addition, for the other to begin: they
  can only both get there if nothing serializes the writes. (Left to chance, two writes of a few
  microseconds each did not overlap once in 1,500 on a loaded machine.)"""
  both_writing = threading.Barrier(2, timeout=30)
  writes = itertools.count()

  class MeetingNumpy:  # NumPy, but its first two additions meet
    def __getattr__(self, name):
      return getattr(np, name)

    def add(self, *args, **kwargs):
      if next(writes) < 2:
        both_writing.wait()
      return np.add(*args, **kwargs)

  monkeypatch.setattr(masters, "np", MeetingNumpy())
  summary = train.train_and_evaluate(
    Config(algorithm="hogwild", num_devices=2, steps=1500, eval_every=500)
  )
  log = list(summary["state"].record.recent)  # the engine's master (SharedMaster)
  by_start = sorted(log, key=lambda w: w.start)
  overlapping = [
    (a.worker, b.worker)
    for i, a in enumerate(by_start)
    for b in by_start[i + 1 : i + 8]
    if b.start < a.end and a.worker != b.worker
  ]
  assert overlapping, "no two workers' in-place writes overlapped in time"
  assert summary["final"]["test_accuracy"] >= 0.85
  assert len(log) == 1500


@pytest.mark.slow
@pytest.mark.parametrize(  # async_easgd: its killed and resumed run in tests/test_checkpoints.py
  "algorithm", ["async_sgd", "hogwild_easgd"]
)
def test_four_workers_reach_90_percent_on_digits(cpu_devices, algorithm):
  summary = train.train_and_evaluate(
    Config(algorithm=algorithm, num_devices=4, steps=1500, eval_every=500)
  )
  assert summary["final"]["test_accuracy"] >= 0.90
  assert sum(summary["worker_steps"]) == 1500 and min(summary["worker_steps"]) > 0
  assert summary["staleness"]["median"] >= 0 and summary["history"][-1]["staleness_max"] >= 1


def test_evaluation_snapshots_come_while_training(problem, worker_batches):
  loss_fn, params = problem
  rule = AsyncSGD(loss_fn, learning_rate=0.1)
  engine, final, snapshots = run_threads(rule, params, worker_batches[:4], 40, eval_every=10)
  # An evaluation point reached while the previous snapshot is being scored is skipped, and
  # its losses go into the next row (tests/test_workdir.py makes that happen on purpose).
  assert {s.step for s in snapshots} <= {10, 20, 30} and final.step == 40
  assert len(snapshots) + engine.evaluations_skipped == 3
  # The first point finds nothing in flight: it is never skipped, and it shows the master of
  # then, not of the end.
  assert snapshots[0].step == 10
  first, last = jax.tree.leaves(snapshots[0].params), jax.tree.leaves(final.params)
  assert not all(np.array_equal(a, b) for a, b in zip(first, last, strict=True))
  assert [len(s.losses) for s in snapshots] == [
    10 * (1 + s.extra["evaluations_skipped"]) for s in snapshots
  ]
  assert sum(len(s.losses) for s in [*snapshots, final]) == 40
  assert sum(final.extra["worker_steps"]) == 40


def test_a_failed_worker_is_reported_and_the_others_finish(problem, worker_batches):
  loss_fn, params = problem
  rule = AsyncSGD(loss_fn, learning_rate=0.1)
  # Worker 1 fails on its first iteration, which it takes as soon as its thread starts (300
  # iterations are far more than the others can finish before then).
  engine, final, _ = run_threads(rule, params, worker_batches[:3], 300, failure=(1, 0))
  assert [(f.worker, f.step) for f in engine.failures] == [(1, 0)]
  assert "InjectedFailure" in engine.failures[0].error
  assert final.extra["worker_steps"][1] == 0 and sum(final.extra["worker_steps"]) == 300
  assert len(applied(engine)) == 300


def test_fail_fast_and_no_workers_left_stop_with_a_clear_error(problem, worker_batches):
  loss_fn, params = problem
  rule = AsyncSGD(loss_fn, learning_rate=0.1)
  with pytest.raises(WorkerFailure, match="worker 1 failed at its step 0.*--fail_fast"):
    run_threads(rule, params, worker_batches[:2], 300, failure=(1, 0), fail_fast=True)
  with pytest.raises(WorkerFailure, match="all 1 workers failed after 3 of 30"):
    run_threads(rule, params, worker_batches[:1], 30, failure=(0, 3))


def test_injected_failure_from_the_command_line_is_named_in_the_summary(tmp_path):
  workdir = tmp_path / "run"
  result = run_cli(
    "--algorithm=async_easgd",
    "--num_devices=3",
    "--steps=300",
    "--inject_failure=2:0",  # at its first iteration: a worker's share of 300 can be small
    f"--workdir={workdir}",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert [f["worker"] for f in summary["failed_workers"]] == [2]
  assert summary["worker_steps"][2] == 0 and sum(summary["worker_steps"]) == 300
  assert "worker 2 failed at its step 0" in result.stderr
  # run.py's worker threads run each CPU call on its caller's thread (engines.dispatches_inline),
  # at most one thread per core (devices.host_threads)
  cores = len(os.sched_getaffinity(0))
  on = f"{cores} thread{'s' * (cores > 1)}"  # the start line's singular on one core
  hosting = "one thread per worker" if cores >= 3 else f"3 workers taking turns on {on}"
  assert f"{hosting}, each call on its caller's thread" in result.stderr
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # A point reached while the previous evaluation still runs is skipped (counted in the row).
  assert [r["step"] for r in rows][-1] == 300 and {r["step"] for r in rows} <= {100, 200, 300}
  assert len(rows) + sum(r["evaluations_skipped"] for r in rows) == 3
  assert "staleness_median" in rows[0]


def test_fail_fast_from_the_command_line_exits_1(tmp_path):
  result = run_cli("--algorithm=async_sgd", "--steps=300", "--inject_failure=1:0", "--fail_fast")
  assert result.returncode == 1
  assert "error: worker 1 failed at its step 0" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_without_a_workdir_stops_every_worker(signum):
  """The signal only asks the loop to stop (a KeyboardInterrupt raised wherever the main thread
  is could leave the workers' lock held: a run once hung 60 s here that way)."""
  command = [sys.executable, os.path.join(REPO, "run.py"), "--algorithm=hogwild_easgd"]
  with child_process(
    [*command, "--steps=10000000"],
    env=child_env(),
    stderr=subprocess.PIPE,
    text=True,
    default_sigint=True,  # Ctrl-C works even when the tests run as a background job
  ) as process:
    for line in process.stderr:  # wait until training is under way
      if "step 100/" in line:
        break
    process.send_signal(signum)
    start = time.monotonic()
    _, stderr = process.communicate(timeout=60)
  assert process.returncode == 128 + signum, stderr[-2000:]
  name = signal.Signals(signum).name
  assert re.search(rf"interrupted: {name} at step \d+; every worker stopped \(no --workdir", stderr)
  assert "Traceback" not in stderr
  assert time.monotonic() - start < 30


def test_only_the_worker_threads_run_cpu_calls_on_their_callers_thread():
  """A worker thread waits for each call's result at once: a queue would only add a hand-off.
  Every other loop keeps the queue, which overlaps its host's next batch with the step."""
  inline = {
    (engine, name)
    for name, kind in algorithms.REGISTRY.items()
    for engine in engines.NAMES
    if engines.dispatches_inline(Config(engine=engine), kind)
  }
  assert inline == {
    ("local", name)
    for name in ("async_sgd", "async_easgd", "hogwild", "hogwild_easgd", "downpour", "async_diloco")
  }


def test_async_flags_are_checked():
  with pytest.raises(ConfigError, match="accepts --optimizer=sgd"):  # --momentum means Nesterov
    train.validate(Config(algorithm="hogwild", momentum=0.9))
  with pytest.raises(ConfigError, match="--inject_failure must be WORKER:STEP"):
    Config(algorithm="async_sgd", num_devices=2, inject_failure="2:1").validate()
  with pytest.raises(ConfigError, match="--inject_failure must be WORKER:STEP"):
    Config(algorithm="async_sgd", inject_failure="x").validate()
  with pytest.raises(ConfigError, match="asynchronous algorithms"):
    train.validate(Config(algorithm="easgd", inject_failure="0:1"))
  assert Config(algorithm="hogwild_easgd", inject_failure="1:0").failure_point == (1, 0)
