"""Benchmark (k): the simulated engine against the local one, and its G = 64 runs end to end.

  python experiments/benchmark_simulated.py         # about 6 minutes on a 2-core machine
  python experiments/benchmark_simulated.py --no-g64 # the ratio table alone, about 4 minutes
  python experiments/benchmark.py --only=simulated  # the same tables

Prints two tables, every figure measured in this one run:

- samples/s of round-robin `easgd` and `sync_easgd` on `digits` (batch 32, alpha = 0.9/G, so
  that sync_easgd's alpha*(1+G) < 2), models `mlp` and `lenet`, G = 4 and 16, on the local
  engine (worker j on emulated CPU device j of 16) and on the simulated one (G workers fused on
  one device), and their ratio: medians of --repeats runs, interleaved;
- the G = 64 goals on `mnist5k` with `mlp`: `python run.py --engine=simulated ...` of round-robin
  `easgd` and `async_easgd` for 10,000 iterations (batch 32) and `sync_easgd` for 1,000 steps
  (batch 16 per worker), each command's wall clock from start to exit and the training seconds
  it logs (the goal: the whole command under 2 minutes).

The throughput is the engine's own (`engine.throughput()`, what the trainer's
summary["samples_per_s"] reports: a run's first step or first chunk left out), of launches of
one engine, built as every run is (`train.build`) and warmed, each launch going on from where
the previous one left. Not a fresh run per measurement: each compiles afresh, and the local
engine compiles its step once per device, G times, inside the measured steps (measured: local
easgd, mlp, G = 16 gave 1515, 1991 and 5202 samples/s for 500, 1000 and 3000 steps).
"""

import argparse
import dataclasses
import os
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

WORKER_COUNTS = (4, 16)
# The local engine's workers: a device each. Set before jax touches a device (benchmark.py
# imports this module first for --only=simulated).
jax.config.update("jax_num_cpu_devices", max(WORKER_COUNTS))

import measure  # noqa: E402

from easgd_jax import train  # noqa: E402
from easgd_jax.config import Config  # noqa: E402
from easgd_jax.engines.base import Plan  # noqa: E402
from easgd_jax.engines.simulated import steppers  # noqa: E402

MODELS = ("mlp", "lenet")
ALGORITHMS = ("easgd", "sync_easgd")
ENGINES = ("local", "simulated")
# Given, so nothing is measured at build time; they set only the virtual clock, not the work.
SIM_COSTS = {"sim_compute_ms": 1.0, "sim_service_us": 20.0}
WARM_STEPS = 2 * steppers.CHUNK  # one launch compiles, a second one sizes the timed runs


def build(model, algorithm, workers, engine):
  """One cell's run, built as every run is (train.build)."""
  config = Config(
    algorithm=algorithm,
    dataset="digits",
    model=model,
    num_devices=workers,
    batch_size=32,
    alpha=0.9 / workers,
    steps=WARM_STEPS,
    eval_every=WARM_STEPS,
    progress_every_s=0,
    engine=engine,
    **(SIM_COSTS if engine == "simulated" else {}),
  )
  return train.build(train.validate(config))


