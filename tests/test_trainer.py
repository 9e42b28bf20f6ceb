"""The one trainer: its metrics schema and diagnostics, named checkpoints, the progress line,
the inner optimizers and schedules, and the moving rate alpha."""

import dataclasses
import hashlib
import json
import math
import os
import types

import jax
import numpy as np
import optax
import pytest

from easgd_jax import algorithms, checkpoints, models, optimizers, reporting, train
from easgd_jax.algorithms import REGISTRY
from easgd_jax.config import Config
from easgd_jax.errors import ConfigError
from easgd_jax.trainer import Trainer

import helpers
import reference
from helpers import run_cli

CORE = ("step", "samples", "wall_time_s", "train_loss", "test_loss", "test_accuracy")
DIAGNOSTICS = ("param_norm", "grad_norm")
GAPS = ("gap_mean", "gap_max")
# DOWNPOUR's workers keep their own x^i beside the master's x~: its gap is reported on every
# engine now (the simulated engine reported it before the one-rule redesign, the threads not).
WITH_A_CENTER = {
  "easgd",
  "sync_easgd",
  "async_easgd",
  "hogwild_easgd",
  "local_sgd",
  "diloco",
  "streaming_diloco",
  "downpour",
  "async_diloco",
}


def quick(**overrides):
  settings = dict(model="mlp", num_devices=2, steps=20, eval_every=10, batch_size=16)
  return Config(**{**settings, **overrides})


@pytest.mark.parametrize("algorithm", sorted(REGISTRY))
def test_every_algorithm_writes_the_same_core_keys_and_its_diagnostics(algorithm, cpu_devices):
  learning_rate = 0.002 if "diloco" in algorithm else 0.05
  summary = train.train_and_evaluate(quick(algorithm=algorithm, learning_rate=learning_rate))
  rows = summary["history"]
  assert [r["step"] for r in rows] == [10, 20]
  for row in rows:
    assert set(CORE + DIAGNOSTICS) <= set(row), row
    assert row["samples"] == row["step"] * REGISTRY[algorithm].samples_per_step(quick())
    assert row["param_norm"] > 0 and row["grad_norm"] > 0
    assert (set(GAPS) <= set(row)) == (algorithm in WITH_A_CENTER), row
    if algorithm in WITH_A_CENTER:
      assert 0 <= row["gap_mean"] <= row["gap_max"]


def test_the_diagnostics_equal_their_numpy_definitions():
  rng = np.random.default_rng(0)
  center = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.ones(4, np.float32)}
  points = [jax.tree.map(lambda x, k=k: x + k * 0.1, center) for k in (1, 2, 3)]
  trainer = Trainer.__new__(Trainer)  # only the diagnostics: no data, model or workdir
  trainer.test_images = jax.device_put(np.zeros(1))
  trainer.probe = None
  trainer._grad_norm = lambda params, batch: 0.0

  def norm(tree):
    return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in tree.values()))

  found = trainer.diagnostics(center, points)
  gaps = [norm({k: p[k] - center[k] for k in center}) / norm(center) for p in points]
  np.testing.assert_allclose(found["param_norm"], norm(center), rtol=1e-6)
  np.testing.assert_allclose(found["gap_mean"], np.mean(gaps), rtol=1e-6)
  np.testing.assert_allclose(found["gap_max"], max(gaps), rtol=1e-6)


def test_grad_norm_is_the_norm_of_the_gradient_on_the_probe_batch(problem, cpu_devices):
  """The trainer's own grad_norm (not a stub) against a NumPy backprop of the tiny MLP."""
  loss_fn, params = problem
  batch = helpers.random_batches(1, seed=11)[0]
  dataset = types.SimpleNamespace(  # the probe batch is the training set's first examples
    tokens_per_example=1,
    num_train=len(batch["label"]),
    take=lambda indices: {k: v[indices] for k, v in batch.items()},
    test_images=batch["image"],
    test_labels=batch["label"],
  )
  config = Config(algorithm="sgd", model="mlp", batch_size=16)
  rule = algorithms.create(config, loss_fn)
  trainer = Trainer(config, rule, dataset, loss_fn, reporting.MetricsLog(), None)
  grads = reference.mlp_gradient(reference.to_layers(params), batch["image"], batch["label"])
  expected = math.sqrt(sum(float(np.sum(g**2)) for layer in grads for g in layer))
  np.testing.assert_allclose(trainer.diagnostics(params, None)["grad_norm"], expected, rtol=1e-5)


