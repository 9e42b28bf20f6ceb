"""The tests' process helper (conftest.child_process) leaves nothing running, whatever happens."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import child_process, run_process


def live_members(group):
  """Pids in process group `group` that are still running (zombies have stopped: not counted)."""
  members = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
    except OSError:  # it exited while we looked
      continue
    if int(fields[2]) == group and fields[0] not in "ZX":
      members.append(int(pid))
  return members


def wait_for(condition, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline
    time.sleep(0.01)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process groups from /proc")
def test_a_timed_out_child_and_everything_it_started_are_killed():
  # A shell with two sleeping children, like run.py with its workers: three processes, one group.
  script = "sleep 600 & sleep 600 & echo started; wait"
  with pytest.raises(subprocess.TimeoutExpired):
    with child_process(["sh", "-c", script], stdout=subprocess.PIPE, text=True) as process:
      group = process.pid
      assert process.stdout.readline() == "started\n"
      wait_for(lambda: len(live_members(group)) == 3)
      process.communicate(timeout=0.2)  # the test's timeout: raises TimeoutExpired
  assert process.returncode == -signal.SIGKILL  # reaped by the helper
  wait_for(lambda: not live_members(group))  # the orphaned sleeps too, not just the shell


def test_a_failing_test_kills_its_child():
  with pytest.raises(AssertionError):
    with child_process([sys.executable, "-c", "import time; time.sleep(600)"]) as process:
      raise AssertionError("the test failed while its child ran")
  assert process.returncode == -signal.SIGKILL


def test_run_process_times_out_instead_of_hanging():
  start = time.monotonic()
  with pytest.raises(subprocess.TimeoutExpired):
    run_process(["sleep", "600"], timeout=0.2)
  assert time.monotonic() - start < 30
  done = run_process([sys.executable, "-c", "print('out'); exit(3)"], timeout=60)
  assert (done.returncode, done.stdout) == (3, "out\n")


def test_default_sigint_restores_ctrl_c_in_a_child_of_a_background_job():
  code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
  before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in `python -m pytest &`
  try:
    inherited = run_process([sys.executable, "-c", code], timeout=60)
    restored = run_process([sys.executable, "-c", code], timeout=60, default_sigint=True)
  finally:
    signal.signal(signal.SIGINT, before)
  assert inherited.stdout == "False\n"  # SIGINT ignored: the child would never see Ctrl-C
  assert restored.stdout == "True\n"
