"""Checkpoints: exact resume after SIGKILL/SIGTERM, corrupted checkpoints, NaN, changed flags.

The subprocess runs share a persistent compilation cache, so each relaunch costs seconds.
"""

import contextlib
import dataclasses
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

from easgd_jax import checkpoints, cli, core, failures, reporting, train
from easgd_jax.config import Config
from easgd_jax.errors import ConfigError

from helpers import REPO, child_env, child_process

# One driver of each kind: one device, a worker per device in turn, every device at once (pmap),
# and the simulated cluster.
# sync_sgd's state (the same pmap placement, without a center) is killed and resumed bitwise in
# tests/test_multiprocess.py, across two processes.
STEPWISE = {  # (sgd's steps are sync_easgd's engine on one device, with less state to resume)
  "easgd": ["--num_devices=4", "--tau=2"],
  "sync_easgd": ["--num_devices=4", "--tau=2"],
  # The simulated cluster: its event stream, jitter and a straggler deciding the order.
  "async_easgd": [
    "--engine=simulated",
    "--num_devices=4",
    "--tau=2",
    "--sim_compute_ms=1",
    "--sim_service_us=50",
    "--sim_jitter=0.5",
    "--sim_stragglers=1",
  ],
}
THREE_STOPS = ("easgd", "async_easgd")  # stopped three times, the others twice
EVERY = 25  # checkpoint and evaluation period of the interrupted runs
SHORT = ["--steps=300", f"--eval_every={EVERY}", f"--checkpoint_every={EVERY}"]  # 3 stops <= 150


@pytest.fixture(scope="module")
def cli_env():
  return child_env()  # run.py sets up its own emulated devices; the session's cache


def launch(env, workdir, *args, stderr=subprocess.PIPE):
  """run.py in its own process group (helpers.child_process): a context manager."""
  return child_process(
    [sys.executable, os.path.join(REPO, "run.py"), *args, f"--workdir={workdir}"],
    env=env,
    stderr=stderr,
    text=True,
    default_sigint=True,  # Ctrl-C works even when the tests run as a background job
  )


def finish(launched, timeout=300):
  """Wait for a `launch`ed run; returns (exit code, stderr). Its group is killed on the way out."""
  with launched as process:
    _, stderr = process.communicate(timeout=timeout)
  return process.returncode, stderr


def latest_checkpoint(workdir):
  folder = os.path.join(workdir, checkpoints.FOLDER)
  if not os.path.isdir(folder):
    return 0
  return max((int(name) for name in os.listdir(folder) if name.isdigit()), default=0)


def interrupt(env, workdir, args, signum, rng, every=EVERY):
  """Launch; once it has saved 1 or 2 new checkpoints, send `signum` a random moment later."""
  target = latest_checkpoint(workdir) + every * rng.choice([1, 2])
  with launch(env, workdir, *args) as process:
    deadline = time.monotonic() + 240
    while latest_checkpoint(workdir) < target:
      assert process.poll() is None, process.communicate()[1][-2000:]
      assert time.monotonic() < deadline, "no checkpoint was written"
      time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.1))  # mid-step, mid-save or mid-evaluation
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
  return process.returncode, stderr


def same_params(a, b):
  x, y = reporting.load_params(a / reporting.PARAMS), reporting.load_params(b / reporting.PARAMS)
  return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def same_rows(a, b, keys=("step", "samples", "train_loss", "test_loss", "test_accuracy")):
  rows_a, rows_b = reporting.read_metrics(a), reporting.read_metrics(b)
  return [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(STEPWISE))
