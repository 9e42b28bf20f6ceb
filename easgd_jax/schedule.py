"""When workers exchange, written once: the every-tau-th-own-step rule and Algorithm 1's order.

Each works on Python ints and on traced JAX integers alike, so a host scheduler, a jitted phase
and the simulated cluster's clock ask the same function.
"""


def exchanges(own_step, tau, opens):
  """Whether a worker's own step `own_step` (0-based) has an exchange with the master.

  `opens`: the exchange opens the step (EASGD: its steps 0, tau, 2 tau, ...); otherwise it
  closes it (local SGD, DiLoCo, DOWNPOUR: after its steps tau - 1, 2 tau - 1, ...).
  """
  return (own_step if opens else own_step + 1) % tau == 0


def round_robin(step, num_workers):
  """Algorithm 1: iteration t uses worker j = t mod G, which is then at its own step t // G."""
  return step % num_workers, step // num_workers
