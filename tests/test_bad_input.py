"""Every entry point's exit codes: bad input is one `error:` line, exit 2 and nothing written.

Also what a good run leaves behind: files with the umask's modes, a log without backend noise, a
divergence message naming the EASGD stability condition it breaks, and 143 for a study stopped
by SIGTERM. Each bad input returns in seconds (most before jax is even imported).
"""

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from easgd_jax import failures, reporting, train
from easgd_jax.algorithms import resolve
from easgd_jax.config import MAX_SEED, Config, ConfigError
from easgd_jax.workdir import check_workdir

from helpers import REPO, bad_input_runs, child_env, child_process, run_at_once, run_process

RUN = os.path.join(REPO, "run.py")
STUDY = os.path.join(REPO, "experiments", "sweep_rho.py")
HUGE = "1000000000000000000"  # 10**18
TWO_PROCESSES = ["--algorithm=sync_sgd", "--num_devices=2", "--num_processes=2", "--process_id=1"]
PROCESS_0 = [*TWO_PROCESSES[:-1], "--process_id=0"]
SIMULATED = ["--engine=simulated", "--model=mlp", "--sim_compute_ms=1", "--sim_service_us=20"]


def cli(script, *args, timeout=60, env=None, **popen_kwargs):
  """`script` with `args` in its own process group, killed with the group after `timeout`."""
  command = [sys.executable, script, *args]
  return run_process(command, cwd=REPO, env=env or child_env(), timeout=timeout, **popen_kwargs)


def assert_bad_input(result, named):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr


BAD_FLAGS = [
  # Checked by Config.validate or absl, before jax is imported.
  (["--seed=-1"], "--seed"),
  ([f"--seed={MAX_SEED + 1}"], "--seed"),  # jax.random.key would take it for seed 0
  ([f"--seed={2**64}"], "--seed"),
  ([f"--num_devices={HUGE}"], "--num_devices"),
  (["--num_devices=100000"], "--num_devices"),  # the CPU backend hung creating the devices
  (["--algorithm=sgd", f"--model_parallel={HUGE}"], "--model_parallel"),
  (["--learning_rate=inf"], "--learning_rate"),
  (["--learning_rate=nan"], "--learning_rate"),
  (["--rho=inf"], "--rho"),
  ([f"--heartbeat_timeout_s={HUGE}"], "--heartbeat_timeout_s"),
  (["--steps=abc"], "--steps"),  # absl's own parse errors exited 1 with two lines
  (["--algorithm=async_diloco", "--outer_delay=0"], "--outer_delay"),
  (["--algorithm=downpour", "--dynamic_local_steps"], "--dynamic_local_steps applies to"),
  (["--no_such_flag=1"], "no_such_flag"),
  ([*TWO_PROCESSES, "--coordinator_address=127.0.0.1:notaport"], "--coordinator_address"),
  ([*TWO_PROCESSES, "--coordinator_address=garbage"], "--coordinator_address"),
  # Process 0 listens on the address it is given, one of this machine's, and only there.
  ([*PROCESS_0, "--coordinator_address=192.0.2.1:12345"], "not an address of this machine"),
  ([*PROCESS_0, "--coordinator_address=example.invalid:12345"], "names a host, not an address"),
  ([*PROCESS_0, "--coordinator_address=0.0.0.0:12345"], "would listen on every interface"),
  (
    [*PROCESS_0, "--coordinator_address=a:1", "--coordinator_bind_address=garbage"],
    "--coordinator_bind_address",
  ),
  (["--algorithm=easgd", "--fragments=2"], "--fragments"),
  (["--algorithm=streaming_diloco", "--tau=5"], "--tau"),  # 2 fragments by default
  (["--algorithm=diloco", "--num_devices=4", "--devices_per_worker=3"], "--devices_per_worker"),
  (["--engine=ray", "--algorithm=diloco", "--num_devices=2", "--min_workers=3"], "--min_workers"),
  (["--engine=ray", "--algorithm=diloco", "--round_timeout_s=0"], "--round_timeout_s"),
  # Checked against the data, before the workdir is touched.
  ([f"--batch_size={HUGE}"], "--batch_size"),
  (["--dataset=synthetic", "--synthetic_shape=100000,100000,3"], "--synthetic_shape"),
  (["--dataset=synthetic", f"--synthetic_train_size={HUGE}"], "--synthetic_train_size"),
  # The simulated cluster's schedule for the whole run (~400 bytes a step) would not fit.
  ([*SIMULATED, "--algorithm=async_sgd", f"--steps={3 * 10**10}"], "--steps=30000000000"),
  # ... and against the model: the MLP has 3 layers to deal into fragments
  (["--algorithm=streaming_diloco", "--model=mlp", "--fragments=4", "--tau=8"], "--fragments=4"),
]


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
  """Every BAD_FLAGS run.py, started together (test_run.run_at_once)."""
  return bad_input_runs(tmp_path_factory, RUN, BAD_FLAGS, "run")


