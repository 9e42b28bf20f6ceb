"""The Ray engine on a real two-node cluster on this machine (tests/conftest.py: `ray_cluster`).

Equalities against the local engine and against sequential replays, accuracy on digits, a
worker that dies (and one that comes back), a parameter server that dies, and the hardening
attacks (SIGTERM and relaunch, bad flags) on Ray runs. In-process runs join the session's
cluster; run.py processes join it with --ray_address.
"""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import psutil
import pytest

from easgd_jax import core, data, models, reporting, study, train
from easgd_jax.config import Config
from easgd_jax.engines.base import worker_seed

import helpers
from helpers import REPO, bad_input_runs, child_env, child_process, run_at_once, run_cli

pytestmark = pytest.mark.slow
SMALL = dict(dataset="digits", model="mlp", batch_size=16, learning_rate=0.05, eval_every=1000)
RUN = os.path.join(REPO, "run.py")


def ray_run(cluster, workdir, **fields):
  config = Config(engine="ray", ray_address=cluster.address, **{**SMALL, **fields})
  summary = train.train_and_evaluate(config, str(workdir))
  return summary, reporting.load_params(os.path.join(workdir, reporting.PARAMS))


def local_run(workdir, **fields):
  summary = train.train_and_evaluate(Config(**{**SMALL, **fields}), str(workdir))
  return summary, reporting.load_params(os.path.join(workdir, reporting.PARAMS))


def assert_params_close(actual, expected, rtol=1e-6):
  assert sorted(actual) == sorted(expected)
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=1e-7, err_msg=name)


def test_async_sgd_with_one_worker_equals_sgd_in_a_study_mixing_engines(ray_cluster, tmp_path):
  """One study, two arms: async_sgd on Ray (one worker) and sgd on the local engine; and
  hogwild_easgd's unlocked server with one worker is easgd with G = 1 on the local engine."""
  on_ray = dict(engine="ray", ray_address=ray_cluster.address)
  elastic = dict(tau=1, rho=1.0)
  arms = (
    study.Arm("async_sgd on ray", dict(algorithm="async_sgd", **on_ray)),
    study.Arm("sgd", dict(algorithm="sgd")),
    study.Arm("hogwild_easgd on ray", dict(algorithm="hogwild_easgd", **on_ray, **elastic)),
    study.Arm("easgd", dict(algorithm="easgd", **elastic)),
  )
  base = Config(**{**SMALL, "num_devices": 1})
  mixed = study.Study("mixed", arms, base=base, seeds=(0,), samples=40 * 16, eval_samples=20 * 16)
  table = study.run(mixed, str(tmp_path))
  assert [row["arm"] for row in table] == [arm.label for arm in arms]
  on_ray, sgd, hogwild_easgd, easgd = (
    reporting.load_params(os.path.join(study.run_dir(str(tmp_path), arm, 0), reporting.PARAMS))
    for arm in arms
  )
  assert_params_close(on_ray, sgd)
  assert_params_close(hogwild_easgd, easgd)
  summaries = [
    json.loads(open(os.path.join(study.run_dir(str(tmp_path), arm, 0), reporting.SUMMARY)).read())
    for arm in arms[:2]
  ]
  assert summaries[0]["engine"] == "ray" and summaries[0]["final"]["step"] == 40
  assert (tmp_path / "results.md").exists()


@pytest.mark.parametrize("pipeline", [False, True])
def test_async_sgd_replays_sequentially_from_its_log(ray_cluster, tmp_path, pipeline):
  """The server's order of applications, each gradient at the version its worker read,
  replayed one after another in this process, gives the run's final parameters."""
  fields = dict(algorithm="async_sgd", num_devices=3, steps=60, seed=5, ray_pipeline=pipeline)
  summary, final = ray_run(ray_cluster, tmp_path, **fields)
  # The record's entries: [worker, its own step, the version it read, the version it made].
  applied = [entry[:3] for entry in reporting.read_applied(tmp_path)]
  assert len(applied) == 60 and len({w for w, _, _ in applied}) == 3
  config = Config(**{**SMALL, **fields})
  for position, (j, own_step, _) in enumerate(applied):
    assert own_step == sum(1 for w, _, _ in applied[:position] if w == j)
  replay = _sequential_replay(config, applied)
  try:
    assert_params_close(final, replay())
  except AssertionError:
    raise AssertionError(
      f"the run is not its log replayed: {_explain(final, replay, len(applied))}"
    ) from None
  # Without the pipeline a worker's next gradient is at W right after its own update (the
  # version p + 1 if that update was applied p-th); with it, at a version before that update.
  previous = {}
  for position, (j, _, read_at) in enumerate(applied):
    if j in previous:
      assert (read_at <= previous[j]) if pipeline else (read_at == previous[j] + 1)
    previous[j] = position
  assert summary["staleness"]["max"] >= 1