def test_killed_and_terminated_runs_resume_bitwise(tmp_path, cli_env, algorithm):
  args = [f"--algorithm={algorithm}", *STEPWISE[algorithm], *SHORT]
  workdir, rng = tmp_path / "interrupted", random.Random(algorithm)
  resumed_from = []
  with contextlib.ExitStack() as stack:
    # A fresh run killed, the resumed run stopped by SIGTERM (Ctrl-C's SIGINT for easgd), and
    # (the host schedule, the simulated events) that resumed run killed: each signal on a fresh
    # and on a resumed run, and resumes from the checkpoints each leaves. sync_easgd's pmapped
    # steps resume after a SIGKILL at the first launch already: a third would repeat it.
    stop = signal.SIGINT if algorithm == "easgd" else signal.SIGTERM
    signals = [signal.SIGKILL, stop] + [signal.SIGKILL] * (algorithm in THREE_STOPS)
    for i, signum in enumerate(signals):
      code, stderr = interrupt(cli_env, workdir, args, signum, rng)
      if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
      else:
        assert code == 128 + signum, stderr[-2000:]  # 143 for SIGTERM, 130 for SIGINT
        assert f"stopped: {signum.name} at step" in stderr, stderr[-2000:]
        assert "run the same command to resume" in stderr
      resumed_from += [
        int(line.split("at step ")[1].split()[0])
        for line in stderr.splitlines()
        if "resuming from the checkpoint at step" in line
      ]
      if i == 0:
        # The uninterrupted reference run goes on beside the rest (a workdir of its own, its log
        # in a file), started once the first launch has put the programs in the compilation
        # cache; it is awaited before the comparison.
        whole_log = stack.enter_context(open(tmp_path / "whole.log", "w"))
        whole = stack.enter_context(launch(cli_env, tmp_path / "whole", *args, stderr=whole_log))
    code, stderr = finish(launch(cli_env, workdir, *args))
    assert code == 0, stderr[-2000:]
    assert "resuming from the checkpoint at step" in stderr
    resumed_from.append(int(stderr.split("resuming from the checkpoint at step ")[1].split()[0]))
    assert whole.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()[-2000:]
  assert len(set(resumed_from)) >= 2, resumed_from  # different kill points
  assert same_params(tmp_path / "whole", workdir)
  assert same_rows(tmp_path / "whole", workdir)  # every evaluation row once, same numbers


@pytest.mark.parametrize(
  "overrides",
  [
    dict(algorithm="easgd", tau=2, momentum=0.9),  # a momentum trace per worker
    dict(algorithm="sgd", model_parallel=2),
    dict(algorithm="sync_sgd", num_devices=4, model_parallel=2),
    dict(algorithm="diloco", num_devices=4, tau=3, learning_rate=0.002),  # inner and outer state
    dict(  # per-fragment outer states, and fragment 1's g_p in flight at steps 20 and 40
      algorithm="streaming_diloco",
      model="mlp",
      num_devices=2,
      tau=4,
      overlap_steps=1,
      merge_alpha=0.5,
      quantize="int8",
      learning_rate=0.002,
    ),
    dict(
      algorithm="local_sgd",
      num_devices=2,
      tau=4,
      optimizer="adamw",
      learning_rate=0.003,
      lr_schedule="warmup_cosine",
      warmup_steps=10,
      decay_steps=60,  # the first launch's --steps would be 40
    ),
  ],
)
def test_a_longer_relaunch_continues_exactly(tmp_path, cpu_devices, overrides):
  base = Config(steps=60, eval_every=20, checkpoint_every=20, **overrides)
  whole = train.train_and_evaluate(base, str(tmp_path / "whole"))
  train.train_and_evaluate(base.__class__(**{**base.to_dict(), "steps": 40}), str(tmp_path / "b"))
  resumed = train.train_and_evaluate(base, str(tmp_path / "b"))
  assert same_params(tmp_path / "whole", tmp_path / "b")
  assert [r["step"] for r in resumed["history"]] == [20, 40, 60]
  timeless = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in resumed["history"]]
  assert timeless == [{k: v for k, v in r.items() if k != "wall_time_s"} for r in whole["history"]]


@pytest.mark.parametrize("algorithm", ["async_sgd", "hogwild", "async_easgd", "hogwild_easgd"])
def test_async_runs_resume_from_the_saved_master(tmp_path, cpu_devices, algorithm):
  config = Config(algorithm=algorithm, model="mlp", steps=400, eval_every=100, checkpoint_every=100)
  train.train_and_evaluate(config.__class__(**{**config.to_dict(), "steps": 200}), str(tmp_path))
  # Right after a restore the engine holds the checkpoint's master and workers, and its counter.
  engine = train.build(train.validate(config, str(tmp_path))).engine
  arrays, record = checkpoints.Checkpointer(str(tmp_path), 3).restore_latest(
    engine.checkpoint_arrays()
  )
  engine.restore(arrays, record)
  restored = engine.checkpoint_arrays()
  assert all(np.array_equal(restored[name], arrays[name]) for name in arrays)
  assert engine.state.version == record["version"] == len(reporting.read_applied(tmp_path)) > 0
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert [r["step"] for r in summary["history"]] == [100, 200, 300, 400]
  assert sum(summary["worker_steps"]) == 400  # the first 200 counted, 200 more done
  # The master's update counter and the applied-update record are the whole run's: versions
  # 1, 2, ... once each across the two launches.
  made = [made for *_, made in reporting.read_applied(tmp_path)]
  assert summary["state"].version == len(made) and made == list(range(1, len(made) + 1))


