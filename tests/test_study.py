"""The study runner on a tiny budget: every arm runs, the tables and plots hold one entry per arm,
and an interrupted study picks up where it stopped."""

import csv
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest

from easgd_jax import study, train
from easgd_jax.algorithms import REGISTRY
from easgd_jax.config import Config
from easgd_jax.errors import ConfigError

import helpers
from helpers import REPO, child_env, child_process, run_process


def experiment(name):
  path = os.path.join(REPO, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny(make_study, **changes):
  base = Config(dataset="digits", model="mlp")
  return dataclasses.replace(make_study(base), samples=320, eval_samples=160, **changes)


@pytest.mark.slow
def test_compare_algorithms_names_every_algorithm_and_reports_each_arm(tmp_path, cpu_devices):
  compare = tiny(experiment("compare_algorithms").make_study, seeds=(0, 1))
  assert {arm.overrides["algorithm"] for arm in compare.arms} == set(REGISTRY)
  # Every arm runs in test_a_killed_study_resumes_without_redoing_finished_runs (the command
  # line, one seed); here a step-driven, a data-parallel and two asynchronous arms, two seeds.
  keep = ("sgd", "sync_easgd", "async_sgd", "downpour, tau=4")
  compare = dataclasses.replace(compare, arms=tuple(a for a in compare.arms if a.label in keep))
  assert len(compare.arms) == len(keep)
  table = study.run(compare, str(tmp_path))
  labels = [arm.label for arm in compare.arms]
  assert [row["arm"] for row in table] == labels
  markdown = (tmp_path / "results.md").read_text().splitlines()
  assert len(markdown) == 2 + len(labels) and all(
    f"| {label} |" in "".join(markdown) for label in labels
  )
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["arm"] for r in rows] == labels and all(r["seeds"] == "2" for r in rows)
  for row in table:
    assert 0 <= row["final_accuracy_mean"] <= 1 and row["samples_per_s"] > 0
    is_async = row["arm"].split(",")[0] in (
      "async_sgd",
      "hogwild",
      "async_easgd",
      "hogwild_easgd",
      "downpour",
    )
    assert (row["staleness_median"] is not None) == is_async
  for plot in (study.SAMPLES_PLOT, study.TIME_PLOT):
    assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
  results = study.load(compare, str(tmp_path))
  assert study.plot_curves(compare, results, "samples", "", str(tmp_path / "x.png")) == labels
  # Every run kept its own workdir, with TensorBoard events beside metrics.jsonl.
  run = study.run_dir(str(tmp_path), compare.arms[0], 1)
  assert {"metrics.jsonl", "summary.json", "config.json"} <= set(os.listdir(run))
  assert any(tag == "test_accuracy" for tag, _, _ in helpers.read_events(run))


def test_same_sample_budget_for_every_algorithm():
  compare = experiment("compare_algorithms").make_study(Config())
  for arm in compare.arms:
    config = compare.config(arm, 0)
    data_parallel = REGISTRY[config.algorithm].data_parallel  # one batch per device per step
    per_step = config.batch_size * (config.num_devices if data_parallel else 1)
    assert config.steps * per_step == compare.samples and config.target_accuracy == 0.95


def test_model_parallel_arms_get_the_same_sample_budget(cpu_devices):
  """A (P / M) x M mesh steps P / M batches at once, not P: the budget counts what train does."""
  arms = (
    study.Arm("sgd", {"algorithm": "sgd"}),
    study.Arm("sync_sgd", {"algorithm": "sync_sgd", "num_devices": 8}),
    study.Arm("sgd, M=4", {"algorithm": "sgd", "model_parallel": 4}),
    study.Arm("sync_sgd 4 x 2", {"algorithm": "sync_sgd", "num_devices": 8, "model_parallel": 2}),
    study.Arm("sync_sgd 2 x 4", {"algorithm": "sync_sgd", "num_devices": 8, "model_parallel": 4}),
  )
  budget = study.Study(name="budget", arms=arms, base=Config(model="mlp"), samples=32 * 8 * 10)
  for arm in arms:
    config = budget.config(arm, 0)
    engine = train.build(config).engine  # what one step consumes: its sampler's batches
    replicas = engine.stepper.sampler.next(config.batch_size)["label"].size // config.batch_size
    assert config.steps * config.batch_size * replicas == budget.samples, arm.label
  assert [budget.config(arm, 0).steps for arm in arms] == [80, 10, 80, 20, 40]


