"""Streaming and asynchronous DiLoCo against DiLoCo and data parallelism, on the language model.

  python experiments/study_streaming.py --workdir=runs/study_streaming
      # 32 arms x 3 seeds; see RUN_TIME for what it took

Workload: a small transformer (MODEL: 4 layers, so that P = 4 fragments exist, width 64,
context 32, batch 4 per worker) on the Shakespeare split by held-out works, sized so that the
whole study fits in about an hour on 2 CPU cores; the same token budget for every run.

The cluster (the simulated engine): G in {8, 16} workers, COMPUTE_MS per worker step, links
between workers of LATENCY_US and 1 or 10 Gbit/s. A synchronous arm's arithmetic does not depend
on the link, only its clock: it trains once, at 1 Gbit/s, and its schedule is re-costed at
10 Gbit/s (`simulated.recost`: the extra table). An asynchronous arm's order of pushes does
depend on it: it trains at each link speed.

Arms:

  sync_sgd                  data-parallel AdamW: an all-reduce of the gradient every step
  diloco                    H = 16 inner AdamW steps, then the outer Nesterov step
  streaming_diloco          H = 16, P in {2, 4} fragments, overlap tau in {0, 1} inner steps,
                            the outer gradient in float32 or fp4
  async_diloco              H = 16, two workers 3x slower; with Delayed Nesterov (N = G: the
                            outer momentum moves every G-th push) and without (N = 1: a plain
                            Nesterov step per push, the naive baseline)
  async_easgd               alpha = 0.5, AdamW inside, tau = 16

What the papers claim, and the columns that test it here: Streaming DiLoCo's loss equals
DiLoCo's at a P times lower peak bandwidth (final loss, peak Gbit/s); fp4 costs no loss (final
loss, bytes sent); Delayed Nesterov beats naive server momentum under stragglers (final loss,
tokens to TARGET_LOSS). Compute utilization is 1 - the communication share.
"""

import dataclasses
import os

from easgd_jax import reporting, study
from easgd_jax.engines import simulated

MODEL = dict(num_layers=4, num_heads=4, width=64, context=32, batch_size=4)
COMPUTE_MS = 10.0  # one worker step, virtual ms
LATENCY_US, LINKS_GBPS, WORKERS, H = 100.0, (1.0, 10.0), (8, 16), 16
SAMPLES = 16_000  # windows of 32 characters: 512,000 tokens per run
TARGET_LOSS, SEEDS = 2.6, (0, 1, 2)
# The whole study, as the last run took (see the README for the conditions).
RUN_TIME = "109 minutes"
STRAGGLERS = {"sim_stragglers": 2, "sim_straggler_slowdown": 3.0}
RECOSTED = "results_recosted.md"  # in the workdir: the synchronous arms at the faster link
SYNCHRONOUS = (  # (label, overrides): trained at the first link, re-costed at the others
  ("sync_sgd (AdamW)", {"algorithm": "sync_sgd"}),
  ("diloco", {"algorithm": "diloco", "tau": H}),
  *(
    (
      f"streaming_diloco, P={p}, overlap={overlap}, {quantize}",
      {
        "algorithm": "streaming_diloco",
        "tau": H,
        "fragments": p,
        "overlap_steps": overlap,
        "quantize": quantize,
      },
    )
    for p in (2, 4)
    for overlap in (0, 1)
    for quantize in ("none", "fp4")
  ),
)
ASYNCHRONOUS = (  # trained at every link
  (
    "async_diloco, Delayed Nesterov, 2 stragglers",
    {"algorithm": "async_diloco", "tau": H, "outer_delay": "G", **STRAGGLERS},
  ),
  (
    "async_diloco, naive Nesterov, 2 stragglers",
    {"algorithm": "async_diloco", "tau": H, "outer_delay": 1, **STRAGGLERS},
  ),
  ("async_easgd, alpha=0.5", {"algorithm": "async_easgd", "tau": H, "alpha": 0.5}),
)


def _on(overrides, workers, link):
  found = {**overrides, "num_devices": workers, "sim_bandwidth_gbps": link}
  if found.get("outer_delay") == "G":  # Delayed Nesterov: the momentum moves every G-th push
    found["outer_delay"] = workers
  return found