def test_failed_workers_stay_in_the_summary_after_a_resume(tmp_path, cpu_devices):
  """Worker 1 fails in the first launch; the resumed launch (no failure injected) reports it
  still: the summary is the whole run's, carried in the checkpoint's record."""
  config = Config(
    algorithm="async_sgd",
    model="mlp",
    num_devices=3,
    steps=120,
    eval_every=60,
    inject_failure="1:0",
  )
  first = train.train_and_evaluate(dataclasses.replace(config, steps=60), str(tmp_path))
  assert [f["worker"] for f in first["failed_workers"]] == [1]
  summary = train.train_and_evaluate(
    dataclasses.replace(config, inject_failure=None), str(tmp_path)
  )
  assert [f["worker"] for f in summary["failed_workers"]] == [1]
  saved = json.loads((tmp_path / reporting.SUMMARY).read_text())
  assert saved["failed_workers"] == first["failed_workers"] and saved["final"]["step"] == 120


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["--algorithm=async_easgd", "--algorithm=downpour --tau=4"])
def test_an_asynchronous_run_killed_resumes_and_reaches_90_percent(tmp_path, cli_env, algorithm):
  args = [*algorithm.split(), "--steps=1500", "--eval_every=250", "--checkpoint_every=250"]
  code, _ = interrupt(cli_env, tmp_path, args, signal.SIGKILL, random.Random(0), every=250)
  assert code == -signal.SIGKILL
  code, stderr = finish(launch(cli_env, tmp_path, *args))
  assert code == 0, stderr[-2000:]
  assert "resuming from the checkpoint at step" in stderr
  rows = reporting.read_metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(250, 1501, 250))
  assert rows[-1]["test_accuracy"] >= 0.90
  # What tests/test_async.py asks of four asynchronous workers, across the kill: every worker
  # stepped, 1500 iterations in all, and the master saw stale pushes.
  summary = json.loads((tmp_path / reporting.SUMMARY).read_text())
  assert sum(summary["worker_steps"]) == 1500 and min(summary["worker_steps"]) > 0
  assert summary["staleness"]["median"] >= 0 and rows[-1]["staleness_max"] >= 1


def corrupt(folder, how):
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      if how == "truncate":
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
      elif "/d/" in path:  # "flip": change array bytes in place, the file still parses
        data = bytearray(open(path, "rb").read())
        data[-8:] = bytes(255 - b for b in data[-8:])
        open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous(tmp_path, cpu_devices, how):
  config = Config(algorithm="easgd", steps=90, eval_every=30, checkpoint_every=30)
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  train.train_and_evaluate(config.__class__(**{**config.to_dict(), "steps": 60}), str(tmp_path))
  corrupt(tmp_path / checkpoints.FOLDER / "60", how)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert os.path.isdir(tmp_path / checkpoints.SET_ASIDE / "60")  # reported and set aside
  assert [r["step"] for r in summary["history"]] == [30, 60, 90]
  assert same_params(tmp_path / "whole", tmp_path)  # resumed from 30, exactly


@pytest.mark.parametrize("edit", ["format edited", "format removed"])
def test_a_record_whose_format_was_edited_is_damage_not_age(tmp_path, edit):
  """The record's checksum is verified before its format is read: an edited record is set
  aside like any damage and the previous checkpoint is used (not exit 2, "older")."""
  saver = checkpoints.Checkpointer(str(tmp_path), keep=3)
  for step in (1, 2):
    saver.save(step, {"w": np.full(4, float(step))}, {"note": step})
  path = tmp_path / checkpoints.FOLDER / "2" / "record" / "metadata"
  record = json.loads(path.read_text())
  if edit == "format edited":
    record["format"] = checkpoints.FORMAT - 1
  else:
    del record["format"]
  path.write_text(json.dumps(record))
  arrays, saved = checkpoints.Checkpointer(str(tmp_path), 3).restore_latest({"w": np.zeros(4)})
  assert saved["step"] == 1 and arrays["w"].tolist() == [1.0] * 4
  assert (tmp_path / checkpoints.SET_ASIDE / "2").is_dir()


