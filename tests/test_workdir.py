"""The workdir under pressure: finished runs stay finished, one run per workdir, resume refuses
what it cannot honour, torn and damaged files, and asynchronous checkpoints that hold one instant.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from easgd_jax import checkpoints, reporting, train, workdir
from easgd_jax.algorithms import AsyncSGD
from easgd_jax.config import Config
from easgd_jax.engines.base import Plan, Snapshot
from easgd_jax.engines.local import threads
from easgd_jax.errors import ConfigError

from helpers import (
  BATCH,
  IMAGE_SHAPE,
  NUM_CLASSES,
  REPO,
  ListSampler,
  child_env,
  kill_group,
  read_events,
  run_process,
)

PROBLEM_SEED = 3  # the `problem` fixture (conftest.py): test_async.py's tiny problem

SMALL = dict(model="mlp", steps=40, eval_every=20, checkpoint_every=20)


@pytest.fixture(scope="module")
def worker_batches():
  """Worker j's stream is worker_batches[j] (test_async.py's batches: the same numbers)."""
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
  ]


def files_of(folder):
  """{relative path: (bytes, mode, inode, modification time)} of every file and folder under
  `folder` (a folder's bytes: None): a rewrite with the same bytes shows too."""
  found = {}
  for root, folders, names in os.walk(folder):
    for name in [*folders, *names, *([] if root != str(folder) else ["."])]:
      path = os.path.normpath(os.path.join(root, name))
      stat = os.stat(path)
      content = None
      if not os.path.isdir(path):
        with open(path, "rb") as f:
          content = f.read()
      found[os.path.relpath(path, folder)] = (content, stat.st_mode, stat.st_ino, stat.st_mtime_ns)
  return found


@pytest.fixture(scope="module")
def cli_env():
  return child_env()


RUN = os.path.join(REPO, "run.py")


def start(env, *args):
  """run.py in its own process group; every caller kills the group in a `finally`."""
  return subprocess.Popen(
    [sys.executable, RUN, *args],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )


@pytest.mark.parametrize("algorithm", ["sgd", "async_sgd"])
def test_a_finished_run_stays_finished_and_writes_nothing(tmp_path, cpu_devices, algorithm):
  config = Config(algorithm=algorithm, num_devices=2, **SMALL)
  first = train.train_and_evaluate(config, str(tmp_path))
  before = files_of(tmp_path)
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again["complete"] and again["final"] == first["final"]
  assert files_of(tmp_path) == before  # not a byte, not a mode changed
  # A lower --steps on the finished run: complete too, and config.json keeps its steps.
  lower = train.train_and_evaluate(
    Config(algorithm=algorithm, num_devices=2, **SMALL | {"steps": 20}), str(tmp_path)
  )
  assert lower["complete"] and files_of(tmp_path) == before


@pytest.mark.parametrize("algorithm", ["easgd", "async_easgd"])
def test_a_kill_after_the_final_checkpoint_is_completed_by_the_relaunch(
  tmp_path, cpu_devices, algorithm
):
  config = Config(algorithm=algorithm, num_devices=2, **SMALL)
  train.train_and_evaluate(config, str(tmp_path))
  params = reporting.load_params(tmp_path / reporting.PARAMS)
  rows = reporting.read_metrics(tmp_path)
  for name in (reporting.SUMMARY, reporting.PARAMS):  # as if SIGKILLed just before writing them
    os.remove(tmp_path / name)
  saved = files_of(tmp_path)[reporting.CONFIG]
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert files_of(tmp_path)[reporting.CONFIG] == saved  # config.json not even rewritten
  assert reporting.read_metrics(tmp_path) == rows  # no extra row
  assert summary["final"] == rows[-1] and os.path.exists(tmp_path / reporting.SUMMARY)
  rewritten = reporting.load_params(tmp_path / reporting.PARAMS)
  assert all(np.array_equal(params[k], rewritten[k]) for k in params)
  assert train.train_and_evaluate(config, str(tmp_path))["complete"]


def test_a_relaunched_finished_run_exits_0_from_the_command_line(tmp_path, cli_env):
  args = [
    "--algorithm=async_sgd",
    "--model=mlp",
    "--steps=40",
    "--eval_every=20",
    f"--workdir={tmp_path}",
  ]
  before = {}
  for launch in range(2):
    before = files_of(tmp_path) if launch else before
    result = run_process([sys.executable, RUN, *args], env=cli_env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
  assert files_of(tmp_path) == before  # run.py's checks of the workdir write nothing either
  stderr = result.stderr
  assert "complete at step 40" in stderr and "Traceback" not in stderr
  assert [r["step"] for r in reporting.read_metrics(tmp_path)] == [20, 40]


HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from easgd_jax import workdir
lock = workdir.Lock({path!r}).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(path):
  process = subprocess.Popen(
    [sys.executable, "-c", HOLD.format(repo=REPO, path=str(path))],
    stdout=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  assert process.stdout.readline().strip() == "held"
  return process


def test_one_run_per_workdir_and_a_dead_holders_lock_is_taken_over(tmp_path, cli_env):
  holder = hold_lock(tmp_path)
  try:
    with pytest.raises(workdir.Busy, match=f"pid {holder.pid}"):
      workdir.Lock(str(tmp_path)).acquire()
    started = time.monotonic()
    run = start(cli_env, "--algorithm=sgd", "--steps=10", f"--workdir={tmp_path}")
    try:
      _, stderr = run.communicate(timeout=120)
    finally:
      kill_group(run)
    assert run.returncode == 2 and time.monotonic() - started < 60
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and f"pid {holder.pid}" in lines[-1], stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == [".lock"]  # nothing written beside the lock
  finally:
    kill_group(holder)  # SIGKILL: its lock is left behind ...
  with workdir.Lock(str(tmp_path)):  # ... and taken over
    pass


def test_a_study_on_a_held_workdir_exits_2(tmp_path, cli_env):
  holder = hold_lock(tmp_path)
  try:
    study = run_process(
      [sys.executable, os.path.join(REPO, "experiments", "sweep_rho.py"), f"--workdir={tmp_path}"],
      env=cli_env,
      timeout=120,
    )
  finally:
    kill_group(holder)
  assert study.returncode == 2, study.stderr[-2000:]
  assert f"pid {holder.pid}" in study.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
  "change, field",
  [
    (dict(momentum=0.9), "momentum"),
    (dict(learning_rate=0.1), "learning_rate"),
    (dict(rho=2.0), "rho"),
    (dict(tau=2), "tau"),
    (dict(batch_size=16), "batch_size"),
    (dict(seed=1), "seed"),
    (dict(synthetic_train_size=100), "synthetic_train_size"),
    (dict(steps=30), "steps"),  # lower, on an unfinished run
  ],
)
def test_resume_refuses_every_change_but_the_allowlist(tmp_path, cpu_devices, change, field):
  config = Config(algorithm="easgd", num_devices=2, **SMALL | {"steps": 60})
  train.train_and_evaluate(Config(**config.to_dict() | {"steps": 40}), str(tmp_path))
  with open(tmp_path / reporting.CONFIG) as f:
    saved = json.load(f)
  saved["steps"] = 60  # as if the first launch had asked for 60 and been stopped at 40
  reporting.write_json(str(tmp_path / reporting.CONFIG), saved)
  before = files_of(tmp_path)
  with pytest.raises(ConfigError, match=f"--{field}=") as error:
    train.train_and_evaluate(Config(**config.to_dict() | change), str(tmp_path))
  assert "\n" not in str(error.value)
  assert files_of(tmp_path) == before
  # The allowlisted fields change freely (and a field an older config.json lacks is its default).
  del saved["inject_failure"]
  reporting.write_json(str(tmp_path / reporting.CONFIG), saved)
  allowed = dict(eval_every=10, checkpoint_every=10, keep_checkpoints=5, target_accuracy=0.5)
  summary = train.train_and_evaluate(Config(**config.to_dict() | allowed), str(tmp_path))
  assert summary["steps"] == 60


@pytest.mark.parametrize("taken", [checkpoints.FOLDER, reporting.CONFIG])
def test_a_name_the_run_needs_taken_by_the_wrong_kind_is_one_line_and_changes_nothing(
  tmp_path, taken
):
  """`checkpoints` a file (a 72-line traceback at the first save), `config.json` a folder:
  ConfigError naming it before anything is written (the lock aside: taken to read)."""
  path = tmp_path / taken
  path.mkdir() if taken == reporting.CONFIG else path.write_text("notes\n")
  before = files_of(tmp_path)
  with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))} .*use another --workdir$"):
    train.train_and_evaluate(Config(algorithm="sgd", **SMALL), str(tmp_path))
  assert files_of(tmp_path).keys() - {workdir.Lock.NAME} == before.keys() - {workdir.Lock.NAME}
  assert files_of(tmp_path)[taken] == before[taken]


