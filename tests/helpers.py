"""What the tests share: process helpers, the tiny problem every rule is checked on, and the
harnesses that drive an engine's placement by hand (the local engine's host schedulers and
threads) with fixed batches, so a run can be compared with a NumPy replay."""

import contextlib
import glob
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys

import jax
import numpy as np

from easgd_jax import core, models, reporting, train
from easgd_jax.config import Config
from easgd_jax.engines.base import Plan, Snapshot
from easgd_jax.engines.local import steps, threads

import reference

NUM_CLASSES, IMAGE_SHAPE, BATCH = 3, (4, 4, 1), 6

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra):
  """The environment of a command-line run: CPU, its own emulated devices, the shared cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  env.pop("XLA_FLAGS", None)  # run.py and the experiments set up their own emulated devices
  return env


RESTORE_SIGINT = (
  "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
  "os.execvp(sys.argv[1], sys.argv[1:])"
)


@contextlib.contextmanager
def child_process(args, *, default_sigint=False, **popen_kwargs):
  """subprocess.Popen(args) in its own process group, killed with everything it started on exit.

  The test owns the process: however the block ends (an assertion, a timeout, Ctrl-C), the whole
  group gets SIGKILL and the child is reaped, so no training run outlives the test that started
  it. `default_sigint` restores SIGINT's default in the child for tests that send it: a shell's
  background job starts with SIGINT ignored, and Python would then never raise KeyboardInterrupt.
  """
  if default_sigint:  # exec through a wrapper: a preexec_fn would fork this threaded process
    args = [sys.executable, "-c", RESTORE_SIGINT, *args]
  process = subprocess.Popen(args, start_new_session=True, **popen_kwargs)
  try:
    yield process
  finally:
    kill_group(process)


def kill_group(process, timeout=30):
  """SIGKILL the process group `process` leads (its pid), then reap it and close its pipes."""
  with contextlib.suppress(ProcessLookupError):  # the group has already gone
    os.killpg(process.pid, signal.SIGKILL)
  process.wait(timeout)
  for stream in (process.stdin, process.stdout, process.stderr):
    if stream is not None:
      stream.close()


def run_process(args, *, timeout, **popen_kwargs):
  """subprocess.run(args, capture_output=True, text=True) through child_process."""
  with child_process(
    args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs
  ) as process:
    stdout, stderr = process.communicate(timeout=timeout)
  return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def run_cli(*args, cwd=REPO, timeout=600):
  """run.py with `args` in a process of its own, killed with its group if it outlives `timeout`."""
  command = [sys.executable, os.path.join(REPO, "run.py"), *args]
  return run_process(command, cwd=cwd, env=child_env(), timeout=timeout)


def run_at_once(commands, *, timeout, **popen_kwargs):
  """run_process for every command, all started together: [CompletedProcess], in order.

  A run refused for bad input spends its second or so importing on one core, so a batch of them
  started together takes a few seconds rather than one each. Each command is a process group of
  its own (conftest.child_process), killed with everything it started however this ends.
  """
  with contextlib.ExitStack() as stack:
    processes = [
      stack.enter_context(
        child_process(
          command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs
        )
      )
      for command in commands
    ]
    outputs = [process.communicate(timeout=timeout) for process in processes]
  return [
    subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    for command, process, (stdout, stderr) in zip(commands, processes, outputs, strict=True)
  ]


def bad_input_runs(tmp_path_factory, script, cases, folder):
  """`script` once per (flags, ...) case of `cases`, all started together, each with a workdir
  `folder` of its own that must not come to exist: {flags: (CompletedProcess, that workdir)}."""
  root = tmp_path_factory.mktemp("bad_input")
  workdirs = []
  for i in range(len(cases)):
    (root / str(i)).mkdir()
    workdirs.append(root / str(i) / folder)
  commands = [
    [sys.executable, script, *flags, f"--workdir={workdir}"]
    for (flags, *_), workdir in zip(cases, workdirs, strict=True)
  ]
  results = run_at_once(commands, timeout=120, cwd=REPO, env=child_env())
  return {
    tuple(flags): (result, workdir)
    for (flags, *_), result, workdir in zip(cases, results, workdirs, strict=True)
  }


def two_process_command(process_id, port, workdir, *flags):
  """run.py as process `process_id` of a 2-process run coordinated on 127.0.0.1:`port`."""
  return [
    sys.executable,
    os.path.join(REPO, "run.py"),
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
    f"--process_id={process_id}",
    f"--workdir={workdir}",
    *flags,
  ]


# --- TensorBoard ----------------------------------------------------------------------------


def read_events(workdir):
  """[(tag, step, value)] from the TensorBoard event files in `workdir`, without TensorFlow."""
  from tensorboardX.proto import event_pb2

  scalars = []
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset + 12 <= len(data):  # TFRecord: length, crc, payload, crc
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.append((value.tag, event.step, value.simple_value))
  return scalars


# --- the tiny problem ------------------------------------------------------------------------


def tiny_problem(seed):
  """A small ReLU MLP (3 classes, 4x4 inputs, 7 hidden units): its loss and initial weights."""
  model = models.create("mlp", NUM_CLASSES, hidden=(7,))
  return core.make_loss_fn(model), models.init_params(model, IMAGE_SHAPE, seed=seed)


def random_batches(count, seed, replicas=None):
  """`count` random batches of BATCH examples; with `replicas`, each a list of one per device."""
  rng = np.random.default_rng(seed)

  def batch():
    return {
      "image": rng.standard_normal((BATCH, *IMAGE_SHAPE)).astype(np.float32),
      "label": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
    }

  if replicas is None:
    return [batch() for _ in range(count)]
  return [[batch() for _ in range(replicas)] for _ in range(count)]


def stacked(batches):
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def concatenated(batches):
  return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)


def assert_params_close(actual, expected_layers, rtol=1e-5, atol=1e-6):
  """`actual` (a parameter pytree) against reference.py's layers."""
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol),
    actual,
    reference.from_layers(expected_layers),
  )


