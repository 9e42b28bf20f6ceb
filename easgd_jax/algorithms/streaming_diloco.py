"""Streaming DiLoCo (Douillard et al., 2025, arXiv 2501.18512): DiLoCo's outer step taken on one
fragment of the model at a time, overlapped with inner steps, on a quantized pseudo-gradient.

The layers are dealt into P fragments, layer l to fragment l mod P (the paper's strided
pattern), and fragment p syncs after inner step t when (t + 1) = (p + 1) H / P (mod H): each
every H steps, the P spread evenly (torchft's offsets; with P = 1 where `diloco` averages):

  every step        W^i <- W^i + u_i(Delta W^i)                    inner optimizer, AdamW
  p's sync, step t  g_p = (1/G) sum_i deq(q(W-bar_p - W^i_p))      one all-reduce, quantized
  step t + tau      W-bar_p <- W-bar_p + outer_p(g_p)              Nesterov SGD, p's own state
                    W^i_p <- alpha W^i_p + (1 - alpha) W-bar_p     W^i_p: after the tau steps

tau (--overlap_steps, < H / P) inner steps run while g_p travels; the worker's fragment then
keeps the share alpha (--merge_alpha) of what it learned meanwhile, its inner optimizer state
untouched, and its next pseudo-gradient is taken against the new W-bar_p. q (--quantize,
easgd_jax/quantize.py) is applied once, before the reduction, which sums in float32. With P = 1,
tau = 0, alpha = 0 and no quantization this is `diloco`, bitwise: unquantized, the reduction is
of the weights (W-bar - mean_i W^i), the same sum as DiLoCo's.

The layers: the numbered top-level modules (Dense_0, Conv_1, block_2) in name order, numbers
counted as numbers (Conv_*, then Dense_*: the image models' forward order), one layer each; the
unnumbered ones (the transformer's token embedding wte, which is also its tied head, the
position embedding wpe and the final norm ln_f) one more, first. An MLP has 3 layers, LeNet 5,
the 4-block transformer 5; more fragments than layers is refused.
"""

import numbers
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from easgd_jax import collectives, core
from easgd_jax import quantize as quantization
from easgd_jax.algorithms.base import Transfer
from easgd_jax.algorithms.diloco import DiLoCo
from easgd_jax.errors import ConfigError


def layers(params):
  """The model's layers in order, each a list of top-level module names (see above)."""
  numbered = {name: re.fullmatch(r"(.*)_(\d+)", name) for name in params}
  order = sorted((m[1], int(m[2]), name) for name, m in numbered.items() if m)
  rest = sorted(name for name, m in numbered.items() if not m)
  return ([rest] if rest else []) + [[name] for *_, name in order]


def fragments(params, count):
  """The top-level names in each of `count` fragments: layer l in fragment l mod count."""
  found = layers(params)
  if count > len(found):
    raise ConfigError(
      f"--fragments={count} is more than the model's {len(found)} layers "
      f"({', '.join('+'.join(names) for names in found)}); use --fragments <= {len(found)}"
    )
  return [sum(found[p::count], []) for p in range(count)]