def test_adamw_steps_are_optax_adamw_and_its_moments_are_in_the_checkpoint(problem, cpu_devices):
  """--optimizer=adamw: four steps of sgd equal optax.adamw called directly (rtol 1e-6), and
  the checkpoint holds its state, mu and nu included, under their names."""
  loss_fn, params = problem
  config = Config(
    algorithm="sgd",
    model="mlp",
    optimizer="adamw",
    learning_rate=0.01,
    weight_decay=0.05,
    beta2=0.99,
  )
  batches = helpers.random_batches(4, seed=12)
  runner = helpers.run_steps(algorithms.create(config, loss_fn), params, batches)
  adamw = optax.adamw(0.01, b2=0.99, weight_decay=0.05, mask=models.DECAY_MASK.get("mlp"))
  expected, state = params, adamw.init(params)
  for batch in batches:
    grads = jax.grad(lambda p, b=batch: loss_fn(p, b)[0])(expected)
    updates, state = adamw.update(grads, state, expected)
    expected = optax.apply_updates(expected, updates)
  saved = runner.checkpoint_arrays()
  wanted = checkpoints.to_host({"params": expected, "opt_state": state})
  assert saved.keys() == wanted.keys()
  assert any("/mu/" in name for name in saved) and any("/nu/" in name for name in saved)
  for name, value in wanted.items():
    np.testing.assert_allclose(saved[name], value, rtol=1e-6, atol=1e-8, err_msg=name)


def test_a_gap_opens_between_syncs_and_closes_at_each_average(cpu_devices):
  """local_sgd's workers drift apart between averages and coincide right after one."""
  config = quick(algorithm="local_sgd", tau=5, eval_every=5, steps=20)
  drifted = quick(algorithm="local_sgd", tau=5, eval_every=3, steps=3)
  at_sync = train.train_and_evaluate(config)["history"]
  between = train.train_and_evaluate(drifted)["history"]
  assert all(row["gap_max"] == 0 for row in at_sync)  # evaluated right after an average
  assert between[-1]["gap_max"] > 0


def test_checkpoint_arrays_are_stored_under_their_path_names(tmp_path, cpu_devices):
  train.train_and_evaluate(quick(algorithm="easgd", momentum=0.9), str(tmp_path))
  record = json.loads((tmp_path / "checkpoints" / "20" / "record" / "metadata").read_text())
  assert record["format"] == checkpoints.FORMAT
  names = set(record["sha256"])
  assert {"master/Dense_0/kernel", "workers/1/local/Dense_1/bias"} <= names
  assert record["step"] == 20  # the step is the record's now, not an array
  assert "workers/1/opt_state/inner/velocity/Dense_0/kernel" in names  # the worker's Nesterov v


def test_a_checkpoint_from_an_older_version_gets_one_line(tmp_path, cpu_devices):
  config = quick(algorithm="sgd", steps=20, checkpoint_every=10)
  train.train_and_evaluate(dataclasses.replace(config, steps=10), str(tmp_path))
  path = tmp_path / "checkpoints" / "10" / "record" / "metadata"
  record = json.loads(path.read_text())
  del record["format"]  # what every checkpoint written before format 2 looks like ...
  record["record_sha256"] = record_digest(record)  # ... its record's digest taken without it
  path.write_text(json.dumps(record))
  with pytest.raises(ConfigError, match=r"^checkpoint 10 in .* older easgd_jax \(format 1"):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]  # nothing set aside or lost


def test_a_format_3_checkpoint_resumes(tmp_path, cpu_devices):
  """Format 4 only added the step's metrics row to the record: a format-3 workdir (the one-rule
  redesign's) resumes as it is, its rows from metrics.jsonl."""
  config = quick(algorithm="sgd", steps=20, checkpoint_every=10)
  train.train_and_evaluate(dataclasses.replace(config, steps=10), str(tmp_path))
  path = tmp_path / "checkpoints" / "10" / "record" / "metadata"
  record = json.loads(path.read_text())
  assert record["format"] == 4 and record["row"]["step"] == 10
  del record["row"]
  record["format"] = 3
  record["record_sha256"] = record_digest(record)
  path.write_text(json.dumps(record))
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert [row["step"] for row in summary["history"]] == [10, 20]


