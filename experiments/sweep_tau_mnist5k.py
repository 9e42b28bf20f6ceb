"""The EASGD paper's tau sweep on mnist5k: Async EASGD / EAMSGD against DOWNPOUR / MDOWNPOUR.

  python experiments/sweep_tau_mnist5k.py --workdir=runs/sweep_tau_mnist5k --dataset=mnist5k \\
      --model=mlp
      # 117 runs of 64,000 samples, 3 seeds: 11 minutes on 2 CPU cores

Zhang, Choromanska and LeCun ("Deep learning with Elastic Averaging SGD", NeurIPS 2015) sweep the
communication period tau in {1, 4, 16, 64} for p = 4, 8 and 16 workers: DOWNPOUR is fine at small
tau and unstable at large tau (and at large p), MDOWNPOUR (momentum on the master) at tau = 1
already, while Async EASGD and EAMSGD stay stable. Here every point runs on `--engine=simulated`
(p workers fused on one CPU device, the order of the master's updates and every read's
staleness from the virtual clock), so the p = 16 points need one device, not 16.

  Async EASGD    async_easgd, alpha = 0.9 / p (the paper's beta = p alpha = 0.9)
  Async EAMSGD   the same with Nesterov momentum delta = 0.9 (Zhang et al.'s Algorithm 2)
  DOWNPOUR       downpour: tau local steps accumulated, pushed, the master's weights pulled
  MDOWNPOUR      downpour --momentum=0.9: Nesterov momentum on the master's update, at tau = 1
                 only, where the paper defines it (this codebase's extension to tau > 1, the
                 same rule on the accumulated update, is left out to keep the sweep's time)

Every point: mnist5k (4,000 train / 1,000 test), mlp, b = 32 per worker, eta = 0.05, the clock of
one PCIe node (compute 1 ms per worker step, master service 20 us, latency 10 us, 96 Gbit/s;
fixed, so the runs are deterministic), 64,000 samples (64,000 / 32 / p own steps per worker),
target 90 %, seeds 0, 1 and 2. Writes results.md (the settings, the table, and final accuracy
pivoted by tau per p with every unstable point marked), results.csv, the usual plots, sweep.png,
and tau_by_p.png (final accuracy and peak test loss against tau, one panel per p).
"""

import dataclasses
import math
import os

from easgd_jax import reporting, study

TAUS = (1, 4, 16, 64)
PS = (4, 8, 16)
BETA, DELTA = 0.9, 0.9  # the paper's moving rate p alpha, and the momentum
ETA, BATCH = 0.05, 32
SAMPLES, TARGET, SEEDS = 64_000, 0.90, (0, 1, 2)  # >= 3 seeds: a spread needs several
COSTS = {  # one PCIe node, as experiments/study_communication.py (a)
  "sim_compute_ms": 1.0,
  "sim_service_us": 20.0,
  "sim_latency_us": 10.0,
  "sim_bandwidth_gbps": 96.0,
}
# measured 2026-12-05, the three seeds, nothing else running (the one-seed run took 9.1 minutes
# on cores shared with other jobs)
RUN_TIME = "11 minutes"
# Unstable: the evaluated weights (the master's, the center) scored a test loss above this at some
# evaluation: worse than the untrained network (2.66 here) and chance (ln 10 = 2.30). In this
# sweep EASGD and EAMSGD never rise above their first evaluation; DOWNPOUR's spikes reach 5-170.
UNSTABLE_LOSS = 3.0


def families(p):
  """(family, label, overrides, its taus) for p workers."""
  elastic = {"algorithm": "async_easgd", "alpha": BETA / p}
  return (
    ("Async EASGD", "EASGD", elastic, TAUS),
    ("Async EAMSGD", "EAMSGD", {**elastic, "momentum": DELTA}, TAUS),
    ("DOWNPOUR", "DOWNPOUR", {"algorithm": "downpour"}, TAUS),
    ("MDOWNPOUR", "MDOWNPOUR", {"algorithm": "downpour", "momentum": DELTA}, (1,)),
  )


def label(name, tau, p):
  return f"{name} tau={tau} p={p}"


def arms():
  return tuple(
    study.Arm(
      label(name, tau, p),
      {**overrides, "num_devices": p, "tau": tau},
      family=f"{family}, p={p}",
      swept=tau,
    )
    for p in PS
    for tau in TAUS
    for family, name, overrides, taus in families(p)
    if tau in taus
  )


def header():
  costs = (
    f"compute {COSTS['sim_compute_ms']:g} ms per worker step, master service "
    f"{COSTS['sim_service_us']:g} us, latency {COSTS['sim_latency_us']:g} us, "
    f"{COSTS['sim_bandwidth_gbps']:g} Gbit/s per link"
  )
  return (
    "# The EASGD paper's tau sweep on mnist5k, simulated\n\n"
    "`python experiments/sweep_tau_mnist5k.py --workdir=runs/sweep_tau_mnist5k --dataset=mnist5k "
    f"--model=mlp`: {len(arms()) * len(SEEDS)} runs, seed{'s' if len(SEEDS) > 1 else ''} "
    f"{', '.join(map(str, SEEDS))}, {RUN_TIME} on 2 "
    "CPU cores.\n\n"
    f"- tau in {{{', '.join(map(str, TAUS))}}}, p = G in {{{', '.join(map(str, PS))}}}; "
    f"EASGD / EAMSGD alpha = {BETA:g} / p (beta = {BETA:g}), EAMSGD and MDOWNPOUR momentum "
    f"{DELTA:g} (Nesterov); MDOWNPOUR at tau = 1 only, where the paper defines it.\n"
    f"- mnist5k / mlp, b = {BATCH} per worker, eta = {ETA:g}; {SAMPLES:,} samples per run, i.e. "
    f"{SAMPLES // BATCH:,} worker steps in all, {SAMPLES // BATCH // PS[-1]:,} per worker at "
    f"p = {PS[-1]} (two exchanges each at tau = 64); target {TARGET:.0%}.\n"
    f"- Simulated engine, one PCIe node's clock (fixed, never measured): {costs}."
  )


