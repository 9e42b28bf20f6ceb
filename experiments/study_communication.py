"""Communication share and time to accuracy on simulated clusters (the SC'17 EASGD comparison).

  python experiments/study_communication.py --workdir=runs/study_communication --dataset=mnist5k \\
      --model=mlp
      # 108 runs of 64,000 samples, 3 seeds: see RUN_TIME

You, Buluc and Demmel ("Scaling Deep Learning on GPU and Knights Landing clusters", SC'17) find
the original EASGD (Algorithm 1, round robin) spending 87 % of its time in communication on 8
GPUs, Sync EASGD 14 %, and Sync EASGD 5.3x faster. This study runs the EASGD family (`easgd`,
`sync_easgd`, `async_easgd`, `hogwild_easgd`) and its SGD counterparts (`sync_sgd`, `async_sgd`,
`hogwild`; `sgd` on one worker as the baseline) on `--engine=simulated`, whose virtual clock
(easgd_jax/engines/simulated/) gives every run its communication share and its virtual
seconds to the target accuracy, on two clusters:

  (a) one 8-GPU PCIe node, G = 4 and 8: latency 10 us, 96 Gbit/s per link (PCIe 3 x16, the
      engine's default);
  (b) a 10 GbE cluster, G = 8, 16 and 64: latency 50 us (a kernel TCP/MPI round on 10 GbE is
      tens of microseconds one way), 10 Gbit/s per link.

Every arm shares these costs, fixed, never measured, so the study is deterministic:

  compute per worker step  1 ms: one step (forward, backward, update) of this MLP at b = 32 on a
                           GPU. Its arithmetic, 6 * 235k parameters * 32 samples = 45 MFLOP, is
                           ~10 us of a 2017 GPU's 5 TFLOP/s; what a framework step of a model
                           this small costs is its dozens of kernel launches and host dispatch,
                           0.5-2 ms in Caffe / Torch / JAX, so 1 ms.
  master service           20 us: the master adding one update to 0.94 MB of weights on a GPU
                           (~3 MB of memory traffic at ~200 GB/s, plus a launch).
  message                  the whole model, 235,146 float32 = 940,584 bytes (the MLP 784-256-
                           128-10), each way: 88 us on PCIe, 802 us on 10 GbE.
  no jitter, no stragglers.

What the clock counts as communication (engines/simulated/): 1 - compute time / (G * makespan),
i.e. every second a worker is not computing: sending, receiving, waiting on the master, and for
Algorithm 1 waiting for its turn (one worker computes at a time, so at least 1 - 1/G), for the
synchronous family waiting for the slowest worker and the ring all-reduce (2 (G - 1) messages of
1/G of the model on every link). Each worker has its own full-duplex link to the master; the
master's own link is not a shared bottleneck, only its service time is (see the results for
what that leaves out on 10 GbE).

Training settings, every arm: mnist5k (4,000 train / 1,000 test), mlp, b = 32 per worker,
eta = 0.05, plain SGD inside, tau = 1; the EASGD arms alpha = 0.9 / G (the EASGD paper's beta =
G alpha = 0.9, stable for the synchronous rule, alpha (1 + G) < 2). Budget 64,000 samples per
run (16 epochs); the target accuracy 90 %. Writes results.md (the settings, the table, ours
beside the paper's figures), results.csv, the usual accuracy plots and clusters.png (accuracy
against virtual time, one panel per cluster and G, and the communication shares).
"""

import dataclasses
import math
import os

from easgd_jax import reporting, study

COMPUTE_MS = 1.0  # one worker step, virtual ms (see the docstring)
SERVICE_US = 20.0  # the master applying one update, virtual us
ETA, BATCH = 0.05, 32
SAMPLES, TARGET, SEEDS = 64_000, 0.90, (0, 1, 2)  # >= 3 seeds: a spread needs several
BETA = 0.9  # EASGD: alpha = BETA / G
# (name, latency us, bandwidth Gbit/s, worker counts)
CLUSTERS = (
  ("PCIe node", 10.0, 96.0, (4, 8)),
  ("10 GbE", 50.0, 10.0, (8, 16, 64)),
)
ALGORITHMS = (  # (label, algorithm, elastic): the EASGD family, then its SGD counterparts
  ("Algorithm 1 (easgd)", "easgd", True),
  ("sync_easgd", "sync_easgd", True),
  ("async_easgd", "async_easgd", True),
  ("hogwild_easgd", "hogwild_easgd", True),
  ("sync_sgd", "sync_sgd", False),
  ("async_sgd", "async_sgd", False),
  ("hogwild", "hogwild", False),
)
BASELINE = "sgd (1 worker)"
# The whole study, 3 seeds, as the last run took on an idle machine (seed 0 alone took 16.9
# minutes with the cores shared, load average 9-14).
RUN_TIME = "10 minutes"


def setting(cluster, g):
  return f"{cluster} G={g}"


