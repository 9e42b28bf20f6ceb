"""Hogwild: asynchronous SGD with the lock removed; workers write the shared W at the same time.

  worker i:  Delta W^i, loss = gradient(W as it reads it)            (worker_step)
  master:    W <- W - eta * Delta W^i, no lock                       (additive: `increment`)

Declared unlocked and additive, and that is all an engine needs. The local engine reads it the
Hogwild way: W is one flat float32 buffer in host memory that every worker thread reads without
a lock (it may be halfway through another's write) and writes in place (engines/local/threads.py).
On a CPU device the jitted step reads the buffer itself, and the write is one NumPy addition
that releases the GIL, so several workers really do write at once. The simulated engine applies
each write whole, on arrival; the Ray engine's server adds them in place, unlocked.

What can go wrong, and why Hogwild tolerates it: two workers that write the same element at the
same moment can lose one of the two increments (read-modify-write race), and a gradient can be
computed from a W that another worker is halfway through writing. Each lost or mixed update is a
small, bounded perturbation of one SGD step; Niu et al. show SGD still converges when such
collisions are sparse or rare, and here they are rare because a write takes microseconds and a
gradient much longer. The test suite checks that writes do overlap and that accuracy still gets
there. Plain SGD only: a momentum trace shared without a lock would need its own analysis.
"""

import jax
import optax

from easgd_jax import core
from easgd_jax.algorithms.base import WorkerMasterRule


class Hogwild(WorkerMasterRule):
  name = "hogwild"
  locked = False
  additive = True
  optimizers = ("sgd",)
  optimizers_why = "an unlocked in-place write has no optimizer state"
  schedules = ("constant",)  # ... and no step count for a schedule

  def __init__(self, loss_fn, *, learning_rate, grad_clip=0.0):
    core.check_hyperparameters(learning_rate=learning_rate)
    self.eta = learning_rate
    self.gradient = core.make_gradient(loss_fn)
    # Clipping looks at one gradient alone, so it needs no state and stays lock-free.
    self.clip = optax.clip_by_global_norm(grad_clip) if grad_clip else None

  @classmethod
  def from_config(cls, config, loss_fn):
    return cls(loss_fn, learning_rate=config.learning_rate, grad_clip=config.grad_clip)

  def master_init(self, params_host):
    return params_host  # W, nothing else: no optimizer state

  def worker_init(self, params_host):
    return ()

  def worker_step(self, worker, view, batch):
    grads, loss = self.gradient(view, batch)
    if self.clip:
      grads, _ = self.clip.update(grads, self.clip.init(grads))
    return worker, grads, loss

  def increment(self, weights, grads):
    return jax.tree.map(lambda g: -self.eta * g, grads)