def test_a_full_disk_is_one_line_exit_1_and_leaves_no_partial_checkpoint(tmp_path, capsys):
  """A checkpoint that no longer fits: one line naming it and its filesystem, exit 1, no
  temporary folder; the checkpoints before it stay (the relaunch resumes from them)."""
  small = tmp_path / "small"
  small.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(small)]).returncode:
    pytest.skip("mounting a small tmpfs needs root")
  try:
    config = Config(algorithm="sgd", model="mlp", steps=200, eval_every=20, checkpoint_every=20)
    with pytest.raises(SystemExit) as stopped:
      cli.run(
        lambda: train.train_and_evaluate(
          dataclasses.replace(config, keep_checkpoints=20), str(small / "w")
        )
      )
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 1 and len(lines) == 1, lines
    full = rf"error: no space left writing {small}/w/checkpoints/\d+ \(the filesystem at {small} "
    assert re.match(full, lines[0]), lines
    left = os.listdir(small / "w" / checkpoints.FOLDER)
    assert left and all(name.isdigit() for name in left), left
  finally:
    subprocess.run(["umount", "-l", str(small)])


def test_an_injected_nan_exits_1_and_keeps_the_last_good_checkpoint(tmp_path, cli_env):
  args = ["--algorithm=easgd", "--steps=200", "--eval_every=50", "--checkpoint_every=50"]
  code, stderr = finish(launch(cli_env, tmp_path, *args, "--inject_nan=123"))
  assert code == 1
  message = stderr.strip().splitlines()[-1]
  assert message.startswith("error: loss is nan at step 123 (worker 2)"), message
  assert "last good checkpoint (step 100) is kept" in message
  assert latest_checkpoint(tmp_path) == 100
  code, stderr = finish(launch(cli_env, tmp_path, *args))  # the same run without the fault
  assert code == 0 and "resuming from the checkpoint at step 100" in stderr


def test_nan_weights_with_a_finite_loss_exit_1_and_save_nothing(tmp_path, capsys, monkeypatch):
  """The weights are checked too, not only the loss: with the loss check off (as if every
  loss had been finite), the NaN weights a poisoned batch leaves stop the run at the next
  checkpoint, step 10 (evaluations come at 20), which is not written."""
  monkeypatch.setattr(failures, "check_losses", lambda *args: None)
  config = Config(
    algorithm="sgd", model="mlp", steps=40, eval_every=20, checkpoint_every=10, inject_nan=3
  )
  with pytest.raises(SystemExit) as stopped:
    cli.run(lambda: train.train_and_evaluate(config, str(tmp_path)))
  lines = capsys.readouterr().err.strip().splitlines()
  assert stopped.value.code == 1 and len(lines) == 1
  assert lines[0].startswith("error: weights are NaN/inf at step 10"), lines
  assert checkpoints.saved_steps(tmp_path) == []


def test_resuming_with_another_algorithm_is_refused_and_changes_nothing(tmp_path, cli_env):
  train.train_and_evaluate(Config(algorithm="easgd", steps=20, eval_every=10), str(tmp_path))
  # Everything, the workdir lock and the folders included: a refused run writes nothing.
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  stamps = {p: p.stat().st_mtime_ns for p in [tmp_path, *tmp_path.rglob("*")]}
  code, stderr = finish(launch(cli_env, tmp_path, "--algorithm=sgd", "--steps=40"))
  assert code == 2
  assert stderr.strip().splitlines() == [
    "error: the workdir holds a run with --algorithm=easgd, not sgd: use another --workdir, "
    "or the same --algorithm to resume it"
  ]
  after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  assert after == before
  assert {p: p.stat().st_mtime_ns for p in [tmp_path, *tmp_path.rglob("*")]} == stamps
  with pytest.raises(ConfigError, match="--num_devices=4, not 2"):
    train.train_and_evaluate(Config(algorithm="easgd", num_devices=2), str(tmp_path))


def test_easgd_stability_condition():
  assert core.elastic_stability(0.05, 4, all_at_once=False) is None
  assert core.elastic_stability(0.05, 8, all_at_once=True) is None  # 0.05 * 9 < 2
  assert "0 < alpha < 1" in core.elastic_stability(1.25, 4, all_at_once=False)
  assert "alpha + beta < 2" in core.elastic_stability(0.3, 8, all_at_once=True)
  assert "elastic force is off" in core.elastic_stability(0.0, 4, all_at_once=True)