def _sequential_replay(config, applied):
  """replay(change=None): the final weights of `applied` ([worker, own step, version read])
  applied one after another, each gradient at the version its worker read, on that worker's own
  batch stream. `change` = (k, "read_at" | "batch"): entry k at the version before the one it
  read, or on the batch after its own (what a wrong read or a batch drawn twice would give)."""
  dataset = data.load(config)
  model = models.create(config.model, dataset.num_classes)
  gradient = jax.jit(core.make_gradient(core.make_loss_fn(model)))
  initial = models.init_params(model, dataset.image_shape, config.seed)
  count = config.num_devices

  def replay(change=None):
    samplers = [data.Sampler(dataset, worker_seed(config.seed, j)) for j in range(count)]
    versions = [initial]
    for k, (j, _, read_at) in enumerate(applied):
      batch = samplers[j].next(config.batch_size)
      if change == (k, "batch"):
        batch = samplers[j].next(config.batch_size)
      read_at = max(read_at - 1, 0) if change == (k, "read_at") else read_at
      grads, _ = gradient(versions[read_at], batch)
      versions.append(jax.tree.map(lambda w, g: w - config.learning_rate * g, versions[-1], grads))
    return {name: np.asarray(v) for name, v in _named(versions[-1]).items()}

  return replay


def _explain(final, replay, entries):
  """Which one-entry change of the log, if any, replays to the run's weights: a failure then
  says where the run left its log (it failed once in CI and has not been reproduced since)."""
  for change in [(k, kind) for kind in ("read_at", "batch") for k in range(entries)]:
    try:
      assert_params_close(final, replay(change))
    except AssertionError:
      continue
    return (
      f"entry {change[0]}: {'the version before' if change[1] == 'read_at' else 'its next batch'}"
    )
  return "no single entry's read or batch explains it"