def test_without_config_json_the_checkpoints_own_config_rules_the_resume(tmp_path, cpu_devices):
  """config.json deleted: each checkpoint's record carries the run's config, and a relaunch
  with other flags is refused as against config.json (nothing resumed or set aside silently)."""
  config = Config(algorithm="easgd", num_devices=2, **SMALL)
  train.train_and_evaluate(config, str(tmp_path))
  os.remove(tmp_path / reporting.CONFIG)
  before = files_of(tmp_path)
  longer = config.to_dict() | {"steps": 60}
  for change, named in (
    (dict(learning_rate=0.1), "--learning_rate"),
    (dict(model="lenet"), "--model"),
  ):
    with pytest.raises(ConfigError, match=f"{named}=") as error:
      train.train_and_evaluate(Config(**longer | change), str(tmp_path))
    assert "\n" not in str(error.value)
    assert files_of(tmp_path) == before
  summary = train.train_and_evaluate(Config(**longer), str(tmp_path))  # the same flags resume
  assert [r["step"] for r in summary["history"]] == [20, 40, 60]
  assert json.loads((tmp_path / reporting.CONFIG).read_text())["steps"] == 60


def test_a_damaged_config_json_is_one_line(tmp_path, cpu_devices):
  (tmp_path / reporting.CONFIG).write_text('{"algorithm": "easgd", "ste')
  with pytest.raises(ConfigError, match="config.json is damaged") as error:
    train.train_and_evaluate(Config(**SMALL), str(tmp_path))
  assert "\n" not in str(error.value)