def arms():
  out = [
    study.Arm(BASELINE, {"algorithm": "sgd", "num_devices": 1}, family="sgd"),
  ]
  for cluster, latency, bandwidth, counts in CLUSTERS:
    network = {"sim_latency_us": latency, "sim_bandwidth_gbps": bandwidth}
    for g in counts:
      for label, algorithm, elastic in ALGORITHMS:
        overrides = {"algorithm": algorithm, "num_devices": g, **network}
        if elastic:
          overrides["alpha"] = BETA / g
        out.append(
          study.Arm(f"{label}, {setting(cluster, g)}", overrides, family=setting(cluster, g))
        )
  return tuple(out)


def header():
  clusters = "; ".join(
    f"{name}: latency {latency:g} us, {bandwidth:g} Gbit/s per link, G = "
    + ", ".join(str(g) for g in counts)
    for name, latency, bandwidth, counts in CLUSTERS
  )
  return (
    "# Communication share and time to accuracy, simulated clusters\n\n"
    "`python experiments/study_communication.py --workdir=runs/study_communication "
    "--dataset=mnist5k --model=mlp`: "
    f"{len(arms()) * len(SEEDS)} runs, seed{'s' if len(SEEDS) > 1 else ''} "
    f"{', '.join(map(str, SEEDS))}, "
    f"{RUN_TIME} on 2 CPU cores.\n\n"
    f"- Costs (fixed, never measured): compute {COMPUTE_MS:g} ms per worker step, master service "
    f"{SERVICE_US:g} us per update, no jitter or stragglers; {clusters}. A message is the whole "
    "model, 940,584 bytes (88 us on PCIe, 802 us on 10 GbE, latency included).\n"
    f"- Training: mnist5k / mlp, b = {BATCH} per worker, eta = {ETA:g}, SGD inside, tau = 1, "
    f"EASGD alpha = {BETA:g} / G; {SAMPLES:,} samples per run, target {TARGET:.0%}.\n"
    "- Communication share = 1 - compute / (G x virtual time): a worker's time not computing "
    "(messages, the master, its turn in Algorithm 1, the slowest worker and the all-reduce in the "
    "synchronous family). `seconds` and `samples/s` are this machine's wall clock; `virtual s` "
    "the simulated cluster's."
  )


def make_study(base):
  base = dataclasses.replace(
    base,
    engine="simulated",
    batch_size=BATCH,
    learning_rate=ETA,
    sim_compute_ms=COMPUTE_MS,
    sim_service_us=SERVICE_US,
    checkpoint_every=0,  # one checkpoint at the end: a G = 64 state is ~100 MB, and a study
    # resumes by whole runs anyway
  )
  return study.Study(
    name="study_communication",
    arms=arms(),
    base=base,
    seeds=SEEDS,
    samples=SAMPLES,
    eval_samples=1_600,
    target_accuracy=TARGET,
    header=header(),
  )


# --- the extra report: ours beside the paper's figures, and clusters.png ----------------------

PAPER = {"easgd_share": 0.87, "sync_share": 0.14, "speedup": 5.3}  # SC'17, 8 GPUs
PLOT = "clusters.png"


def _row(table, label):
  return next(r for r in table if r["arm"] == label)


def _fmt(value, spec):
  return "diverged" if value is None else format(value, spec)


def comparison(table):
  """Markdown: Algorithm 1 vs Sync EASGD at G = 8 on each cluster, beside the SC'17 figures."""
  lines = [
    "## Beside SC'17 (You, Buluc, Demmel): Algorithm 1 vs Sync EASGD at G = 8",
    "",
    "| | Algorithm 1: communication | Sync EASGD: communication | Sync EASGD speedup, time "
    f"to {TARGET:.0%} | Sync EASGD speedup, virtual time per sample |",
    "| --- | --- | --- | --- | --- |",
    f"| SC'17, 8 GPUs | {PAPER['easgd_share']:.0%} | {PAPER['sync_share']:.0%} "
    f"| {PAPER['speedup']:g}x | |",
  ]
  for cluster, *_ in CLUSTERS:
    easgd = _row(table, f"Algorithm 1 (easgd), {setting(cluster, 8)}")
    sync = _row(table, f"sync_easgd, {setting(cluster, 8)}")
    to_target = (
      f"{easgd['virtual_seconds_to_target'] / sync['virtual_seconds_to_target']:.1f}x"
      if easgd["virtual_seconds_to_target"] and sync["virtual_seconds_to_target"]
      else "–"
    )
    per_sample = easgd["virtual_time_s"] / sync["virtual_time_s"]  # same samples, both
    lines.append(
      f"| ours, {cluster} G = 8 | {easgd['communication_share']:.1%} "
      f"| {sync['communication_share']:.1%} | {to_target} | {per_sample:.1f}x |"
    )
  return "\n".join(lines) + "\n"