def syncing(step, tau, count):
  """The fragment that syncs after inner step `step` (0-based), or None: fragment p when
  (step + 1) = (p + 1) tau / count (mod tau)."""
  offset, period = (step + 1) % tau, tau // count
  return None if offset % period else (offset // period - 1) % count


def _part(tree, names):
  return {name: tree[name] for name in names}


class StreamingDiLoCoState(NamedTuple):
  center: Any  # W-bar: each fragment as its last outer step left it (the same on every replica)
  outer_state: tuple  # fragment p's outer optimizer state, one per fragment
  in_flight: tuple  # g_p between fragment p's sync and its outer step (tau > 0; else empty)
  local: Any  # W^i
  opt_state: Any  # worker i's own inner optimizer state
  quantization_error: Any  # the last sync's ||deq(q(Delta)) - Delta|| / ||Delta||, all workers


class StreamingDiLoCo(DiLoCo):
  name = "streaming_diloco"
  streams = True

  @classmethod
  def defaults(cls, config):
    """DiLoCo's (AdamW inside, H = 10) and 2 fragments: one of them syncs every 5 steps."""
    return {**super().defaults(config), "fragments": 2}

  def __init__(
    self,
    loss_fn,
    *,
    tau=1,
    fragments=1,
    overlap_steps=0,
    merge_alpha=0.0,
    quantize="none",
    learning_rate=None,
    optimizer=None,
    outer_learning_rate=0.7,
    outer_momentum=0.9,
  ):
    core.check_hyperparameters(tau=tau, fragments=fragments)
    if tau % fragments:
      raise ValueError(f"tau must be a multiple of fragments (got {tau!r}, {fragments!r})")
    if not (isinstance(overlap_steps, numbers.Integral) and 0 <= overlap_steps < tau // fragments):
      raise ValueError(f"overlap_steps must be in [0, tau / fragments) (got {overlap_steps!r})")
    if not 0 <= merge_alpha <= 1:
      raise ValueError(f"merge_alpha must be in [0, 1] (got {merge_alpha!r})")
    if quantize not in quantization.FORMATS:
      raise ValueError(
        f"quantize must be one of {', '.join(quantization.FORMATS)} (got {quantize!r})"
      )
    # DiLoCo's inner and outer optimizers, checked there
    super().__init__(
      loss_fn,
      tau=tau,
      learning_rate=learning_rate,
      optimizer=optimizer,
      outer_learning_rate=outer_learning_rate,
      outer_momentum=outer_momentum,
    )
    self.count, self.overlap = fragments, overlap_steps
    self.alpha, self.format = merge_alpha, quantize
    inner_step = core.make_sgd_step(loss_fn, self.optimizer)

    def local_step(state, batch):
      local, opt_state, loss = inner_step(state.local, state.opt_state, batch)
      return state._replace(local=local, opt_state=opt_state), loss

    def sync(p):  # after the inner step g_p leaves; with no overlap it lands at once
      def phase(state, batch):
        state, loss = local_step(state, batch)
        g, error = self.pseudo_gradient(state, p)
        state = state._replace(quantization_error=error)
        if overlap_steps:
          return state._replace(in_flight=_replaced(state.in_flight, p, g)), loss
        return self.outer_step(state, p, g), loss

      return phase

    def land(p):  # tau inner steps after fragment p's sync
      def phase(state, batch):
        state, loss = local_step(state, batch)
        return self.outer_step(state, p, state.in_flight[p]), loss

      return phase

    lands = tuple(land(p) for p in range(fragments)) if overlap_steps else ()
    self.phases = (local_step, *(sync(p) for p in range(fragments)), *lands)

  def phase(self, step):
    """0: an inner step; 1 + p: one after which fragment p syncs (and, with no overlap, takes
    its outer step); 1 + P + p: one after which fragment p's outer step lands."""
    p = syncing(step, self.tau, self.count)
    if p is not None:
      return 1 + p
    sent = step - self.overlap  # the step whose g_p lands now
    p = syncing(sent, self.tau, self.count) if self.overlap and sent >= 0 else None
    return 0 if p is None else 1 + self.count + p

  def pseudo_gradient(self, state, p):
    """(g_p, the relative quantization error over every worker's Delta_p)."""
    names = fragments(state.local, self.count)[p]
    center, local = _part(state.center, names), _part(state.local, names)
    if self.format == "none":  # the mean of the weights, as DiLoCo's
      return jax.tree.map(jnp.subtract, center, collectives.replica_mean(local)), jnp.float32(0)
    delta = jax.tree.map(jnp.subtract, center, local)
    sent = quantization.roundtrip(delta, self.format)
    lost, total = (_squares(t) for t in (jax.tree.map(jnp.subtract, sent, delta), delta))
    error = jnp.sqrt(lost / jnp.where(total > 0, total, 1)).astype(jnp.float32)
    return collectives.replica_mean(sent), error

  def outer_step(self, state, p, g):
    """Fragment p's outer step with its own outer state, and the workers' fragments merged."""
    names = fragments(state.local, self.count)[p]
    center = _part(state.center, names)
    updates, outer = self.outer.update(g, state.outer_state[p], center)
    center = optax.apply_updates(center, updates)
    local = jax.tree.map(
      lambda w, c: self.alpha * w + (1 - self.alpha) * c, _part(state.local, names), center
    )
    return state._replace(
      center={**state.center, **center},
      outer_state=_replaced(state.outer_state, p, outer),
      local={**state.local, **local},
    )

  @classmethod
  def from_config(cls, config, loss_fn):
    return cls(
      loss_fn,
      tau=config.tau,
      fragments=config.fragments,
      overlap_steps=config.overlap_steps,
      merge_alpha=config.merge_alpha,
      quantize=config.quantize,
      optimizer=cls.inner_optimizer(config),
      outer_learning_rate=config.outer_learning_rate,
      outer_momentum=config.outer_momentum,
    )

  def init(self, params_host) -> StreamingDiLoCoState:
    names = fragments(params_host, self.count)
    parts = [_part(params_host, n) for n in names]
    # Each fragment's share of the float32 model at the wire width, for `transfers`.
    whole = sum(4 * np.size(x) for x in jax.tree.leaves(params_host))
    self.shares = tuple(
      sum(quantization.wire_bytes(np.shape(x), self.format) for x in jax.tree.leaves(part)) / whole
      for part in parts
    )
    zeros = tuple(jax.tree.map(jnp.zeros_like, part) for part in parts) if self.overlap else ()
    return StreamingDiLoCoState(
      params_host,
      tuple(self.outer.init(part) for part in parts),
      zeros,
      params_host,
      self.optimizer.init(params_host),
      jnp.float32(0),
    )

  def transfers(self, step, num_bytes):
    """After fragment p's sync: its share of the model at the wire width (scales included; the
    shares are known once `init` has seen the model), landing `overlap_steps` steps later."""
    p = syncing(step, self.tau, self.count)
    return () if p is None else (Transfer(num_bytes * self.shares[p], self.overlap),)

  def diagnostics(self, state):
    return {} if self.format == "none" else {"quantization_error": state.quantization_error}


def _squares(tree):
  """The sum of squares of `tree` over every replica's."""
  return collectives.replica_sum(optax.tree.norm(tree, squared=True))


def _replaced(items, p, item):
  return (*items[:p], item, *items[p + 1 :])
