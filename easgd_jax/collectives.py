"""The replicas' all-reduce, for the data-parallel phases: one function, whatever runs them.

A phase calls `replica_sum` / `replica_mean` over the axis AXIS and never asks where it runs:

- under `pmap` (the local engine, one replica per device): `lax.psum`, an all-reduce;
- under `vmap(axis_name=AXIS)` (the simulated engine, every replica stacked on one device): a
  product with a vector of ones. Why not lax.psum there too: under vmap it becomes a reduction
  over the leading axis, which XLA:CPU runs ~6x slower than the product (64 replicas of a
  235k-weight MLP: 140 ms against 23 ms), and a sync_easgd step spent most of its time in it;
- with the axis unbound (one replica under plain jit: a model-parallel mesh, where GSPMD sums
  the gradient over the whole batch itself): the identity;
- traced inside `deferred(reduce)` (the Ray engine, whose replicas are processes): `reduce`'s
  own, a host call to its reducer, the phase going on with what comes back.

A worker may itself be several devices (--devices_per_worker): `worker_mean` averages over the
axis INNER of one worker's devices (core.make_gradient applies it to every gradient), the
identity when that axis is unbound.
"""

import contextlib

import jax
import jax.numpy as jnp

AXIS = "devices"  # the axis every collective names; engines map or vmap the phases over it
INNER = "worker_devices"  # the devices of one worker, when it has several
_deferred = []  # the reducers phases are being traced for (innermost last)


def _bound(axis=AXIS):
  try:
    jax.lax.axis_size(axis)
  except NameError:
    return False
  return True


@contextlib.contextmanager
def deferred(reduce):
  """While tracing under this, a replica reduction of `tree` is `reduce(tree, mean)`: an
  engine whose replicas are not devices reduces across them its own way."""
  _deferred.append(reduce)
  try:
    yield
  finally:
    _deferred.pop()


def _over_replicas(mean):
  @jax.custom_batching.custom_vmap
  def reduce(x):
    if not _bound():
      return x
    return jax.lax.pmean(x, AXIS) if mean else jax.lax.psum(x, AXIS)

  @reduce.def_vmap
  def batched(axis_size, in_batched, x):
    (is_batched,) = in_batched
    if not is_batched:  # the same value on every replica
      return (x if mean else x * axis_size), False
    flat = x.reshape(axis_size, -1)
    total = (jnp.ones((1, axis_size), x.dtype) @ flat).reshape(x.shape[1:])
    if mean:
      total = total / axis_size
    return jnp.broadcast_to(total, x.shape), True

  return reduce


_sum, _mean = _over_replicas(mean=False), _over_replicas(mean=True)


def replica_sum(tree):
  """The sum of `tree` over the replicas, the same on every replica."""
  if _deferred:
    return _deferred[-1](tree, False)
  return jax.tree.map(_sum, tree)


def replica_mean(tree):
  if _deferred:
    return _deferred[-1](tree, True)
  return jax.tree.map(_mean, tree)


def worker_mean(tree):
  """The mean of `tree` over one worker's devices (INNER), or `tree` itself when it has one."""
  if not _bound(INNER):
    return tree
  return jax.tree.map(lambda x: jax.lax.pmean(x, INNER), tree)