def test_a_torn_row_and_lost_events_are_restored_on_resume(tmp_path, cpu_devices):
  """Power lost after the checkpoint at step 20: its own row torn mid-line (the checkpoint's
  record keeps it) and the TensorBoard events never flushed (rewritten from the rows)."""
  config = Config(algorithm="sgd", **SMALL)
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
  train.train_and_evaluate(Config(**config.to_dict() | {"steps": 20}), str(tmp_path))
  metrics = tmp_path / reporting.METRICS
  metrics.write_text(metrics.read_text()[:-30])
  for events in tmp_path.glob("events.out.tfevents.*"):
    events.write_bytes(b"")
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert [r["step"] for r in summary["history"]] == [20, 40]
  timeless = lambda rows: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]
  assert timeless(reporting.read_metrics(tmp_path)) == timeless(whole["history"])
  scalars = [step for tag, step, _ in read_events(tmp_path) if tag == "test_accuracy"]
  assert scalars == [20, 40]  # every row once, every launch's
  assert all(p.stat().st_size > 0 for p in tmp_path.glob("events.out.tfevents.*"))


def test_a_damaged_checkpoint_record_falls_back_to_the_previous_checkpoint(tmp_path, cpu_devices):
  config = Config(algorithm="easgd", num_devices=2, **SMALL | {"steps": 60})
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  train.train_and_evaluate(Config(**config.to_dict() | {"steps": 40}), str(tmp_path))
  record = tmp_path / checkpoints.FOLDER / "40" / "record" / "metadata"
  text = record.read_text()
  assert '"train_seconds": ' in text
  record.write_text(text.replace('"train_seconds": ', '"train_seconds": 1', 1))  # still JSON
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert os.path.isdir(tmp_path / checkpoints.SET_ASIDE / "40")
  params = reporting.load_params(tmp_path / reporting.PARAMS)
  expected = reporting.load_params(tmp_path / "whole" / reporting.PARAMS)
  assert all(np.array_equal(params[k], expected[k]) for k in params)  # resumed from 20, exactly
  assert [r["step"] for r in summary["history"]] == [20, 40, 60]


class SlowSnapshots:
  """Counts the master's evaluation snapshots alive at once (each is freed once it was scored)."""

  live = peak = 0

  def __init__(self, master):
    self.taken = master.snapshot

  def __call__(self):
    SlowSnapshots.live += 1
    SlowSnapshots.peak = max(SlowSnapshots.peak, SlowSnapshots.live)
    return self.taken()


def test_at_most_one_evaluation_in_flight_and_no_loss_is_lost(problem, worker_batches):
  loss_fn, params = problem
  steps = 200
  config = Config(num_devices=4, steps=steps, eval_every=1, batch_size=BATCH, fail_fast=True)
  samplers = [ListSampler(b) for b in worker_batches[:4]]
  rule = AsyncSGD(loss_fn, learning_rate=0.1)
  engine = threads.ThreadEngine(config, rule, None, params, samplers)
  engine.master.snapshot = SlowSnapshots(engine.master)  # from the first iteration on
  scored, final = [], None
  for event in engine.run(Plan(config, checkpointing=False)):  # the trainer's part, slowed
    if not isinstance(event, Snapshot):
      continue
    if event.step == steps:
      final = event
      continue
    time.sleep(0.05)  # slower than an iteration: points come faster than they can be scored
    scored.append(event)
    SlowSnapshots.live -= 1
  assert SlowSnapshots.peak <= 2  # the one being scored, and the final one
  assert len(scored) + engine.evaluations_skipped == 199 and engine.evaluations_skipped > 0
  skipped = [s.extra["evaluations_skipped"] for s in [*scored, final]]
  assert sum(skipped) == engine.evaluations_skipped
  assert sum(len(s.losses) for s in scored) + len(final.losses) == 200  # every loss in a row
  entries = [entry for s in scored for entry in s.losses]  # (iteration, [loss], who), on the host
  assert all(isinstance(v, np.ndarray) and v.shape == (1,) for _, v, _ in entries)
  assert sorted(i for i, _, _ in entries + final.losses) == list(range(1, 201))


