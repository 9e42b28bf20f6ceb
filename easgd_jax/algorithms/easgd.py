"""Round-robin EASGD: Algorithm 1 of the seed ("Original EASGD on multi-GPU system").

G workers each keep local weights W^j; the master is the center W-bar (on device 0 on the local
engine). Iteration t uses worker j = t mod G:

  line 8   the host draws b random samples for worker j;
  line 9   W-bar_t is sent to worker j;                    } the exchange that opens j's step:
  line 11  W^j_t is sent to the master;                    } worker_message, then master_apply
  line 13  master: W-bar_{t+1} = W-bar_t + alpha * (W^j_t - W-bar_t)                  Eq. (2)
  line 10  worker j: forward and backward at W^j_t give Delta W^j_t;
  line 12  worker j: W^j_{t+1} = W^j_t + u(Delta W^j_t) - alpha * (W^j_t - W-bar_t)   Eq. (1)

with u the inner optimizer's update (-eta * Delta W for SGD) and alpha = eta * rho. With tau > 1
the exchange happens on worker j's every tau-th own step, counting from its first (as in Zhang
et al.'s EASGD), and the other steps are local steps. With Nesterov momentum W^j_t in lines 11-13
is the worker's point x^j (EAMSGD, Algorithm 2).

This is Asynchronous EASGD's rule (async_easgd.py), locked, in Algorithm 1's deterministic order
instead of first come first served: `schedule = ROUND_ROBIN` is the only difference. Eq. (2)
needs W^j_t, the weights *before* worker j's update, so the center never waits for a gradient.
"""

from easgd_jax.algorithms.async_easgd import AsyncEASGD
from easgd_jax.algorithms.base import ROUND_ROBIN


class RoundRobinEASGD(AsyncEASGD):
  name = "easgd"
  schedule = ROUND_ROBIN
