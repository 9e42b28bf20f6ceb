"""Communication period tau: Async EASGD vs Async EAMSGD vs async SGD (the NeurIPS'15 comparison).

  python experiments/sweep_tau.py --workdir=runs/sweep_tau
      # digits/lenet, G = 4, tau in {1, 4, 16, 64}, 2 seeds: 18 runs, ~4 minutes on 2 cores
      # (at the ~11-13 s a digits run measured for sweep_rho and compare_algorithms)

EASGD and EAMSGD (momentum 0.9) exchange with the center on every tau-th step of a worker.
async_sgd pushes every gradient (it has no tau; DOWNPOUR's accumulated pushes are not
implemented), so it is run once per seed and drawn at every tau as the reference line.
Writes results.md / .csv, the accuracy plots and sweep.png.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from easgd_jax import study  # noqa: E402

TAUS = (1, 4, 16, 64)
G = 4


def make_study(base):
  arms = []
  for tau in TAUS:
    arms.append(
      study.Arm(
        f"EASGD tau={tau}",
        {"algorithm": "async_easgd", "num_devices": G, "tau": tau},
        family="Async EASGD",
        swept=tau,
      )
    )
    arms.append(
      study.Arm(
        f"EAMSGD tau={tau}",
        {"algorithm": "async_easgd", "num_devices": G, "tau": tau, "momentum": 0.9},
        family="Async EAMSGD",
        swept=tau,
      )
    )
  arms.append(
    study.Arm("async SGD", {"algorithm": "async_sgd", "num_devices": G}, family="async SGD")
  )
  return study.Study(name="sweep_tau", arms=tuple(arms), base=base, seeds=(0, 1), sweep_name="tau")


if __name__ == "__main__":
  study.main(make_study)