def samples_per_s(built, steps=WARM_STEPS):
  """One launch of `steps` more steps from where the previous launch left the engine.

  Whole chunks only: a shorter last chunk would be a new scan length, compiled inside the clock.
  """
  steps = max(WARM_STEPS, -(-steps // steppers.CHUNK) * steppers.CHUNK)
  engine = built.engine
  total = engine.start + steps
  for _ in engine.run(
    Plan(dataclasses.replace(built.config, steps=total, eval_every=steps), False)
  ):
    pass
  engine.start = total
  iterations, seconds = engine.throughput()
  return iterations * built.rule.samples_per_step(built.config) / seconds, steps


def measure_cells(repeats, target_s):
  """{(model, algorithm, G): {engine: (median samples/s, steps per run)}}."""
  cells = [(m, a, g) for m in MODELS for a in ALGORITHMS for g in WORKER_COUNTS]
  built, steps = {}, {}
  for cell in cells:
    for engine in ENGINES:
      key = (*cell, engine)
      built[key] = build(*cell, engine)
      samples_per_s(built[key])  # compiles (the local engine: on each of the G devices)
      rate, _ = samples_per_s(built[key])  # warm
      per_step = built[key].rule.samples_per_step(built[key].config)
      steps[key] = int(rate / per_step * target_s)
  rates = {key: [] for key in built}
  for _ in range(repeats):  # interleaved, so drift on the machine hits both engines alike
    for key in built:
      rate, steps[key] = samples_per_s(built[key], steps[key])
      rates[key].append(rate)
  return {
    cell: {e: (statistics.median(rates[(*cell, e)]), steps[(*cell, e)]) for e in ENGINES}
    for cell in cells
  }


def print_ratios(repeats=3, target_s=1.0):
  if len(jax.devices()) < max(WORKER_COUNTS):
    raise SystemExit(
      f"{len(jax.devices())} CPU devices; the local engine needs {max(WORKER_COUNTS)}: import "
      "this module before jax touches a device"
    )
  header = (
    f"{'(k) digits, batch 32':<22}{'algorithm':<12}{'G':>4}{'it/run local':>14}{'sim':>7}"
    f"{'local samples/s':>17}{'simulated (vs local)':>23}"
  )
  print(header)
  print("-" * len(header))
  found = measure_cells(repeats, target_s)
  for (model, algorithm, workers), m in found.items():
    (local, local_steps), (sim, sim_steps) = m["local"], m["simulated"]
    print(
      f"{model:<22}{algorithm:<12}{workers:>4}{local_steps:>14}{sim_steps:>7}{local:>17.0f}"
      f"{f'{sim:.0f} ({sim / local:.2f}x)':>23}",
      flush=True,
    )
  print(
    f"alpha = 0.9/G, eta 0.05; samples/s medians of {repeats} interleaved runs of about "
    f"{target_s:g} s each, every engine built and warmed first.\n  local: worker j on emulated "
    f"CPU device j of {len(jax.devices())}; simulated: one device, --sim_compute_ms=1 "
    f"--sim_service_us=20 (the clock's costs; they do not change the work)"
  )
  print()


G64 = (  # (algorithm, steps, batch per worker), the goals
  ("easgd", 10_000, 32),
  ("async_easgd", 10_000, 32),
  ("sync_easgd", 1_000, 16),
)


def g64_command(algorithm, steps, batch_size):
  return [
    sys.executable,
    "run.py",
    "--engine=simulated",
    f"--algorithm={algorithm}",
    "--dataset=mnist5k",
    "--model=mlp",
    "--num_devices=64",
    f"--batch_size={batch_size}",
    f"--alpha={0.9 / 64}",
    f"--steps={steps}",
    "--sim_compute_ms=1",
    "--sim_service_us=20",
    "--progress_every_s=0",
    "--eval_every=1000",
  ]


def print_g64(limit_s=120):
  header = (
    f"{'(k) mnist5k/mlp, G = 64':<26}{'steps':>7}{'batch':>7}{'command s':>11}"
    f"{'training s':>12}{'start-up + eval s':>19}{'test acc':>10}{'goal < 2 min':>14}"
  )
  print(header)
  print("-" * len(header))
  for algorithm, steps, batch_size in G64:
    command = g64_command(algorithm, steps, batch_size)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    done = re.search(r"done: test_accuracy ([\d.]+) after \d+ steps \(([\d.]+)s\)", result.stderr)
    if result.returncode or not done:
      raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    accuracy, training = float(done.group(1)), float(done.group(2))
    print(
      f"{algorithm:<26}{steps:>7}{batch_size:>7}{wall:>11.1f}{training:>12.1f}"
      f"{wall - training:>19.1f}{accuracy:>10.4f}{'met' if wall < limit_s else 'NOT met':>14}",
      flush=True,
    )
  print(f"  python {' '.join(g64_command('ALGORITHM', 'STEPS', 'B')[1:])}")
  print()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per cell")
  parser.add_argument("--target_s", type=float, default=1.0, help="seconds per timed run")
  parser.add_argument("--g64", action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args()
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores, load average "
    f"{measure.settle():.2f}"
  )
  print_ratios(args.repeats, args.target_s)
  if args.g64:
    print_g64()


if __name__ == "__main__":
  main()