def record_digest(record):
  """The SHA-256 a checkpoint's record carries of itself (its canonical JSON, itself left out),
  written since late in format 1: an older checkpoint's record is intact, not damaged."""
  content = {k: v for k, v in record.items() if k != "record_sha256"}
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def test_a_long_run_prints_progress_lines(tmp_path):
  result = run_cli(
    "--model=mlp", "--algorithm=sgd", "--steps=20000", "--eval_every=20000", "--progress_every_s=1"
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("progress: step")]
  assert lines, result.stderr[-2000:]
  assert all("steps/s" in line and "samples/s" in line and "ETA" in line for line in lines)


def test_alpha_and_rho_give_the_same_run_and_not_both(cpu_devices):
  by_rho = train.train_and_evaluate(quick(algorithm="easgd", learning_rate=0.05, rho=2.0))
  by_alpha = train.train_and_evaluate(quick(algorithm="easgd", learning_rate=0.05, alpha=0.1))
  assert [r["test_loss"] for r in by_rho["history"]] == [
    r["test_loss"] for r in by_alpha["history"]
  ]
  with pytest.raises(ConfigError, match="--alpha=0.1 and --rho=2.0 both set the moving rate"):
    quick(algorithm="easgd", alpha=0.1, rho=2.0).validate()


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(algorithm="hogwild", optimizer="adamw"), "accepts --optimizer=sgd"),
    (dict(algorithm="hogwild_easgd", optimizer="momentum", momentum=0.9), "accepts --optimizer"),
    (dict(algorithm="hogwild", lr_schedule="cosine"), "accepts --lr_schedule=constant"),
    (dict(optimizer="nesterov"), "needs --momentum"),
    (dict(optimizer="rmsprop"), "--optimizer=rmsprop is unknown"),
    (dict(lr_schedule="linear"), "--lr_schedule=linear is unknown"),
    (dict(lr_schedule="warmup_cosine", warmup_steps=20, steps=20), "--warmup_steps=20"),
    (dict(algorithm="diloco", outer_momentum=1.0), "--outer_momentum"),
  ],
)
def test_optimizer_and_schedule_flags_are_checked(overrides, message):
  with pytest.raises(ConfigError, match=message):
    train.validate(Config(**overrides))


@pytest.mark.parametrize(
  "optimizer, algorithm",
  [
    ("sgd", "async_easgd"),
    ("momentum", "sync_easgd"),
    ("nesterov", "easgd"),
    ("adamw", "easgd"),  # every optimizer, each kind of driver and exchange
    ("adamw", "sync_easgd"),
    ("adamw", "async_sgd"),
  ],
)
def test_inner_optimizers_train_every_kind_of_algorithm(optimizer, algorithm, cpu_devices):
  momentum = 0.9 if optimizer in ("momentum", "nesterov") else 0.0
  learning_rate = 0.003 if optimizer == "adamw" else 0.05
  config = quick(
    algorithm=algorithm,
    optimizer=optimizer,
    momentum=momentum,
    learning_rate=learning_rate,
    steps=60,
    eval_every=30,
  )
  rows = train.train_and_evaluate(config)["history"]
  assert rows[-1]["test_loss"] < rows[0]["test_loss"] or rows[-1]["test_accuracy"] > 0.3


def test_the_nesterov_optimizer_is_optax_nesterov():
  """optimizers.nesterov keeps v itself (for EAMSGD's point x); its iterates are optax's."""
  params = {"w": np.array([1.0, -2.0, 3.0], np.float32)}
  grads = [{"w": np.array(g, np.float32)} for g in ([0.5, 1, -1], [2, 0, 1], [-1, 1, 0.5])]
  ours, theirs = optimizers.nesterov(0.1, 0.9), optax.sgd(0.1, momentum=0.9, nesterov=True)
  a, sa, b, sb = params, ours.init(params), params, theirs.init(params)
  for g in grads:
    ua, sa = ours.update(g, sa)
    ub, sb = theirs.update(g, sb)
    a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
  np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
  shift = optimizers.lookahead_shift(sa)["w"]  # delta * v: W - x
  np.testing.assert_allclose(shift, 0.9 * np.asarray(sa.velocity["w"]), rtol=1e-6)