def _named(params):
  """As params.npz names them."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(key): leaf for key, leaf in flat}


def test_async_sgd_pipelined_with_one_worker_is_exactly_one_step_stale(ray_cluster, tmp_path):
  summary, _ = ray_run(
    ray_cluster, tmp_path, algorithm="async_sgd", num_devices=1, steps=30, ray_pipeline=True
  )
  # The first gradient is at the initial W (0); the second too (1); then always one behind.
  assert summary["staleness"]["histogram"] == {"0": 1, "1": 29}


def test_hogwild_reaches_90_percent_on_digits(ray_cluster, tmp_path):
  """(async_easgd reaches it below with one of its three workers lost with a node.)"""
  summary, _ = ray_run(
    ray_cluster, tmp_path, algorithm="hogwild", num_devices=4, steps=800, eval_every=400
  )
  assert summary["final"]["test_accuracy"] >= 0.9
  assert summary["engine"] == "ray" and sum(summary["worker_steps"]) == 800
  assert min(summary["worker_steps"]) > 0


def test_round_robin_on_ray_equals_the_local_engine_and_resumes_across_engines(
  ray_cluster, tmp_path
):
  fields = dict(algorithm="easgd", num_devices=3, tau=2, checkpoint_every=20, seed=2)
  _, local = local_run(tmp_path / "local", steps=40, **fields)
  _, on_ray = ray_run(ray_cluster, tmp_path / "ray", steps=40, **fields)
  assert_params_close(on_ray, local)
  # The same checkpoint on both engines: 20 steps locally, then 20 more on Ray.
  local_run(tmp_path / "moved", steps=20, **fields)
  _, moved = ray_run(ray_cluster, tmp_path / "moved", steps=40, **fields)
  assert_params_close(moved, local)


@pytest.mark.parametrize("restarts", [0, 1])
def test_a_worker_that_dies_is_reported_and_the_run_completes(
  ray_cluster, tmp_path, restarts, monkeypatch
):
  """--inject_failure on Ray ends worker 1's process at its step 5 (os._exit, as a kill); a
  restarted one starts from the center as it is then, with a fresh worker state."""
  from easgd_jax.engines.ray.asynchronous import AsyncEngine  # Ray: after the cluster fixture

  started = {}  # worker 1's state handed to its actor: at the start, at a restart (and the center)
  make = AsyncEngine._worker

  def worker(self, j, state, sampler_state, stream=None):
    if j == 1:
      started["restart" if stream else "start"] = (state, self.master_host)
    return make(self, j, state, sampler_state, stream)

  monkeypatch.setattr(AsyncEngine, "_worker", worker)
  summary, _ = ray_run(
    ray_cluster,
    tmp_path,
    algorithm="async_easgd",
    num_devices=3,
    steps=300,
    eval_every=100,
    inject_failure="1:5",
    max_worker_restarts=restarts,
  )
  assert [f["worker"] for f in summary["failed_workers"]] == [1]
  # Its steps 0-4 finished before it died, whichever reply the driver saw first: they count.
  assert summary["failed_workers"][0]["step"] == 5
  assert sum(summary["worker_steps"]) == 300
  rows = reporting.read_metrics(tmp_path)
  if restarts:
    assert summary["restarted_workers"] == {"1": 1}
    assert summary["worker_steps"][1] > 5  # it rejoined and worked on
    assert all(r["workers_alive"] == 3 for r in rows)
    (first, initial), (state, center) = started["start"], started["restart"]
    jax.tree.map(np.testing.assert_array_equal, state.local, center)  # the center of then
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, first.opt_state)  # fresh
    assert not all(map(np.array_equal, jax.tree.leaves(center), jax.tree.leaves(initial)))
  else:
    assert summary["worker_steps"][1] == 5
    assert rows[-1]["workers_alive"] == 2


@pytest.mark.parametrize("restarts", [0, 1])
def test_round_robin_goes_on_when_a_worker_dies(ray_cluster, tmp_path, caplog, restarts):
  """Worker 1 of Algorithm 1 dies in its step 3: reported at that step; t mod G then skips it,
  or its restarted actor takes its turns from the center."""
  summary, params = ray_run(
    ray_cluster,
    tmp_path,
    algorithm="easgd",
    num_devices=3,
    tau=2,
    steps=60,
    eval_every=30,
    inject_failure="1:3",
    max_worker_restarts=restarts,
  )
  assert [(f["worker"], f["step"]) for f in summary["failed_workers"]] == [(1, 3)]
  if restarts:
    assert summary["restarted_workers"] == {"1": 1}
    assert "worker 1 restarted (1 of 1)" in caplog.text
  else:
    assert "round-robin goes on over the 2 live workers" in caplog.text
  assert [r["step"] for r in reporting.read_metrics(tmp_path)] == [30, 60]
  assert all(np.isfinite(v).all() for v in params.values())


def test_a_node_that_leaves_takes_its_workers_and_the_run_goes_on(ray_cluster, tmp_path, caplog):
  """A third node joins; workers are spread over the nodes; the node leaves after the first
  evaluation (its processes killed). Its workers are reported dead, the others finish, and
  async_easgd still reaches 0.90 on digits."""
  caplog.set_level(logging.INFO, logger="absl")  # where each worker runs
  node = ray_cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
  ray_cluster.wait_for_nodes()
  left = []

  def remove_after_the_first_row():
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      if (tmp_path / reporting.METRICS).exists() and reporting.read_metrics(tmp_path):
        break
      time.sleep(0.05)
    ray_cluster.remove_node(node, allow_graceful=False)
    left.append(time.monotonic())

  remover = threading.Thread(target=remove_after_the_first_row)
  try:
    remover.start()
    fields = dict(algorithm="async_easgd", num_devices=3, steps=1500, eval_every=250)
    summary, _ = ray_run(ray_cluster, tmp_path, **fields)
  finally:
    remover.join()
    if node in ray_cluster.worker_nodes:
      ray_cluster.remove_node(node, allow_graceful=False)
    # Until the cluster has seen the node go (missed heartbeats: seconds, more on a busy
    # machine), Ray may still place the next test's actors on it, and they would die there.
    ray_cluster.wait_for_nodes(timeout=120)
  on_it = {
    int(j)
    for j, where in re.findall(r"ray: worker (\d+) on (.*)", caplog.text)
    if node.node_id in where
  }
  assert on_it, caplog.text[-2000:]  # spread: one of the three workers went to the new node
  assert {f["worker"] for f in summary["failed_workers"]} == on_it
  assert sum(summary["worker_steps"]) == 1500
  assert reporting.read_metrics(tmp_path)[-1]["workers_alive"] == 3 - len(on_it)
  assert summary["final"]["test_accuracy"] >= 0.9


def _launch(cluster, workdir, *extra):
  args = [
    sys.executable,
    os.path.join(REPO, "run.py"),
    "--engine=ray",
    f"--ray_address={cluster.address}",
    "--dataset=digits",
    "--model=mlp",
    f"--workdir={workdir}",
    "--progress_every_s=1",
    *extra,
  ]
  return args


def _wait_for(process, pattern, lines, timeout=120):
  """Read the child's stderr until `pattern` matches a line; returns the match."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    line = process.stderr.readline()
    if not line:
      break
    lines.append(line)
    found = re.search(pattern, line)
    if found:
      return found
  events = "".join(line for line in lines if "ray:" in line or line.startswith("error"))
  raise AssertionError(
    f"no line matching {pattern!r}; the engine's lines:\n{events[-3000:]}\nthe last lines:\n"
    f"{''.join(lines)[-1500:]}"
  )


