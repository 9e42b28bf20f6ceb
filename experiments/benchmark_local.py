"""Benchmark: what the elastic transformation costs, and what local SGD and DiLoCo save.

  python experiments/benchmark_local.py      # about 3 minutes on a 2-core machine

Prints one table, every ratio measured in this one run (medians over interleaved repeats, the
same harness as experiments/benchmark.py):

  (h) one worker's step through elastic.elastic (the exchange gate a traced array, so every step
      computes u - alpha * e * (x - W-bar)) against the same step with the elastic term written
      by hand and dropped on local steps, per iteration, on one device (tau = 4);
  (i) samples/s of local_sgd (tau = 1 and 8) and diloco (tau = 8, the same SGD inner optimizer,
      so only the communication differs) on 4 devices, as ratios to sync_sgd, which all-reduces
      every step. On CPU-emulated devices an all-reduce is a memory copy, so (i) bounds what
      skipping communication buys here; on a network it is the point of the algorithms.
"""

import dataclasses
import os
import statistics
import time

import benchmark  # noqa: E402, I001  (sets up 4 CPU devices before jax touches one)
import jax
import measure
import optax

from easgd_jax import core, data, devices, elastic, train


class HandWrittenElastic:
  """One worker with Eq. (1) written out and skipped on local steps: the pre-optax form."""

  def __init__(self, loss_fn, eta, alpha, tau):
    self.tau, self.optimizer = tau, optax.sgd(eta)
    sgd_step = core.make_sgd_step(loss_fn, self.optimizer)

    def elastic_step(w, opt_state, center, batch):
      new, opt_state, loss = sgd_step(w, opt_state, batch)
      return jax.tree.map(lambda n, wi, c: n - alpha * (wi - c), new, w, center), opt_state, loss

    self._steps = (jax.jit(sgd_step), jax.jit(elastic_step))

  def init(self, params):
    return (devices.put(params, jax.devices()[0]), self.optimizer.init(params), params, 0)

  def step(self, state, batch):
    w, opt_state, center, t = state
    if t % self.tau == 0:
      w, opt_state, loss = self._steps[1](w, opt_state, center, batch)
    else:
      w, opt_state, loss = self._steps[0](w, opt_state, batch)
    return (w, opt_state, center, t + 1), loss


class TransformElastic(HandWrittenElastic):
  """The same worker through elastic.elastic: one step function, the gate in the state."""

  def __init__(self, loss_fn, eta, alpha, tau):
    self.optimizer = elastic.elastic(optax.sgd(eta), alpha, tau)
    self._step = jax.jit(core.make_elastic_step(loss_fn, self.optimizer))

  def step(self, state, batch):
    w, opt_state, center, t = state
    w, opt_state, loss = self._step(w, opt_state, center, batch)
    return (w, opt_state, center, t + 1), loss


def seconds_per_step(worker, params, sampler, batch_size, iterations):
  state = worker.init(params)
  state, loss = worker.step(state, sampler.next(batch_size))  # compile outside the clock
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for _ in range(iterations):
    state, loss = worker.step(state, sampler.next(batch_size))
  jax.block_until_ready(state[0])
  return (time.perf_counter() - start) / iterations


def measure_elastic(config, repeats=5, iterations=300):
  """(h) {name: median seconds per step} of the two forms of one elastic worker."""
  dataset, _, loss_fn, params = train.setup(config)
  sampler = data.Sampler(dataset, seed=0)
  workers = {
    "hand": HandWrittenElastic(loss_fn, 0.01, 0.01, 4),
    "transform": TransformElastic(loss_fn, 0.01, 0.01, 4),
  }
  times = {name: [] for name in workers}
  for _ in range(repeats):  # interleaved
    for name, worker in workers.items():
      times[name].append(seconds_per_step(worker, params, sampler, config.batch_size, iterations))
  return {name: statistics.median(t) for name, t in times.items()}


RUNS = {
  "sync_sgd": dict(algorithm="sync_sgd"),
  "local_sgd_1": dict(algorithm="local_sgd", tau=1),
  "local_sgd_8": dict(algorithm="local_sgd", tau=8),
  "diloco_8": dict(algorithm="diloco", tau=8, optimizer="sgd"),
}


def measure_runs(config, repeats=5, steps=300):
  """(i) {name: median samples/s} of 4-device runs (experiments/measure.py), interleaved."""
  base = dataclasses.replace(
    config, num_devices=4, learning_rate=0.01, steps=steps, eval_every=steps, progress_every_s=0
  )
  rates = {name: [] for name in RUNS}
  for _ in range(repeats):
    for name, fields in RUNS.items():
      rates[name].append(benchmark.samples_per_s(dataclasses.replace(base, **fields))[0])
  return {name: statistics.median(r) for name, r in rates.items()}


def main():
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores, load "
    f"average {measure.settle():.2f}"
  )
  header = (
    f"{'dataset/model':<26}{'batch':>6}{'(h) ms/it hand':>16}{'transform':>11}{'ratio':>8}"
    f"{'(i) samples/s sync_sgd4':>25}{'local_sgd4 t=1':>16}{'t=8':>14}{'diloco4 t=8':>16}"
  )
  print(header)
  print("-" * len(header))
  for config in benchmark.CASES[:2]:
    m, rate = measure_elastic(config), measure_runs(config)
    ratio = {name: rate[name] / rate["sync_sgd"] for name in rate}
    print(
      f"{config.dataset + '/' + config.model:<26}{config.batch_size:>6}{m['hand'] * 1e3:>16.3f}"
      f"{m['transform'] * 1e3:>11.3f}{m['transform'] / m['hand']:>8.3f}{rate['sync_sgd']:>25.0f}"
      f"{rate['local_sgd_1']:>9.0f} ({ratio['local_sgd_1']:.2f}x)"
      f"{rate['local_sgd_8']:>7.0f} ({ratio['local_sgd_8']:.2f}x)"
      f"{rate['diloco_8']:>9.0f} ({ratio['diloco_8']:.2f}x)"
    )


if __name__ == "__main__":
  main()
