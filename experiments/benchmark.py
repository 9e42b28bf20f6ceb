"""Benchmark: the cost of Algorithm 1's bookkeeping and how well its devices overlap.

  python experiments/benchmark.py            # about 30 minutes on a 2-core machine
  python experiments/benchmark.py --only=ray # (j) the Ray engine alone, about 16 minutes
  python experiments/benchmark.py --only=simulated  # (k) the simulated engine, about 6 minutes
  python experiments/benchmark.py --only=hogwild --torch_python=/tmp/torchvenv/bin/python
                                             # (g) alone, about 40 minutes idle
(the worker threads' tables, (e) and (g), measured alone as above, run each CPU call on its
caller's thread, as run.py runs them; beside the other tables every call is queued)

Prints one table, every ratio measured in this one run (medians over interleaved repeats, so a
noisy neighbour slows both sides of a ratio alike):

  (a) easgd on 1 device, time per iteration / time per iteration of plain jitted SGD
      (same model, batch and host sampling; goal <= 1.05);
  (b) easgd iterations/s on 2 devices / on 1 device (goal >= 1.8 where the devices can run
      side by side: the host never waits inside an iteration, so device 1 works while device 0
      does);
  (c) sync_sgd samples/s on 1, 2 and 4 devices, as ratios to 1 device;
  (d) time per iteration of sync_easgd (all 4 workers step) and of round-robin easgd (one
      worker steps) on 4 devices, and their samples/s;
  (e) samples/s of async_sgd, hogwild and async_easgd (worker threads) with 1, 2 and 4 workers,
      as ratios to 1 worker, and the median staleness of their master updates;
  (f) model parallelism: SGD step time and parameter bytes per device with every layer split
      across M in {1, 2, 4} devices, for an MLP with two 4096-wide layers on synthetic 32x32x3;
  (g) samples/s of hogwild, async_sgd and async_easgd with 2 and 4 workers beside the PyTorch
      Hogwild pattern (experiments/torch_hogwild.py: share_memory, torch.multiprocessing, one SGD
      optimizer per process, no lock) on the same model and batch, as ratios to PyTorch, with
      both sides' thread settings. PyTorch is optional and lives in its own venv
      (experiments/requirements-torch.txt); without it the PyTorch column is left out.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import tempfile

# Four emulated CPU devices (16 with --only=simulated, main); set before jax touches a device.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

jax.config.update("jax_num_cpu_devices", 4)

import measure  # noqa: E402

from easgd_jax import algorithms, devices, models, train  # noqa: E402
from easgd_jax.config import Config  # noqa: E402

CASES = [
  Config(dataset="digits", model="lenet", batch_size=32),
  Config(dataset="synthetic", model="mlp", batch_size=128, synthetic_shape=(32, 32, 3)),
  Config(dataset="synthetic", model="cifar_cnn", batch_size=64, synthetic_shape=(32, 32, 3)),
]
HYPER = dict(learning_rate=0.01, rho=1.0, progress_every_s=0)
SETTLE = [True]  # --no_settle: cells back to back (an old-against-new comparison settles once)


def samples_per_s(config, model=None):
  """samples/s of one run (experiments/measure.py: the engine as train_and_evaluate drives it),
  on an idle machine unless --no_settle."""
  if SETTLE[0]:
    measure.settle()
  return measure.run(config, model)


def interleaved(cells, repeats):
  """{key: median samples/s} of each cell's config, the repeats interleaved, so that drift on
  the machine hits every cell alike; each cell is run once first to compile outside the clock
  (and to size it)."""
  rates = {key: [] for key in cells}
  for _ in range(repeats):
    for key, (config, model) in cells.items():
      rates[key].append(samples_per_s(config, model)[0])
  return {key: statistics.median(r) for key, r in rates.items()}


def sized(config, target_seconds, model=None):
  """`config` with --steps for about `target_seconds` of training after the warm-up (while the
  last worker compiles its first iteration, which throughput leaves out), from a probe run grown
  until it times something."""
  steps = 40
  while True:
    probe = dataclasses.replace(config, steps=steps, eval_every=steps)
    rate, summary = samples_per_s(probe, model)
    if rate > 0 or steps >= 40_000:
      break
    steps *= 10  # every iteration of the probe came before the last worker had compiled
  stopwatch = getattr(summary["engine"], "stopwatch", None)
  warm_up_s = stopwatch.warmed[1] if stopwatch and stopwatch.warmed else 0.0
  per_step = algorithms.REGISTRY[config.algorithm].samples_per_step(config)
  # Plus twice the probe's warm-up: with 4 worker threads on 2 cores a worker's first
  # (compiling) iteration can take seconds while the others run (lenet: 3.5 s, 1,539 of 4,000
  # iterations done before the clock started).
  steps = max(40, int(rate * (target_seconds + 2 * warm_up_s) / per_step))
  return dataclasses.replace(config, steps=steps, eval_every=steps)


def measure_bookkeeping(config, repeats=7, target_seconds=0.5):
  """(a), (b): sgd, easgd on 1 and on 2 devices: {name: seconds per iteration}."""
  base = dataclasses.replace(config, **HYPER)
  cells = {
    "sgd": dataclasses.replace(base, algorithm="sgd", num_devices=1),
    "easgd_1": dataclasses.replace(base, algorithm="easgd", num_devices=1),
    "easgd_2": dataclasses.replace(base, algorithm="easgd", num_devices=2),
  }
  cells = {key: (sized(c, target_seconds), None) for key, c in cells.items()}
  rates = interleaved(cells, repeats)
  return {key: config.batch_size / rate for key, rate in rates.items()}


def measure_sync(config, repeats=5, target_seconds=0.5):
  """(c) sync_sgd on 1, 2, 4 devices; (d) sync_easgd against round-robin easgd on 4:
  {name: samples/s}."""
  base = dataclasses.replace(config, **HYPER)
  cells = {
    f"sync_sgd_{p}": dataclasses.replace(base, algorithm="sync_sgd", num_devices=p)
    for p in (1, 2, 4)
  }
  cells["sync_easgd_4"] = dataclasses.replace(base, algorithm="sync_easgd", num_devices=4)
  cells["easgd_4"] = dataclasses.replace(base, algorithm="easgd", num_devices=4)
  cells = {key: (sized(c, target_seconds), None) for key, c in cells.items()}
  return interleaved(cells, repeats)


ASYNC = ("async_sgd", "hogwild", "async_easgd")


def measure_async(config, steps=600, repeats=3):
  """(e) every async algorithm with 1, 2, 4 workers, repeats interleaved: {(name, G):
  (median samples/s, median staleness)}."""
  base = dataclasses.replace(config, steps=steps, eval_every=steps, **HYPER)
  rates, staleness = {}, {}
  for _ in range(repeats):
    for name in ASYNC:
      for g in (1, 2, 4):
        rate, summary = samples_per_s(dataclasses.replace(base, algorithm=name, num_devices=g))
        rates.setdefault((name, g), []).append(rate)
        staleness.setdefault((name, g), []).append(
          (summary["staleness"] or {"median": 0})["median"]
        )
  return {key: (statistics.median(rates[key]), statistics.median(staleness[key])) for key in rates}


def measure_model_parallel(batch_size=128, repeats=5, target_seconds=1.0):
  """(f) ms per step and parameter MiB on one device, for M = 1, 2, 4."""
  config = Config(
    algorithm="sgd",
    dataset="synthetic",
    synthetic_shape=(32, 32, 3),
    batch_size=batch_size,
    **HYPER,
  )
  model = models.create("mlp", 10, hidden=(4096, 4096))
  cells = {
    m: (sized(dataclasses.replace(config, model_parallel=m), target_seconds, model), model)
    for m in (1, 2, 4)
  }
  rates = interleaved(cells, repeats)
  seconds = {m: batch_size / rate for m, rate in rates.items()}
  bytes_on_device_0 = {}
  for m, (cell, _) in cells.items():
    _, summary = samples_per_s(dataclasses.replace(cell, steps=1, eval_every=1), model)
    state = summary["engine"].state
    first = jax.devices()[0]
    bytes_on_device_0[m] = sum(
      shard.data.nbytes
      for leaf in jax.tree.leaves(state.params)
      for shard in leaf.addressable_shards
      if shard.device == first
    )
  return seconds, bytes_on_device_0


TORCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_hogwild.py")
VS_TORCH = ("hogwild", "async_sgd", "async_easgd")
HOGWILD_MODELS = ("mlp", "lenet")


def torch_run(torch_python, data_path, model, num_workers, batch_size, steps, threads):
  """samples/s of one experiments/torch_hogwild.py run (a fresh process; start-up not timed)."""
  command = [torch_python, TORCH_SCRIPT, f"--data={data_path}", f"--model={model}"]
  command += [f"--workers={num_workers}", f"--steps={steps}", f"--batch_size={batch_size}"]
  command += [f"--threads={threads}", "--learning_rate=0.01"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
  if result.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
  return json.loads(result.stdout.splitlines()[-1])["samples_per_s"]


def measure_hogwild(model, torch_python, torch_threads, repeats=5, target_seconds=1.0):
  """(g) {(name, G): median samples/s} for VS_TORCH and "torch", G in (2, 4), on digits."""
  base = Config(dataset="digits", model=model, batch_size=32, **HYPER)
  b = base.batch_size
  # One iteration count for every contender of a model: 1 s of hogwild, 2-3 s of the others.
  # Sized at 4 workers: each compiles its first iteration on its own device, and a run must
  # outlast the last of those (the clock starts when every worker has one done).
  probe = sized(dataclasses.replace(base, algorithm="hogwild", num_devices=4), target_seconds)
  steps = probe.steps
  rates = {}
  with tempfile.TemporaryDirectory() as tmp:
    data_path = os.path.join(tmp, "train.npz")
    dataset = train.setup(base)[0]
    np.savez(data_path, train_images=dataset.train_images, train_labels=dataset.train_labels)
    for _ in range(repeats):  # interleaved, so drift on the machine hits every contender alike
      for g in (2, 4):
        if torch_python:
          if SETTLE[0]:
            measure.settle()
          rate = torch_run(torch_python, data_path, model, g, b, steps, torch_threads)
          rates.setdefault(("torch", g), []).append(rate)
        for name in VS_TORCH:
          config = dataclasses.replace(
            base, algorithm=name, num_devices=g, steps=steps, eval_every=steps
          )
          rates.setdefault((name, g), []).append(samples_per_s(config)[0])
  return {key: statistics.median(r) for key, r in rates.items()}, steps


def print_hogwild(torch_python, torch_threads, repeats):
  header = (
    f"{'(g) digits/model':<18}{'workers':>8}{'it/run':>8}{'pytorch samples/s':>19}"
    + "".join(f"{name + ' (vs pytorch)':>26}" for name in VS_TORCH)
  )
  print(header)
  print("-" * len(header))
  for model in HOGWILD_MODELS:
    m, steps = measure_hogwild(model, torch_python, torch_threads, repeats)
    for g in (2, 4):
      torch_rate = m.get(("torch", g))
      row = f"{model:<18}{g:>8}{steps:>8}{f'{torch_rate:.0f}' if torch_rate else 'n/a':>19}"
      for name in VS_TORCH:
        rate = m[(name, g)]
        ratio = f"({rate / torch_rate:.2f}x)" if torch_rate else ""
        row += f"{f'{rate:.0f} {ratio}':>26}"
      print(row)
  cpu_devices = len(jax.devices())
  calls = "on its caller" if devices.dispatches_inline() else "queued for XLA"
  print(
    f"batch 32, eta 0.01, samples/s medians of {repeats} interleaved repeats, PyTorch and JAX "
    f"alike.\n  jax: one process, G workers on min(G, cores) threads, worker j on emulated CPU "
    f"device j of {cpu_devices}; XLA:CPU's one intra-op thread pool ({os.cpu_count()} cores) "
    f"serves them all; each call {calls}'s thread; "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  if torch_python:
    print(
      f"  pytorch: G processes (fork), torch.set_num_threads({torch_threads}) in each, "
      f"{torch_python}"
    )
  else:
    print("  pytorch: not run (pass --torch_python=PYTHON of a venv with torch)")


def print_bookkeeping():
  header = (
    f"{'dataset/model':<26}{'batch':>6}{'sgd ms/it':>11}{'easgd1 ms/it':>14}"
    f"{'easgd2 ms/it':>14}{'(a) 1dev/sgd':>14}{'(b) it/s 2dev/1dev':>20}"
  )
  print(header)
  print("-" * len(header))
  for config in CASES:
    m = measure(config)
    print(
      f"{config.dataset + '/' + config.model:<26}{config.batch_size:>6}"
      f"{m['sgd'] * 1e3:>11.3f}{m['easgd_1'] * 1e3:>14.3f}{m['easgd_2'] * 1e3:>14.3f}"
      f"{m['easgd_1'] / m['sgd']:>14.3f}{m['easgd_1'] / m['easgd_2']:>20.2f}"
    )
  print()


def print_sync():
  header = (
    f"{'dataset/model':<26}{'batch/dev':>10}{'(c) sync_sgd samples/s: 1dev':>30}"
    f"{'2dev':>14}{'4dev':>14}{'(d) ms/it sync_easgd4':>23}{'easgd4':>9}"
    f"{'samples/s sync_easgd4':>23}{'easgd4':>9}"
  )
  print(header)
  print("-" * len(header))
  for config in CASES[:2]:
    m = measure_sync(config)
    b = config.batch_size
    rate = {p: m[f"sync_sgd_{p}"] for p in (1, 2, 4)}
    print(
      f"{config.dataset + '/' + config.model:<26}{b:>10}{rate[1]:>30.0f}"
      f"{rate[2]:>7.0f} ({rate[2] / rate[1]:.2f}x){rate[4]:>7.0f} ({rate[4] / rate[1]:.2f}x)"
      f"{4 * b / m['sync_easgd_4'] * 1e3:>23.3f}{b / m['easgd_4'] * 1e3:>9.3f}"
      f"{m['sync_easgd_4']:>23.0f}{m['easgd_4']:>9.0f}"
    )
  print()


def print_async():
  header = (
    f"{'(e) dataset/model':<26}{'algorithm':<14}{'samples/s: 1 worker':>20}{'2 workers':>18}"
    f"{'4 workers':>18}{'staleness median 1/2/4':>25}"
  )
  print(header)
  print("-" * len(header))
  config = CASES[0]
  m = measure_async(config)
  for name in ASYNC:
    (r1, s1), (r2, s2), (r4, s4) = (m[(name, g)] for g in (1, 2, 4))
    print(
      f"{config.dataset + '/' + config.model:<26}{name:<14}{r1:>20.0f}"
      f"{r2:>9.0f} ({r2 / r1:.2f}x){r4:>9.0f} ({r4 / r1:.2f}x){f'{s1:g} / {s2:g} / {s4:g}':>25}"
    )
  print()


def print_model_parallel():
  header = (
    f"{'(f) model parallel, mlp 4096x4096, batch 128':<46}{'ms/step':>10}{'vs M=1':>9}"
    f"{'param MiB/device':>18}{'vs M=1':>9}"
  )
  print(header)
  print("-" * len(header))
  seconds, sizes = measure_model_parallel()
  for m in (1, 2, 4):
    print(
      f"{f'M = {m}':<46}{seconds[m] * 1e3:>10.1f}{seconds[m] / seconds[1]:>9.2f}"
      f"{sizes[m] / 2**20:>18.1f}{sizes[m] / sizes[1]:>9.2f}"
    )
  print()


SECTIONS = ("bookkeeping", "sync", "async", "model_parallel", "hogwild", "ray", "simulated")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
  parser.add_argument(
    "--torch_python",
    default=os.environ.get("TORCH_PYTHON"),
    help="python of a venv with torch (experiments/requirements-torch.txt), for (g)",
  )
  parser.add_argument("--torch_threads", type=int, default=1, help="per PyTorch process, (g)")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of (g)")
  parser.add_argument(
    "--no_settle",
    action="store_true",
    help="run the cells back to back, without waiting for an idle machine before each",
  )
  args = parser.parse_args()
  SETTLE[0] = not args.no_settle
  only = args.only.split(",")
  if unknown := set(only) - set(SECTIONS):
    parser.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
  # The sections in their own modules ask for their CPU devices when imported, which works only
  # before jax touches a device (the print below); simulated's 16 (G = 16 on the local engine)
  # last, so that it wins over ray's 4.
  if "ray" in only:
    import benchmark_ray
  if "simulated" in only:
    import benchmark_simulated
  # Measured alone, the worker threads' tables run them as run.py does, each CPU call on its
  # caller's thread (engines.dispatches_inline); beside the step-driven tables, queued.
  devices.dispatch_cpu_calls_inline(set(only) <= {"async", "hogwild"})
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores, load average "
    f"{measure.settle() if SETTLE[0] else measure.load_average():.2f}"
  )
  if "bookkeeping" in only:
    print_bookkeeping()
  if "sync" in only:
    print_sync()
  if "async" in only:
    print_async()
  if "model_parallel" in only:
    print_model_parallel()
  if "hogwild" in only:
    print_hogwild(args.torch_python, args.torch_threads, args.repeats)
  if "ray" in only:  # (j), experiments/benchmark_ray.py: the Ray engine against the local one
    benchmark_ray.print_ray()
  if "simulated" in only:  # (k), experiments/benchmark_simulated.py: against the local engine
    benchmark_simulated.print_ratios()
    benchmark_simulated.print_g64()


if __name__ == "__main__":
  main()
