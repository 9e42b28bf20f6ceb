"""Studies: many runs side by side, the comparison tables and plots the EASGD papers make.

A study is a list of `Arm`s (an algorithm with its settings, or one point of a sweep), each run
for every seed on the same data, model and budget. The budget is counted in *samples*, so an
algorithm that steps every worker at once (sync_sgd, sync_easgd: P * b samples per iteration) and
one that steps one worker (b samples) see the same amount of data.

Every run keeps its own workdir (STUDY/runs/ARM/seed_S, ARM the label made a folder name) with
the usual files; a run whose summary.json exists is finished and skipped, and an unfinished one
resumes from its checkpoint, so an interrupted study is relaunched with the same command. At
the end the study writes:

  results.md / results.csv   per arm: final test accuracy (mean ± std over seeds), steps, samples
                             and seconds to the target accuracy, samples/s, staleness (async);
                             a run that diverges is noted (diverged.json) and counted, not averaged
  accuracy_vs_samples.png    one curve per arm: mean over seeds, band = min..max
  accuracy_vs_time.png
  accuracy_vs_virtual_time.png  when some arm runs --engine=simulated: against the simulated
                             cluster's clock, and the table adds the virtual seconds to the
                             target and the communication share (simulated.py)
  sweep.png                  for a sweep: final accuracy and samples to target against the
                             swept value, one line per family
"""

import csv
import dataclasses
import io
import json
import os
import re

import numpy as np
from absl import logging

from easgd_jax import reporting
from easgd_jax.algorithms import REGISTRY
from easgd_jax.config import Config
from easgd_jax.workdir import Lock