def _wait_for_step(process, minimum, lines):
  """Read the child's progress lines until one reports at least `minimum` steps."""
  while int(_wait_for(process, r"progress: step (\d+)", lines).group(1)) < minimum:
    pass


def test_sigkilled_worker_and_server_then_sigterm_and_relaunches(ray_cluster, tmp_path):
  """The hardening attacks on a Ray run, one after another on one workdir: a worker's process
  SIGKILLed mid-run (reported, the run goes on), then the parameter server's (exit 3); the
  relaunch resumes from the last checkpoint and gets SIGTERM (exit 143, a checkpoint of that
  moment), and the next relaunch resumes from it and finishes."""
  args = _launch(ray_cluster, tmp_path, "--algorithm=async_sgd", "--num_devices=3")
  args += ["--steps=800", "--eval_every=400", "--checkpoint_every=200"]
  lines = []
  with child_process(args, env=child_env(), stderr=subprocess.PIPE, text=True) as p:
    pid = int(_wait_for(p, r"parameter server on node 127\.0\.0\.1 pid (\d+)", lines).group(1))
    worker = int(_wait_for(p, r"worker 2 on node 127\.0\.0\.1 pid (\d+)", lines).group(1))
    _wait_for_step(p, 250, lines)  # past the checkpoint at 200
    os.kill(worker, signal.SIGKILL)
    _wait_for(p, r"ray: worker 2 died at run step \d+ \(worker 2 failed at its step \d+", lines)
    os.kill(pid, signal.SIGKILL)
    lines += p.stderr.readlines()
    assert p.wait(timeout=60) == 3, "".join(lines)[-3000:]
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and "parameter server died" in errors[0]
  saved = max(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())

  lines = []
  with child_process(args, env=child_env(), stderr=subprocess.PIPE, text=True) as p:
    _wait_for(p, f"resuming from the checkpoint at step {saved}", lines)
    _wait_for(p, r"progress: step", lines)
    p.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    lines += p.stderr.readlines()
    assert p.wait(timeout=30) == 143, "".join(lines)[-3000:]
  assert time.monotonic() - sent < 30
  stopped = re.search(r"SIGTERM at step (\d+)", "".join(lines))
  assert stopped, "".join(lines)[-2000:]

  result = run_cli(*args[2:], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resuming from the checkpoint at step {stopped.group(1)}" in result.stderr
  summary = json.loads((tmp_path / reporting.SUMMARY).read_text())
  assert summary["final"]["step"] == 800 and sum(summary["worker_steps"]) == 800
  # One record of the whole run's applied updates across the three launches: versions 1..800,
  # each (worker, its step) once; on resume it was cut back to the checkpoint, not restarted.
  record = reporting.read_applied(tmp_path)
  assert [made for *_, made in record] == list(range(1, 801))
  assert len({(worker, step) for worker, step, _, _ in record}) == 800


BAD_ENGINE_FLAGS = [
  (
    ["--engine=ray", "--algorithm=sgd"],
    "--engine=ray runs easgd, sync_sgd, .*; --algorithm=sgd runs on --engine=local or simulated",
  ),
  (
    ["--engine=ray", "--algorithm=async_sgd", "--round_timeout_s=5"],
    "--round_timeout_s applies to the step-driven algorithms' rounds",
  ),
  (["--algorithm=async_sgd", "--num_devices=2", "--devices_per_worker=2"], "use 1"),
  (["--algorithm=hogwild", "--engine=threads"], "--engine=threads is unknown"),
  (
    ["--engine=ray", "--algorithm=hogwild", "--ray_address=nowhere"],
    "--ray_address must be auto or HOST:PORT",
  ),
  (["--engine=ray", "--algorithm=async_sgd", "--max_worker_restarts=-1"], "--max_worker_restarts"),
  (["--algorithm=async_sgd", "--ray_pipeline"], "--ray_pipeline applies to --engine=ray"),
  (["--algorithm=easgd", "--inject_failure=1:3"], "and to easgd, sync_sgd, .* with --engine=ray"),
]


@pytest.fixture(scope="module")
def bad_engine_runs(tmp_path_factory):
  """Every BAD_ENGINE_FLAGS run.py, started together (test_run.run_at_once)."""
  cases = [([*flags, "--steps=5"], message) for flags, message in BAD_ENGINE_FLAGS]
  return bad_input_runs(tmp_path_factory, os.path.join(REPO, "run.py"), cases, "w")


@pytest.mark.parametrize("flags, message", BAD_ENGINE_FLAGS, ids=[m for _, m in BAD_ENGINE_FLAGS])
def test_bad_engine_flags_exit_2_with_one_line(bad_engine_runs, flags, message):
  result, workdir = bad_engine_runs[(*flags, "--steps=5")]
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(errors) == 1 and re.search(message, errors[0]), result.stderr
  assert not workdir.exists()


def test_an_unreachable_ray_address_exits_2_within_30_seconds(tmp_path):
  """Nothing at the address, or a listener that isn't Ray (ray.init hung there past 120 s)."""
  with socket.socket() as silent:  # accepts connections (its backlog), answers nothing
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    addresses = ["127.0.0.1:9", f"127.0.0.1:{silent.getsockname()[1]}"]
    commands = [
      [RUN, "--engine=ray", "--algorithm=async_sgd", f"--ray_address={address}"]
      + [f"--workdir={tmp_path / str(i)}"]
      for i, address in enumerate(addresses)
    ]
    started = time.monotonic()
    results = run_at_once(
      [[sys.executable, *c] for c in commands], timeout=120, cwd=REPO, env=child_env()
    )
  assert time.monotonic() - started < 30
  for i, (address, result) in enumerate(zip(addresses, results, strict=True)):
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--ray_address={address}" in errors[0]
    assert not (tmp_path / str(i)).exists()


def _ray_processes(folder):
  """The processes whose environment names `folder` as Ray's temp folder (RAY_TMPDIR)."""
  found = []
  for process in psutil.process_iter():
    try:
      if process.environ().get("RAY_TMPDIR") == folder:
        found.append(process)
    except psutil.Error:
      pass
  return found


def test_a_private_ray_ignores_another_cluster_and_leaves_nothing_behind(ray_cluster, tmp_path):
  """Without --ray_address a run starts its own Ray on 127.0.0.1, whatever RAY_ADDRESS says
  (here: the session's cluster; joined, the run failed with a traceback), and when it ends,
  finished or SIGKILLed, no process of it is left, nor any file in Ray's temp folder."""
  folder = tempfile.mkdtemp(prefix="ray_", dir="/tmp")  # unix socket paths must stay short
  try:
    env = child_env(RAY_ADDRESS=ray_cluster.address, RAY_TMPDIR=folder)
    args = [sys.executable, RUN, "--engine=ray", "--algorithm=async_sgd", "--num_devices=2"]
    args += ["--model=mlp", "--eval_every=1000", f"--workdir={tmp_path}"]
    for steps in (60, 100000):  # a run that finishes, then one killed mid-run
      lines, command = [], [*args, f"--steps={steps}"]
      with child_process(command, env=env, stderr=subprocess.PIPE, text=True) as p:
        _wait_for(p, r"ray: worker 1 on node 127\.0\.0\.1", lines)
        listening = {
          c.laddr.ip
          for process in _ray_processes(folder)
          for c in process.net_connections(kind="tcp")
          if c.status == psutil.CONN_LISTEN
        }
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
        if steps == 60:
          lines += p.stderr.readlines()
          assert p.wait(timeout=120) == 0, "".join(lines)[-3000:]
        else:
          p.kill()  # the driver alone: what its private cluster started must go with it
        # Checked before the test kills the driver's process group: Ray's own agents outlived
        # a killed driver by 60 s.
        deadline = time.monotonic() + 20
        while (_ray_processes(folder) or os.listdir(folder)) and time.monotonic() < deadline:
          time.sleep(0.2)
        assert not _ray_processes(folder) and not os.listdir(folder)
  finally:
    for process in _ray_processes(folder):
      process.kill()
    shutil.rmtree(folder, ignore_errors=True)


def test_round_robin_on_ray_keeps_its_golden_values(ray_cluster, tmp_path):
  """Algorithm 1 with its workers as actors: the golden values of tests/test_golden.py."""
  name = "ray/easgd_tau2"
  found = helpers.golden_run(name, tmp_path, {"ray_address": ray_cluster.address})
  helpers.golden_check(name, found)


def test_downpour_runs_on_ray_with_no_code_of_its_own_and_survives_a_dead_worker(
  ray_cluster, tmp_path
):
  """The one-rule design's proof: DOWNPOUR, written once as a pure rule, on the generic server
  and worker actors; a worker killed at its step 5 is reported and the others learn digits."""
  summary, _ = ray_run(
    ray_cluster,
    tmp_path,
    algorithm="downpour",
    num_devices=4,
    tau=4,
    steps=1200,
    eval_every=600,
    inject_failure="1:5",
  )
  assert [f["worker"] for f in summary["failed_workers"]] == [1]
  assert summary["final"]["test_accuracy"] >= 0.9
  assert sum(summary["worker_steps"]) == 1200
  record = reporting.read_applied(tmp_path)  # one entry per push, rounds of tau = 4 steps
  assert all((step + 1) % 4 == 0 for _, step, _, _ in record)
  assert [made for *_, made in record] == list(range(1, len(record) + 1))


def test_async_diloco_measures_its_workers_and_keeps_their_local_steps_on_resume(
  ray_cluster, tmp_path, caplog
):
  """Asynchronous DiLoCo on the generic actors: each worker's H_w from the speed it measured at
  the first launch (all at once), each push after H_w inner steps, the same H_w after a resume,
  and digits learned."""
  caplog.set_level(logging.INFO, logger="absl")
  fields = dict(
    algorithm="async_diloco",
    num_devices=3,
    tau=4,
    learning_rate=None,  # diloco's AdamW
    eval_every=120,
    checkpoint_every=120,
    dynamic_local_steps=True,
  )
  first, _ = ray_run(ray_cluster, tmp_path, steps=120, **fields)
  periods = first["exchange_periods"]
  assert len(periods) == 3 and all(1 <= p <= 4 for p in periods) and 4 in periods
  assert caplog.text.count("ray: worker speeds") == 1
  summary, _ = ray_run(ray_cluster, tmp_path, steps=360, **fields)
  assert caplog.text.count("ray: worker speeds") == 1  # the resume took them from its checkpoint
  assert summary["exchange_periods"] == periods and sum(summary["worker_steps"]) == 360
  record = reporting.read_applied(tmp_path)
  assert [made for *_, made in record] == list(range(1, len(record) + 1))
  assert all((step + 1) % periods[j] == 0 for j, step, _, _ in record)
  # 0.66 and 0.68 where the noise of a loaded host timed some worker 2.5x slower (periods
  # [1, 4, 1], [1, 3, 4]); above 0.7 otherwise (chance: 0.1)
  assert summary["final"]["test_accuracy"] >= 0.5


def test_the_transformer_runs_on_ray(ray_cluster, tmp_path):
  """The language-model workload on the Ray engine: a tiny transformer, a few asynchronous
  iterations and Algorithm 1's, against the Shakespeare windows each worker gathers itself."""
  for algorithm in ("async_easgd", "easgd"):
    summary, _ = ray_run(
      ray_cluster,
      tmp_path / algorithm,
      **helpers.TINY_LM,
      algorithm=algorithm,
      batch_size=None,
      learning_rate=None,
    )
    assert summary["final"]["step"] == 12 and summary["final"]["test_loss"] < 5.0