def arms():
  found = []
  for workers in WORKERS:
    for label, overrides in SYNCHRONOUS:
      found.append(study.Arm(f"{label}, G={workers}", _on(overrides, workers, LINKS_GBPS[0])))
    for label, overrides in ASYNCHRONOUS:
      for link in LINKS_GBPS:
        arm = study.Arm(f"{label}, G={workers}, {link:g} Gbit/s", _on(overrides, workers, link))
        found.append(arm)
  return tuple(found)


def header():
  links = " and ".join(f"{link:g}" for link in LINKS_GBPS)
  return (
    "# Streaming and asynchronous DiLoCo on the language model\n\n"
    f"`python experiments/study_streaming.py --workdir=runs/study_streaming`: {len(arms())} "
    f"arms x {len(SEEDS)} seeds, {SAMPLES * MODEL['context']:,} tokens per run, {RUN_TIME} on "
    "2 CPU cores.\n\n"
    f"- G = {' and '.join(map(str, WORKERS))} workers on the simulated engine: {COMPUTE_MS:g} ms "
    f"per worker step, {LATENCY_US:g} us latency, {links} Gbit/s per link; H = {H}. The "
    f"synchronous arms train at {LINKS_GBPS[0]:g} Gbit/s (rows without a link) and are "
    f"re-costed at the others below; the asynchronous arms train at each.\n"
    f"- The transformer with {MODEL['num_layers']} layers, {MODEL['num_heads']} heads, width "
    f"{MODEL['width']}, context {MODEL['context']}, batch {MODEL['batch_size']} per worker; "
    "validation loss in nats per character on held-out works; warm-up a tenth of each run's "
    "steps. Compute utilization = 1 - communication share."
  )


def make_study(base):
  base = dataclasses.replace(
    base,
    **MODEL,
    engine="simulated",
    sim_compute_ms=COMPUTE_MS,
    sim_latency_us=LATENCY_US,
    sim_bandwidth_gbps=LINKS_GBPS[0],
    checkpoint_every=0,  # a study resumes by whole runs
  )
  return study.Study(
    name="study_streaming",
    arms=arms(),
    base=base,
    seeds=SEEDS,
    samples=SAMPLES,
    eval_samples=SAMPLES // 8,
    target_loss=TARGET_LOSS,
    warmup_fraction=0.1,
    header=header(),
  )


def recosted(the_study, workdir, link):
  """The synchronous arms' runs re-costed at `link` Gbit/s: a Markdown table of their clock,
  means over the seeds that reached the target (virtual seconds to it) or over every seed."""
  lines = [
    f"| run, re-costed at {link:g} Gbit/s | virtual s to {the_study.target_loss:g} "
    "| virtual s in all | compute utilization | peak Gbit/s |",
    "| --- | --- | --- | --- | --- |",
  ]
  for arm in the_study.arms:
    if arm.overrides["algorithm"] not in {o["algorithm"] for _, o in SYNCHRONOUS}:
      continue
    reached, total, utilization, peak = [], [], [], []
    for seed in the_study.seeds:
      folder = study.run_dir(workdir, arm, seed)
      if not os.path.exists(os.path.join(folder, reporting.SUMMARY)):
        continue  # diverged: the main table counts it
      rows = simulated.recost(folder, sim_bandwidth_gbps=link)
      summary = reporting.summarize(rows, target_loss=the_study.target_loss)
      if summary.get("virtual_time_s_to_target_loss") is not None:
        reached.append(summary["virtual_time_s_to_target_loss"])
      final = rows[-1]
      total.append(final["virtual_time_s"])
      utilization.append(final["compute_share"])
      peak.append(final["peak_bandwidth_gbps"])
    mean = lambda xs, spec: format(sum(xs) / len(xs), spec) if xs else "–"  # noqa: E731
    lines.append(
      f"| {arm.label} | {mean(reached, '.4g')} ({len(reached)}/{len(the_study.seeds)}) "
      f"| {mean(total, '.4g')} | {mean(utilization, '.1%')} | {mean(peak, '.3g')} |"
    )
  return "\n".join(lines) + "\n"


def finish(the_study, workdir, table):
  """The synchronous arms at every faster link, beside results.md."""
  del table
  text = "\n".join(recosted(the_study, workdir, link) for link in LINKS_GBPS[1:])
  reporting.write_text(os.path.join(workdir, RECOSTED), text)


if __name__ == "__main__":
  study.main(make_study, finish=finish, dataset="shakespeare", model="transformer")