def test_schedules_count_run_steps_and_decay_steps_is_fixed_at_the_first_launch(tmp_path):
  cosine = optimizers.schedule("cosine", 0.1, decay_steps=100)
  assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(100)) == pytest.approx(0.0)
  per_worker = optimizers.schedule("cosine", 0.1, decay_steps=100, steps_per_count=4)
  assert float(per_worker(25)) == pytest.approx(0.0)  # a worker's 25th own step: run step 100
  warm = optimizers.schedule("warmup_cosine", 0.1, decay_steps=100, warmup_steps=10)
  assert float(warm(0)) == 0.0 and float(warm(10)) == pytest.approx(0.1)
  assert optimizers.schedule("constant", 0.1, decay_steps=100) == 0.1  # no count in the state

  config = quick(algorithm="sgd", lr_schedule="cosine", steps=20, checkpoint_every=10)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  longer = dataclasses.replace(config, steps=40)
  resumed = train.train_and_evaluate(longer, str(tmp_path / "run"))
  saved = json.loads((tmp_path / "run" / reporting.CONFIG).read_text())
  assert saved["decay_steps"] == 20 and saved["steps"] == 40  # the schedule kept its length
  whole = train.train_and_evaluate(dataclasses.replace(longer, decay_steps=20))
  assert [r["test_loss"] for r in resumed["history"]] == [r["test_loss"] for r in whole["history"]]


def engine_run_wrapped(wrap):
  """train.build whose engine's run(plan) is wrap(run)(plan): an engine that stops or is
  signalled where a test says."""
  build = train.build

  def build_wrapped(config):
    *built, engine = build(config)
    engine.run = wrap(engine.run)
    return (*built, engine)

  return build_wrapped


@pytest.mark.parametrize("where", ["after a point", "at the step a launch resumed from"])
def test_a_stop_just_after_a_point_adds_no_second_row_or_checkpoint(tmp_path, monkeypatch, where):
  """An engine may see SIGTERM right after it made a point (a row and a checkpoint) and give a
  second snapshot at that step, stopped: the run stops there (Preempted, exit 143) without a
  second row or a second save of that step (orbax refuses one: a traceback, exit 1)."""
  import signal

  from easgd_jax.engines.base import Snapshot
  from easgd_jax.errors import Preempted

  config = Config(algorithm="sgd", model="mlp", steps=40, eval_every=20, checkpoint_every=20)

  def stop_after_20(run):
    def run_then_stop(plan):
      for event in run(plan):
        yield event
        if isinstance(event, Snapshot) and event.step == 20:
          yield dataclasses.replace(event, stopped=signal.SIGTERM)  # the same step again
          return

    return run_then_stop

  def stop_at_once(run):  # a stop at the step it resumed from, before any step
    def run_stopped(plan):
      for event in run(plan):
        if isinstance(event, Snapshot):  # what an engine holds then: a state to save
          yield dataclasses.replace(event, step=20, stopped=signal.SIGTERM)
          return

    return run_stopped

  monkeypatch.setattr(train, "build", engine_run_wrapped(stop_after_20))
  if where == "at the step a launch resumed from":
    with pytest.raises(Preempted):
      train.train_and_evaluate(config, str(tmp_path))
    monkeypatch.setattr(train, "build", engine_run_wrapped(stop_at_once))
  with pytest.raises(Preempted, match="SIGTERM at step 20"):
    train.train_and_evaluate(config, str(tmp_path))
  steps = [row["step"] for row in reporting.read_metrics(tmp_path)]
  assert steps == sorted(set(steps)) and 20 in steps, steps
  assert checkpoints.saved_steps(str(tmp_path)) == [20]


def test_a_signal_in_the_last_steps_completes_the_run_and_still_stops_the_caller(
  tmp_path, monkeypatch
):
  """SIGTERM after the engine's last look at it (here: after the final snapshot) is not lost:
  the run writes its outputs (complete, not torn) and then stops with exit 143, so that a study
  halts before its next run; the same command then reports the finished run."""
  import signal

  from easgd_jax.engines.base import Snapshot
  from easgd_jax.errors import Preempted

  config = Config(algorithm="sgd", model="mlp", steps=20, eval_every=10, checkpoint_every=10)
  build = train.build

  def signal_at_the_end(run):
    def run_then_signal(plan):
      for event in run(plan):
        yield event
        if isinstance(event, Snapshot) and event.step == config.steps:
          os.kill(os.getpid(), signal.SIGTERM)  # the handler only notes it

    return run_then_signal

  monkeypatch.setattr(train, "build", engine_run_wrapped(signal_at_the_end))
  with pytest.raises(Preempted, match="SIGTERM in the last steps; the run is complete") as stop:
    train.train_and_evaluate(config, str(tmp_path))
  assert stop.value.exit_code == 143
  assert os.path.exists(tmp_path / reporting.SUMMARY)
  monkeypatch.setattr(train, "build", build)
  assert train.train_and_evaluate(config, str(tmp_path))["steps"] == 20
