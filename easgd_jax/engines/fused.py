"""Fused execution for the simulated cluster: all G workers' states stacked on one device.

The simulated engine (simulated.py) runs a cluster's arithmetic on one
device: every worker's weights and optimizer state stacked along a leading axis of G, the
training set on the device, and each iteration's batch gathered there by the example numbers the
local engine's host sampler draws (`data.Sampler.indices`: same seed, same stream). Iterations
run as one `lax.scan` per chunk, one dispatch per chunk instead of one per iteration. The update
rules are the algorithm's own jitted functions, called inside the scan; nothing is rewritten.

Round-robin EASGD (Algorithm 1) first: iteration t takes worker j = t mod G's slice, applies
Eq. (2) to the center on j's exchange steps (its own steps 0, tau, 2 tau, ...) and Eq. (1) to
the slice, and writes the slice back.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from easgd_jax import devices
from easgd_jax.algorithms.easgd import EASGDState


class Stacked(NamedTuple):
  """EASGDState with every worker's pytree stacked on a leading axis, all on one device."""

  center: Any
  locals: Any  # leaves [G, ...]
  opt_states: Any  # leaves [G, ...]
  step: jax.Array  # t, an int32 scalar


def stack(state: EASGDState, device) -> Stacked:
  """The round-robin state on one device, its workers stacked."""
  host = jax.tree.map(np.asarray, state)  # the workers' pytrees may live on different devices
  stacked = Stacked(
    center=host.center,
    locals=jax.tree.map(lambda *xs: np.stack(xs), *host.locals),
    opt_states=jax.tree.map(lambda *xs: np.stack(xs), *host.opt_states),
    step=np.int32(state.step),
  )
  return devices.put(stacked, device)


def unstack(stacked: Stacked, num_workers) -> EASGDState:
  """Back to the local engine's layout (host arrays; the algorithm's `init` says the devices)."""
  host = jax.tree.map(np.asarray, stacked)
  pick = lambda tree, j: jax.tree.map(lambda x: x[j], tree)  # noqa: E731
  return EASGDState(
    center=host.center,
    locals=tuple(pick(host.locals, j) for j in range(num_workers)),
    opt_states=tuple(pick(host.opt_states, j) for j in range(num_workers)),
    step=int(host.step),
  )


def round_robin(algorithm, images, labels):
  """run(stacked, indices) -> (stacked, losses): Algorithm 1 over `indices` [iterations, b],
  iteration k's batch being images[indices[k]], as one jitted lax.scan. `images` and `labels`
  are the training set, on the device the state is on."""
  num_workers, tau = algorithm.num_workers, algorithm.tau
  elastic_step, center_update = algorithm._elastic_step, algorithm._center_update

  def iteration(state: Stacked, xs):
    index, poison = xs
    j = state.step % num_workers
    exchange = (state.step // num_workers) % tau == 0
    local = jax.tree.map(lambda x: x[j], state.locals)
    opt_state = jax.tree.map(lambda x: x[j], state.opt_states)
    image = jnp.where(poison, jnp.nan, images[index])  # --inject_nan: this batch all NaN
    batch = {"image": image, "label": labels[index]}
    # Eq. (2) with W^j_t before its update, on j's exchange steps only.
    center = jax.lax.cond(
      exchange, lambda: center_update(state.center, local, opt_state), lambda: state.center
    )
    # Eq. (1): the gate in the optimizer state is 0 between exchanges, so the center read there
    # adds nothing; the local engine passes W^j itself, which gives the same numbers.
    local, opt_state, loss = elastic_step(local, opt_state, state.center, batch)
    put = lambda stacked, x: stacked.at[j].set(x)  # noqa: E731
    state = Stacked(
      center=center,
      locals=jax.tree.map(put, state.locals, local),
      opt_states=jax.tree.map(put, state.opt_states, opt_state),
      step=state.step + 1,
    )
    return state, loss

  @jax.jit
  def run(stacked, indices, poison=None):
    """`poison`: [iterations] bools, the iterations whose batch is all NaN (default none)."""
    indices = jnp.asarray(indices)
    if poison is None:
      poison = jnp.zeros(indices.shape[:1], bool)
    return jax.lax.scan(iteration, stacked, (indices, poison))

  return run