# --- harnesses: an engine's placement driven by hand -----------------------------------------


def stepper(rule, params, num_devices=None, devices=None):
  """The local engine's host scheduler for `rule`, placed as a run would place it: one device
  (sgd), one replica per device (data parallel), or Algorithm 1's workers. Drive it with
  `.step(t, batch)`; its state is `.state`."""
  devices = devices or jax.devices()
  if rule.kind == "worker_master":
    return steps.RoundRobin(None, rule, None, params, devices[:num_devices])
  if rule.data_parallel:
    return steps.Replicas(None, rule, None, params, devices[:num_devices])
  return steps.Single(None, rule, None, params, devices[0])


def run_steps(rule, params, batches, num_devices=None, devices=None):
  """`stepper(...)` taken through `batches` (stacked per device for a data-parallel rule)."""
  runner = stepper(rule, params, num_devices, devices)
  for t, batch in enumerate(batches):
    runner.step(t, stacked(batch) if isinstance(batch, list) else batch)
  return runner


class ListSampler:
  """Hands out a fixed list of batches in order, like data.Sampler does from its generator."""

  def __init__(self, batches):
    self.batches, self.taken = batches, 0

  def next(self, batch_size):
    batch = self.batches[self.taken % len(self.batches)]
    self.taken += 1
    return batch

  def state(self):
    return self.taken

  def set_state(self, taken):
    self.taken = taken


def run_threads(rule, params, batches, steps, eval_every=10**9, fail_fast=False, failure=None):
  """The local engine's worker threads on `rule`, worker j reading batches[j] in order, for
  `steps` iterations in all: (the engine, its final snapshot, the evaluation snapshots)."""
  config = Config(
    num_devices=len(batches),
    steps=steps,
    eval_every=eval_every,
    batch_size=BATCH,
    fail_fast=fail_fast,
    inject_failure=failure and f"{failure[0]}:{failure[1]}",
  )
  samplers = [ListSampler(b) for b in batches]
  engine = threads.ThreadEngine(config, rule, None, params, samplers)
  found = [e for e in engine.run(Plan(config, checkpointing=False)) if isinstance(e, Snapshot)]
  return engine, found[-1], found[:-1]