@pytest.mark.slow
def test_a_sweep_plots_one_line_per_family(tmp_path, cpu_devices):
  sweep = tiny(experiment("sweep_rho").make_study, seeds=(0,))
  sweep = dataclasses.replace(sweep, arms=tuple(a for a in sweep.arms if a.swept in (1.0, 16.0)))
  table = study.run(sweep, str(tmp_path))
  assert sorted({row["swept"] for row in table}) == [1.0, 16.0]
  assert study.plot_sweep(sweep, table, str(tmp_path / "s.png")) == ["easgd", "sync_easgd"]
  assert (tmp_path / study.SWEEP_PLOT).exists()
  tau = tiny(experiment("sweep_tau").make_study, seeds=(0,))
  tau = dataclasses.replace(tau, arms=tau.arms[:6])  # tau = 1 and 4 of every family
  tau_table = study.run(tau, str(tmp_path / "tau"))
  assert study.plot_sweep(tau, tau_table, str(tmp_path / "t.png")) == [
    "Async EASGD",
    "Async EAMSGD",
    "DOWNPOUR",
  ]
  for name in ("sweep_tau", "sweep_workers"):  # the other sweeps are well formed
    other = experiment(name).make_study(Config())
    assert other.sweep_name and all(other.config(arm, 0) for arm in other.arms)


@pytest.mark.slow
def test_a_killed_study_resumes_without_redoing_finished_runs(tmp_path):
  env = child_env()
  command = [
    sys.executable,
    os.path.join(REPO, "experiments", "sweep_rho.py"),  # 8 arms: compare_algorithms' 15 took 51 s
    f"--workdir={tmp_path}",
    "--samples=320",
    "--seeds=0",
    "--model=mlp",
  ]
  summaries = lambda: sorted(tmp_path.glob("runs/*/seed_0/summary.json"))  # noqa: E731
  with child_process(command, env=env, stderr=subprocess.DEVNULL) as process:
    deadline = time.monotonic() + 300
    while len(summaries()) < 2:
      assert process.poll() is None and time.monotonic() < deadline
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
  finished = {path: path.stat().st_mtime_ns for path in summaries()}
  arms = len(experiment("sweep_rho").make_study(Config()).arms)
  assert 2 <= len(finished) < arms
  result = run_process(command, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stderr.count("finished earlier, skipped") == len(finished)
  assert {path: path.stat().st_mtime_ns for path in finished} == finished  # not redone
  assert len(summaries()) == arms
  assert len((tmp_path / "results.md").read_text().splitlines()) == arms + 2  # header, rule


def test_bad_study_flags_exit_2(tmp_path):
  result = run_process(
    [
      sys.executable,
      os.path.join(REPO, "experiments", "sweep_tau.py"),
      f"--workdir={tmp_path}/s",
      "--model=resnet",
    ],
    env=child_env(),
    timeout=120,
  )
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
    "error: --model=resnet is unknown; choose one of: mlp, lenet, cifar_cnn, transformer"
  ]
  assert not (tmp_path / "s").exists()


def test_a_diverging_run_is_reported_and_the_study_goes_on(tmp_path, cpu_devices):
  arms = (
    study.Arm("sgd", {"algorithm": "sgd"}),
    study.Arm("poisoned", {"algorithm": "sgd", "inject_nan": 3}),  # NaN batch at step 3
  )
  small = study.Study(
    name="diverging",
    arms=arms,
    base=Config(model="mlp"),
    seeds=(0,),
    samples=320,
    eval_samples=160,
  )
  table = study.run(small, str(tmp_path))
  assert [(row["arm"], row["diverged"]) for row in table] == [("sgd", 0), ("poisoned", 1)]
  assert table[1]["final_accuracy_mean"] is None
  assert "| poisoned | 1/1 diverged |" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "runs" / "poisoned" / "seed_0" / study.DIVERGED).exists()
  results = study.load(small, str(tmp_path))
  assert study.plot_curves(small, results, "samples", "", str(tmp_path / "c.png")) == ["sgd"]
  assert [row["arm"] for row in study.run(small, str(tmp_path))] == ["sgd", "poisoned"]  # skipped
  # Relaunched with other settings, it refuses naming the flag and writes nothing (the budget is
  # the study's own: its runs must all have it), nor does a plain run on its workdir or the reverse.
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  for changes, named in (
    (dict(samples=640), "--samples"),
    (dict(base=Config(model="lenet")), "--model=mlp, not lenet"),
    (dict(base=Config(model="mlp", dataset="mnist5k")), "--dataset=digits, not mnist5k"),
  ):
    with pytest.raises(ConfigError, match=named):
      study.run(dataclasses.replace(small, **changes), str(tmp_path))
  with pytest.raises(ConfigError, match="holds a study"):
    train.train_and_evaluate(Config(model="mlp", steps=5), str(tmp_path))
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "config.json").write_text("{}")
  with pytest.raises(ConfigError, match="holds a single run"):
    study.run(small, str(tmp_path / "plain"))
  assert os.listdir(tmp_path / "plain") == ["config.json"]