def peak_rss_mb(pid):
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return 0.0


@pytest.mark.slow
def test_sigterm_stops_a_busy_async_run_within_30_s_with_bounded_memory(tmp_path, cli_env):
  args = [
    "--algorithm=async_easgd",
    "--num_devices=2",  # two workers keep the evaluations busy; each more is one more compile
    "--dataset=synthetic",
    "--synthetic_shape=32,32,3",
    "--model=cifar_cnn",
    "--eval_every=1",
    "--steps=2000",
    f"--workdir={tmp_path}",
  ]
  process = start(cli_env, *args)
  try:
    for line in process.stderr:  # evaluations are under way: the backlog would build now
      if re.search(r"step \d+/2000", line):
        break
    time.sleep(5)
    peak = peak_rss_mb(process.pid)
    process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    took = time.monotonic() - stopped
  finally:
    kill_group(process)
  assert process.returncode == 143, stderr[-2000:]
  assert took < 30 and peak < 2048, (took, peak)
  assert "checkpoint saved" in stderr
  assert checkpoints.saved_steps(tmp_path)


def test_async_checkpoints_apply_every_iteration_once_across_five_sigkills(tmp_path, cli_env):
  steps, every = 600, 40
  args = [
    "--algorithm=async_sgd",
    "--model=mlp",
    f"--steps={steps}",
    f"--eval_every={every}",
    f"--checkpoint_every={every}",
    f"--workdir={tmp_path}",
  ]
  rng = random.Random(0)
  for _ in range(5):
    # Short of the last checkpoint: a launch that can reach its target is still running to kill
    # (a kill that lands late, past two more checkpoints, can leave less than a target's worth).
    target = max(checkpoints.saved_steps(tmp_path), default=0) + every * rng.choice([1, 2])
    target = min(target, steps - every)
    process = start(cli_env, *args)
    try:
      deadline = time.monotonic() + 240
      while max(checkpoints.saved_steps(tmp_path), default=0) < target:
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.005)
      time.sleep(rng.uniform(0.0, 0.05))  # mid-iteration, mid-save or mid-evaluation
    finally:
      kill_group(process)  # SIGKILL
  result = run_process([sys.executable, RUN, *args], env=cli_env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  # The record's lines are now [worker, worker_step, read_at, applied_as]: (worker, worker_step)
  # is what each entry of applied_updates.json's "applied" was.
  applied = [tuple(entry[:2]) for entry in reporting.read_applied(tmp_path)]
  assert len(applied) == steps and len(set(applied)) == steps  # each exactly once
  with open(tmp_path / reporting.SUMMARY) as f:
    worker_steps = json.load(f)["worker_steps"]
  for j, count in enumerate(worker_steps):  # worker j's steps 0..n_j-1, none missing
    assert sorted(s for w, s in applied if w == j) == list(range(count))
  assert [r["step"] for r in reporting.read_metrics(tmp_path)] == list(
    range(every, steps + 1, every)
  )


def test_a_failed_write_removes_its_partial_folder_while_writes_in_flight_refill_it(tmp_path):
  """A save that fails (a full disk) with writes still in flight, as tensorstore's threads are:
  they put files back into the partial folder after a first removal; none is left at the end."""
  import threading

  path = str(tmp_path / "checkpoints" / "40")
  partial = path + ".orbax-checkpoint-tmp"
  stop = threading.Event()

  def in_flight():
    while not stop.is_set():
      try:
        os.makedirs(os.path.join(partial, "arrays"), exist_ok=True)
        open(os.path.join(partial, "arrays", "chunk"), "w").close()
      except OSError:  # removed under it
        pass
      time.sleep(0.001)

  writer = threading.Thread(target=in_flight)
  writer.start()
  threading.Timer(0.2, stop.set).start()  # the writes end 0.2 s after they began
  with pytest.raises(ValueError, match="a write failed"):
    with workdir.writing(path, ".orbax-checkpoint-tmp"):
      time.sleep(0.05)
      raise ValueError("a write failed")
  writer.join()
  assert not os.path.exists(partial)