def shared_master_link(study_, table, message_bytes):
  """Markdown: the parameter-server arms on 10 GbE as the clock runs them (each worker its own
  link to the master) beside a master whose one link carries every message: its service time
  then includes receiving the message, bytes / bandwidth. Clock only (simulated events), no
  training: the arithmetic would change only by the order of the updates."""
  from easgd_jax.engines import simulated
  from easgd_jax.engines.simulated import clock, events

  name, latency, bandwidth, counts = CLUSTERS[1]
  steps = study_.config(study_.arms[0], SEEDS[0]).steps  # sgd's: b samples per step, as these
  wire_us = message_bytes / (bandwidth * simulated.BYTES_PER_GBIT) * 1e6
  lines = [
    f"## The parameter-server arms on {name} if the master's link were shared",
    "",
    f"The clock gives every worker its own {bandwidth:g} Gbit/s link to the master and makes "
    f"only the master's {SERVICE_US:g} us service a queue. A real parameter server has one "
    f"link: each {message_bytes:,}-byte message holds it {wire_us:.0f} us. Below, the same "
    f"{steps:,} iterations with the service time {SERVICE_US:g} + {wire_us:.0f} us (locked, "
    "the master's link the queue); the arms' own rows for comparison.",
    "",
    "| arm | communication share: own links (the run) | virtual s in all: own links (the run) "
    "| communication share: shared link | virtual s in all: shared link |",
    "| --- | --- | --- | --- | --- |",
  ]
  for g in counts:
    for arm_name, opens in (("async_sgd", False), ("async_easgd", True)):
      costs = clock.Costs(
        compute_s=COMPUTE_MS / 1e3,
        latency_s=latency / 1e6,
        bandwidth_bytes_s=bandwidth * simulated.BYTES_PER_GBIT,
        service_s=(SERVICE_US + wire_us) / 1e6,
      )
      order = events.events(costs, g, steps, message_bytes, seed=SEEDS[0], opens_round=opens)
      shared = events.metrics(order, steps)
      row = _row(table, f"{arm_name}, {setting(name, g)}")  # a diverged run has no clock
      lines.append(
        f"| {arm_name}, G = {g} | {_fmt(row['communication_share'], '.1%')} "
        f"| {_fmt(row['virtual_time_s'], '.3g')} "
        f"| {shared['communication_share']:.1%} | {shared['virtual_time_s']:.3g} |"
      )
  return "\n".join(lines) + "\n"


def plot(study_, workdir, table):
  """Accuracy against virtual time, one panel per (cluster, G), and the communication shares."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  results = study.load(study_, workdir)
  curves = study.curves(study_, results, "virtual_time_s")
  settings = [setting(name, g) for name, _, _, counts in CLUSTERS for g in counts]
  fig, axes = plt.subplots(2, 3, figsize=(16, 9))
  panels = dict(zip(settings, axes.flat, strict=False))
  names = [label for label, _, _ in ALGORITHMS]
  for where, axis in panels.items():
    if BASELINE in curves:
      x, mean, _, _ = curves[BASELINE]
      axis.plot(x, mean, color="grey", linestyle="--", label=BASELINE)
    for index, name in enumerate(names):
      label = f"{name}, {where}"
      if label in curves:
        x, mean, _, _ = curves[label]
        # Dashed: on the simulated engine a Hogwild arm is its locked twin's arithmetic in a
        # near-identical order, so its curve would hide under that one
        style = "--" if name.startswith("hogwild") else "-"
        axis.plot(x, mean, color=f"C{index}", linestyle=style, label=name)
    axis.axhline(TARGET, color="grey", linestyle=":", linewidth=1)
    axis.set_xscale("log")
    axis.set_ylim(0.5, 1.0)
    axis.set_title(where)
    axis.set_xlabel("virtual time (s)")
    axis.set_ylabel("test accuracy")
    axis.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=8)
  bars = axes.flat[len(settings)]
  width = 0.8 / len(names)
  for index, name in enumerate(names):
    shares = [_row(table, f"{name}, {where}")["communication_share"] for where in settings]
    shares = [math.nan if share is None else share for share in shares]  # diverged: no bar
    bars.bar(
      [k + index * width for k in range(len(settings))],
      shares,
      width,
      color=f"C{index}",
      label=name,
    )
  bars.set_xticks([k + 0.4 - width / 2 for k in range(len(settings))], settings, fontsize=8)
  bars.set_ylabel("communication share")
  bars.set_ylim(0, 1)
  bars.grid(alpha=0.3, axis="y")
  bars.set_title("communication share of worker time (no bar: diverged)")
  fig.suptitle(
    f"mnist5k / mlp, {SAMPLES:,} samples, compute {COMPUTE_MS:g} ms/step, "
    f"service {SERVICE_US:g} us (virtual)"
  )
  reporting.save_figure(fig, os.path.join(workdir, PLOT))


def finish(study_, workdir, table):
  summary, _ = next(run for run in study.load(study_, workdir)[BASELINE] if run is not None)
  text = (
    study.markdown(study_, table)
    + "\n"
    + comparison(table)
    + "\n"
    + shared_master_link(study_, table, summary["sim_message_bytes"])
  )
  reporting.write_text(os.path.join(workdir, "results.md"), text)
  plot(study_, workdir, table)


if __name__ == "__main__":
  study.main(make_study, finish=finish)
