"""What an algorithm is: pure rules over pytrees, and the facts it declares about itself.

An algorithm never touches a device, a thread, a lock, an actor, a file or a clock: those are
the engines' (easgd_jax/engines), which read the facts below and nothing else, and the trainer
(easgd_jax/trainer.py) is the one loop around them. Adding an algorithm is one file with one
class and one line in `REGISTRY` (algorithms/__init__.py); every engine then runs it.

Two kinds:

- STEP_DRIVEN (`StepRule`: sgd, sync_sgd, sync_easgd, local_sgd, diloco): every replica steps at
  once. `init(params)` is one replica's state; `phases` are per-replica functions
  fn(state, batch) -> (state, loss) whose all-reduces are easgd_jax.collectives'; `phase(step)`
  picks the one run step `step` (0-based) uses. An engine maps them over G replicas: pmap on
  devices, vmap on one device, one replica under jit on a model-parallel mesh.
- WORKER_MASTER (`WorkerMasterRule`: async_sgd, hogwild, async_easgd, hogwild_easgd, downpour,
  round-robin easgd, whose master is Algorithm 1's center, and async_diloco): G workers and one
  master.

    worker_init(params) -> worker state          master_init(params) -> master state
    worker_step(worker, view, batch) -> (worker, message, loss)
    master_apply(master, message, worker) -> (master, reply)

  `view` is what the worker last received from the master (for a step that did not open with
  an exchange in the `opens_round` form, None: the rule then needs no master). Facts:
  `opens_round` (the exchange comes before the step, its message `worker_message(worker)`, and
  the step uses that exchange's reply: EASGD; otherwise the step's own message is sent after
  it: async SGD, DOWNPOUR), `sends(own_step)` (on which of its own steps a worker exchanges),
  `locked` (the master applies one message at a time, or unlocked: Hogwild), `additive` (the
  master is its weights and master_apply adds `increment(weights, message)`: an engine may then
  write it in place without a copy), `schedule` (ASYNCHRONOUS: each worker at its own pace;
  ROUND_ROBIN: Algorithm 1's order, iteration t on worker t mod G), `periods_from_speeds` (each
  worker's exchange period is its own, `periods(speeds)` of the speeds the engine measures once
  and keeps in its checkpoints; `with_period` puts it into the worker's state and the engine
  passes it to `sends`).

`samples_per_step(config)` is what one run step consumes (studies budget in it); a run step is
one step of every replica, or one worker's iteration.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from easgd_jax import models, optimizers, schedule
from easgd_jax.optimizers import OPTIMIZERS, SCHEDULES

STEP_DRIVEN, WORKER_MASTER = "step_driven", "worker_master"
# What the SGD-only algorithms take on a model whose recipe is AdamW (the transformer): plain SGD
# at the rate that trained fastest over 400 steps of the default transformer (0.1, 0.3, 1, 3 tried;
# 1 and 3 reach test loss 2.81, 0.1 2.86; AdamW 2.55 in 200), the gradient clipped as AdamW's is.
SGD_RECIPE = dict(
  optimizer="sgd", learning_rate=1.0, lr_schedule="constant", warmup_steps=0, grad_clip=1.0
)
ASYNCHRONOUS, ROUND_ROBIN = "asynchronous", "round_robin"


class Rule:
  """The facts every algorithm declares; a class overrides what differs."""

  name: str
  kind: str
  elastic = False  # exchanges with a center by Eq. (1)/(2): alpha, stability, gaps
  all_at_once = False  # every worker exchanges at the same moment (stability condition)
  data_parallel = False  # G replicas, one batch each per step from a sharded sampler
  model_parallel = False  # runs on a (data, model) mesh with --model_parallel > 1
  optimizers = OPTIMIZERS  # the inner optimizers it accepts
  optimizers_why = ""  # why, when it accepts fewer (for the error that refuses one)
  schedules = SCHEDULES  # the learning-rate schedules it accepts
  settings = {}  # its own defaults, on every model
  own_flags = ()  # the flags only some algorithms read that this one does (others refuse them)
  streams = False  # splits, overlaps and quantizes an outer gradient (config.STREAMING's flags)

  @classmethod
  def defaults(cls, config):
    """Its defaults for the settings not given (config.OTHERWISE's), for config.model: the
    model's training recipe (models.TRAINING), then its own `settings`."""
    found = {**models.TRAINING.get(config.model, {}), **cls.settings}
    if cls.elastic and config.model in models.TRAINING:  # with AdamW inside, eta * rho ~ 1e-3
      found["alpha"] = 0.9 / config.num_devices  # would barely couple: beta = G alpha = 0.9
    if cls.optimizers == ("sgd",) and config.model in models.TRAINING:
      found.update(SGD_RECIPE)  # an unlocked in-place write takes plain, constant SGD
    return found

  @classmethod
  def samples_per_step(cls, config):
    """Samples one run step consumes (studies budget in these; throughput counts them)."""
    if config.model_parallel > 1:
      data = config.num_devices // config.model_parallel if cls.data_parallel else 1
      return config.batch_size * data
    return config.batch_size * (config.num_devices if cls.data_parallel else 1)

  @classmethod
  def steps_per_count(cls, config):
    """Run steps per step of one worker's optimizer: G when a run step is one worker's."""
    return config.num_devices if cls.kind == WORKER_MASTER else 1

  @classmethod
  def inner_optimizer(cls, config):
    return optimizers.from_config(config, cls.steps_per_count(config))


class Transfer(NamedTuple):
  """One all-reduce a step-driven rule starts after a run step (what the cluster clock costs)."""

  num_bytes: float  # what each worker puts into it (the whole float32 model: the default)
  overlap_steps: int = 0  # inner steps that run while it travels; its result lands after them


class StepRule(Rule):
  kind = STEP_DRIVEN
  phases: tuple  # per-replica fn(state, batch) -> (state, loss), set by the subclass
  tau = 1  # with two phases: the exchange phase every tau-th step ...
  opens_round = False  # ... opening a round (steps 0, tau, ...) or closing it (tau - 1, ...)

  def phase(self, step):
    """The index in `phases` of the function run step `step` (0-based) uses: 1 on an exchange
    step, when there are two phases (local steps, then the exchange); else 0."""
    return int(len(self.phases) > 1 and schedule.exchanges(step, self.tau, self.opens_round))

  def eval_params(self, state):
    """The weights to evaluate, from one replica's state."""
    return state.params

  def diagnostics(self, state):
    """{name: scalar} of one replica's state, added to each evaluation row (none here)."""
    return {}

  def transfers(self, step, num_bytes):
    """The all-reduces that start after run step `step` (0-based), for `num_bytes` the whole
    float32 model: by default, on a data-parallel rule's exchange steps, the whole model, waited
    for before the next step."""
    if not (self.data_parallel and schedule.exchanges(step, self.tau, self.opens_round)):
      return ()
    return (Transfer(num_bytes),)

  def worker_point(self, state):
    """x^i of one replica beside the center (the gap diagnostic), or None."""
    return None


class WorkerMasterRule(Rule):
  kind = WORKER_MASTER
  schedule = ASYNCHRONOUS
  opens_round = False
  locked = True
  additive = False
  tau = 1  # the worker's exchange period, in its own steps
  periods_from_speeds = False  # each worker's own period, from the speeds an engine measures

  def sends(self, own_step, period=None):
    """Whether a worker exchanges on its own step `own_step` (0-based; an int or traced), every
    `period` own steps (its entry of `periods`; tau when not given)."""
    return schedule.exchanges(own_step, self.tau if period is None else period, self.opens_round)

  def periods(self, speeds):
    """Each worker's exchange period, given every worker's speed (steps per second): tau."""
    return [self.tau] * len(speeds)

  def with_period(self, worker, period):
    """A worker state that exchanges every `period` own steps (the same, when that is tau)."""
    return worker

  def worker_message(self, worker):
    """What a worker sends when an exchange opens its step (the `opens_round` form)."""
    raise NotImplementedError

  def increment(self, weights, message):
    """An `additive` master's change: master_apply is weights + increment(weights, message)."""
    raise NotImplementedError

  def master_apply(self, master, message, worker):
    """The additive form; the reply is the weights read (opening) or written (closing)."""
    del worker
    new = jax.tree.map(jnp.add, master, self.increment(master, message))
    return new, (master if self.opens_round else new)

  def eval_params(self, master):
    return master

  def worker_point(self, worker, view):
    """x^i of a worker beside the center (the gap diagnostic), given its last reply (None for
    an `opens_round` rule), or None."""
    return None
