"""Streaming and asynchronous DiLoCo against DiLoCo and data parallelism, on the language model.

  python experiments/study_streaming.py --workdir=runs/study_streaming
      # 13 arms x 3 seeds of 307,200 tokens; see RUN_TIME for what it took

Workload: the transformer's defaults (4 layers, 4 heads, width 128, context 64, batch 12 per
worker) on the Shakespeare split by held-out works, G = 4 workers on the simulated engine:
COMPUTE_MS per worker step, 1 ms latency, 1 Gbit/s per link, so that a whole model (3.2 MB in
float32) takes ~26 ms to send, about one step of compute.

Arms:

  sync_sgd                  data-parallel AdamW: an all-reduce of the gradient every step
  diloco                    H = 16 inner AdamW steps, then the outer Nesterov step
  streaming_diloco          H = 16, P in {2, 4} fragments, overlap tau in {0, 1} inner steps,
                            the outer gradient in float32 or fp4
  async_diloco              H = 16, two of the four workers 3x slower; with Delayed Nesterov
                            (N = G: the outer momentum moves every G-th push) and without
                            (N = 1: a plain Nesterov step per push, the naive baseline)
  async_easgd               alpha = 0.5, AdamW inside, tau = 16

What the papers claim, and the columns that test it here: Streaming DiLoCo's loss equals
DiLoCo's at a P times lower peak bandwidth (final loss, peak Gbit/s); fp4 costs no loss (final
loss, bytes sent); Delayed Nesterov beats naive server momentum under stragglers (final loss,
tokens to TARGET_LOSS). Compute utilization is 1 - the communication share.
"""

import dataclasses

from easgd_jax import study

COMPUTE_MS = 30.0  # one worker step of the baby transformer, virtual ms
LATENCY_US, BANDWIDTH_GBPS, G, H = 1000.0, 1.0, 4, 16
SAMPLES = 4_800  # windows of 64 characters: 307,200 tokens per run
TARGET_LOSS, SEEDS = 2.7, (0, 1, 2)
RUN_TIME = "not yet measured"  # the whole study, as the last run took
STRAGGLERS = {"sim_stragglers": 2, "sim_straggler_slowdown": 3.0}
ARMS = (  # (label, overrides)
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
  (
    "async_diloco, Delayed Nesterov, 2 stragglers",
    {"algorithm": "async_diloco", "tau": H, "outer_delay": G, **STRAGGLERS},
  ),
  (
    "async_diloco, naive Nesterov, 2 stragglers",
    {"algorithm": "async_diloco", "tau": H, "outer_delay": 1, **STRAGGLERS},
  ),
  ("async_easgd, alpha=0.5", {"algorithm": "async_easgd", "tau": H, "alpha": 0.5}),
)


def arms():
  return tuple(study.Arm(label, overrides) for label, overrides in ARMS)


def header():
  return (
    "# Streaming and asynchronous DiLoCo on the language model\n\n"
    f"`python experiments/study_streaming.py --workdir=runs/study_streaming`: {len(ARMS)} arms "
    f"x {len(SEEDS)} seeds, {SAMPLES * 64:,} tokens per run, {RUN_TIME} on 2 CPU cores.\n\n"
    f"- G = {G} workers on the simulated engine: {COMPUTE_MS:g} ms per worker step, "
    f"{LATENCY_US / 1000:g} ms latency, {BANDWIDTH_GBPS:g} Gbit/s per link; H = {H}.\n"
    "- The transformer's defaults (4 layers, 4 heads, width 128, context 64, batch 12 per "
    "worker); validation loss in nats per character on held-out works; warm-up a tenth of each "
    "run's steps. Compute utilization = 1 - communication share."
  )


def make_study(base):
  base = dataclasses.replace(
    base,
    engine="simulated",
    num_devices=G,
    sim_compute_ms=COMPUTE_MS,
    sim_latency_us=LATENCY_US,
    sim_bandwidth_gbps=BANDWIDTH_GBPS,
    checkpoint_every=0,  # a study resumes by whole runs
  )
  return study.Study(
    name="study_streaming",
    arms=arms(),
    base=base,
    seeds=SEEDS,
    samples=SAMPLES,
    eval_samples=SAMPLES // 4,
    target_loss=TARGET_LOSS,
    warmup_fraction=0.1,
    header=header(),
  )


if __name__ == "__main__":
  study.main(make_study, dataset="shakespeare", model="transformer")
