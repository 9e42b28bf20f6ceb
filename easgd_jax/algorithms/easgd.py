"""Round-robin EASGD: Algorithm 1 of the seed ("Original EASGD on multi-GPU system").

G workers each keep local weights W^j on their own device; the center W-bar lives on device 0.
Iteration t uses worker j = t mod G:

  line 8   the host copies b random samples to device j;
  line 9   W-bar_t is sent to device j;
  line 11  W^j_t is sent to device 0;
  line 13  device 0: W-bar_{t+1} = W-bar_t + alpha * (W^j_t - W-bar_t)                  Eq. (2)
  line 10  device j: forward and backward at W^j_t give Delta W^j_t;
  line 12  device j: W^j_{t+1} = W^j_t + u(Delta W^j_t) - alpha * (W^j_t - W-bar_t)     Eq. (1)

with u the inner optimizer's update (-eta * Delta W for SGD) and alpha = eta * rho. With tau > 1
the exchange (lines 9-13) happens on worker j's every tau-th own step, counting from its first
(as in Zhang et al.'s EASGD), and the other steps are local steps; the gate is in the worker's
optimizer state (elastic.py), and the host, which knows the same count, moves weights only then.
With Nesterov momentum W^j_t in lines 11-13 is the worker's point x^j (EAMSGD, Algorithm 2).

Eq. (2) needs W^j_t, the weights *before* worker j's update, so the center never waits for a
gradient: it is enqueued on device 0 ahead of the worker's step, and with JAX's asynchronous
dispatch the next worker can start while this one still computes. The host never blocks here.
"""

from typing import Any, NamedTuple

import jax

from easgd_jax import core, devices, elastic
from easgd_jax.algorithms.base import Defaults


class EASGDState(NamedTuple):
  center: Any  # W-bar, on device 0
  locals: tuple  # W^j, each on worker j's device
  opt_states: tuple  # worker j's elastic optimizer state (its count, its inner state), beside W^j
  step: int  # t, iterations done so far (all workers together)


class RoundRobinEASGD(Defaults):
  """The host-side scheduler. Drive it from a notebook with `init` and `step` (or `run`)."""

  name = "easgd"
  engines = ("local", "ray", "simulated")
  elastic = True
  batches_per_step = 1  # one worker, one batch per iteration

  def __init__(
    self,
    loss_fn,
    *,
    num_workers,
    learning_rate=None,
    rho=None,
    tau=1,
    momentum=0.0,
    alpha=None,
    optimizer=None,
    available_devices=None,
  ):
    """alpha, or rho with the base learning_rate (alpha = learning_rate * rho); `optimizer` is
    the inner optax transformation (default SGD at learning_rate, Nesterov with momentum)."""
    core.check_hyperparameters(momentum=momentum, tau=tau, num_workers=num_workers)
    self.num_workers, self.tau = num_workers, tau
    self.alpha = core.moving_rate(alpha, learning_rate, rho)
    self.devices = devices.worker_devices(num_workers, available_devices)
    self.center_device = self.devices[0]
    inner = core.inner_or_default(optimizer, learning_rate, momentum)
    self.optimizer = elastic.elastic(inner, self.alpha, tau)
    elastic_step = core.make_elastic_step(loss_fn, self.optimizer)

    def center_update(center, local, opt_state):
      return elastic.center_update(center, elastic.gap(local, opt_state, center), self.alpha)

    def fused_step(local, opt_state, center, batch):
      # Everything on one device: one dispatch instead of two, same arithmetic.
      new_center = center_update(center, local, opt_state)
      local, opt_state, loss = elastic_step(local, opt_state, center, batch)
      return local, opt_state, new_center, loss

    self._elastic_step = jax.jit(elastic_step)
    self._center_update = jax.jit(center_update)
    self._fused_step = jax.jit(fused_step)
    # Fusing is only safe on a single device: with several, the center would then wait for
    # device 0's gradient and the other workers would stall behind it.
    self._fused = len(set(self.devices)) == 1

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    return cls(
      loss_fn,
      num_workers=config.num_devices,
      alpha=config.moving_rate,
      tau=config.tau,
      optimizer=cls.inner_optimizer(config),
      available_devices=available_devices,
    )

  def init(self, params_host) -> EASGDState:
    """Algorithm 1, lines 3-5: copy W to every worker and to the center."""
    opt_state_host = self.optimizer.init(params_host)
    return EASGDState(
      center=devices.put(params_host, self.center_device),
      locals=tuple(devices.put(params_host, d) for d in self.devices),
      opt_states=tuple(devices.put(opt_state_host, d) for d in self.devices),
      step=0,
    )

  def worker(self, step):
    """(j, exchange): the worker of iteration `step` and whether it exchanges with the center."""
    j = step % self.num_workers
    own_step = step // self.num_workers
    return j, own_step % self.tau == 0

  def step(self, state: EASGDState, batch_host):
    """One iteration t; returns the new state and worker j's batch loss (still on device)."""
    j, exchange = self.worker(state.step)
    device = self.devices[j]
    batch = devices.put(batch_host, device)
    local, opt_state, center = state.locals[j], state.opt_states[j], state.center
    if exchange and self._fused:
      local, opt_state, center, loss = self._fused_step(local, opt_state, center, batch)
    elif exchange:
      center_at_worker = devices.put(center, device)
      local_at_center = devices.put((local, opt_state), self.center_device)
      center = self._center_update(center, *local_at_center)
      local, opt_state, loss = self._elastic_step(local, opt_state, center_at_worker, batch)
    else:  # the gate is 0: any center gives a plain local step; W^j itself costs no transfer
      local, opt_state, loss = self._elastic_step(local, opt_state, local, batch)
    new_state = EASGDState(
      center=center,
      locals=_replace(state.locals, j, local),
      opt_states=_replace(state.opt_states, j, opt_state),
      step=state.step + 1,
    )
    return new_state, loss

  # Worker j's rule and the center's rule, apart (the Ray engine runs them on different nodes).

  def worker_step(self, local, opt_state, center, batch):
    """Line 10 and 12 on worker j: Eq. (1) against `center`, or a local step when it is None."""
    return self._elastic_step(local, opt_state, local if center is None else center, batch)

  def center_step(self, center, local, opt_state):
    """Line 13 on device 0: Eq. (2) with worker j's W^j_t (its point x^j)."""
    return self._center_update(center, local, opt_state)

  def run(self, state: EASGDState, batches):
    """Apply `step` for each host batch in order; returns the final state and the losses."""
    losses = []
    for batch in batches:
      state, loss = self.step(state, batch)
      losses.append(loss)
    return state, losses

  def eval_params(self, state: EASGDState):
    return state.center

  def worker_points(self, state: EASGDState):
    return [elastic.point(w, s) for w, s in zip(state.locals, state.opt_states, strict=True)]


def _replace(items, index, value):
  return items[:index] + (value,) + items[index + 1 :]
