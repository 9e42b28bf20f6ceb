"""A study's plots: accuracy or loss curves (mean over seeds, band from worst to best seed),
sweeps."""

import numpy as np

from easgd_jax import reporting


def curves(study, results, x_key, y_key="test_accuracy"):
  """{arm: (x, mean y, min, max)} over seeds, at the evaluation steps all seeds share."""
  out = {}
  for arm in study.arms:
    histories = [run[1] for run in results[arm.label] if run is not None]
    if not histories or any(x_key not in h[-1] for h in histories):
      continue  # every seed diverged (the table says so), or no such clock (a real engine's run)
    # The evaluation steps every seed has (a seed's rows may start or end elsewhere).
    shared = set.intersection(*({r["step"] for r in h} for h in histories))
    histories = [[r for r in h if r["step"] in shared] for h in histories]
    accuracy = np.array([[r[y_key] for r in h] for h in histories])
    x = np.array([[r[x_key] for r in h] for h in histories]).mean(axis=0)
    out[arm.label] = (x, accuracy.mean(axis=0), accuracy.min(axis=0), accuracy.max(axis=0))
  return out


def plot_curves(study, results, x_key, xlabel, path, y_key="test_accuracy", ylabel="test accuracy"):
  """`y_key` against `x_key`, one curve (mean, band over seeds) per arm, one panel per family of
  arms (a study's clusters, say) when it has several, the legend beside each; returns the
  labels."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lines = curves(study, results, x_key, y_key)
  family = {arm.label: arm.family for arm in study.arms}
  panels = {}  # {family: [(label, curve)]}, in the arms' order; families without a curve left out
  for label, curve in lines.items():
    panels.setdefault(family[label], []).append((label, curve))
  fig, axes = plt.subplots(
    max(len(panels), 1), 1, figsize=(11, 4.2 * max(len(panels), 1)), squeeze=False, sharex=True
  )
  target = study.target_accuracy if y_key == "test_accuracy" else study.target_loss
  labels = []
  for axis, (name, panel) in zip(axes[:, 0], panels.items() or [("", [])], strict=True):
    for index, (label, (x, mean, low, high)) in enumerate(panel):
      # Ten colours, then the same ten dashed: no two curves of a 12-arm panel look alike.
      style = ("-", "--", "-.")[index // 10 % 3]
      (line,) = axis.plot(x, mean, label=label, color=f"C{index % 10}", linestyle=style)
      axis.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
      labels.append(label)
    if target is not None:
      axis.axhline(target, color="grey", linestyle=":", linewidth=1)
    axis.set_ylabel(ylabel)
    if y_key == "test_accuracy":
      axis.set_ylim(max(0.0, axis.get_ylim()[0]), 1.0)
    axis.grid(alpha=0.3)
    if panel:
      axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if len(panels) > 1:
      axis.set_title(name, fontsize=10)
  axes[-1, 0].set_xlabel(xlabel)
  fig.suptitle(
    f"{study.name}: {study.base.model} on {study.base.dataset}, {len(study.seeds)} seeds"
  )
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
