"""A study's plots: accuracy or loss curves (mean over seeds, band from worst to best seed),
sweeps."""

import numpy as np

from easgd_jax import reporting


def curves(study, results, x_key, y_key="test_accuracy"):
  """{arm: (x, mean y, min, max)} over seeds, on the evaluation points all seeds share."""
  out = {}
  for arm in study.arms:
    histories = [run[1] for run in results[arm.label] if run is not None]
    if not histories or any(x_key not in h[-1] for h in histories):
      continue  # every seed diverged (the table says so), or no such clock (a real engine's run)
    length = min(len(h) for h in histories)
    accuracy = np.array([[r[y_key] for r in h[:length]] for h in histories])
    x = np.array([[r[x_key] for r in h[:length]] for h in histories]).mean(axis=0)
    out[arm.label] = (x, accuracy.mean(axis=0), accuracy.min(axis=0), accuracy.max(axis=0))
  return out


def plot_curves(study, results, x_key, xlabel, path, y_key="test_accuracy", ylabel="test accuracy"):
  """`y_key` against `x_key`, one curve (mean, band over seeds) per arm; returns the labels."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axis = plt.subplots(figsize=(8, 5))
  lines = curves(study, results, x_key, y_key).items()
  for index, (label, (x, mean, low, high)) in enumerate(lines):
    # Ten colours, then the same ten dashed: no two curves of a 12-arm study look alike.
    style = ("-", "--", "-.")[index // 10 % 3]
    (line,) = axis.plot(x, mean, label=label, color=f"C{index % 10}", linestyle=style)
    axis.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
  target = study.target_accuracy if y_key == "test_accuracy" else study.target_loss
  if target is not None:
    axis.axhline(target, color="grey", linestyle=":", linewidth=1)
  axis.set_xlabel(xlabel)
  axis.set_ylabel(ylabel)
  if y_key == "test_accuracy":
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