def test_simulated_arms_need_one_device_and_add_the_clock_columns():
  """A G = 64 simulated arm fuses its workers on one device; only a simulated study's table
  carries the virtual time to target and the communication share."""
  arms = (
    study.Arm("sgd", {"algorithm": "sgd"}),
    study.Arm("sync_easgd G=64", {"algorithm": "sync_easgd", "num_devices": 64, "alpha": 0.01}),
  )
  base = Config(model="mlp", engine="simulated", sim_compute_ms=1.0, sim_service_us=20.0)
  simulated = study.Study(name="sim", arms=arms, base=base, seeds=(0,), header="# settings")
  local = study.Study(name="local", arms=arms[:1], base=Config(model="mlp"), seeds=(0,))
  assert simulated.devices_needed() == 1 and simulated.simulated and not local.simulated
  summary = {
    "final": {"test_accuracy": 0.9},
    "steps_to_target": 10,
    "samples_to_target": 320,
    "seconds_to_target": 1.0,
    "samples_per_s": 100.0,
    "virtual_seconds_to_target": 0.25,
    "sim_virtual_time_s": 0.5,
    "sim_communication_share": 0.2,
    "sim_link_busy_share": 0.1,
    "sim_staleness_histogram": {"0": 1, "3": 5},  # as summary.json has it: string keys
  }
  results = {arm.label: [(summary, [])] for arm in arms}
  table = study.rows(simulated, results)
  assert table[1]["virtual_seconds_to_target"] == 0.25 and table[1]["communication_share"] == 0.2
  assert table[1]["staleness_median"] == 3.0
  text = study.markdown(simulated, table)
  assert text.startswith("# settings\n\n| run |") and "| 0.25 | 0.5 | 20.0% |" in text
  plain = study.rows(local, {"sgd": [(summary, [])]})
  assert "communication_share" not in plain[0]
  assert "virtual" not in study.markdown(local, plain)
  # A spread is never printed from one sample: the mean and n; from three, mean ± sample std.
  assert "| sgd | 0.9000 (n = 1) |" in study.markdown(local, plain)
  three = [({**summary, "final": {"test_accuracy": a}}, []) for a in (0.90, 0.92, 0.94)]
  spread = study.rows(local, {"sgd": three})
  assert "| sgd | 0.9200 ± 0.0200 (n = 3) |" in study.markdown(local, spread)
  lm = dataclasses.replace(local, target_loss=2.0)  # and a text study's validation loss
  one = [({**summary, "final": {"test_accuracy": 0.5, "test_loss": 2.5}}, [])]
  assert "| sgd | 2.5000 (n = 1) |" in study.markdown(lm, study.rows(lm, {"sgd": one}))


@pytest.mark.parametrize(
  "name", ["study_communication", "sweep_tau_mnist5k", "study_streaming", "compare_lm"]
)
def test_the_simulated_studies_run_three_seeds_at_least(name):
  """A simulated run is fast and deterministic: its studies report a spread over seeds."""
  assert len(experiment(name).make_study(Config()).seeds) >= 3


