"""Checkpoints: exact resume after SIGKILL/SIGTERM, corrupted checkpoints, NaN, changed flags.

The subprocess runs share a persistent compilation cache, so each relaunch costs seconds.
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from easgd_jax import checkpoints, core, reporting, train
from easgd_jax.config import Config
from easgd_jax.errors import ConfigError

from helpers import REPO, child_env, child_process

# One driver of each kind: one device, a worker per device in turn, every device at once (pmap),
# and the simulated cluster.
# sync_sgd's state (the same pmap placement, without a center) is killed and resumed bitwise in
# tests/test_multiprocess.py, across two processes.
STEPWISE = {
  "sgd": [],
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
EVERY = 25  # checkpoint and evaluation period of the interrupted runs
SHORT = ["--steps=300", f"--eval_every={EVERY}", f"--checkpoint_every={EVERY}"]  # 3 stops <= 150


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
  return child_env(  # run.py sets up its own emulated devices
    JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )


def launch(env, workdir, *args, stderr=subprocess.PIPE):
  """run.py in its own process group (helpers.child_process): a context manager."""
  return child_process(
    [sys.executable, os.path.join(REPO, "run.py"), *args, f"--workdir={workdir}"],
    env=env,
    stderr=stderr,
    text=True,
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
    # A fresh run killed, the resumed run stopped by SIGTERM, and that resumed run killed: both
    # signals, on a fresh and on a resumed run, and resumes from the checkpoints each leaves.
    for i, signum in enumerate([signal.SIGKILL, signal.SIGTERM, signal.SIGKILL]):
      code, stderr = interrupt(cli_env, workdir, args, signum, rng)
      if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
      else:
        assert code == 143, stderr[-2000:]
        assert "stopped: SIGTERM at step" in stderr and "run the same command to resume" in stderr
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
  config = Config(algorithm=algorithm, steps=400, eval_every=100, checkpoint_every=100)
  train.train_and_evaluate(config.__class__(**{**config.to_dict(), "steps": 200}), str(tmp_path))
  saved = reporting.load_params(tmp_path / reporting.PARAMS)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert [r["step"] for r in summary["history"]] == [100, 200, 300, 400]
  assert sum(summary["worker_steps"]) == 400  # the first 200 counted, 200 more done
  # The engine's master counts its updates (`version`) for every algorithm: the EASGD family's
  # exchanges and the others' updates are one counter now.
  counter = summary["state"].version
  assert counter >= 200  # the master's update counter carried on from the checkpoint
  assert not all(
    np.array_equal(saved[k], v)
    for k, v in reporting.load_params(tmp_path / reporting.PARAMS).items()
  )


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


def test_resuming_with_another_algorithm_is_refused_and_changes_nothing(tmp_path, cli_env):
  train.train_and_evaluate(Config(algorithm="easgd", steps=20, eval_every=10), str(tmp_path))
  # Everything but the workdir lock, whose file names the pid of the last run that held it.
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
  stamps = {p: p.stat().st_mtime_ns for p in before}
  code, stderr = finish(launch(cli_env, tmp_path, "--algorithm=sgd", "--steps=40"))
  assert code == 2
  assert stderr.strip().splitlines() == [
    "error: the workdir holds a run with --algorithm=easgd, not sgd: use another --workdir, "
    "or the same --algorithm to resume it"
  ]
  after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
  assert after == before and {p: p.stat().st_mtime_ns for p in after} == stamps
  with pytest.raises(ConfigError, match="--num_devices=4, not 2"):
    train.train_and_evaluate(Config(algorithm="easgd", num_devices=2), str(tmp_path))


def test_easgd_stability_condition():
  assert core.elastic_stability(0.05, 4, all_at_once=False) is None
  assert core.elastic_stability(0.05, 8, all_at_once=True) is None  # 0.05 * 9 < 2
  assert "0 < alpha < 1" in core.elastic_stability(1.25, 4, all_at_once=False)
  assert "alpha + beta < 2" in core.elastic_stability(0.3, 8, all_at_once=True)
  assert "elastic force is off" in core.elastic_stability(0.0, 4, all_at_once=True)
