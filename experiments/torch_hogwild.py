"""The PyTorch Hogwild pattern (pytorch/examples `mnist_hogwild`), as the baseline for `hogwild`.

  pip install -r experiments/requirements-torch.txt   # into its own venv: see that file
  python experiments/torch_hogwild.py --data=DIGITS.npz --model=mlp --workers=4 --steps=2000
  # prints one JSON line: {"samples_per_s": ..., "threads_per_process": 1, ...}

The pattern: the model lives in shared memory (`model.share_memory()`), `torch.multiprocessing`
starts one process per worker, and each process runs its own `torch.optim.SGD` over the shared
parameters with no lock, so every `optimizer.step()` writes the shared weights in place while the
others read and write them. The networks are `easgd_jax/models.py`'s MLP and LeNet layer for layer
(same widths, SAME padding, pooling that rounds up, Xavier-uniform weights, zero biases); each
process samples its batches with replacement from the training set, as `data.Sampler` does.

Only torch and NumPy are imported, so this runs from a venv without jax; `experiments/benchmark.py
--only=hogwild --torch_python=...` writes the training set to an .npz file and runs this script
once per measurement, interleaved with the JAX runs.

Timing: every process first takes `--warmup` steps, then waits at a barrier; the clock runs from
the barrier to the last process's last step, so process start-up and torch's import are not
counted, as thread start-up is not on the JAX side either. `--steps` is the total over all
processes, split evenly (the example gives each process the same number of epochs).
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional


def conv_relu_pool(in_channels, out_channels):
  # SAME padding for a 5x5 kernel; ceil_mode is flax's SAME max-pooling (odd sizes round up).
  return [
    nn.Conv2d(in_channels, out_channels, 5, padding=2),
    nn.ReLU(),
    nn.MaxPool2d(2, 2, ceil_mode=True),
  ]


def dense_relu(sizes):
  layers = []
  for a, b in zip(sizes, sizes[1:], strict=False):
    layers += [nn.Linear(a, b), nn.ReLU()]
  return layers


def create(model, image_shape, num_classes):
  """models.MLP (256, 128) or models.LeNet ((8, 16) convs, (128, 64) dense) for NCHW input."""
  height, width, channels = image_shape
  if model == "mlp":
    hidden = [height * width * channels, 256, 128]
    body = [nn.Flatten(), *dense_relu(hidden)]
  elif model == "lenet":
    for _ in range(2):
      height, width = -(-height // 2), -(-width // 2)
    hidden = [16 * height * width, 128, 64]
    body = [*conv_relu_pool(channels, 8), *conv_relu_pool(8, 16), nn.Flatten()]
    body += dense_relu(hidden)
  else:
    raise SystemExit(f"--model must be mlp or lenet (got {model!r})")
  network = nn.Sequential(*body, nn.Linear(hidden[-1], num_classes))
  for layer in network:
    if isinstance(layer, nn.Linear | nn.Conv2d):
      nn.init.xavier_uniform_(layer.weight)
      nn.init.zeros_(layer.bias)
  return network


def worker(rank, network, images, labels, steps, args, barrier, finished):
  """One Hogwild process: its own optimizer over the shared parameters, no lock."""
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed + rank)
  optimizer = torch.optim.SGD(network.parameters(), lr=args.learning_rate)

  def step():
    index = torch.randint(0, len(labels), (args.batch_size,))
    optimizer.zero_grad()
    loss = functional.cross_entropy(network(images[index]), labels[index])
    loss.backward()
    optimizer.step()  # in place on the shared weights, while the other processes use them
    return loss

  for _ in range(args.warmup):
    step()
  barrier.wait()
  for _ in range(steps):
    loss = step()
  finished[rank] = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
  if not torch.isfinite(loss):
    raise SystemExit(f"worker {rank}: loss {loss.item()}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help=".npz with NHWC train_images, train_labels")
  parser.add_argument("--model", default="mlp", choices=["mlp", "lenet"])
  parser.add_argument("--workers", type=int, default=4, help="processes")
  parser.add_argument("--steps", type=int, default=2000, help="iterations, all processes")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--learning_rate", type=float, default=0.01)
  parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads per process")
  parser.add_argument("--warmup", type=int, default=20, help="untimed steps per process")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  with np.load(args.data) as arrays:
    images = torch.from_numpy(arrays["train_images"].astype(np.float32))
    labels = torch.from_numpy(arrays["train_labels"].astype(np.int64))
  image_shape, num_classes = tuple(images.shape[1:]), int(labels.max()) + 1
  images = images.permute(0, 3, 1, 2).contiguous().share_memory_()  # NHWC -> NCHW, once
  labels = labels.share_memory_()
  torch.manual_seed(args.seed)
  network = create(args.model, image_shape, num_classes)
  network.share_memory()

  context = mp.get_context("fork")  # the example's default on Linux; shares without pickling
  barrier = context.Barrier(args.workers + 1)
  finished = context.Array("d", args.workers)
  per_process = args.steps // args.workers
  processes = [
    context.Process(
      target=worker, args=(rank, network, images, labels, per_process, args, barrier, finished)
    )
    for rank in range(args.workers)
  ]
  for process in processes:
    process.start()
  try:
    barrier.wait(timeout=300)
    start = time.perf_counter()
    for process in processes:
      process.join(timeout=600)
  finally:
    for process in processes:
      if process.is_alive():
        process.terminate()
        process.join(timeout=10)
  if any(process.exitcode for process in processes):
    raise SystemExit(f"a worker failed: exit codes {[p.exitcode for p in processes]}")
  seconds = max(finished) - start
  result = {
    "samples_per_s": per_process * args.workers * args.batch_size / seconds,
    "seconds": seconds,
    "model": args.model,
    "workers": args.workers,
    "batch_size": args.batch_size,
    "threads_per_process": args.threads,
    "torch": torch.__version__,
    "cores": os.cpu_count(),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
