"""Benchmark (m): the char-level transformer's single-device training tokens/s, ours against a
nanoGPT-style PyTorch model of the same shape, batch and context (experiments/torch_gpt.py).

  python experiments/benchmark_lm.py --torch_python=/tmp/torchvenv/bin/python --repeats=3
  python experiments/benchmark_lm.py --torch_python=... --layers=6 --heads=6 --width=384 \
      --context=256 --batch_size=64 --steps=100    # nanoGPT's GPU shakespeare_char shape

One process each, interleaved: every repeat runs ours, then PyTorch's (the order alternating
between repeats), each as a fresh process after the machine settled (the 1-minute load average
below 0.5, waited for up to 5 minutes and printed). Ours is `--algorithm=sgd --optimizer=adamw`
(the model's training recipe) through run.py on one device, its tokens/s summary.json's
samples_per_s times the context (each launch's compiling first steps left out); PyTorch's is
torch_gpt.py's speed mode, timed after --speed_warmup untimed steps. Both use every core of the
machine (XLA's and PyTorch's intra-op thread pools). Prints a Markdown table: the medians and
the ratio ours / PyTorch.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags
from measure import settle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string(
  "torch_python", None, "Python of a venv with experiments/requirements-torch.txt"
)
flags.DEFINE_integer("repeats", 3, "Interleaved pairs of runs.")
flags.DEFINE_integer("steps", 300, "Timed training steps per run.")
flags.DEFINE_integer("layers", 4, "Transformer layers.")
flags.DEFINE_integer("heads", 4, "Attention heads.")
flags.DEFINE_integer("width", 128, "Width.")
flags.DEFINE_integer("context", 64, "Context (characters).")
flags.DEFINE_integer("batch_size", 12, "Windows per step.")
flags.mark_flag_as_required("torch_python")
FLAGS = flags.FLAGS


def ours():
  """Tokens/s of one run.py launch."""
  with tempfile.TemporaryDirectory() as workdir:
    command = [
      sys.executable, os.path.join(REPO, "run.py"), "--algorithm=sgd", "--optimizer=adamw",
      "--model=transformer", "--dataset=shakespeare", "--num_devices=1",
      f"--num_layers={FLAGS.layers}", f"--num_heads={FLAGS.heads}", f"--width={FLAGS.width}",
      f"--context={FLAGS.context}", f"--batch_size={FLAGS.batch_size}",
      f"--steps={FLAGS.steps}", f"--eval_every={FLAGS.steps}", "--progress_every_s=0",
      f"--workdir={workdir}",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    with open(os.path.join(workdir, "summary.json")) as f:
      return json.load(f)["samples_per_s"] * FLAGS.context


def pytorch():
  command = [
    FLAGS.torch_python, os.path.join(REPO, "experiments", "torch_gpt.py"), "--mode=speed",
    f"--layers={FLAGS.layers}", f"--heads={FLAGS.heads}", f"--width={FLAGS.width}",
    f"--context={FLAGS.context}", f"--batch_size={FLAGS.batch_size}", f"--steps={FLAGS.steps}",
  ]  # fmt: skip
  result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
  return json.loads(result.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main(argv):
  del argv
  found = {"ours": [], "pytorch": []}
  for repeat in range(FLAGS.repeats):
    order = (("ours", ours), ("pytorch", pytorch))
    for name, measure in order if repeat % 2 == 0 else order[::-1]:
      load = settle()
      found[name].append(measure())
      print(f"repeat {repeat}: {name} {found[name][-1]:,.0f} tokens/s (load {load:.2f})")
  mine, theirs = (statistics.median(found[k]) for k in ("ours", "pytorch"))
  shape = f"{FLAGS.layers}x{FLAGS.heads}x{FLAGS.width}, context {FLAGS.context}"
  print("\n| model | batch | PyTorch tokens/s | ours tokens/s | ours / PyTorch |")
  print("|---|---|---|---|---|")
  print(f"| {shape} | {FLAGS.batch_size} | {theirs:,.0f} | {mine:,.0f} | {mine / theirs:.2f}x |")


if __name__ == "__main__":
  app.run(main)