# --- golden values (tests/test_golden.py, tests/test_ray.py) ---------------------------------

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "golden.json")
WRITE = os.environ.get("WRITE_GOLDEN") == "1"

# Every field that touches the arithmetic, written out (the defaults may change).
WRITTEN_OUT = dict(
  dataset="digits",
  model="mlp",
  num_devices=4,
  batch_size=16,
  learning_rate=0.05,
  rho=1.0,
  tau=1,
  momentum=0.0,
  optimizer="sgd",
  lr_schedule="constant",
  warmup_steps=0,
  weight_decay=1e-4,
  outer_learning_rate=0.7,
  outer_momentum=0.9,
  steps=40,
  eval_every=20,
  checkpoint_every=20,
  seed=0,
  model_parallel=1,
)
SIMULATED = dict(
  engine="simulated",
  sim_compute_ms=1.0,
  sim_latency_us=10.0,
  sim_bandwidth_gbps=96.0,
  sim_service_us=50.0,
  sim_jitter=0.5,
  sim_stragglers=1,
  sim_straggler_slowdown=4.0,
)
STEP_DRIVEN = {
  "sgd": dict(algorithm="sgd"),
  "sgd_adamw_warmup_cosine": dict(
    algorithm="sgd",
    optimizer="adamw",
    learning_rate=2e-3,
    lr_schedule="warmup_cosine",
    warmup_steps=5,
    decay_steps=40,
  ),
  "sync_sgd": dict(algorithm="sync_sgd"),
  "sync_easgd_tau2": dict(algorithm="sync_easgd", tau=2),
  "sync_eamsgd_tau2": dict(algorithm="sync_easgd", tau=2, momentum=0.9, optimizer="nesterov"),
  "local_sgd_tau2": dict(algorithm="local_sgd", tau=2),
  "diloco_tau3": dict(algorithm="diloco", tau=3, optimizer="adamw", learning_rate=2e-3),
  "easgd_tau2": dict(algorithm="easgd", tau=2),
  "eamsgd_tau2": dict(algorithm="easgd", tau=2, momentum=0.9, optimizer="nesterov"),
}
LOCAL_ONLY = {
  "sgd_model_parallel2": dict(algorithm="sgd", model_parallel=2),
  "sync_sgd_model_parallel2": dict(algorithm="sync_sgd", model_parallel=2),
}
ASYNC = {
  "async_sgd": dict(algorithm="async_sgd"),
  "hogwild": dict(algorithm="hogwild"),
  "async_easgd_tau2": dict(algorithm="async_easgd", tau=2),
  "async_eamsgd_tau2": dict(algorithm="async_easgd", tau=2, momentum=0.9, optimizer="nesterov"),
  "hogwild_easgd_tau2": dict(algorithm="hogwild_easgd", tau=2),
  "downpour_tau3": dict(algorithm="downpour", tau=3),
  "mdownpour_tau2": dict(algorithm="downpour", tau=2, momentum=0.9, optimizer="nesterov"),
}