@dataclasses.dataclass(frozen=True)
class Arm:
  label: str  # the row and curve name
  overrides: dict  # Config fields on top of the study's base config
  family: str = ""  # sweeps: the line this point belongs to (e.g. "EASGD")
  swept: float | None = None  # sweeps: the x value of this point

  @property
  def folder(self):
    """The label as a folder name: "sgd, model parallel M=4" -> "sgd_model_parallel_M=4"."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", self.label).strip("_")


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  arms: tuple
  base: Config = Config()
  seeds: tuple = (0, 1, 2)
  samples: int = 64_000  # the budget: training samples per run
  eval_samples: int = 3_200  # samples between evaluations
  target_accuracy: float = 0.95
  sweep_name: str | None = None  # x-axis label of sweep.png; None: not a sweep
  header: str = ""  # results.md: this text (the study's settings, say) above the table

  def config(self, arm, seed):
    """The run's Config: iterations from the sample budget (P * b samples per sync step)."""
    config = dataclasses.replace(self.base, seed=seed, **arm.overrides)
    per_step = REGISTRY[config.algorithm].samples_per_step(config)  # the algorithm says
    steps = max(1, self.samples // per_step)
    return dataclasses.replace(
      config,
      steps=steps,
      eval_every=max(1, min(steps, self.eval_samples // per_step)),
      target_accuracy=self.target_accuracy,
    ).validate()

  def devices_needed(self):
    """Devices to emulate: the most any run drives. A simulated run fuses its G workers on one
    device, so a G = 64 simulated arm needs one, not 64."""
    configs = (self.config(arm, 0) for arm in self.arms)
    return max(max(1 if c.engine == "simulated" else c.local_devices for c in configs), 1)

  @property
  def simulated(self):
    """Some arm runs on the simulated cluster: the table and plots add its clock."""
    return any(self.config(arm, 0).engine == "simulated" for arm in self.arms)


def run_dir(workdir, arm, seed):
  return os.path.join(workdir, "runs", arm.folder, f"seed_{seed}")


def run(study, workdir):
  """Run every (arm, seed) not yet finished, then write the tables and plots. Returns the rows."""
  from easgd_jax import train  # after the caller has set up the devices

  with Lock(workdir):  # one study per workdir; each run also locks its own folder
    return _run_all(study, workdir, train)


def _run_all(study, workdir, train):
  total = len(study.arms) * len(study.seeds)
  for index, (arm, seed) in enumerate(
    ((arm, seed) for arm in study.arms for seed in study.seeds), start=1
  ):
    folder = run_dir(workdir, arm, seed)
    if any(os.path.exists(os.path.join(folder, name)) for name in (reporting.SUMMARY, DIVERGED)):
      logging.info("[%d/%d] %s seed %d: finished earlier, skipped", index, total, arm.label, seed)
      continue
    logging.info("[%d/%d] %s seed %d", index, total, arm.label, seed)
    try:
      train.train_and_evaluate(study.config(arm, seed), folder)
    except train.DivergenceError as error:  # a result too (e.g. an unstable rho): note it, go on
      logging.warning("%s seed %d diverged: %s", arm.label, seed, error)
      reporting.write_text(os.path.join(folder, DIVERGED), json.dumps({"error": str(error)}) + "\n")
  return report(study, workdir)


DIVERGED = "diverged.json"  # in a run's folder: it stopped on a NaN/inf (the message inside)


def load(study, workdir):
  """{arm label: [(summary, metrics rows), or None if it diverged, per seed]} from the runs."""
  results = {}
  for arm in study.arms:
    runs = []
    for seed in study.seeds:
      folder = run_dir(workdir, arm, seed)
      if os.path.exists(os.path.join(folder, DIVERGED)):
        runs.append(None)  # counted in the table's "diverged" column, left out of the means
        continue
      with open(os.path.join(folder, reporting.SUMMARY)) as f:
        runs.append((json.load(f), reporting.read_metrics(folder)))
    results[arm.label] = runs
  return results


def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values))


def rows(study, results):
  """One row per arm: the table's numbers (means over seeds; None where a seed never got there)."""
  table = []
  for arm in study.arms:
    summaries = [run[0] for run in results[arm.label] if run is not None]
    diverged = len(results[arm.label]) - len(summaries)
    accuracy, accuracy_std = _mean_std([s["final"]["test_accuracy"] for s in summaries])
    reached = [s for s in summaries if s.get("steps_to_target") is not None]
    staleness = [_staleness_median(s) for s in summaries]
    table.append(
      {
        "arm": arm.label,
        "family": arm.family,
        "swept": arm.swept,
        "seeds": len(results[arm.label]),
        "diverged": diverged,
        "final_accuracy_mean": accuracy,
        "final_accuracy_std": accuracy_std,
        "reached_target": f"{len(reached)}/{len(results[arm.label])}",
        "steps_to_target": _mean_std([s["steps_to_target"] for s in reached])[0],
        "samples_to_target": _mean_std([s["samples_to_target"] for s in reached])[0],
        "seconds_to_target": _mean_std([s["seconds_to_target"] for s in reached])[0],
        "samples_per_s": _mean_std([s["samples_per_s"] for s in summaries])[0],
        "staleness_median": _mean_std(staleness)[0],
      }
    )
    if study.simulated:  # only then, so the other studies' tables keep their columns
      table[-1].update(_clock_columns(summaries, reached))
  return table


def _staleness_median(summary):
  """The median staleness of an asynchronous run: measured (local, ray), or from the simulated
  cluster's histogram {staleness: count}; None for the other algorithms."""
  if summary.get("staleness"):
    return summary["staleness"]["median"]
  histogram = summary.get("sim_staleness_histogram")
  if not histogram:
    return None
  values = sorted((int(v), c) for v, c in histogram.items())  # JSON keys are strings
  return float(np.median(np.repeat([v for v, _ in values], [c for _, c in values])))


def _clock_columns(summaries, reached):
  """The simulated cluster's columns (None for an arm on a real engine, or never reaching it)."""
  mean = lambda runs, key: _mean_std([s.get(key) for s in runs])[0]  # noqa: E731
  return {
    "virtual_seconds_to_target": mean(reached, "virtual_seconds_to_target"),
    "virtual_time_s": mean(summaries, "sim_virtual_time_s"),
    "communication_share": mean(summaries, "sim_communication_share"),
    "link_busy_share": mean(summaries, "sim_link_busy_share"),
  }


def markdown(study, table):
  target = f"{study.target_accuracy:.0%}"
  simulated = bool(table) and "communication_share" in table[0]
  clock = f" virtual s to {target} | virtual s in all | communication share |" if simulated else ""
  lines = [
    f"| run | final test accuracy | reached {target} | steps to {target} | samples to {target} "
    f"| seconds to {target} | samples/s | staleness (median) |{clock}",
    "| --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * (3 if simulated else 0),
  ]
  for row in table:
    diverged = f"{row['diverged']}/{row['seeds']} diverged"
    if row["final_accuracy_mean"] is None:
      accuracy = diverged
    else:
      accuracy = f"{row['final_accuracy_mean']:.4f} ± {row['final_accuracy_std']:.4f}"
      accuracy += f" ({diverged})" if row["diverged"] else ""
    lines.append(
      f"| {row['arm']} | {accuracy} "
      f"| {row['reached_target']} | {_fmt(row['steps_to_target'], '.0f')} "
      f"| {_fmt(row['samples_to_target'], '.0f')} | {_fmt(row['seconds_to_target'], '.1f')} "
      f"| {_fmt(row['samples_per_s'], '.0f')} | {_fmt(row['staleness_median'], '.1f')} |"
      + (
        f" {_fmt(row['virtual_seconds_to_target'], '.4g')} | {_fmt(row['virtual_time_s'], '.4g')} "
        f"| {_fmt(row['communication_share'], '.1%')} |"
        if simulated
        else ""
      )
    )
  header = study.header.strip()
  return (header + "\n\n" if header else "") + "\n".join(lines) + "\n"


def _fmt(value, spec):
  return "–" if value is None else format(value, spec)


def to_csv(table):
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(table[0]))
  writer.writeheader()
  writer.writerows(table)
  return out.getvalue()