@pytest.mark.slow
def test_a_text_study_reports_loss_tokens_and_bytes_to_its_target_loss(tmp_path, cpu_devices):
  """A study judged by validation loss: its table and plots carry the loss, the tokens and
  virtual seconds to the target loss and the cluster's bytes; every run warms up for the same
  share of its own steps."""
  compare_lm = experiment("compare_lm")
  base = Config(dataset="shakespeare", model="transformer", num_layers=1, width=16, context=8)
  lm = compare_lm.make_study(base)
  arms = tuple(a for a in lm.arms if a.label.startswith("sync_sgd") and "simulated" in a.label)
  lm = dataclasses.replace(lm, arms=arms, seeds=(0,), samples=1920, eval_samples=480)
  configs = [lm.config(arm, 0) for arm in lm.arms]  # G = 8 and 16: 20 and 10 steps
  assert [c.steps for c in configs] == [20, 10] and [c.warmup_steps for c in configs] == [2, 1]
  lm = dataclasses.replace(lm, target_loss=4.3)  # reached by G = 8, not by G = 16
  table = study.run(lm, str(tmp_path))
  for arm, row in zip(lm.arms, table, strict=True):
    rows = study.load(lm, str(tmp_path))[arm.label][0][1]
    reached = next((r for r in rows if r["test_loss"] <= 4.3), None)
    assert row["final_loss_mean"] == rows[-1]["test_loss"] and row["bytes_sent"] > 0
    assert row["tokens_to_target_loss"] == (reached and reached["tokens"])
    assert row["virtual_seconds_to_target_loss"] == (reached and reached["virtual_time_s"])
  assert [row["reached_target_loss"] for row in table] == ["1/1", "0/1"]
  text = (tmp_path / "results.md").read_text()
  assert "| final validation loss | reached 4.3 | tokens to 4.3 |" in text
  assert text.count(" (n = 1) |") == 2 and "±" not in text  # no spread from one seed
  assert (tmp_path / study.LOSS_TOKENS_PLOT).exists()
  assert (tmp_path / study.LOSS_VIRTUAL_TIME_PLOT).exists()
  # Relaunched with another target: no run again, the table timed to the new target.
  summaries = sorted(tmp_path.glob("runs/*/seed_0/summary.json"))
  written = [os.stat(path).st_mtime_ns for path in summaries]
  table = study.run(dataclasses.replace(lm, target_loss=4.6), str(tmp_path))
  assert [row["reached_target_loss"] for row in table] == ["1/1", "1/1"]
  assert [os.stat(path).st_mtime_ns for path in summaries] == written
  text = (tmp_path / "results.md").read_text()
  assert "| final validation loss | reached 4.6 | tokens to 4.6 |" in text


@pytest.mark.parametrize("name", ["compare_lm", "study_streaming"])
def test_the_language_model_studies_are_valid_and_give_every_arm_the_same_tokens(name):
  lm = experiment(name).make_study(Config(dataset="shakespeare", model="transformer"))
  configs = [lm.config(arm, 0) for arm in lm.arms]  # each validated as its run would be
  tokens = {
    c.steps * REGISTRY[c.algorithm].samples_per_step(c) * c.context for c in configs
  }  # fmt: skip
  assert tokens == {lm.samples * configs[0].context}
  assert all(c.warmup_steps == c.steps // 10 for c in configs)


@pytest.mark.slow
def test_the_streaming_study_recosts_a_synchronous_arm_as_if_trained_at_the_faster_link(
  tmp_path, cpu_devices
):
  """A synchronous arm trains once, at 1 Gbit/s; its row at 10 Gbit/s (results_recosted.md) is
  the clock of the same run trained at 10 Gbit/s."""
  module = experiment("study_streaming")
  lm = module.make_study(Config(dataset="shakespeare", model="transformer"))
  (arm,) = [a for a in lm.arms if a.label == "diloco, G=8"]
  base = dataclasses.replace(lm.base, num_layers=1, width=16, context=8)
  lm = dataclasses.replace(lm, arms=(arm,), base=base, seeds=(0,), samples=1024, eval_samples=512)
  table = study.run(lm, str(tmp_path / "study"))
  module.finish(lm, str(tmp_path / "study"), table)
  text = (tmp_path / "study" / module.RECOSTED).read_text()
  (row,) = [line for line in text.splitlines() if line.startswith("| diloco, G=8 |")]
  recosted_total = float(row.split("|")[3])
  fast = dataclasses.replace(arm, overrides={**arm.overrides, "sim_bandwidth_gbps": 10.0})
  trained = train.train_and_evaluate(lm.config(fast, 0), str(tmp_path / "fast"))
  assert recosted_total == pytest.approx(trained["sim_virtual_time_s"], rel=1e-3)
  assert recosted_total < table[0]["virtual_time_s"]  # the faster link: less time in all
