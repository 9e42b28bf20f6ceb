"""Communication period tau: Async EASGD vs Async EAMSGD vs DOWNPOUR (the NeurIPS'15 comparison).

  python experiments/sweep_tau.py --workdir=runs/sweep_tau
      # digits/lenet, G = 4, tau in {1, 4, 16, 64}, 2 seeds: 24 runs, 4.4 minutes on 2 cores

EASGD and EAMSGD (momentum 0.9) exchange with the center on every tau-th step of a worker;
DOWNPOUR pushes its accumulated tau local steps to the master and pulls the master's weights
(at tau = 1 it is async_sgd). The paper finds DOWNPOUR best at small tau and unstable at 16 and
64, where EASGD keeps improving. MDOWNPOUR (--momentum on downpour) is defined for tau = 1 only
and is not swept here. Writes results.md / .csv, the accuracy plots and sweep.png.
"""

from easgd_jax import study

TAUS = (1, 4, 16, 64)
G = 4


# (family, label, overrides): every family at every tau, in this order.
FAMILIES = (
  ("Async EASGD", "EASGD", {"algorithm": "async_easgd"}),
  ("Async EAMSGD", "EAMSGD", {"algorithm": "async_easgd", "momentum": 0.9}),
  ("DOWNPOUR", "DOWNPOUR", {"algorithm": "downpour"}),
)


def make_study(base):
  arms = [
    study.Arm(
      f"{label} tau={tau}",
      {**overrides, "num_devices": G, "tau": tau},
      family=family,
      swept=tau,
    )
    for tau in TAUS
    for family, label, overrides in FAMILIES
  ]
  return study.Study(name="sweep_tau", arms=tuple(arms), base=base, seeds=(0, 1), sweep_name="tau")


if __name__ == "__main__":
  study.main(make_study)
