"""Benchmark (j): the asynchronous family on the Ray engine against the local engine.

  python experiments/benchmark_ray.py        # about 16 minutes on a 2-core machine
  python experiments/benchmark_ray.py --models=lenet --workers=4 --repeats=3  # the goal's cell
  python experiments/benchmark.py --only=ray # the same table

Prints one table, every ratio measured in this one run on an embedded Ray on this machine:
samples/s of async_sgd, hogwild, async_easgd, hogwild_easgd and downpour (tau 4) on `digits`
with `lenet` and `mlp`, G = 2 and 4 workers, on the local engine (worker threads) and on Ray, with
and without
--ray_pipeline, as ratios to the local engine (medians of `--repeats` runs, interleaved, each run
built and driven as every run is: experiments/measure.py, as benchmark.py measures); and the
cost of one parameter-server round trip (a push of the model's gradient and the pull of W that
comes back) in ms, measured alone from a worker actor.

Where the time goes: a Ray iteration is the local one plus that round trip (serializing the
weights into the object store and back, two actor calls) and the driver handing out the
iteration; --ray_pipeline overlaps the round trip with the next gradient.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 4)  # the local engine's workers: a device each

import measure  # noqa: E402

from easgd_jax import algorithms, train  # noqa: E402
from easgd_jax.config import Config  # noqa: E402
from easgd_jax.engines.ray import cluster as ray_cluster  # noqa: E402

ALGORITHMS = ("async_sgd", "hogwild", "async_easgd", "hogwild_easgd", "downpour")
ENGINES = (("local", {}), ("ray", {}), ("ray+pipeline", {"ray_pipeline": True}))
SETTLE = [True]


def samples_per_s(model, algorithm, workers, engine, steps):
  """One run (experiments/measure.py: the engine as train_and_evaluate drives it), on an idle
  machine unless --no_settle."""
  if SETTLE[0]:
    measure.settle()
  fields = dict(ENGINES)[engine]
  config = Config(
    algorithm=algorithm,
    dataset="digits",
    model=model,
    num_devices=workers,
    batch_size=32,
    tau=4 if algorithm == "downpour" else 1,
    steps=steps,
    eval_every=steps,
    progress_every_s=0,
    engine="ray" if engine != "local" else "local",
    **fields,
  )
  return measure.run(config)[0]


def round_trip_ms(model, repeats=200):
  """Median ms of one push + pull of the model's weights between a worker and the server."""
  import ray

  from easgd_jax.engines.ray import actors

  config = train.validate(Config(algorithm="async_sgd", dataset="digits", model=model))
  _, _, loss_fn, params = train.setup(config)
  rule = algorithms.create(config, loss_fn)
  server = actors.Server.options(num_cpus=0.25).remote(rule, rule.master_init(params), 0)

  @ray.remote(num_cpus=0.25)
  def client(server, params, repeats):
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      ray.get(server.apply.remote(0, 0, jax.tree.map(lambda p: p * 0, params), 0))
      times.append(time.perf_counter() - start)
    return statistics.median(times[repeats // 10 :]) * 1e3

  try:
    return ray.get(client.remote(server, params, repeats))
  finally:
    ray.kill(server)


def print_ray(
  steps=600, repeats=1, models=("lenet", "mlp"), workers_counts=(2, 4), names=ALGORITHMS
):
  # One private Ray for every run (not one already on the machine); its watchdog stops it and
  # removes its files when this process exits.
  ray_cluster.connect(Config(engine="ray"))
  header = (
    f"{'(j) digits, batch 32':<22}{'algorithm':<15}{'G':>3}{'local samples/s':>17}"
    f"{'ray':>16}{'ray+pipeline':>18}{'round trip ms':>15}"
  )
  print(header)
  print("-" * len(header))
  for model in models:
    trip = round_trip_ms(model)
    for algorithm in names:
      for workers in workers_counts:
        rates = {engine: [] for engine, _ in ENGINES}
        for _ in range(repeats):
          for engine, _ in ENGINES:
            rates[engine].append(samples_per_s(model, algorithm, workers, engine, steps))
        local, on_ray, piped = (statistics.median(rates[e]) for e, _ in ENGINES)
        print(
          f"{model:<22}{algorithm:<15}{workers:>3}{local:>17.0f}"
          f"{on_ray:>8.0f} ({on_ray / local:.2f}x){piped:>10.0f} ({piped / local:.2f}x)"
          f"{trip:>15.2f}",
          flush=True,
        )
  print()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600, help="iterations per run")
  parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per cell")
  parser.add_argument("--models", default="lenet,mlp", help="comma-separated models")
  parser.add_argument("--workers", default="2,4", help="comma-separated worker counts G (<= 4)")
  parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated")
  parser.add_argument("--no_settle", action="store_true", help="no idle wait before each cell")
  args = parser.parse_args()
  SETTLE[0] = not args.no_settle
  models = args.models.split(",")
  workers = [int(g) for g in args.workers.split(",")]
  if not set(models) <= {"lenet", "mlp"} or not all(1 <= g <= 4 for g in workers):
    parser.error("--models takes lenet and mlp, --workers counts from 1 to 4")
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores, load average "
    f"{measure.load_average():.2f}"
  )
  print_ray(args.steps, args.repeats, models, workers, args.algorithms.split(","))


if __name__ == "__main__":
  main()