@pytest.mark.parametrize("flags, named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_exit_2_and_writes_nothing(bad_flag_runs, flags, named):
  result, workdir = bad_flag_runs[tuple(flags)]
  assert_bad_input(result, named)
  assert not workdir.exists()


def test_a_bad_workdir_is_one_line_exit_2_and_touches_nothing(tmp_path):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("keep me\n")
  in_proc = "/proc/easgd_jax_run"  # /proc takes no folders, even from root
  workdirs = (a_file, a_file / "run", "", *([in_proc] if os.path.isdir("/proc") else []))
  commands = [[sys.executable, RUN, f"--workdir={workdir}"] for workdir in workdirs]
  for workdir, result in zip(
    workdirs, run_at_once(commands, timeout=60, cwd=REPO, env=child_env()), strict=True
  ):
    assert_bad_input(result, f"--workdir={workdir}")
  assert a_file.read_text() == "keep me\n"
  assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # no probe or temporary file left
  assert not os.path.exists(in_proc)


def test_a_taken_port_a_listener_not_jax_and_a_missing_platform_are_one_line_exit_2(tmp_path):
  """Process 0 on a port something listens on (jax crashed with a segfault), process 1 at a
  listener that is no JAX coordinator (a C++ abort after its timeout), and JAX_PLATFORMS=cuda
  with no GPU (an AssertionError traceback): each one line, exit 2, nothing written."""
  with socket.socket() as taken:  # accepts connections (its backlog), answers nothing
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = f"--coordinator_address=127.0.0.1:{taken.getsockname()[1]}"
    cases = [
      ([*PROCESS_0, address], {}, f"port {taken.getsockname()[1]} is in use"),
      ([*TWO_PROCESSES, address, "--heartbeat_timeout_s=3"], {}, "is not a JAX coordinator"),
      (["--steps=5"], {"JAX_PLATFORMS": "cuda"}, "JAX_PLATFORMS=cuda"),
    ]
    with contextlib.ExitStack() as stack:
      runs = [
        stack.enter_context(
          child_process(
            [sys.executable, RUN, *flags, f"--workdir={tmp_path / str(i)}"],
            cwd=REPO,
            env={**child_env(), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
          )
        )
        for i, (flags, env, _) in enumerate(cases)
      ]
      outputs = [run.communicate(timeout=120) for run in runs]
  for i, (run, (_, stderr), (*_, named)) in enumerate(zip(runs, outputs, cases, strict=True)):
    assert_bad_input(subprocess.CompletedProcess(run.args, run.returncode, "", stderr), named)
    assert not (tmp_path / str(i)).exists()


def test_check_workdir_accepts_a_new_or_existing_folder_and_leaves_no_trace(tmp_path):
  check_workdir(str(tmp_path / "a" / "b"))
  check_workdir(str(tmp_path))
  assert os.listdir(tmp_path) == []
  with pytest.raises(ConfigError, match="File name too long"):
    check_workdir(str(tmp_path / ("x" * 300)))
  # An empty --workdir= is refused by run.py and by the library's own entry (a study, a notebook).
  with pytest.raises(ConfigError, match="--workdir= is empty"):
    train.validate(Config(), "")


def test_a_process_with_no_coordinator_fails_within_the_heartbeat_timeout():
  with socket.socket() as probe:  # a port nobody listens on
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  start = time.monotonic()
  result = cli(
    RUN, *TWO_PROCESSES, f"--coordinator_address=127.0.0.1:{port}", "--heartbeat_timeout_s=2"
  )
  assert_bad_input(result, "start process 0 first")
  assert time.monotonic() - start < 30  # jax's own retry ran 300 s, then aborted the process


BAD_STUDY_FLAGS = [
  (["--samples=-5"], "--samples"),  # was one step per arm
  (["--samples=0"], "--samples"),  # was the study's default budget
  (["--samples=abc"], "--samples"),
  ([f"--seeds=0,{MAX_SEED + 1}"], "--seeds"),
]


@pytest.fixture(scope="module")
def bad_study_flag_runs(tmp_path_factory):
  """Every BAD_STUDY_FLAGS study, started together (test_run.run_at_once)."""
  return bad_input_runs(tmp_path_factory, STUDY, BAD_STUDY_FLAGS, "study")


@pytest.mark.parametrize("flags, named", BAD_STUDY_FLAGS, ids=[f[0] for f, _ in BAD_STUDY_FLAGS])
def test_a_bad_study_flag_is_one_line_exit_2_and_writes_nothing(bad_study_flag_runs, flags, named):
  result, workdir = bad_study_flag_runs[tuple(flags)]
  assert_bad_input(result, named)
  assert not workdir.exists()


@pytest.mark.slow
def test_a_study_stopped_by_sigterm_exits_143(tmp_path):
  command = [sys.executable, STUDY, f"--workdir={tmp_path}", "--model=mlp", "--seeds=0"]
  command.append("--samples=100000000")  # never finishes on its own
  with child_process(command, cwd=REPO, env=child_env(), stderr=subprocess.DEVNULL) as study:
    deadline = time.monotonic() + 300
    # metrics.jsonl appears once the run trains, with its SIGTERM handler in place.
    while not list(tmp_path.glob("runs/*/seed_0/metrics.jsonl")):
      assert study.poll() is None and time.monotonic() < deadline
      time.sleep(0.05)
    study.send_signal(signal.SIGTERM)
    assert study.wait(timeout=120) == 143


@pytest.mark.slow
def test_a_cpu_run_logs_no_backend_noise_and_writes_files_with_the_umasks_modes(tmp_path):
  env = child_env()
  env.pop("JAX_PLATFORMS")  # as a user runs it: jax probes every platform it knows
  workdir = tmp_path / "run"
  args = ["--model=mlp", "--steps=2", "--eval_every=1", f"--workdir={workdir}"]
  result = cli(RUN, *args, env=env, timeout=300, umask=0o022)
  assert result.returncode == 0, result.stderr[-2000:]
  for noise in ("Unable to initialize backend", "Event loop is closed", "Traceback"):
    assert noise not in result.stderr, result.stderr
  assert sum("devices: cpu:0" in line for line in result.stderr.splitlines()) == 1
  modes = {
    os.path.relpath(os.path.join(root, name), workdir): stat.S_IMODE(
      os.stat(os.path.join(root, name)).st_mode
    )
    for root, _, names in os.walk(workdir)
    for name in names
  }
  assert reporting.SUMMARY in modes and reporting.PARAMS in modes
  assert {path: mode for path, mode in modes.items() if mode != 0o644} == {}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=lambda umask: f"umask {umask:03o}")
def test_atomic_writes_follow_the_umask(tmp_path, umask):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  previous = os.umask(umask)
  try:
    reporting.write_text(str(tmp_path / "a.txt"), "text\n")
    reporting.write_json(str(tmp_path / "b.json"), {"x": 1})
    reporting.save_params(str(tmp_path / "c.npz"), {"w": np.zeros(3)})
    reporting.save_figure(plt.figure(), str(tmp_path / "d.png"))
  finally:
    os.umask(previous)
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
  assert modes == dict.fromkeys(["a.txt", "b.json", "c.npz", "d.png"], 0o666 & ~umask)


@pytest.mark.slow
def test_a_diverging_easgd_run_is_told_the_stability_condition_it_breaks():
  result = cli(
    RUN, "--model=mlp", "--rho=30", "--inject_nan=1", "--steps=2", "--eval_every=1", timeout=300
  )
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: loss is nan at step 1") and "it needs 0 < alpha < 1" in last
  # The start-up warning said so before the run began (alpha = eta * rho = 0.05 * 30).
  assert "EASGD stability: alpha = 1.5 >= 1" in result.stderr


@pytest.mark.parametrize(
  "config, expected",
  [
    (Config(algorithm="easgd", rho=30.0), ["alpha = 1.5 >= 1", "--rho=30"]),
    (Config(algorithm="async_easgd", rho=20.0), ["alpha = 1 >= 1", "0 < alpha < 1"]),
    (Config(algorithm="easgd", alpha=1.5), ["alpha = 1.5 >= 1", "(now --alpha=1.5)"]),
    (
      Config(algorithm="sync_easgd", rho=16.0),
      ["alpha + beta = alpha*(1+G) = 4 >= 2", "alpha + beta < 2", "--learning_rate=0.05"],
    ),
    (Config(algorithm="easgd"), ["lower --learning_rate (now 0.05)"]),  # stable: eta it is
    (Config(algorithm="sync_easgd", rho=0.0), ["lower --learning_rate (now 0.05)"]),
    (Config(algorithm="sgd", rho=100.0), ["lower --learning_rate (now 0.05)"]),  # rho unused
  ],
  ids=lambda value: (
    f"{value.algorithm} alpha={resolve(value).moving_rate:g}" if isinstance(value, Config) else ""
  ),
)
def test_divergence_advice_names_the_violated_condition(config, expected):
  advice = failures.divergence_advice(resolve(config))  # as a run sees it: its defaults resolved
  assert all(part in advice for part in expected), advice


def test_seed_bounds_are_the_ones_jax_and_numpy_accept():
  assert Config(seed=0).validate() and Config(seed=MAX_SEED).validate()
  for seed in (-1, MAX_SEED + 1, 1.5):
    with pytest.raises(ConfigError, match="--seed"):
      Config(seed=seed).validate()
