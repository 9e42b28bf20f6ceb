"""A study's table: one row per arm, means over seeds (results.md, results.csv)."""

import csv
import io

import numpy as np


def _mean_std(values):
  """Mean and sample standard deviation (ddof 1) of the values given; no spread from one."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _mean_text(row, name):
  """`mean ± std (n = N)` of `row`'s `name`: the mean alone for one run, never a spread."""
  diverged = f"{row['diverged']}/{row['seeds']} diverged"
  if row[f"{name}_mean"] is None:
    return diverged
  std = row[f"{name}_std"]
  spread = f" ± {std:.4f}" if std is not None else ""
  return f"{row[f'{name}_mean']:.4f}{spread} (n = {row['n']}" + (
    f", {diverged})" if row["diverged"] else ")"
  )


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
        "n": len(summaries),  # the runs the means are over
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
    if study.target_loss is not None:
      table[-1].update(_loss_columns(summaries, len(results[arm.label])))
  return table


def _loss_columns(summaries, seeds):
  """A text study's columns: the validation loss, what reaching `target_loss` took, and the
  simulated cluster's bytes and peak bandwidth (None on a real engine)."""
  reached = [s for s in summaries if s.get("tokens_to_target_loss") is not None]
  loss, loss_std = _mean_std([s["final"]["test_loss"] for s in summaries])
  mean = lambda runs, key: _mean_std([s.get(key) for s in runs])[0]  # noqa: E731
  final = lambda key: _mean_std([s["final"].get(key) for s in summaries])[0]  # noqa: E731
  return {
    "final_loss_mean": loss,
    "final_loss_std": loss_std,
    "reached_target_loss": f"{len(reached)}/{seeds}",
    "tokens_to_target_loss": mean(reached, "tokens_to_target_loss"),
    "seconds_to_target_loss": mean(reached, "wall_time_s_to_target_loss"),
    "virtual_seconds_to_target_loss": mean(reached, "virtual_time_s_to_target_loss"),
    "bytes_sent": final("bytes_sent"),
    "peak_bandwidth_gbps": final("peak_bandwidth_gbps"),
  }


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
  if study.target_loss is not None:
    return _loss_markdown(study, table)
  target = f"{study.target_accuracy:.0%}"
  simulated = bool(table) and "communication_share" in table[0]
  clock = f" virtual s to {target} | virtual s in all | communication share |" if simulated else ""
  lines = [
    f"| run | final test accuracy | reached {target} | steps to {target} | samples to {target} "
    f"| seconds to {target} | samples/s | staleness (median) |{clock}",
    "| --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * (3 if simulated else 0),
  ]
  for row in table:
    accuracy = _mean_text(row, "final_accuracy")
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


def _loss_markdown(study, table):
  target = f"{study.target_loss:g}"
  lines = [
    f"| run | final validation loss | reached {target} | tokens to {target} "
    f"| seconds to {target} | virtual s to {target} | virtual s in all | communication share "
    "| bytes sent | peak Gbit/s |",
    "| --- |" + " --- |" * 9,
  ]
  for row in table:
    loss = _mean_text(row, "final_loss")
    lines.append(
      f"| {row['arm']} | {loss} | {row['reached_target_loss']} "
      f"| {_fmt(row['tokens_to_target_loss'], ',.0f')} "
      f"| {_fmt(row['seconds_to_target_loss'], '.1f')} "
      f"| {_fmt(row.get('virtual_seconds_to_target_loss'), '.4g')} "
      f"| {_fmt(row.get('virtual_time_s'), '.4g')} | {_fmt(row.get('communication_share'), '.1%')} "
      f"| {_fmt(row['bytes_sent'], '.3g')} | {_fmt(row['peak_bandwidth_gbps'], '.3g')} |"
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