def make_study(base):
  base = dataclasses.replace(
    base,
    engine="simulated",
    batch_size=BATCH,
    learning_rate=ETA,
    checkpoint_every=0,  # one checkpoint at the end; the study resumes by whole runs
    **COSTS,
  )
  return study.Study(
    name="sweep_tau_mnist5k",
    arms=arms(),
    base=base,
    seeds=SEEDS,
    samples=SAMPLES,
    eval_samples=3_200,
    target_accuracy=TARGET,
    sweep_name="tau",
    header=header(),
  )


# --- the extra report: final accuracy pivoted by tau, one table and one panel per p -----------

PLOT = "tau_by_p.png"


def outcomes(study_, workdir):
  """{arm label: (final accuracy or None, peak test loss or None, unstable)}, means over seeds:
  unstable when a seed stopped on a NaN/inf or its test loss ever rose above UNSTABLE_LOSS.
  The test loss, not the training loss: DOWNPOUR's workers fit their own copies well (their
  training loss stays low) while the master they push into blows up."""
  out = {}
  for label_, runs in study.load(study_, workdir).items():
    finished = [run for run in runs if run is not None]
    if not finished:
      out[label_] = (None, None, True)
      continue
    accuracy = sum(s["final"]["test_accuracy"] for s, _ in finished) / len(finished)
    peaks = [max(r["test_loss"] for r in rows) for _, rows in finished]
    unstable = len(finished) < len(runs) or max(peaks) > UNSTABLE_LOSS
    out[label_] = (accuracy, sum(peaks) / len(peaks), unstable)
  return out


def pivot(found):
  """Markdown: final test accuracy, a row per family, a column per tau, one table per p."""
  lines = [
    "## Final test accuracy by tau",
    "",
    f"The mean over the seeds ({', '.join(map(str, SEEDS))}) that finished.",
    "",
    "**bold ✗**: unstable (stopped on a NaN/inf, or the evaluated weights' test loss above "
    f"{UNSTABLE_LOSS:g} at some evaluation: worse than the untrained network's 2.66); the peak "
    "test loss in brackets. MDOWNPOUR runs at tau = 1 only (the paper's).",
  ]
  for p in PS:
    lines += ["", f"p = {p}", "", "| | " + " | ".join(f"tau = {t}" for t in TAUS) + " |"]
    lines.append("| --- |" + " --- |" * len(TAUS))
    for family, name, _, _ in families(p):
      cells = []
      for tau in TAUS:
        accuracy, loss, unstable = found.get(label(name, tau, p), (None, None, None))
        if unstable is None:
          cell = "not run"
        elif accuracy is None:
          cell = "**✗ NaN**"
        elif unstable:
          cell = f"**✗ {accuracy:.3f}** ({loss:.2f})"
        else:
          cell = f"{accuracy:.3f}"
        cells.append(cell)
      lines.append(f"| {family} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(found, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, len(PS), figsize=(5 * len(PS), 8), sharex=True)
  for column, p in enumerate(PS):
    top, bottom = axes[0, column], axes[1, column]
    for index, (family, name, _, taus) in enumerate(families(p)):
      points = [found[label(name, tau, p)] for tau in taus]
      style = {"color": f"C{index}", "marker": "o", "label": family}
      accuracy = [math.nan if a is None else a for a, _, _ in points]
      peak = [math.nan if v is None else v for _, v, _ in points]
      top.plot(taus, accuracy, **style)
      bottom.plot(taus, peak, **style)
      for tau, (a, v, unstable) in zip(taus, points, strict=True):
        if not unstable:
          continue
        if a is None:  # stopped on a NaN/inf: a cross in the family's colour, stacked near 0
          top.plot(tau, 0.04 + 0.06 * index, "x", color=f"C{index}", markersize=10, mew=2)
          top.annotate(
            "NaN", (tau, 0.04 + 0.06 * index), xytext=(8, -4), textcoords="offset points"
          )
          continue
        top.plot(tau, a, "x", color="red", markersize=12, mew=2)
        bottom.plot(tau, v, "x", color="red", markersize=12, mew=2)
    top.axhline(TARGET, color="grey", linestyle=":", linewidth=1)
    bottom.axhline(UNSTABLE_LOSS, color="red", linestyle=":", linewidth=1, label="unstable above")
    top.set_title(f"p = {p}")
    top.set_ylim(0, 1)
    top.set_ylabel("final test accuracy")
    bottom.set_ylabel("peak test loss")
    bottom.set_yscale("log")
    bottom.set_xlabel("tau (MDOWNPOUR: 1 only)")
    for axis in (top, bottom):
      axis.set_xscale("log", base=2)
      axis.set_xticks(TAUS, [str(t) for t in TAUS])
      axis.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  axes[1, 0].legend(fontsize=8)
  fig.suptitle(
    f"tau sweep, mnist5k / mlp, {SAMPLES:,} samples, simulated PCIe node "
    "(red x: unstable; x near 0: stopped on NaN/inf)"
  )
  reporting.save_figure(fig, path)


def finish(study_, workdir, table):
  found = outcomes(study_, workdir)
  text = study.markdown(study_, table) + "\n" + pivot(found)
  reporting.write_text(os.path.join(workdir, "results.md"), text)
  plot(found, os.path.join(workdir, PLOT))


if __name__ == "__main__":
  study.main(make_study, finish=finish)