GOLDEN_CASES = {
  **{f"local/{k}": v for k, v in {**STEP_DRIVEN, **LOCAL_ONLY}.items()},
  **{f"simulated/{k}": {**v, **SIMULATED} for k, v in {**STEP_DRIVEN, **ASYNC}.items()},
}
RAY = {"ray/easgd_tau2": dict(STEP_DRIVEN["easgd_tau2"], engine="ray")}  # tests/test_ray.py
# Bitwise reproducible on their engine, except these (compared to rtol 1e-6):
CLOSE = frozenset()
# Columns the redesign moved, each for a reason given here; the weights stay bitwise, the rest of
# the row too, and these columns agree to rtol 1e-9:
CLOCK_COLUMNS = ("virtual_time_s", "compute_share", "communication_share", "link_busy_share")
EXPLAINED = {
  # The clock now charges synchronous EASGD's all-reduce on the steps it exchanges (0, tau, ...;
  # it charged tau - 1, 2 tau - 1, ... before, as for local SGD): the same step times summed in
  # another order move the last digit.
  "simulated/sync_easgd_tau2": CLOCK_COLUMNS,
  "simulated/sync_eamsgd_tau2": CLOCK_COLUMNS,
  # The gap diagnostic's x^i = W - delta v is now computed op by op on every engine; the
  # simulated engine's asynchronous runs computed it in one jitted call before, where XLA
  # contracts it into a fused multiply-add (one rounding fewer).
  "simulated/async_eamsgd_tau2": ("gap_mean", "gap_max"),
}
# Written on purpose since (only these, the weights and every other column untouched): the
# simulated rows' new `bytes_sent` and `peak_bandwidth_gbps`; and `master_utilization` of the
# asynchronous runs, which counted the whole service of an update the master starts at the row's
# time, past that time (above 1 for a saturated locked master); rows that end on a local step
# kept theirs bit for bit.
CLOCK = ("wall_time_s",)


def golden_config(fields):
  return Config(**{**WRITTEN_OUT, **fields})


def fingerprint(workdir, summary):
  params = reporting.load_params(os.path.join(workdir, reporting.PARAMS))
  digest = hashlib.sha256()
  for name in sorted(params):
    digest.update(name.encode())
    digest.update(np.ascontiguousarray(params[name]).tobytes())
  rows = [{k: v for k, v in row.items() if k not in CLOCK} for row in summary["history"]]
  flat = {name: params[name].ravel()[:4].tolist() for name in sorted(params)}
  return {"params_sha256": digest.hexdigest(), "rows": rows, "params_head": flat}


def golden_run(name, tmp_path, extra=None):
  workdir = str(tmp_path / name.replace("/", "_"))
  fields = {**GOLDEN_CASES, **RAY}[name]
  summary = train.train_and_evaluate(golden_config({**fields, **(extra or {})}), workdir)
  return fingerprint(workdir, summary)


def golden_values():
  if not os.path.exists(FIXTURE):
    return {}
  with open(FIXTURE) as f:
    return json.load(f)


def golden_check(name, found):
  if WRITE:
    saved = golden_values()
    saved[name] = found
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w") as f:
      json.dump(saved, f, indent=1, sort_keys=True)
      f.write("\n")
    return
  expected = golden_values()[name]
  if name in CLOSE:
    for a, b in zip(found["rows"], expected["rows"], strict=True):
      for key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=f"{name} {key}")
    return
  explained = EXPLAINED.get(name, ())
  moved = [
    (row["step"], key, value, expected_row.get(key))
    for row, expected_row in zip(found["rows"], expected["rows"], strict=True)
    for key, value in row.items()
    if expected_row.get(key) != value
    and not (key in explained and np.isclose(value, expected_row[key], rtol=1e-9, atol=0))
  ]
  assert len(found["rows"]) == len(expected["rows"]) and not moved, (
    f"{name}: the metrics rows moved (step, column, now, before: {moved[:4]}); a refactor that "
    f"changes them is a bug until a note says why"
  )
  assert found["params_sha256"] == expected["params_sha256"], (
    f"{name}: the final weights moved (first values {found['params_head']} against "
    f"{expected['params_head']}); a refactor that changes them is a bug until a note says why"
  )


# A transformer small enough for a test on any engine: one block, 2 heads of 8, a 20,000-character
# slice of the corpus, 12 steps of 2 workers.
TINY_LM = dict(
  dataset="shakespeare",
  model="transformer",
  num_layers=1,
  num_heads=2,
  width=16,
  context=8,
  max_chars=20_000,
  num_devices=2,
  steps=12,
  eval_every=12,
)
