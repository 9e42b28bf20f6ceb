"""Benchmark (l): two checkouts of this repository against each other, run by run.

  python experiments/benchmark_commits.py --old=/path/to/old/checkout --new=.   # ~50 minutes

Every cell is one `python run.py ...` command run in both checkouts, back to back in an order
that alternates, once the machine has settled before the cell (the 1-minute load average below
--idle, waited for up to 5 minutes and printed): the same command, measured the same way on both
sides, however the code inside differs; pairs taken together see the same machine. Its figure
is summary.json's samples_per_s, the training throughput both versions report (each launch's
compiling first steps left out). Medians over --repeats pairs and the ratio new / old per cell; a
cell more than 10 % slower is flagged.

The cells: the worker-thread family against one another (hogwild, async_sgd, async_easgd with
2 and 4 workers, mlp and lenet: the hogwild-vs-PyTorch table's JAX side), the simulated engine
and the local one (round-robin easgd and sync_easgd, G = 4 and 16), and the Ray engine
(async_sgd, hogwild, async_easgd, hogwild_easgd, lenet, G = 4).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import measure

DIGITS = ["--dataset=digits", "--batch_size=32", "--learning_rate=0.01", "--progress_every_s=0"]
SIM = ["--engine=simulated", "--sim_compute_ms=1", "--sim_service_us=20"]


def cells():
  """{name: flags}: the commands both checkouts run."""
  found = {}
  for model, steps in (("mlp", 4000), ("lenet", 1500)):
    for g in (2, 4):
      for algorithm in ("hogwild", "async_sgd", "async_easgd"):
        found[f"threads {algorithm} {model} G={g}"] = [
          f"--algorithm={algorithm}",
          f"--model={model}",
          f"--num_devices={g}",
          f"--steps={steps}",
          *DIGITS,
        ]
  for model, steps in (("mlp", 2000), ("lenet", 600)):
    for algorithm in ("easgd", "sync_easgd"):
      for g in (4, 16):
        alpha = f"--alpha={0.9 / g}"
        base = [f"--algorithm={algorithm}", f"--model={model}", f"--num_devices={g}", alpha]
        # Runs of a few seconds at least: at 500 steps a simulated sync_easgd run trains for
        # 0.4 s, and its fixed costs (the last chunk's scan, the clock) read as a 2x slowdown.
        found[f"local {algorithm} {model} G={g}"] = [*base, f"--steps={2 * steps}", *DIGITS]
        simulated = [*base, f"--steps={10 * steps}", *DIGITS, *SIM]
        found[f"simulated {algorithm} {model} G={g}"] = simulated
  for algorithm in ("async_sgd", "hogwild", "async_easgd", "hogwild_easgd"):
    found[f"ray {algorithm} lenet G=4"] = [
      f"--algorithm={algorithm}",
      "--model=lenet",
      "--num_devices=4",
      "--steps=600",
      "--engine=ray",
      *DIGITS,
    ]
  return found


def samples_per_s(checkout, flags, workdir):
  steps = next(int(f.split("=")[1]) for f in flags if f.startswith("--steps="))
  command = [sys.executable, "run.py", *flags, f"--eval_every={steps}", f"--workdir={workdir}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
  if result.returncode:
    raise SystemExit(f"{checkout}: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)["samples_per_s"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--old", required=True, help="a checkout of the older commit")
  parser.add_argument("--new", default=".", help="a checkout of the newer commit")
  parser.add_argument("--repeats", type=int, default=2, help="pairs per cell")
  parser.add_argument(
    "--only", default="", help="comma-separated: cells whose name contains one of these"
  )
  parser.add_argument("--idle", type=float, default=0.5, help="load average to wait for")
  args = parser.parse_args()
  print(f"{'cell':<36}{'old samples/s':>15}{'new samples/s':>15}{'new/old':>9}  load averages")
  for name, flags in cells().items():
    if not any(part in name for part in args.only.split(",")):
      continue
    rates, loads = {"old": [], "new": []}, [measure.settle(quiet=args.idle)]
    for repeat in range(args.repeats):
      order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
      for side in order:
        checkout = os.path.abspath(getattr(args, side))
        with tempfile.TemporaryDirectory() as workdir:
          rates[side].append(samples_per_s(checkout, flags, os.path.join(workdir, "run")))
    old, new = statistics.median(rates["old"]), statistics.median(rates["new"])
    flag = "  SLOWER" if new < 0.9 * old else ""
    shown = " ".join(f"{load:.2f}" for load in loads)
    print(f"{name:<36}{old:>15.0f}{new:>15.0f}{new / old:>8.2f}x  {shown}{flag}", flush=True)


if __name__ == "__main__":
  main()