def curves(study, results, x_key):
  """{arm: (x, mean accuracy, min, max)} over seeds, on the evaluation points all seeds share."""
  out = {}
  for arm in study.arms:
    histories = [run[1] for run in results[arm.label] if run is not None]
    if not histories or any(x_key not in h[-1] for h in histories):
      continue  # every seed diverged (the table says so), or no such clock (a real engine's run)
    length = min(len(h) for h in histories)
    accuracy = np.array([[r["test_accuracy"] for r in h[:length]] for h in histories])
    x = np.array([[r[x_key] for r in h[:length]] for h in histories]).mean(axis=0)
    out[arm.label] = (x, accuracy.mean(axis=0), accuracy.min(axis=0), accuracy.max(axis=0))
  return out


def plot_curves(study, results, x_key, xlabel, path):
  """Test accuracy against `x_key`, one curve (mean, band over seeds) per arm; returns labels."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axis = plt.subplots(figsize=(8, 5))
  for index, (label, (x, mean, low, high)) in enumerate(curves(study, results, x_key).items()):
    # Ten colours, then the same ten dashed: no two curves of a 12-arm study look alike.
    style = ("-", "--", "-.")[index // 10 % 3]
    (line,) = axis.plot(x, mean, label=label, color=f"C{index % 10}", linestyle=style)
    axis.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
  axis.axhline(study.target_accuracy, color="grey", linestyle=":", linewidth=1)
  axis.set_xlabel(xlabel)
  axis.set_ylabel("test accuracy")
  axis.set_ylim(max(0.0, axis.get_ylim()[0]), 1.0)
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  axis.set_title(
    f"{study.name}: {study.base.model} on {study.base.dataset}, {len(study.seeds)} seeds"
  )
  labels = [text.get_text() for text in axis.get_legend().get_texts()]
  reporting.save_figure(fig, path)
  return labels


def plot_sweep(study, table, path):
  """Final accuracy and samples to target against the swept value, one line per family."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  families = dict.fromkeys(row["family"] for row in table)
  for family in families:
    points = [r for r in table if r["family"] == family]
    if all(r["swept"] is None for r in points):  # not swept (e.g. async SGD has no tau): a line
      accuracy, samples = points[0]["final_accuracy_mean"], points[0]["samples_to_target"]
      if accuracy is not None:
        left.axhline(accuracy, linestyle="--", color="grey", label=family)
      if samples is not None:
        right.axhline(samples, linestyle="--", color="grey", label=family)
      continue
    points = sorted(points, key=lambda r: r["swept"])
    x = [r["swept"] for r in points]
    left.errorbar(
      x,
      [np.nan if r["final_accuracy_mean"] is None else r["final_accuracy_mean"] for r in points],
      yerr=[0.0 if r["final_accuracy_std"] is None else r["final_accuracy_std"] for r in points],
      marker="o",
      capsize=3,
      label=family,
    )
    right.plot(
      x,
      [np.nan if r["samples_to_target"] is None else r["samples_to_target"] for r in points],
      marker="o",
      label=family,
    )
  left.set_ylabel("final test accuracy (mean ± std)")
  right.set_ylabel(f"samples to {study.target_accuracy:.0%} (mean)")
  for axis in (left, right):
    axis.set_xlabel(study.sweep_name)
    axis.set_xscale("log", base=2)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  fig.suptitle(f"{study.name}: {study.base.model} on {study.base.dataset}")
  reporting.save_figure(fig, path)
  return list(families)


