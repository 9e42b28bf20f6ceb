"""Where Hogwild's time goes: one worker's step loop alone, in one process and in two at once.

  python experiments/benchmark_steps.py --torch_python=/tmp/torchvenv/bin/python

Each process runs the plain SGD step (forward, backward, W <- W - eta * Delta W; batch 32 of
digits, the models of easgd_jax/models.py and experiments/torch_hogwild.py) with one thread:
JAX with XLA:CPU's Eigen pool off (`--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`), PyTorch with torch.set_num_threads(1). Two processes start
their timed loops at the same moment. No Hogwild write: this is the compute the workers need,
against which benchmark.py's (g) table shows what the engines make of it (BENCHMARKS.md).
"""

import argparse
import json
import os
import subprocess
import sys
import time

STEPS = {"mlp": 20_000, "lenet": 3_000}
HERE = os.path.dirname(os.path.abspath(__file__))

JAX_LOOP = """
import json, os, sys, time
import jax, jax.numpy as jnp
from easgd_jax import config as C, train
model, steps, start_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cfg = train.validate(C.Config(model=model, dataset="digits", algorithm="sgd"))
dataset, _, loss_fn, params = train.setup(cfg)
images, labels = dataset.train_images[:32], dataset.train_labels[:32]
batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
@jax.jit
def step(p, batch):
  grads = jax.grad(lambda p: loss_fn(p, batch)[0])(p)
  return jax.tree.map(lambda w, g: w - 0.01 * g, p, grads)
params = jax.block_until_ready(step(params, batch))
while time.time() < start_at:
  time.sleep(0.001)
begin = time.perf_counter()
for _ in range(steps):
  params = step(params, batch)
jax.block_until_ready(params)
print(json.dumps({"us_per_step": 1e6 * (time.perf_counter() - begin) / steps}))
"""

TORCH_LOOP = """
import json, sys, time
sys.path.insert(0, sys.argv[4])
import torch
import torch_hogwild
torch.set_num_threads(1)
model, steps, start_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
net = torch_hogwild.create(model, (8, 8, 1), 10)
optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
def step():
  optimizer.zero_grad()
  torch.nn.functional.cross_entropy(net(x), y).backward()
  optimizer.step()
for _ in range(50):
  step()
while time.time() < start_at:
  time.sleep(0.001)
begin = time.perf_counter()
for _ in range(steps):
  step()
print(json.dumps({"us_per_step": 1e6 * (time.perf_counter() - begin) / steps}))
"""


def loops(python, code, model, processes, env):
  """us per step of each of `processes` loops started together (8 s to import and compile)."""
  start_at = str(time.time() + 8)
  children = [
    subprocess.Popen(
      [python, "-c", code, model, str(STEPS[model]), start_at, HERE],
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      env=env,
      text=True,
    )
    for _ in range(processes)
  ]
  try:
    return [
      json.loads(child.communicate(timeout=300)[0].splitlines()[-1])["us_per_step"]
      for child in children
    ]
  finally:
    for child in children:
      child.kill()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch_python", default=None, help="a venv's python with torch")
  args = parser.parse_args()
  jax_env = {
    **os.environ,
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
  }
  sides = [("jax", sys.executable, JAX_LOOP, jax_env)]
  if args.torch_python:
    sides.append(("pytorch", args.torch_python, TORCH_LOOP, dict(os.environ)))
  print(f"load average {os.getloadavg()[0]:.2f}; us per step, batch 32, one thread per process")
  for model in STEPS:
    for name, python, code, env in sides:
      alone = loops(python, code, model, 1, env)
      both = loops(python, code, model, 2, env)
      rate = sum(32e6 / us for us in both)
      print(
        f"{model:<6} {name:<8} 1 process {alone[0]:7.0f} us   2 at once "
        f"{' + '.join(f'{us:.0f}' for us in both)} us: {rate:,.0f} samples/s"
      )


if __name__ == "__main__":
  main()
