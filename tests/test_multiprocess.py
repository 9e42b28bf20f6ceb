"""Multi-process runs: checkpoints in the shared workdir, exact resume after SIGKILL, a dead peer.

Every run here is two `run.py` processes on this machine, each with 2 emulated CPU devices (4 in
all), given the same workdir as two machines on shared storage would be. The processes share the
tests' compilation cache (helpers.child_env), so a launch costs seconds after the first.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import psutil
import pytest

from easgd_jax import checkpoints, reporting

from helpers import REPO, child_env, child_process, two_process_command

HEARTBEAT_S = 10
STEPS, EVERY = 150, 25  # a kill after the checkpoint at step 50 lands mid-run
SHORT = [
  "--model=mlp",
  "--num_devices=4",
  f"--steps={STEPS}",
  f"--eval_every={EVERY}",
  f"--checkpoint_every={EVERY}",
  f"--heartbeat_timeout_s={HEARTBEAT_S}",
]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def start(workdir, port, process_id, flags, log_path):
  """One process of a 2-process run.py, its output in `log_path` (a helpers.child_process)."""
  command = two_process_command(process_id, port, workdir, *flags)
  env = child_env(PYTHONUNBUFFERED="1")
  with open(log_path, "w") as log:
    with child_process(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT) as process:
      yield process


@contextlib.contextmanager
def start_pair(workdir, flags, name):
  """Both processes of a run on a fresh port, as they run: (processes, log paths)."""
  port = free_port()
  logs = [f"{workdir}.{name}.{i}.log" for i in range(2)]
  with contextlib.ExitStack() as stack:
    yield [stack.enter_context(start(workdir, port, i, flags, logs[i])) for i in range(2)], logs


def finish_pair(procs, logs, timeout=300):
  """Wait for both processes of a `start_pair`: (exit codes, logs)."""
  for process in procs:
    process.wait(timeout=timeout)
  return [p.returncode for p in procs], [open(path).read() for path in logs]


def run_pair(workdir, flags, name, timeout=300):
  """Both processes to the end: (exit codes, logs)."""
  with start_pair(workdir, flags, name) as (procs, logs):
    return finish_pair(procs, logs, timeout)


def rows_without_time(workdir):
  return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in read_rows(workdir)]


def read_rows(workdir):
  with open(os.path.join(workdir, reporting.METRICS)) as f:
    return [json.loads(line) for line in f if line.strip()]


def listening(pid, port):
  """The local addresses process `pid` listens on at `port`."""
  found = psutil.Process(pid).net_connections(kind="tcp")
  return {c.laddr.ip for c in found if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def flip_a_byte_of_process_1(workdir, step):
  """Corrupt process 1's shards in checkpoint `step`: only process 1 reads them."""
  folder = os.path.join(workdir, checkpoints.FOLDER, str(step), "state", "ocdbt.process_1", "d")
  path = max((os.path.join(folder, name) for name in os.listdir(folder)), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.slow
@pytest.mark.parametrize(
  "algorithm, flags, victim, signum, corrupt",
  [
    ("sync_sgd", [], 1, signal.SIGTERM, False),
    ("sync_easgd", ["--tau=2"], 0, signal.SIGKILL, True),
  ],
)
def test_a_stopped_process_relaunched_resumes_bitwise(
  tmp_path, algorithm, flags, victim, signum, corrupt
):
  """SIGKILL one process after a checkpoint: the other stops; SIGTERM to one only: both stop
  after a checkpoint of that moment (143). The same commands finish the run, bitwise.

  With `corrupt`, process 1's part of the newest checkpoint is damaged too: every process sets
  that checkpoint aside together and resumes from the one before. Process 0's coordinator
  listens on 127.0.0.1 alone (jax's default is every interface).
  """
  flags = [f"--algorithm={algorithm}", *flags, *SHORT]
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  with contextlib.ExitStack() as stack:
    with start_pair(killed, flags, "first") as (procs, logs):
      deadline = time.monotonic() + 240
      while max(checkpoints.saved_steps(killed), default=0) < 50:
        alive = all(p.poll() is None for p in procs)
        assert alive and time.monotonic() < deadline, open(logs[0]).read()[-3000:]
        time.sleep(0.02)
      port = int(procs[0].args[2].rsplit(":", 1)[1])  # two_process_command's coordinator
      assert listening(procs[0].pid, port) <= {"127.0.0.1", "::ffff:127.0.0.1"}
      procs[victim].send_signal(signum)
      killed_at = time.monotonic()
      # The uninterrupted reference pair runs beside the rest of the test (its own port and
      # workdir), started now that the programs are in the compilation cache; it is awaited
      # before the comparison.
      reference = stack.enter_context(start_pair(whole, flags, "run"))
      survivor = procs[1 - victim]
      survivor.wait(timeout=120)
      procs[victim].wait(timeout=120)
      waited = time.monotonic() - killed_at
    log = open(logs[1 - victim]).read()
    assert waited < HEARTBEAT_S + 20, waited  # it notices, it does not hang
    if signum == signal.SIGTERM:  # both stop at the same step, after its checkpoint
      assert [p.returncode for p in procs] == [143, 143], log[-3000:]
      stopped = int(re.search(r"SIGTERM at step (\d+)", log).group(1))
      assert stopped == max(checkpoints.saved_steps(killed))
    else:
      assert survivor.returncode != 0, log[-3000:]
      assert "another task died" in log or "unhealthy" in log, log[-3000:]  # and says so
    saved = max(checkpoints.saved_steps(killed))
    assert 50 <= saved < STEPS  # stopped mid-run
    if corrupt:
      flip_a_byte_of_process_1(killed, saved)

    codes, logs = run_pair(killed, flags, "again")  # the same commands, on a fresh port
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    codes, whole_logs = finish_pair(*reference)
    assert codes == [0, 0], whole_logs[0][-3000:] + whole_logs[1][-3000:]
  resumed = saved - EVERY if corrupt else saved
  for log in logs:  # every process resumed, none started over
    assert f"resuming from the checkpoint at step {resumed} of {STEPS}" in log, log[-3000:]
  assert os.path.isdir(killed / checkpoints.SET_ASIDE / str(saved)) == corrupt
  one = reporting.load_params(whole / reporting.PARAMS)
  two = reporting.load_params(killed / reporting.PARAMS)
  assert one.keys() == two.keys()
  for key in one:
    np.testing.assert_array_equal(two[key], one[key])  # bitwise
  assert rows_without_time(killed) == rows_without_time(whole)
  assert [r["step"] for r in read_rows(killed)] == list(range(EVERY, STEPS + 1, EVERY))


def test_processes_given_different_workdirs_all_exit_2_and_write_nothing(tmp_path):
  flags = ["--algorithm=sync_sgd", "--num_devices=4", f"--heartbeat_timeout_s={HEARTBEAT_S}"]
  port = free_port()
  workdirs = [tmp_path / f"run_{i}" for i in range(2)]
  logs = [tmp_path / f"run_{i}.log" for i in range(2)]
  with contextlib.ExitStack() as stack:
    procs = [stack.enter_context(start(workdirs[i], port, i, flags, logs[i])) for i in range(2)]
    for process in procs:
      process.wait(timeout=120)
  for process, log in zip(procs, logs, strict=True):
    assert process.returncode == 2, log.read_text()[-3000:]
    assert "differs between the processes" in log.read_text()
  assert not any(w.exists() for w in workdirs)