def report(study, workdir):
  """Write results.md, results.csv and the plots from the finished runs; return the rows."""
  results = load(study, workdir)
  table = rows(study, results)
  reporting.write_text(os.path.join(workdir, "results.md"), markdown(study, table))
  reporting.write_text(os.path.join(workdir, "results.csv"), to_csv(table))
  plot_curves(study, results, "samples", "training samples", os.path.join(workdir, SAMPLES_PLOT))
  plot_curves(
    study,
    results,
    "wall_time_s",
    "wall time (s, evaluation excluded)",
    os.path.join(workdir, TIME_PLOT),
  )
  if study.simulated:
    plot_curves(
      study,
      results,
      "virtual_time_s",
      "virtual time on the simulated cluster (s)",
      os.path.join(workdir, VIRTUAL_TIME_PLOT),
    )
  if study.sweep_name:
    plot_sweep(study, table, os.path.join(workdir, SWEEP_PLOT))
  logging.info("%s: results in %s\n%s", study.name, workdir, markdown(study, table))
  return table


SAMPLES_PLOT, TIME_PLOT, SWEEP_PLOT = "accuracy_vs_samples.png", "accuracy_vs_time.png", "sweep.png"
VIRTUAL_TIME_PLOT = "accuracy_vs_virtual_time.png"  # simulated studies


def main(make_study, finish=None):
  """The absl entry point every experiments/*.py study file calls; `finish(study, workdir,
  table)`, if given, runs after the study's own report (a study's extra tables and plots)."""
  from absl import app, flags

  from easgd_jax.config import parse_flags

  flags.DEFINE_string("workdir", None, "Folder for the study (each run in runs/ARM/seed_S).")
  flags.DEFINE_string("dataset", "digits", "digits, mnist5k (offline), mnist, cifar10, synthetic.")
  flags.DEFINE_string("data_dir", None, "tensorflow-datasets folder for mnist/cifar10.")
  flags.DEFINE_string(
    "model", None, "mlp, lenet or cifar_cnn (default: lenet; cifar_cnn on cifar10)."
  )
  flags.DEFINE_list("seeds", None, "Seeds, e.g. 0,1,2 (default: the study's); one run each.")
  flags.DEFINE_integer("samples", None, "Budget: training samples per run (default: the study's).")
  flags.DEFINE_float("target_accuracy", None, "Accuracy whose time/samples the table reports.")
  flags.mark_flag_as_required("workdir")
  FLAGS = flags.FLAGS

  def _main(argv):
    import sys

    from easgd_jax.config import MAX_SEED, ConfigError, exit_bad_input
    from easgd_jax.workdir import check_workdir

    if len(argv) > 1:
      exit_bad_input(f"unexpected arguments {argv[1:]}: every setting is a --flag")
    try:
      model = FLAGS.model or ("cifar_cnn" if FLAGS.dataset == "cifar10" else "lenet")
      base = Config(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model=model).validate()
      study = make_study(base)
      changes = {}
      if FLAGS.seeds:
        if not all(s.strip().isdigit() and int(s) <= MAX_SEED for s in FLAGS.seeds):
          raise ConfigError(
            f"--seeds must be integers in 0..{MAX_SEED} like 0,1,2 (got {','.join(FLAGS.seeds)})"
          )
        changes["seeds"] = tuple(int(s) for s in FLAGS.seeds)
      if FLAGS.samples is not None:  # --samples=0 is refused, not taken for "the default"
        if FLAGS.samples < 1:
          raise ConfigError(f"--samples must be an integer >= 1 (got {FLAGS.samples})")
        changes["samples"] = FLAGS.samples
      if FLAGS.target_accuracy is not None:
        changes["target_accuracy"] = FLAGS.target_accuracy
      study = dataclasses.replace(study, **changes)
      for arm in study.arms:  # every run's settings are checked before the first one starts
        for seed in study.seeds:
          study.config(arm, seed)
      check_workdir(FLAGS.workdir)
    except ConfigError as error:
      exit_bad_input(error)
    from easgd_jax import devices, train

    devices.emulate_cpu_devices(study.devices_needed())
    try:
      table = run(study, FLAGS.workdir)
      if finish:
        finish(study, FLAGS.workdir, table)
    except ConfigError as error:  # e.g. another study holds the workdir
      exit_bad_input(error)
    except KeyboardInterrupt:
      print("interrupted: the same command resumes the study", file=sys.stderr)
      sys.exit(130)
    except train.Preempted as stop:  # SIGTERM / SIGINT: the current run saved a checkpoint
      print(f"stopped: {stop}", file=sys.stderr)
      sys.exit(stop.exit_code)
    except train.WorkerFailure as error:
      print(f"error: {error}", file=sys.stderr)
      sys.exit(1)

  flags.FLAGS.set_default("logtostderr", True)
  app.run(_main, flags_parser=parse_flags)
