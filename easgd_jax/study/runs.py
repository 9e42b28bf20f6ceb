"""Studies: many runs side by side, the comparison tables and plots the EASGD papers make.

A study is a list of `Arm`s (an algorithm with its settings, or one point of a sweep), each run
for every seed on the same data, model and budget. The budget is counted in *samples*, so an
algorithm that steps every worker at once (sync_sgd, sync_easgd: P * b samples per iteration) and
one that steps one worker (b samples) see the same amount of data.

Every run keeps its own workdir (STUDY/runs/ARM/seed_S, ARM the label made a folder name) with
the usual files; a run whose summary.json exists is finished and skipped, and an unfinished one
resumes from its checkpoint, so an interrupted study is relaunched with the same command. A
relaunch with other settings (a run's, or the budget) is refused naming the flag, as run.py
refuses one, and so is a workdir that holds a single run. At the end the study writes:

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

A text study (`target_loss` set) reports validation loss instead: the table gives the final loss,
tokens and seconds (virtual seconds) to the target loss, bytes sent and the peak bandwidth, and
the plots are loss_vs_tokens.png and loss_vs_virtual_time.png.
"""

import dataclasses
import json
import os
import re

from absl import logging

from easgd_jax import checkpoints, engines, reporting, resume, train
from easgd_jax.algorithms import REGISTRY, resolve
from easgd_jax.config import Config
from easgd_jax.errors import ConfigError, DivergenceError
from easgd_jax.study import plots, tables
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
  # A text workload is judged by validation loss: the table reports the loss, tokens and
  # (virtual) seconds to this loss, bytes and peak bandwidth, and the plots show the loss.
  target_loss: float | None = None
  warmup_fraction: float | None = None  # each run's warm-up: this share of its own steps
  sweep_name: str | None = None  # x-axis label of sweep.png; None: not a sweep
  header: str = ""  # results.md: this text (the study's settings, say) above the table

  def config(self, arm, seed):
    """The run's Config: iterations from the sample budget (P * b samples per sync step)."""
    config = dataclasses.replace(self.base, seed=seed, **arm.overrides)
    # The algorithm says, at the batch size the run will resolve to.
    per_step = REGISTRY[config.algorithm].samples_per_step(resolve(config))
    steps = max(1, self.samples // per_step)
    config = dataclasses.replace(
      config,
      steps=steps,
      eval_every=max(1, min(steps, self.eval_samples // per_step)),
      target_accuracy=None if self.target_loss else self.target_accuracy,
      target_loss=self.target_loss,
    )
    if self.warmup_fraction is not None:  # the same share of a short run as of a long one
      config = dataclasses.replace(config, warmup_steps=int(self.warmup_fraction * steps))
    return train.validate(config)

  def devices_needed(self):
    """Devices to emulate: the most any run drives (a simulated run fuses its G workers on
    one device, so a G = 64 simulated arm needs one, not 64)."""
    configs = (self.config(arm, 0) for arm in self.arms)
    return max(max(engines.devices_to_emulate(c) for c in configs), 1)

  @property
  def simulated(self):
    """Some arm runs on a virtual clock: the table and plots add its columns."""
    return any(engines.virtual_clock(self.config(arm, 0)) for arm in self.arms)


def run_dir(workdir, arm, seed):
  return os.path.join(workdir, resume.STUDY_RUNS, arm.folder, f"seed_{seed}")


def run(study, workdir):
  """Run every (arm, seed) not yet finished, then write the tables and plots. Returns the rows.

  ConfigError, before anything is written, when the workdir holds a single run, or runs made
  with other settings than `study`'s (run.py's resume rules, and the same budget)."""
  check(study, workdir)
  with Lock(workdir):  # one study per workdir; each run also locks its own folder
    return _run_all(study, workdir)


def check(study, workdir):
  for name in (reporting.CONFIG, checkpoints.FOLDER):
    if os.path.exists(os.path.join(workdir, name)):
      raise ConfigError(
        f"--workdir={workdir} holds a single run ({name}), not a study: use another --workdir"
      )
  for arm in study.arms:
    for seed in study.seeds:
      folder = run_dir(workdir, arm, seed)
      saved = resume.saved_config(folder)
      if saved is None:
        continue
      config = train.validate(study.config(arm, seed), folder)
      config = resume.fix_measured(resume.fix_decay_steps(config, folder), folder)
      resume.check_same_experiment(saved, config)  # names --model, --dataset, ...
      if saved.get("steps") != config.steps:
        raise ConfigError(
          f"{folder} holds a run of {saved.get('steps')} steps, not {config.steps}: the study's "
          f"budget (--samples) changed; use the same --samples, or another --workdir"
        )


def _run_all(study, workdir):
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
    except DivergenceError as error:  # a result too (e.g. an unstable rho): note it, go on
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
        summary, rows = json.load(f), reporting.read_metrics(folder)
      # The target is the study's: --target_accuracy / --target_loss may have changed since the
      # run finished (a relaunch with another target only rewrites the table).
      accuracy = None if study.target_loss is not None else study.target_accuracy
      reached = reporting.summarize(rows, accuracy, study.target_loss)
      summary.update({key: value for key, value in reached.items() if "target" in key})
      runs.append((summary, rows))
    results[arm.label] = runs
  return results


def report(study, workdir):
  """Write results.md, results.csv and the plots from the finished runs; return the rows."""
  results = load(study, workdir)
  table = tables.rows(study, results)
  reporting.write_text(os.path.join(workdir, "results.md"), tables.markdown(study, table))
  reporting.write_text(os.path.join(workdir, "results.csv"), tables.to_csv(table))
  if study.target_loss is not None:
    _plot_losses(study, results, workdir)
  else:
    _plot_accuracies(study, results, workdir)
  if study.sweep_name:
    plots.plot_sweep(study, table, os.path.join(workdir, SWEEP_PLOT))
  logging.info("%s: results in %s\n%s", study.name, workdir, tables.markdown(study, table))
  return table


def _plot_losses(study, results, workdir):
  loss = {"y_key": "test_loss", "ylabel": "validation loss (nats per character)"}
  plots.plot_curves(
    study, results, "tokens", "training tokens", os.path.join(workdir, LOSS_TOKENS_PLOT), **loss
  )
  if study.simulated:
    plots.plot_curves(
      study,
      results,
      "virtual_time_s",
      "virtual time on the simulated cluster (s)",
      os.path.join(workdir, LOSS_VIRTUAL_TIME_PLOT),
      **loss,
    )


def _plot_accuracies(study, results, workdir):
  plots.plot_curves(
    study, results, "samples", "training samples", os.path.join(workdir, SAMPLES_PLOT)
  )
  plots.plot_curves(
    study,
    results,
    "wall_time_s",
    "wall time (s, evaluation excluded)",
    os.path.join(workdir, TIME_PLOT),
  )
  if study.simulated:
    plots.plot_curves(
      study,
      results,
      "virtual_time_s",
      "virtual time on the simulated cluster (s)",
      os.path.join(workdir, VIRTUAL_TIME_PLOT),
    )


SAMPLES_PLOT, TIME_PLOT, SWEEP_PLOT = "accuracy_vs_samples.png", "accuracy_vs_time.png", "sweep.png"
VIRTUAL_TIME_PLOT = "accuracy_vs_virtual_time.png"  # simulated studies
LOSS_TOKENS_PLOT, LOSS_VIRTUAL_TIME_PLOT = "loss_vs_tokens.png", "loss_vs_virtual_time.png"  # text
