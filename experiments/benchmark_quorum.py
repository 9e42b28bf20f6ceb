"""Benchmark: the step-driven outer loops on Ray (replica actors, a reducer, a quorum per round).

  python experiments/benchmark_quorum.py              # the three tables (waits for an idle machine)
  python experiments/benchmark_quorum.py --steps=60 --recovery_steps=600 --no_settle  # a look

Three tables, every run on one embedded Ray on this machine, built and driven as every run is
(experiments/measure.py):

1. Outer-round overhead: DiLoCo on digits (mlp), G = 4, H in {1, 10, 50}: samples/s on the local
   engine (4 devices, pmap) and on Ray, and Ray's extra time per outer round,
   (t_ray - t_local) / rounds, beside the reducer's own median time to sum a round
   (`reduce_ms_median`) and a push's median wait at the reducer (`round_wait_ms_median`).
2. Recovery: worker 1 SIGKILLed inside a round (--inject_failure: its process signals itself)
   with --max_worker_restarts=1: seconds from the loss to the next closed round
   (`lost_to_next_round_s`) and to its rejoin (`lost_to_rejoined_s`).
3. Joining against the model size: the same failure for each --models, the replacement's time to
   fetch a live worker's state through the object store and take it (`join_fetch_ms`). An entry
   `transformer@W:S` is the char-level transformer of width W on Shakespeare (batch 2, so that
   its steps stay short) for S run steps, enough for the replacement to start before the run
   ends: the sizes reach 12.7 million weights (width 1024 would need over 16 GiB for four
   workers on one machine).
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 4)  # the local engine's workers: a device each

import measure  # noqa: E402

from easgd_jax import train  # noqa: E402
from easgd_jax.config import Config  # noqa: E402
from easgd_jax.engines.ray import cluster as ray_cluster  # noqa: E402

SETTLE = [True]
DILOCO = dict(algorithm="diloco", dataset="digits", num_devices=4, batch_size=32)


def one_run(**fields):
  if SETTLE[0]:
    measure.settle()
  config = Config(**{**DILOCO, "progress_every_s": 0, **fields})
  config = Config(**{**vars(config), "eval_every": config.steps})
  return measure.run(config)


def overhead(steps, taus):
  print(
    f"{'(1) DiLoCo digits mlp G=4':<28}{'H':>4}{'local samples/s':>17}{'ray samples/s':>15}"
    f"{'ray extra ms/round':>20}{'reduce ms':>11}{'wait ms':>9}"
  )
  for tau in taus:
    local, _ = one_run(model="mlp", tau=tau, steps=steps)
    on_ray, summary = one_run(model="mlp", tau=tau, steps=steps, engine="ray")
    per_step = lambda rate: DILOCO["batch_size"] * DILOCO["num_devices"] / rate  # noqa: E731
    extra_ms = (per_step(on_ray) - per_step(local)) * tau * 1e3
    print(
      f"{'':<28}{tau:>4}{local:>17.0f}{on_ray:>15.0f}{extra_ms:>20.2f}"
      f"{summary['reduce_ms_median']:>11.3f}{summary['round_wait_ms_median']:>9.2f}",
      flush=True,
    )
  print()


def _model(name, steps):
  """(fields, run steps) of a --models entry: `mlp`, `lenet` or `transformer@WIDTH:STEPS`."""
  name, _, own_steps = name.partition(":")
  model, _, width = name.partition("@")
  steps = int(own_steps or steps)
  if model != "transformer":
    return dict(model=model), steps
  return dict(model=model, dataset="shakespeare", width=int(width or 128), batch_size=2), steps


def recovery(steps, names):
  print(
    f"{'(2, 3) a worker lost mid-round':<32}{'params':>10}{'to next round s':>17}"
    f"{'to rejoined s':>15}{'join fetch ms':>15}"
  )
  for name in names:
    fields, run_steps = _model(name, steps)
    _, summary = one_run(
      **fields,
      tau=10,
      steps=run_steps,
      engine="ray",
      inject_failure=f"1:{run_steps // 2 - 1}",
      max_worker_restarts=1,
    )
    size = _parameters(fields)
    print(
      f"{name:<32}{size:>10}{_first(summary['lost_to_next_round_s']):>17}"
      f"{_first(summary['lost_to_rejoined_s']):>15}{_first(summary['join_fetch_ms']):>15}",
      flush=True,
    )
  print()


def _first(values):
  return f"{values[0]:.3f}" if values else "-"


def _parameters(fields):
  config = train.validate(Config(**{**DILOCO, **fields}))
  params = train.setup(config)[3]
  return sum(x.size for x in jax.tree.leaves(params))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=500, help="run steps per run")
  parser.add_argument("--taus", default="1,10,50", help="comma-separated H of (1); empty: no (1)")
  parser.add_argument(
    "--recovery_steps", type=int, default=5000, help="run steps of (2, 3) where a model names none"
  )
  parser.add_argument(
    "--models",
    default="mlp,lenet,transformer@128:3000,transformer@256:1000,transformer@512:300",
    help="comma-separated models of (2, 3): mlp, lenet, transformer@WIDTH:STEPS",
  )
  parser.add_argument("--no_settle", action="store_true", help="no idle wait before each run")
  args = parser.parse_args()
  SETTLE[0] = not args.no_settle
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores, load average "
    f"{measure.load_average():.2f}"
  )
  ray_cluster.connect(Config(engine="ray"))  # one embedded Ray for every run
  if args.taus:  # --taus= skips (1)
    overhead(args.steps, [int(t) for t in args.taus.split(",")])
  recovery(args.recovery_steps, args.models.split(","))


if __name__ == "__main__":
  main()
